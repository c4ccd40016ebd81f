"""Fuzzing the public API with mutated real inputs: safetensors headers (byte and JSON edits) under
``read_checkpoint`` and ``apply_plan``, and cut plans (JSON edits, text edits) under
``CutPlan.from_dict``, ``CutPlan.from_json`` and ``apply_plan``. Every failure must be a
``StructpruneError`` subclass (naming the file, for a broken checkpoint), never another exception
or a panic; no example may hang (a watchdog ends the run) or grow memory by much.

Example counts are CI's; ``STRUCTPRUNE_EXAMPLE_SCALE`` multiplies them (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import faulthandler
import json
import resource
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import structprune
from ckpt import encode_header, encode_safetensors, examples, plan_dict
from hypothesis import given, settings
from hypothesis import strategies as st
from structprune.errors import PlanError, StructpruneError

TENSORS = {
    "embed.weight": np.arange(24, dtype=np.float32).reshape(6, 4),
    "layers.0.up.weight": np.arange(12, dtype=np.float16).reshape(3, 4),
    "layers.0.up.bias": np.arange(3, dtype=np.float32),
    "step": np.array(7, dtype=np.int64),
}
VALID = encode_safetensors(TENSORS, {"format": "pt"})
CONFIG = {"hidden_size": 4, "intermediate_size": 3}
PLAN = plan_dict(
    {
        "embed.weight": {"keep": {"1": "hidden"}},
        "layers.0.up.weight": {"keep": {"0": [0, 2], "1": "hidden"}, "rename": "layers.0.up_proj.weight"},
        "layers.0.up.bias": {"keep": {"0": [0, 2]}, "replace": {"fill": 0.5}},
        "layers.0.o.bias": {"add": {"dtype": "F32", "shape": [3], "values": [1.0, 2.0, 3.0]}},
        "step": {"drop": True},
    },
    index_sets={"hidden": [0, 1, 3]},
    config={"hidden_size": 3, "intermediate_size": 2},
)
# Words the readers give meaning to, so that mutations get past the first type check.
WORDS = [
    "format", "version", "tensors", "index_sets", "config", "files", "metadata", "keep", "drop", "rename", "add",
    "replace", "dtype", "shape", "values", "fill", "file", "tensor", "data_offsets", "__metadata__", "hidden",
    "F32", "F16", "BF16", "F4", "I64", "BOOL", "Q7", "structprune.cut-plan", *TENSORS, "0", "1", "", "..", "/",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from(WORDS) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
# A regression that blocks (a FIFO opened, an endless loop) ends the run instead of hanging it.
WATCHDOG_SECONDS = 600
# Peak RSS may grow this much over a whole test: the inputs are a few hundred bytes.
MEMORY_SLACK_BYTES = 256 << 20


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    faulthandler.cancel_dump_traceback_later()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MEMORY_SLACK_BYTES, f"peak memory grew by {grown / 2**20:.0f} MiB"


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every node of a JSON document, as the keys leading to it (the root is ``()``)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, prefix + (index,))
    return found


def edited(document: Any, data: st.DataObject) -> Any:
    """``document`` after one to four random edits: a node replaced, removed or given a member."""
    doc = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(paths(doc)))
        new = data.draw(JSON)
        if not path:
            doc = new
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "remove", "insert"]))
        target = parent[path[-1]]
        if action == "remove":
            del parent[path[-1]]
        elif action == "insert" and isinstance(target, dict):
            target[data.draw(st.sampled_from(WORDS) | st.text(max_size=6))] = new
        elif action == "insert" and isinstance(target, list):
            target.append(new)
        else:
            parent[path[-1]] = new
    return doc


def header_json() -> dict[str, Any]:
    (length,) = struct.unpack("<Q", VALID[:8])
    return json.loads(VALID[8 : 8 + length])


def data_bytes() -> bytes:
    (length,) = struct.unpack("<Q", VALID[:8])
    return VALID[8 + length :]


@st.composite
def broken_files(draw: Callable[..., Any]) -> bytes:
    """The bytes of model.safetensors after an edit of its header's JSON, its bytes or its length."""
    kind = draw(st.sampled_from(["json", "bytes", "length", "truncate"]))
    if kind == "json":
        return encode_header(edited(header_json(), draw(st.data())), data_bytes())
    blob = bytearray(VALID)
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 8))):
            blob[draw(st.integers(0, len(VALID) - 1))] = draw(st.integers(0, 255))
    elif kind == "length":
        blob[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(VALID))))
    else:
        del blob[draw(st.integers(0, len(VALID))) :]
    return bytes(blob)


def checkpoint(root: Path, blob: bytes = VALID) -> Path:
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(blob)
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    return model_dir


def assert_reported(err: BaseException, *names: str) -> None:
    assert isinstance(err, StructpruneError), f"{type(err).__name__} is not a StructpruneError: {err}"
    for name in names:
        assert name in str(err), f"{name!r} not named in: {err}"


@settings(max_examples=examples(300))
@given(blob=broken_files())
def test_broken_headers_are_reported_with_the_file(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = checkpoint(Path(tmp), blob)
        shard = str(model_dir / "model.safetensors")
        for call in (lambda: structprune.read_checkpoint(model_dir), lambda: structprune.apply_plan(model_dir, plan_dict(), Path(tmp) / "out")):
            try:
                call()
            except Exception as err:  # noqa: BLE001 - the point is which exceptions come out
                assert_reported(err, shard)
                assert getattr(err, "path", None) == shard
                assert not (Path(tmp) / "out").exists()


@settings(max_examples=examples(300))
@given(data=st.data())
def test_mutated_plans_are_applied_or_refused(data: st.DataObject) -> None:
    plan = edited(PLAN, data)
    try:
        structprune.CutPlan.from_dict(plan)
    except Exception as err:  # noqa: BLE001
        assert_reported(err)
    if not isinstance(plan, dict):
        return  # apply_plan reads a string as a plan file's path, and refuses others by type
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = checkpoint(Path(tmp))
        try:
            structprune.apply_plan(model_dir, plan, Path(tmp) / "out")
        except Exception as err:  # noqa: BLE001
            assert_reported(err)
            assert not (Path(tmp) / "out").exists()


@settings(max_examples=examples(300))
@given(data=st.data())
def test_mutated_plan_text_is_parsed_or_refused_naming_the_file(data: st.DataObject) -> None:
    text = json.dumps(PLAN)
    position = data.draw(st.integers(0, len(text)))
    text = text[:position] + data.draw(st.text(max_size=6)) + text[position + data.draw(st.integers(0, 6)) :]
    try:
        structprune.CutPlan.from_json(text)
    except Exception as err:  # noqa: BLE001
        assert isinstance(err, PlanError), f"{type(err).__name__}: {err}"
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(text)
        model_dir = checkpoint(Path(tmp))
        try:
            structprune.apply_plan(model_dir, plan_file, Path(tmp) / "out")
        except Exception as err:  # noqa: BLE001
            assert_reported(err)
            if "not JSON" in str(err):
                assert str(plan_file) in str(err)
