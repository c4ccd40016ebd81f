"""The golden traced graphs of rust/tests/data/graphs/ (what `cargo test --test graph` tests the
graph rules on) and the examples docs/traced-graph.md and docs/structures-format.md show from them
are what the current tracer produces. tests/golden_graphs.py regenerates them."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import golden_graphs  # noqa: E402

REGENERATE = "regenerate with `.venv/bin/python tests/golden_graphs.py` (then `STRUCTPRUNE_BLESS=1 cargo test --test graph`) and review the diff"


def golden(name: str) -> dict:
    return json.loads(golden_graphs.ir_path(name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", golden_graphs.names())
def test_golden_ir_is_what_the_tracer_produces(name: str) -> None:
    import torch
    import transformers

    made_with = golden(name)["model"]["versions"]
    installed = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    if made_with != installed:
        # torch.export's graph of transformers' code changes with either library: a newer release
        # is not a regression of this project (the tracer's own tests cover it), only stale goldens.
        pytest.skip(f"the goldens were traced with {made_with}, this is {installed}: {REGENERATE}")
    traced = golden_graphs.pinned(golden_graphs.trace(name))
    stored = golden_graphs.pinned(golden(name))
    if traced != stored:
        changed = [i for i, (a, b) in enumerate(zip(traced["nodes"], stored["nodes"])) if a != b]
        where = f"first differing node {changed[0]}" if changed else f"{len(traced['nodes'])} nodes traced, {len(stored['nodes'])} stored"
        pytest.fail(f"{golden_graphs.ir_path(name)} is stale ({where}): {REGENERATE}")


def test_traced_graph_example_is_rendered_from_the_llama_golden() -> None:
    documented = golden_graphs.documented_section()
    assert documented is not None, f"{golden_graphs.DOC} lost its generated example markers"
    assert documented == golden_graphs.example_section(golden("llama")), f"the example of {golden_graphs.DOC} is stale: {REGENERATE}"


def test_structures_example_is_part_of_the_llama_golden() -> None:
    text = (golden_graphs.ROOT / "docs" / "structures-format.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- structures-example -->\n```json\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert match, "docs/structures-format.md lost its checked example"
    shown = json.loads(match.group(1))
    stored = json.loads((golden_graphs.DATA / "llama.structures.json").read_text(encoding="utf-8"))["structures"]
    assert len(shown) == 2
    for structure in shown:
        assert structure == stored[structure["id"]], f"structure {structure['id']} of docs/structures-format.md differs from the golden"
