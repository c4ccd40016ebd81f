"""What the compiled core and the Python package agree on: the exception classes the core raises
by name, and the format tag of the structures it returns (docs/structures-format.md)."""

from __future__ import annotations

import inspect
import json

import pytest

from structprune import _core, errors
from structprune.errors import GraphError, StructpruneError
from structprune.tracing.graph import STRUCTURES_FORMAT, STRUCTURES_VERSION, StructureGraph


def test_every_error_class_the_core_raises_exists_in_errors() -> None:
    # _core.ERROR_CLASSES is rust/src/error.rs's PYTHON_CLASSES, which a Rust test checks every
    # error variant maps into.
    assert _core.ERROR_CLASSES
    for name in _core.ERROR_CLASSES:
        cls = getattr(errors, name, None)
        assert inspect.isclass(cls) and issubclass(cls, StructpruneError), f"structprune.errors has no StructpruneError {name}"
        assert name in errors.__all__


def test_structures_from_the_core_carry_the_format_python_reads() -> None:
    ir = {"format": "structprune.traced-graph", "version": 1, "params": [], "nodes": [], "outputs": []}
    document = json.loads(_core.build_structures(json.dumps(ir)))
    assert (document["format"], document["version"]) == (STRUCTURES_FORMAT, STRUCTURES_VERSION)
    assert StructureGraph.from_core(document, {}, {}).structures == []


@pytest.mark.parametrize("tag", [{"format": STRUCTURES_FORMAT, "version": STRUCTURES_VERSION + 1}, {"format": "other", "version": 1}, {}])
def test_structures_of_another_format_or_version_are_refused(tag: dict) -> None:
    document = {**tag, "structures": [], "pinned": [], "blocks": None, "params": {}}
    with pytest.raises(GraphError, match="rebuild it"):
        StructureGraph.from_core(document, {}, {})
