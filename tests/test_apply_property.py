"""Property tests: apply_plan on random checkpoints and plans equals a numpy reference, byte for byte.

Every output tensor is compared against `np.take` on the input bytes reinterpreted as unsigned
integers of the element width, so the reference is exact for every dtype (BF16/F8 included).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structprune
from ckpt import (
    DTYPE_SIZES,
    INDEX_FILE,
    RawTensor,
    cut_reference,
    examples,
    plan_dict,
    random_raw,
    read_checkpoint_raw,
    tree_bytes,
    tree_hashes,
    write_checkpoint,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

DTYPES = sorted(DTYPE_SIZES)
TOKENIZER = b'{"model": "bpe"}'
CONFIG = {"hidden_size": 4, "nested": {"a": 1}}


@dataclass
class Case:
    """A random input checkpoint, a plan for it and the expected output (in output order)."""

    tensors: dict[str, RawTensor]
    shards: list[list[str]]
    force_index: bool
    plan: dict[str, Any]
    expected: dict[str, RawTensor] = field(default_factory=dict)


SMALL_DIMS = st.integers(0, 7)
# Mostly long dims (rows of several KB, many chunks per tensor) with the odd empty one.
LARGE_DIMS = st.one_of(st.integers(40, 300), st.integers(40, 300), st.integers(0, 3))


@st.composite
def raw_tensors(draw: st.DrawFn, sizes: st.SearchStrategy[int], min_dims: int, max_dims: int) -> RawTensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(sizes, min_size=min_dims, max_size=max_dims))
    # Bytes come from a seeded RNG rather than st.binary: tensors reach ~19 KB, far above what
    # hypothesis likes to draw byte by byte, and shrinking byte contents buys nothing here.
    return random_raw(dtype, shape, draw(st.integers(0, 2**32 - 1)))


@st.composite
def keeps(draw: st.DrawFn, shape: Sequence[int]) -> dict[int, list[int]]:
    """Random sorted, unique kept indices on a random subset of the dims (possibly empty)."""
    dims = draw(st.sets(st.sampled_from(range(len(shape))))) if shape else set()
    result: dict[int, list[int]] = {}
    for dim in sorted(dims):
        chosen = draw(st.sets(st.integers(0, shape[dim] - 1))) if shape[dim] > 0 else set()
        result[dim] = sorted(chosen)
    return result


def pick_renames(draw: st.DrawFn, names: list[str], renamed: list[str], dropped: set[str]) -> dict[str, str]:
    """Targets for the renamed tensors: fresh names, names of dropped tensors or names of other
    renamed tensors (layer renumbering chains and swaps), never the name of a tensor that stays."""
    staying = set(names) - dropped - set(renamed)
    fresh = [f"renamed.{i}" for i in range(len(renamed))]
    pool = sorted(dropped) + list(renamed) + fresh
    used: set[str] = set()
    targets: dict[str, str] = {}
    for source in renamed:
        candidates = [t for t in pool if t not in used and t != source and t not in staying]
        target = draw(st.sampled_from(candidates))
        used.add(target)
        targets[source] = target
    return targets


@st.composite
def cases(
    draw: st.DrawFn, sizes: st.SearchStrategy[int] = SMALL_DIMS, min_dims: int = 0, max_dims: int = 4, max_tensors: int = 6
) -> Case:
    count = draw(st.integers(1, max_tensors))
    names = [f"model.layers.{i}.weight" for i in range(count)]
    tensors = {name: draw(raw_tensors(sizes, min_dims, max_dims)) for name in names}
    actions = {name: draw(st.sampled_from(["none", "keep", "drop", "rename", "keep+rename"])) for name in names}
    dropped = {n for n, a in actions.items() if a == "drop"}
    renamed = [n for n, a in actions.items() if "rename" in a]
    renames = pick_renames(draw, names, renamed, dropped)

    entries: dict[str, dict[str, Any]] = {}
    index_sets: dict[str, list[int]] = {}
    cuts: dict[str, dict[int, list[int]]] = {}
    for name in names:
        entry: dict[str, Any] = {}
        if actions[name] == "drop":
            entry["drop"] = True
        if "keep" in actions[name]:
            cuts[name] = draw(keeps(tensors[name].shape))
            entry["keep"] = keep_json(draw, cuts[name], index_sets)
        if name in renames:
            entry["rename"] = renames[name]
        if entry and entry != {"keep": {}}:
            entries[name] = entry

    # Split the input into 1-3 contiguous shards; one shard may still use the indexed layout.
    shard_count = draw(st.integers(1, min(3, count)))
    bounds = sorted(draw(st.sets(st.integers(1, count - 1), min_size=shard_count - 1, max_size=shard_count - 1))) if shard_count > 1 else []
    edges = [0, *bounds, count]
    shards = [names[a:b] for a, b in zip(edges, edges[1:])]
    force_index = draw(st.booleans())

    case = Case(tensors, shards, force_index, plan_dict(entries, index_sets=index_sets))
    for name in names:
        if name in dropped:
            continue
        case.expected[renames.get(name, name)] = cut_reference(tensors[name], cuts.get(name, {}))
    return case


def keep_json(draw: st.DrawFn, cut: Mapping[int, list[int]], index_sets: dict[str, list[int]]) -> dict[str, Any]:
    """JSON form of a keep: dims as decimal strings, indices inline or via a named index set."""
    result: dict[str, Any] = {}
    for dim, indices in cut.items():
        if draw(st.booleans()):
            set_name = f"set{len(index_sets)}"
            index_sets[set_name] = indices
            result[str(dim)] = set_name
        else:
            result[str(dim)] = indices
    return result


def write_input(case: Case, root: Path) -> Path:
    return write_checkpoint(
        root / "in",
        case.tensors,
        shards=case.shards,
        force_index=case.force_index,
        config=CONFIG,
        extra_files={"tokenizer.json": TOKENIZER},
        use_library=False,  # raw writer: BF16/F8 support and a known on-disk tensor order
    )


def apply(case: Case, root: Path, out_name: str, **kwargs: Any) -> tuple[Path, Any]:
    out = root / out_name
    report = structprune.apply_plan(root / "in", case.plan, out, **kwargs)
    return out, report


def check_output(case: Case, out: Path, report: Any, max_shard_size: int) -> None:
    ckpt = read_checkpoint_raw(out)
    # Order and contents: output order is input order (renamed tensors included).
    assert list(ckpt.tensors) == list(case.expected)
    for name, want in case.expected.items():
        got = ckpt.tensors[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert got.data == want.data, f"{name}: bytes differ from the numpy reference"
    check_sharding(ckpt.shards, ckpt.tensors, ckpt.shard_of, max_shard_size)
    for shard in ckpt.shards:
        assert ckpt.shard_metadata[shard] == {"format": "pt"}, shard
    check_index(out, ckpt.shards, ckpt.shard_of, case.expected)
    # Non-checkpoint files: config.json untouched by an empty patch, tokenizer.json copied.
    assert json.loads((out / "config.json").read_text()) == CONFIG
    assert (out / "tokenizer.json").read_bytes() == TOKENIZER
    expected_files = set(ckpt.shards) | {"config.json", "tokenizer.json", ".structprune-output"}
    if len(ckpt.shards) > 1:
        expected_files.add(INDEX_FILE)
    assert set(tree_bytes(out)) == expected_files
    assert report.shards == ckpt.shards
    assert report.tensors == len(case.expected)
    assert Path(report.output_dir).resolve() == out.resolve()


def check_sharding(shards: list[str], tensors: Mapping[str, RawTensor], shard_of: Mapping[str, str], limit: int) -> None:
    """Greedy fill in order: no shard over the limit unless it holds a single non-empty tensor
    that is itself over the limit, and no two neighbouring shards could have been one."""
    sizes = {shard: 0 for shard in shards}
    nonempty = {shard: 0 for shard in shards}
    for name, tensor in tensors.items():
        sizes[shard_of[name]] += tensor.nbytes
        nonempty[shard_of[name]] += tensor.nbytes > 0
    # Tensors must be laid out shard after shard (shard order == tensor order).
    order = [shard_of[name] for name in tensors]
    assert order == sorted(order)
    for shard in shards:
        assert sizes[shard] <= limit or nonempty[shard] == 1, f"{shard} holds {sizes[shard]} > {limit} bytes"
    for left, right in zip(shards, shards[1:]):
        assert sizes[left] + sizes[right] > limit, f"{left} and {right} would fit in one shard"
    if len(shards) == 1:
        assert shards == ["model.safetensors"]
    else:
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]


def check_index(out: Path, shards: list[str], shard_of: Mapping[str, str], expected: Mapping[str, RawTensor]) -> None:
    index_path = out / INDEX_FILE
    if len(shards) == 1:
        assert not index_path.exists()
        return
    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    assert index["weight_map"] == dict(shard_of)


def no_leftovers(root: Path, *expected: str) -> None:
    """Only the input and the finished outputs may sit in the parent (no temp siblings)."""
    assert sorted(p.name for p in root.iterdir()) == sorted(["in", *expected])


@settings(max_examples=examples(120))
@given(
    case=cases(),
    shard_fraction=st.floats(0.0, 1.2),
    budgets=st.tuples(st.integers(1024, 65536), st.integers(1024, 65536)),
    threads=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_apply_matches_numpy_reference(
    case: Case, shard_fraction: float, budgets: tuple[int, int], threads: tuple[int, int]
) -> None:
    # An output with no tensor at all is covered by an example test (test_apply_basic.py).
    assume(case.expected)
    total = sum(t.nbytes for t in case.expected.values())
    # A fraction of the output size forces several shards most of the time; >1 gives one shard.
    max_shard_size = max(1, math.ceil(total * shard_fraction))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        input_before = tree_hashes(write_input(case, root))
        out_a, report = apply(case, root, "out_a", max_shard_size=max_shard_size, memory_budget=budgets[0], threads=threads[0])
        check_output(case, out_a, report, max_shard_size)
        out_b, _ = apply(case, root, "out_b", max_shard_size=max_shard_size, memory_budget=budgets[1], threads=threads[1])
        # Determinism across thread counts and memory budgets, every file byte-identical.
        assert tree_bytes(out_a) == tree_bytes(out_b)
        assert tree_hashes(root / "in") == input_before
        no_leftovers(root, "out_a", "out_b")


@settings(max_examples=examples(15))
@given(case=cases(sizes=LARGE_DIMS, min_dims=2, max_dims=2, max_tensors=3), budget=st.sampled_from([1024, 4096, 10_000]))
def test_apply_chunked_large_rows(case: Case, budget: int) -> None:
    """Tensors of up to 300x300 elements (up to 720 KB) against budgets of a few KiB: many
    chunks per tensor, rows longer than the budget included."""
    total = sum(t.nbytes for t in case.expected.values())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_input(case, root)
        out_small, report = apply(case, root, "small", max_shard_size=total // 2 + 1, memory_budget=budget, threads=3)
        check_output(case, out_small, report, total // 2 + 1)
        out_big, _ = apply(case, root, "big", max_shard_size=total // 2 + 1, memory_budget="256MiB", threads=1)
        assert tree_bytes(out_small) == tree_bytes(out_big)


@settings(max_examples=examples(40))
@given(case=cases(), budget=st.sampled_from([1, 7, 64, 500]), threads=st.integers(1, 4))
def test_apply_budget_below_one_row(case: Case, budget: int, threads: int) -> None:
    """A memory budget smaller than one row (even one element) still gives the same bytes: the
    budget bounds buffering, it is not a precondition on tensor sizes."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_input(case, root)
        out_tiny, report = apply(case, root, "tiny", memory_budget=budget, threads=threads)
        out_ref, _ = apply(case, root, "ref", threads=1)
        assert tree_bytes(out_tiny) == tree_bytes(out_ref)
        assert list(read_checkpoint_raw(out_tiny).tensors) == list(case.expected)
