"""Example-based tests of the apply engine's Python API: plan forms, report, config patching,
file copying, size strings, overwrite, read_checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structprune
from ckpt import (
    BASE_CONFIG,
    INDEX_FILE,
    TOKENIZER_BYTES,
    CheckpointFactory,
    SINGLE_FILE,
    RawTensor,
    merge_patch,
    plan_dict,
    read_checkpoint_raw,
    read_safetensors,
    shard_name,
    tree_bytes,
    tree_hashes,
    write_plan,
)
from structprune import CutPlan, TensorCut


def example_plan() -> CutPlan:
    return CutPlan(
        tensors={
            "layers.0.up.weight": TensorCut(keep={0: "mlp0", 1: [0, 2, 4, 6]}),
            "layers.0.down.weight": TensorCut(keep={1: "mlp0"}),
            "layers.0.norm.weight": TensorCut(drop=True),
            "layers.1.up.weight": TensorCut(rename="layers.0.extra.weight", keep={0: [5]}),
        },
        index_sets={"mlp0": [1, 3, 4]},
        config={"intermediate_size": 3, "rope_scaling": None},
        metadata={"method": "hand-written", "seed": 0},
    )


def expected_arrays(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mlp0 = [1, 3, 4]
    return {
        "embed.weight": tensors["embed.weight"],
        "layers.0.up.weight": tensors["layers.0.up.weight"][np.ix_(mlp0, [0, 2, 4, 6])],
        "layers.0.down.weight": tensors["layers.0.down.weight"][:, mlp0],
        "layers.0.extra.weight": tensors["layers.1.up.weight"][[5], :],
        "step": tensors["step"],
    }


def assert_arrays_equal(out: Path, expected: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import load_file

    loaded = {}
    for shard in read_checkpoint_raw(out).shards:
        loaded.update(load_file(str(out / shard)))
    assert sorted(loaded) == sorted(expected)
    for name, want in expected.items():
        assert loaded[name].dtype == want.dtype, name
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)


def test_apply_cutplan_object(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    model_dir = make_checkpoint(small_tensors)
    before = tree_hashes(model_dir)
    report = structprune.apply_plan(model_dir, example_plan(), tmp_path / "out")
    out = tmp_path / "out"
    assert_arrays_equal(out, expected_arrays(small_tensors))
    assert tree_hashes(model_dir) == before
    # Report fields.
    assert Path(report.output_dir).resolve() == out.resolve()
    assert report.tensors == 5
    assert report.shards == [SINGLE_FILE]
    assert "tokenizer.json" in report.copied_files
    assert not any(name.endswith(".safetensors") for name in report.copied_files)
    tensor_bytes = sum(a.nbytes for a in expected_arrays(small_tensors).values())
    file_bytes = sum(len(data) for data in tree_bytes(out).values())
    assert tensor_bytes <= report.bytes_written <= file_bytes
    assert isinstance(report.skipped_files, list)


def test_plan_forms_give_identical_output(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    """CutPlan object, JSON-schema dict, path and str path are the same plan."""
    model_dir = make_checkpoint(small_tensors)
    plan = example_plan()
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    forms: dict[str, Any] = {
        "object": plan,
        "dict": json.loads(plan.to_json()),
        "path": plan_path,
        "str": str(plan_path),
    }
    outputs = {}
    for label, form in forms.items():
        structprune.apply_plan(model_dir, form, tmp_path / label)
        outputs[label] = tree_bytes(tmp_path / label)
    assert all(files == outputs["object"] for files in outputs.values())


def test_cutplan_json_roundtrip(tmp_path: Path) -> None:
    plan = example_plan()
    document = json.loads(plan.to_json())
    assert document["format"] == "structprune.cut-plan"
    assert document["version"] == 1
    # JSON keys of keep are decimal strings; index set references stay names.
    assert document["tensors"]["layers.0.up.weight"]["keep"] == {"0": "mlp0", "1": [0, 2, 4, 6]}
    assert document["tensors"]["layers.0.norm.weight"]["drop"] is True
    assert document["config"] == {"intermediate_size": 3, "rope_scaling": None}
    assert CutPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "p.json")
    assert CutPlan.load(tmp_path / "p.json") == plan


def test_cutplan_from_doc_example() -> None:
    """The example in docs/plan-format.md parses into the dataclasses."""
    text = json.dumps(
        {
            "format": "structprune.cut-plan",
            "version": 1,
            "index_sets": {"hidden": [0, 1, 2, 5, 6]},
            "tensors": {
                "w.up": {"keep": {"0": [3, 4], "1": "hidden"}},
                "w.gone": {"drop": True},
                "w.moved": {"rename": "w.new"},
            },
            "config": {"intermediate_size": 3},
            "metadata": {"method": "taylor"},
        }
    )
    plan = CutPlan.from_json(text)
    assert plan.tensors["w.up"] == TensorCut(keep={0: [3, 4], 1: "hidden"})
    assert plan.tensors["w.gone"].drop is True
    assert plan.tensors["w.moved"].rename == "w.new"
    assert plan.index_sets == {"hidden": [0, 1, 2, 5, 6]}
    assert plan.metadata == {"method": "taylor"}


def test_config_merge_patch(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    config = {**BASE_CONFIG, "nested": {"keep": 1, "remove": 2, "deeper": {"x": 1}}, "list": [1, 2]}
    patch = {"hidden_size": 4, "rope_scaling": None, "nested": {"remove": None, "deeper": {"y": 2}, "new": True}, "list": [3]}
    model_dir = make_checkpoint(small_tensors, config=config)
    structprune.apply_plan(model_dir, plan_dict(config=patch), tmp_path / "out")
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    assert got == merge_patch(config, patch)
    assert got["nested"] == {"keep": 1, "deeper": {"x": 1, "y": 2}, "new": True}
    assert "rope_scaling" not in got


def test_every_other_file_copied(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    extras = {"tokenizer.json": TOKENIZER_BYTES, "generation_config.json": b'{"do_sample": false}', "README.md": b"# toy\n"}
    model_dir = make_checkpoint(small_tensors, extra_files=extras, shards=[["embed.weight", "step"], ["layers.0.up.weight", "layers.0.down.weight", "layers.0.norm.weight", "layers.1.up.weight"]])
    report = structprune.apply_plan(model_dir, plan_dict(), tmp_path / "out")
    out = tmp_path / "out"
    for name, content in extras.items():
        assert (out / name).read_bytes() == content
        assert name in report.copied_files
    # The input's shards and index are rewritten, not copied: one output shard, no index.
    assert not (out / INDEX_FILE).exists()
    assert not (out / shard_name(1, 2)).exists()
    assert report.shards == [SINGLE_FILE]
    assert json.loads((out / "config.json").read_text()) == BASE_CONFIG


def test_identity_plan_preserves_tensors(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    model_dir = make_checkpoint(small_tensors)
    structprune.apply_plan(model_dir, plan_dict(), tmp_path / "out")
    assert_arrays_equal(tmp_path / "out", small_tensors)


def test_all_tensors_dropped(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    """Every tensor dropped: a single model.safetensors with no tensors (header only)."""
    model_dir = make_checkpoint({"a": np.ones(3, np.float32), "b": np.ones(2, np.int8)})
    report = structprune.apply_plan(model_dir, plan_dict({"a": {"drop": True}, "b": {"drop": True}}), tmp_path / "out")
    ckpt = read_checkpoint_raw(tmp_path / "out")
    assert ckpt.shards == [SINGLE_FILE]
    assert ckpt.tensors == {}
    assert report.tensors == 0


def test_zero_size_keep(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    """An empty keep list gives a zero-size dimension, not an error."""
    model_dir = make_checkpoint({"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
    structprune.apply_plan(model_dir, plan_dict({"w": {"keep": {"0": []}}}), tmp_path / "out")
    tensor = read_checkpoint_raw(tmp_path / "out").tensors["w"]
    assert tensor.shape == (0, 4) and tensor.data == b""


def test_layer_renumbering_chain(make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    """Block removal: drop layer 1, layers 2 and 3 become 1 and 2 (renames onto freed names)."""
    tensors = {f"layers.{i}.w": np.full(2, i, np.int16) for i in range(4)}
    plan = plan_dict({"layers.1.w": {"drop": True}, "layers.2.w": {"rename": "layers.1.w"}, "layers.3.w": {"rename": "layers.2.w"}})
    model_dir = make_checkpoint(tensors)
    structprune.apply_plan(model_dir, plan, tmp_path / "out")
    out = read_checkpoint_raw(tmp_path / "out").tensors
    assert {name: t.to_numpy()[0] for name, t in out.items()} == {"layers.0.w": 0, "layers.1.w": 2, "layers.2.w": 3}


# 3 tensors of 300_000 bytes. Thresholds chosen away from equality so that the test does not
# depend on whether "up to max_shard_size" is inclusive.
SIZE_CASES: list[tuple[Any, int]] = [
    ("500KB", 3),
    ("590KB", 3),  # 590_000 < 600_000: two tensors do not fit
    ("590KiB", 2),  # 604_160 >= 600_000: two tensors fit
    ("800KB", 2),
    ("1MiB", 1),
    ("1MB", 1),
    ("5GB", 1),
    (650_000, 2),
    (299_999, 3),
]


@pytest.mark.parametrize(("size", "shards"), SIZE_CASES)
def test_max_shard_size_strings(size: Any, shards: int, make_checkpoint: CheckpointFactory, tmp_path: Path) -> None:
    tensors = {f"t{i}": np.full(75_000, i, np.float32) for i in range(3)}
    model_dir = make_checkpoint(tensors)
    report = structprune.apply_plan(model_dir, plan_dict(), tmp_path / "out", max_shard_size=size)
    assert len(report.shards) == shards
    ckpt = read_checkpoint_raw(tmp_path / "out")
    assert ckpt.shards == report.shards
    if shards > 1:
        assert ckpt.index is not None
        assert ckpt.index["metadata"]["total_size"] == 900_000
        assert ckpt.index["weight_map"] == ckpt.shard_of


@pytest.mark.parametrize("budget", ["256MiB", "1KiB", "4KB", 3000, "64KiB", "1GB"])
def test_memory_budget_strings(budget: Any, make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    model_dir = make_checkpoint(small_tensors)
    structprune.apply_plan(model_dir, example_plan(), tmp_path / "ref")
    structprune.apply_plan(model_dir, example_plan(), tmp_path / "out", memory_budget=budget, threads=2)
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "ref")


def test_overwrite_replaces_output(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    """--overwrite replaces an earlier output (it holds the marker every output gets) or an empty
    directory."""
    model_dir = make_checkpoint(small_tensors)
    out = tmp_path / "out"
    out.mkdir()
    structprune.apply_plan(model_dir, plan_dict(), out, overwrite=True)
    assert (out / ".structprune-output").is_file()
    (out / "stale.txt").write_text("old")
    structprune.apply_plan(model_dir, example_plan(), out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert_arrays_equal(out, expected_arrays(small_tensors))
    # Second overwrite on a real previous output also works and gives the same bytes.
    first = tree_bytes(out)
    structprune.apply_plan(model_dir, example_plan(), out, overwrite=True)
    assert tree_bytes(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_read_checkpoint(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray]) -> None:
    bf16 = RawTensor("BF16", (2, 3), bytes(range(12)))
    tensors: dict[str, Any] = {**small_tensors, "bf.weight": bf16}
    names = list(tensors)
    model_dir = make_checkpoint(tensors, shards=[names[:3], names[3:]], use_library=False)
    ckpt = structprune.read_checkpoint(model_dir)
    assert ckpt.shards == [shard_name(1, 2), shard_name(2, 2)]
    assert set(ckpt.tensors) == set(names)
    assert ckpt.config == BASE_CONFIG
    info = ckpt.tensors["layers.0.down.weight"]
    assert (info.name, info.dtype, info.shape, info.file, info.nbytes) == ("layers.0.down.weight", "F16", (8, 6), shard_name(1, 2), 96)
    assert ckpt.tensors["bf.weight"].dtype == "BF16"
    assert ckpt.tensors["bf.weight"].shape == (2, 3)
    assert ckpt.tensors["step"].shape == ()
    assert ckpt.total_bytes == sum(t.nbytes for t in small_tensors.values()) + 12


def test_read_checkpoint_without_config(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray]) -> None:
    ckpt = structprune.read_checkpoint(make_checkpoint(small_tensors, config=None))
    assert ckpt.config is None
    assert ckpt.shards == [SINGLE_FILE]


def test_library_written_input_order(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    """Output order follows the input's on-disk (offset) order, whatever the writer chose."""
    model_dir = make_checkpoint(small_tensors)
    structprune.apply_plan(model_dir, plan_dict(), tmp_path / "out")
    assert list(read_checkpoint_raw(tmp_path / "out").tensors) == list(read_safetensors(model_dir / SINGLE_FILE).tensors)


def test_plan_file_written_by_hand(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    model_dir = make_checkpoint(small_tensors)
    path = write_plan(tmp_path / "plan.json", json.loads(example_plan().to_json()))
    structprune.apply_plan(model_dir, path, tmp_path / "out")
    assert_arrays_equal(tmp_path / "out", expected_arrays(small_tensors))


def test_progress_callback(make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    """progress may be a callable receiving (done_bytes, total_bytes), ending at done == total."""
    calls: list[tuple[int, int]] = []
    model_dir = make_checkpoint(small_tensors)
    structprune.apply_plan(model_dir, example_plan(), tmp_path / "out", progress=lambda done, total: calls.append((done, total)))
    assert calls, "progress callback never called"
    dones = [done for done, _ in calls]
    assert dones == sorted(dones)
    assert calls[-1][0] == calls[-1][1] > 0


@pytest.mark.parametrize("threads", [0, -1])
def test_bad_thread_count(threads: int, make_checkpoint: CheckpointFactory, small_tensors: dict[str, np.ndarray], tmp_path: Path) -> None:
    model_dir = make_checkpoint(small_tensors)
    with pytest.raises(ValueError):
        structprune.apply_plan(model_dir, example_plan(), tmp_path / "out", threads=threads)
    assert not (tmp_path / "out").exists()
