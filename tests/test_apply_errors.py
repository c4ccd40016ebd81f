"""Corrupted checkpoints and invalid plans: the documented exception, a message naming the file
and the tensor, nothing left behind, input untouched."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structprune
from ckpt import (
    SINGLE_FILE,
    RawTensor,
    encode_header,
    encode_safetensors,
    plan_dict,
    read_checkpoint_raw,
    shard_name,
    tree_hashes,
    write_checkpoint,
    write_plan,
)
from structprune.errors import (
    CheckpointError,
    ConfigError,
    HeaderError,
    OutputExistsError,
    PlanError,
    SettingError,
    ShardIndexError,
    StructpruneError,
    StructpruneIOError,
)

# Distinctive names so that "the message names the tensor" cannot pass by accident.
A, B, C = "alpha.weight", "beta.bias", "gamma.scale"
# A: F32 [4, 3] = 48 bytes, B: I32 [5] = 20 bytes, C: F16 [2, 2, 2] = 16 bytes.
TENSORS: dict[str, np.ndarray] = {
    A: np.arange(12, dtype=np.float32).reshape(4, 3),
    B: np.arange(5, dtype=np.int32),
    C: np.arange(8, dtype=np.float16).reshape(2, 2, 2),
}
DATA = b"".join(np.ascontiguousarray(t).tobytes() for t in TENSORS.values())


def header(a: tuple[int, int], b: tuple[int, int], c: tuple[int, int], b_dtype: str = "I32") -> dict[str, Any]:
    """Header for TENSORS with explicit data offsets, to build overlapping/gapped layouts."""
    return {
        "__metadata__": {"format": "pt"},
        A: {"dtype": "F32", "shape": [4, 3], "data_offsets": list(a)},
        B: {"dtype": b_dtype, "shape": [5], "data_offsets": list(b)},
        C: {"dtype": "F16", "shape": [2, 2, 2], "data_offsets": list(c)},
    }


VALID = encode_safetensors(TENSORS, {"format": "pt"})


@dataclass(frozen=True)
class Corruption:
    """Bytes of a broken model.safetensors, the exception expected, the tensor to be named."""

    blob: bytes
    error: type[Exception]
    tensor: str | None


def raw_header(text: str, data: bytes) -> bytes:
    """A safetensors file whose header is exactly ``text`` (so it can hold what a dict cannot: a key twice)."""
    encoded = text.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def header_not_json() -> bytes:
    text = b"{this is not json}      "
    return struct.pack("<Q", len(text)) + text + DATA


CORRUPTIONS: dict[str, Corruption] = {
    "truncated": Corruption(VALID[:-7], CheckpointError, None),
    "truncated_in_header": Corruption(VALID[:20], CheckpointError, None),
    "shorter_than_length_prefix": Corruption(VALID[:5], CheckpointError, None),
    "header_length_past_eof": Corruption(struct.pack("<Q", 10**6) + VALID[8:], HeaderError, None),
    "header_not_json": Corruption(header_not_json(), HeaderError, None),
    "header_not_object": Corruption(encode_header([1, 2, 3], DATA), HeaderError, None),  # type: ignore[arg-type]
    "unknown_dtype": Corruption(encode_header(header((0, 48), (48, 68), (68, 84), b_dtype="Q7"), DATA), HeaderError, B),
    # b starts 4 bytes inside a; the whole buffer is still exactly covered at its end.
    "overlapping_offsets": Corruption(encode_header(header((0, 48), (44, 64), (64, 80)), DATA[:80]), CheckpointError, B),
    "gap_between_offsets": Corruption(encode_header(header((0, 48), (52, 72), (72, 88)), DATA + b"\0" * 4), CheckpointError, B),
    # b declares 5 x I32 = 20 bytes but its offsets span 16.
    "span_not_shape_times_itemsize": Corruption(encode_header(header((0, 48), (48, 64), (64, 80)), DATA[:80]), CheckpointError, B),
    "offsets_reversed": Corruption(encode_header(header((0, 48), (68, 48), (68, 84)), DATA), CheckpointError, B),
    "trailing_bytes": Corruption(VALID + b"\0" * 8, CheckpointError, None),
    "duplicate_tensor_key": Corruption(
        raw_header(
            '{"%s":{"dtype":"F32","shape":[4,3],"data_offsets":[0,48]},"%s":{"dtype":"I32","shape":[5],"data_offsets":[48,68]},'
            '"%s":{"dtype":"F16","shape":[2,2,2],"data_offsets":[68,84]},"%s":{"dtype":"F32","shape":[4,3],"data_offsets":[0,48]}}'
            % (A, B, C, A),
            DATA,
        ),
        HeaderError,
        None,
    ),
}


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(input dir, output path); both live in tmp_path/work so leftovers are easy to spot."""
    work = tmp_path / "work"
    work.mkdir()
    return work / "src-ckpt", work / "dst-ckpt"


def run_failing(
    model_dir: Path, plan: Any, out: Path, error: type[Exception], *names: str, **kwargs: Any
) -> StructpruneError:
    """apply_plan must raise `error` whose message contains every one of `names`; afterwards
    the output does not exist, no temp sibling is left and the input is byte-identical."""
    before = tree_hashes(model_dir)
    with pytest.raises(error) as info:
        structprune.apply_plan(model_dir, plan, out, **kwargs)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    assert isinstance(info.value, StructpruneError)
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [model_dir.name]
    assert tree_hashes(model_dir) == before
    return info.value


def keep_a_rows() -> dict[str, Any]:
    return plan_dict({A: {"keep": {"0": [0, 2]}}})


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupted_file(kind: str, layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    corruption = CORRUPTIONS[kind]
    write_checkpoint(model_dir, {}, config={"hidden_size": 3}, extra_files={"tokenizer.json": b"{}"}, shards=[])
    (model_dir / SINGLE_FILE).write_bytes(corruption.blob)
    names = [SINGLE_FILE] + ([corruption.tensor] if corruption.tensor else [])
    run_failing(model_dir, keep_a_rows(), out, corruption.error, *names)


def test_duplicate_key_is_named(layout: tuple[Path, Path]) -> None:
    """A tensor listed twice in a header means two things to two readers: refused, as the reference
    parser refuses it, naming the key."""
    model_dir, out = layout
    write_checkpoint(model_dir, {}, shards=[])
    (model_dir / SINGLE_FILE).write_bytes(CORRUPTIONS["duplicate_tensor_key"].blob)
    run_failing(model_dir, keep_a_rows(), out, HeaderError, SINGLE_FILE, f"duplicate key '{A}'")


def test_null_metadata_is_accepted(layout: tuple[Path, Path]) -> None:
    """``"__metadata__": null`` is no metadata (the reference parser reads it so)."""
    model_dir, out = layout
    write_checkpoint(model_dir, {}, shards=[])
    text = json.dumps({"__metadata__": None, **{k: v for k, v in header((0, 48), (48, 68), (68, 84)).items() if k != "__metadata__"}})
    (model_dir / SINGLE_FILE).write_bytes(raw_header(text, DATA))
    structprune.apply_plan(model_dir, keep_a_rows(), out)
    assert read_checkpoint_raw(out).tensors[B] == read_checkpoint_raw(model_dir).tensors[B]


def test_corrupted_file_is_a_value_error(layout: tuple[Path, Path]) -> None:
    """CheckpointError is also a ValueError so generic callers can catch it."""
    model_dir, out = layout
    write_checkpoint(model_dir, {}, shards=[])
    (model_dir / SINGLE_FILE).write_bytes(CORRUPTIONS["header_not_json"].blob)
    error = run_failing(model_dir, plan_dict(), out, HeaderError, SINGLE_FILE)
    assert isinstance(error, ValueError) and isinstance(error, CheckpointError)


def test_error_attributes_name_path_and_tensor(layout: tuple[Path, Path]) -> None:
    """errors.py: exceptions carry .path (the file at fault) and .tensor where they apply."""
    model_dir, out = layout
    write_checkpoint(model_dir, {}, shards=[])
    (model_dir / SINGLE_FILE).write_bytes(CORRUPTIONS["unknown_dtype"].blob)
    error = run_failing(model_dir, keep_a_rows(), out, HeaderError)
    assert error.path is not None and Path(error.path).name == SINGLE_FILE
    assert error.tensor == B


def test_plan_error_attribute_names_tensor(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    error = run_failing(model_dir, PLAN_ERRORS["index_out_of_range"][0], out, PlanError)
    assert error.tensor == A


def test_read_checkpoint_reports_corruption(layout: tuple[Path, Path]) -> None:
    model_dir, _ = layout
    write_checkpoint(model_dir, {}, shards=[])
    (model_dir / SINGLE_FILE).write_bytes(CORRUPTIONS["unknown_dtype"].blob)
    with pytest.raises(HeaderError, match="Q7|dtype") as info:
        structprune.read_checkpoint(model_dir)
    assert SINGLE_FILE in str(info.value) and B in str(info.value)


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints with a broken index


def sharded(model_dir: Path) -> None:
    write_checkpoint(model_dir, TENSORS, shards=[[A, B], [C]], config={"hidden_size": 3})


def edit_index(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = model_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def test_missing_shard_file(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    sharded(model_dir)
    (model_dir / shard_name(2, 2)).unlink()
    run_failing(model_dir, keep_a_rows(), out, ShardIndexError, shard_name(2, 2))


def test_index_names_tensor_absent_from_shard(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    sharded(model_dir)
    edit_index(model_dir, lambda index: index["weight_map"].update({"ghost": shard_name(1, 2)}))
    run_failing(model_dir, keep_a_rows(), out, ShardIndexError, "ghost", shard_name(1, 2))


def test_index_maps_tensor_to_wrong_shard(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    sharded(model_dir)
    edit_index(model_dir, lambda index: index["weight_map"].update({C: shard_name(1, 2)}))
    run_failing(model_dir, keep_a_rows(), out, ShardIndexError, C)


def test_tensor_present_in_two_shards(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    sharded(model_dir)
    # Shard 2 also carries B; the index still maps B to shard 1.
    (model_dir / shard_name(2, 2)).write_bytes(encode_safetensors({B: TENSORS[B], C: TENSORS[C]}, {"format": "pt"}))
    error = run_failing(model_dir, keep_a_rows(), out, ShardIndexError, B)
    assert shard_name(1, 2) in str(error) or shard_name(2, 2) in str(error)


def test_index_not_json(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    sharded(model_dir)
    (model_dir / "model.safetensors.index.json").write_text("{not json")
    run_failing(model_dir, keep_a_rows(), out, ShardIndexError, "model.safetensors.index.json")


def test_corrupted_second_shard_names_that_shard(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    sharded(model_dir)
    path = model_dir / shard_name(2, 2)
    path.write_bytes(path.read_bytes()[:-3])
    run_failing(model_dir, keep_a_rows(), out, CheckpointError, shard_name(2, 2))


def test_no_checkpoint_at_all(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    run_failing(model_dir, plan_dict(), out, CheckpointError, str(model_dir.name))


def test_missing_model_dir(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    with pytest.raises(StructpruneError) as info:
        structprune.apply_plan(model_dir, plan_dict(), out)
    assert isinstance(info.value, (CheckpointError, StructpruneIOError))
    assert str(model_dir.name) in str(info.value)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Invalid plans (validated before anything is written)

S, TARGET = "scalar.step", "renamed.target"
PLAN_ERRORS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "unknown_tensor": (plan_dict({"no.such.tensor": {"drop": True}}), ("no.such.tensor",)),
    "index_out_of_range": (plan_dict({A: {"keep": {"0": [0, 4]}}}), (A,)),
    "negative_index": (plan_dict({A: {"keep": {"1": [-1, 0]}}}), (A,)),
    "unsorted_indices": (plan_dict({A: {"keep": {"0": [2, 1]}}}), (A,)),
    "duplicate_indices": (plan_dict({A: {"keep": {"0": [1, 1]}}}), (A,)),
    # The culprit is the index set itself, so its name is what the message must carry.
    "unsorted_index_set": (plan_dict({A: {"keep": {"0": "rows"}}}, index_sets={"rows": [3, 0]}), ("rows",)),
    "index_set_out_of_range": (plan_dict({C: {"keep": {"2": "cols"}}}, index_sets={"cols": [0, 2]}), (C,)),
    "dim_out_of_range": (plan_dict({A: {"keep": {"2": [0]}}}), (A,)),
    "dim_on_scalar": (plan_dict({S: {"keep": {"0": []}}}), (S,)),
    "dim_not_a_number": (plan_dict({A: {"keep": {"rows": [0]}}}), (A,)),
    "unknown_index_set": (plan_dict({A: {"keep": {"0": "missing_set"}}}), (A, "missing_set")),
    "drop_with_keep": (plan_dict({A: {"drop": True, "keep": {"0": [0]}}}), (A,)),
    "drop_with_rename": (plan_dict({A: {"drop": True, "rename": TARGET}}), (A,)),
    "two_renames_to_one_name": (plan_dict({A: {"rename": TARGET}, B: {"rename": TARGET}}), (TARGET,)),
    "rename_onto_staying_tensor": (plan_dict({A: {"rename": B}}), (B,)),
    "wrong_format": ({**plan_dict(), "format": "something-else"}, ()),
    "wrong_version": ({**plan_dict(), "version": 2}, ()),
    "config_patch_not_object": ({**plan_dict(), "config": [1, 2]}, ()),
}


@pytest.mark.parametrize("kind", sorted(PLAN_ERRORS))
def test_invalid_plan(kind: str, layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, {**TENSORS, S: np.array(1.5, dtype=np.float32)}, config={"hidden_size": 3})
    plan, names = PLAN_ERRORS[kind]
    error = run_failing(model_dir, plan, out, PlanError, *names)
    assert isinstance(error, ValueError)


def test_two_renames_message_names_a_source(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    error = run_failing(model_dir, PLAN_ERRORS["two_renames_to_one_name"][0], out, PlanError, TARGET)
    assert A in str(error) or B in str(error)


def test_plan_file_not_json_names_file(layout: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    plan_path = tmp_path / "broken-plan.json"
    plan_path.write_text("{ nope")
    run_failing(model_dir, plan_path, out, PlanError, "broken-plan.json")


def test_plan_file_with_unknown_tensor(layout: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    plan_path = write_plan(tmp_path / "plan.json", plan_dict({"nope": {"drop": True}}))
    run_failing(model_dir, plan_path, out, PlanError, "nope")
    run_failing(model_dir, str(plan_path), out, PlanError, "nope")


def test_cut_on_sub_byte_dtype_through_a_byte_is_a_plan_error(layout: tuple[Path, Path]) -> None:
    """F4 elements are not byte-addressable (docs/plan-format.md): a cut whose slices are not whole
    bytes is a PlanError naming the tensor and dimension; one along whole-byte slices is exact."""
    model_dir, out = layout
    f4 = RawTensor("F4", (4, 2), bytes([0x10, 0x32, 0x54, 0x76]))  # 8 four-bit elements, a row per byte
    write_checkpoint(model_dir, {"quant.f4": f4, A: TENSORS[A]}, use_library=False)
    run_failing(model_dir, plan_dict({"quant.f4": {"keep": {"1": [0]}}}), out, PlanError, "quant.f4", "dim 1")
    structprune.apply_plan(model_dir, plan_dict({"quant.f4": {"keep": {"0": [1, 3]}}}), out)
    assert read_checkpoint_raw(out).tensors["quant.f4"] == RawTensor("F4", (2, 2), bytes([0x32, 0x76]))


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"),
    [("F4", (1000, 3), 1500), ("F4", (4, 1), 2), ("F6_E2M3", (12, 1), 9), ("F6_E3M2", (1000, 5), 3750)],
)
def test_sub_byte_rows_are_copied_byte_for_byte(
    dtype: str, shape: tuple[int, ...], nbytes: int, layout: tuple[Path, Path]
) -> None:
    """Rows that are not whole bytes (an F4 [1000, 3] row is 12 bits) are copied exactly, not with
    a third of the tensor zeroed or a division by zero."""
    model_dir, out = layout
    tensor = RawTensor(dtype, shape, bytes((i * 131 + 7) % 251 + 1 for i in range(nbytes)))
    write_checkpoint(model_dir, {"quant.packed": tensor, A: TENSORS[A]}, use_library=False)
    structprune.apply_plan(model_dir, plan_dict(), out, memory_budget="8KiB", threads=3)
    assert read_checkpoint_raw(out).tensors["quant.packed"] == tensor


def test_config_patch_without_config_json(layout: tuple[Path, Path]) -> None:
    """docs/plan-format.md: config edits without a config.json are a ConfigError."""
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS, config=None)
    run_failing(model_dir, plan_dict(config={"hidden_size": 2}), out, ConfigError, "config.json")


def test_empty_config_patch_without_config_json_is_a_no_op(layout: tuple[Path, Path]) -> None:
    """RFC 7386: an empty merge patch changes nothing, so it needs no config.json."""
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS, config=None)
    structprune.apply_plan(model_dir, plan_dict(config={}), out)
    assert not (out / "config.json").exists()


def test_config_json_invalid(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS, config=None, extra_files={"config.json": b"{broken"})
    run_failing(model_dir, plan_dict(config={"hidden_size": 2}), out, ConfigError, "config.json")


@pytest.mark.parametrize("size", ["5 parsecs", "", "-1", "1.5.2GB", "GB"])
def test_bad_size_strings(size: str, layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    with pytest.raises(ValueError):
        structprune.apply_plan(model_dir, plan_dict(), out, max_shard_size=size)
    with pytest.raises(ValueError):
        structprune.apply_plan(model_dir, plan_dict(), out, memory_budget=size)
    assert not out.exists()


@pytest.mark.parametrize("budget", ["100TB", "2TiB", 2**40 + 1, "99999999999999999999999999TB", 10**40])
def test_memory_budget_past_the_cap_is_a_setting_error(budget: Any, layout: tuple[Path, Path]) -> None:
    """100 TB used to abort the process (allocation failure, staging left behind) and a huge number
    to raise OverflowError: both are a SettingError naming the option and the 1 TiB cap, before
    anything is written."""
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    error = run_failing(model_dir, plan_dict(), out, SettingError, "--memory-budget", "1.0 TiB", memory_budget=budget)
    assert isinstance(error, ValueError)


@pytest.mark.parametrize("threads", [0, 100_000, 10**30, True, 1.5])
def test_thread_count_out_of_range_is_a_setting_error(threads: Any, layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    run_failing(model_dir, plan_dict(), out, SettingError, "--threads", threads=threads)


def test_huge_shard_size_is_a_value_error_not_an_overflow(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    run_failing(model_dir, plan_dict(), out, SettingError, "max_shard_size", max_shard_size=2**64)


def test_memory_budget_at_the_cap_works_on_a_small_model(layout: tuple[Path, Path]) -> None:
    """Buffers never exceed the largest tensor, so the cap itself costs a small model nothing."""
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    structprune.apply_plan(model_dir, plan_dict(), out, memory_budget="1TiB", threads=2)
    assert read_checkpoint_raw(out).tensors[A] == read_checkpoint_raw(model_dir).tensors[A]


# ---------------------------------------------------------------------------------------------
# Existing output


def test_existing_output_is_refused(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    out.mkdir()
    (out / "keep-me.txt").write_text("precious")
    before = tree_hashes(model_dir)
    with pytest.raises(OutputExistsError) as info:
        structprune.apply_plan(model_dir, keep_a_rows(), out)
    assert isinstance(info.value, FileExistsError)
    assert out.name in str(info.value)
    assert set(tree_hashes(out)) == {"keep-me.txt"}
    assert (out / "keep-me.txt").read_text() == "precious"
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([model_dir.name, out.name])
    assert tree_hashes(model_dir) == before


def test_existing_output_file_is_refused(layout: tuple[Path, Path]) -> None:
    model_dir, out = layout
    write_checkpoint(model_dir, TENSORS)
    out.write_text("not a directory")
    with pytest.raises(OutputExistsError):
        structprune.apply_plan(model_dir, keep_a_rows(), out)
    assert out.read_text() == "not a directory"


def test_output_inside_input_is_refused(layout: tuple[Path, Path]) -> None:
    """Writing into the input dir would modify it (and copy the output into itself)."""
    model_dir, _ = layout
    write_checkpoint(model_dir, TENSORS)
    before = tree_hashes(model_dir)
    with pytest.raises(StructpruneError):
        structprune.apply_plan(model_dir, keep_a_rows(), model_dir, overwrite=True)
    assert tree_hashes(model_dir) == before


def exception_hierarchy() -> Mapping[type[Exception], tuple[type[Exception], ...]]:
    return {
        CheckpointError: (StructpruneError, ValueError),
        HeaderError: (CheckpointError,),
        ShardIndexError: (CheckpointError,),
        PlanError: (StructpruneError, ValueError),
        OutputExistsError: (StructpruneError, FileExistsError),
        StructpruneIOError: (StructpruneError, OSError),
        ConfigError: (StructpruneError, ValueError),
    }


def test_exception_hierarchy() -> None:
    for cls, bases in exception_hierarchy().items():
        for base in bases:
            assert issubclass(cls, base), f"{cls.__name__} is not a {base.__name__}"
        # Re-exported from the package root.
        assert getattr(structprune, cls.__name__) is cls
    assert structprune.StructpruneError is StructpruneError
