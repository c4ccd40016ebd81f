"""Structures found by ``structprune.trace`` on the tiny configs: which rows and columns each unit
covers, what a unit costs, what is pinned, how invalid selections are refused, and the
``structprune inspect`` command."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Set, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from arch_configs import CONFIGS, HIDDEN, KINDS, LAYERS, NOT_EXPRESSIBLE, PREFIX  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import structprune  # noqa: E402
from structprune import PlanError, StructpruneError, apply_plan, read_checkpoint  # noqa: E402
from structprune.cli import main  # noqa: E402
from structprune.plan.cuts import Selection, checkpoint_cut_plan, cut_plan  # noqa: E402
from structprune.tracing.export import checkpoint_name_map  # noqa: E402
from structprune.tracing.graph import Structure, StructureGraph, summarize  # noqa: E402

PER_LAYER_KINDS = ("heads", "kv_groups", "query_heads", "channels")


@pytest.fixture(scope="module")
def graphs() -> Callable[[str], StructureGraph]:
    transformers.logging.set_verbosity_error()
    cache: Dict[str, StructureGraph] = {}

    def get(arch: str) -> StructureGraph:
        if arch not in cache:
            cache[arch] = structprune.trace(CONFIGS[arch]())
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A checkpoint of the architecture written by transformers (default init)."""
    transformers.logging.set_verbosity_error()
    cache: Dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            config = CONFIGS[arch]()
            path = tmp_path_factory.mktemp(arch) / "model"
            torch.manual_seed(0)
            getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.float32).save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return get


def by_layer(graph: StructureGraph, kind: str) -> Dict[Any, Structure]:
    structures = graph.by_kind(kind)
    out = {s.layer: s for s in structures}
    assert len(out) == len(structures), f"two {kind} structures in one layer"
    return out


def covered(structure: Structure, param: str, dim: int, units: Sequence[int]) -> List[int]:
    """Indices along ``dim`` of ``param`` that ``units`` cover, over all members on that dimension."""
    members = [m for m in structure.members if (m.param, m.dim) == (param, dim)]
    assert members, (structure.kind, param, dim)
    return sorted(set(np.concatenate([m.indices(units) for m in members]).tolist()))


def spans(*ranges: Tuple[int, int]) -> List[int]:
    return sorted(i for start, stop in ranges for i in range(start, stop))


def touched(structure: Structure) -> Set[Tuple[str, int]]:
    return {(m.param, m.dim) for m in structure.members}


def pinned_reasons(graph: StructureGraph, param: str, dim: int) -> List[str]:
    return [p.reason for p in graph.pinned if (p.param, p.dim) == (param, dim)]


# ------------------------------------------------------------------------------------------------
# every architecture


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_layers_and_blocks(graphs: Callable[[str], StructureGraph], arch: str) -> None:
    graph = graphs(arch)
    assert graph.blocks is not None
    assert (graph.blocks.prefix, graph.blocks.count) == (PREFIX[arch], LAYERS)
    offered = {s.kind for s in graph.structures} | {"blocks"}
    assert offered == KINDS[arch]
    for kind in PER_LAYER_KINDS:
        layers = by_layer(graph, kind)
        if not layers:
            continue
        assert sorted(layers) == list(range(LAYERS)), kind
        # the untraced last layer replicates the last traced one
        last, replica = layers[LAYERS - 2], layers[LAYERS - 1]
        rename = lambda p: p.replace(f"{PREFIX[arch]}.{LAYERS - 2}.", f"{PREFIX[arch]}.{LAYERS - 1}.")  # noqa: E731
        assert {(rename(m.param), m.dim, m.offset, m.stride, m.free) for m in last.members} == {
            (m.param, m.dim, m.offset, m.stride, m.free) for m in replica.members
        }
        assert (replica.units, replica.unit_params) == (last.units, last.unit_params)
        for layer, s in layers.items():
            assert all(m.param.startswith(f"{PREFIX[arch]}.{layer}.") for m in s.members), (kind, layer)
    for s in graph.by_kind("hidden"):
        assert s.layer is None and s.units == HIDDEN
        assert all((m.offset, m.stride, m.free) == (0, 1, ()) for m in s.members)
    for s in graph.structures:
        assert s.members and s.units > 0 and s.unit_params > 0
        for m in s.members:
            assert m.param in graph.params and 0 <= m.dim < len(graph.params[m.param])
            assert m.indices(range(s.units)).max() < graph.params[m.param][m.dim]
    rows = summarize(graph)
    assert {r.kind for r in rows} == {s.kind for s in graph.structures}
    assert sum(r.count for r in rows) == len(graph.structures)


def expected_unit_params(graph: StructureGraph, kind: str) -> Tuple[Selection, int]:
    """One unit of ``kind`` removed in every layer, and what the graph says that costs."""
    if kind == "blocks":
        assert graph.blocks is not None
        return Selection(blocks=[0]), graph.blocks.unit_params
    structures = graph.by_kind(kind)
    return Selection(units={s.id: [s.units - 1] for s in structures}), sum(s.unit_params for s in structures)


UNIT_CASES = [(arch, kind) for arch in CONFIGS for kind in sorted(KINDS[arch])]


@pytest.mark.parametrize("arch,kind", UNIT_CASES, ids=[f"{a}-{k}" for a, k in UNIT_CASES])
def test_unit_params_is_what_a_cut_removes(
    graphs: Callable[[str], StructureGraph], saved: Callable[[str], Path], tmp_path: Path, arch: str, kind: str
) -> None:
    graph, path = graphs(arch), saved(arch)
    before = read_checkpoint(path)
    selection, cost = expected_unit_params(graph, kind)
    # Inexpressible kinds are still planned (unverified) so their cost can be counted; so is one
    # hidden channel, as a hidden width of 63 is no multiple of the head count (Llama's config
    # refuses it).
    verify = kind not in NOT_EXPRESSIBLE[arch] and kind != "hidden"
    names = list(before.tensors)
    plan = cut_plan(graph, before.config or {}, selection, names, model_names=checkpoint_name_map(path, names), verify=verify)
    # The unverified cuts write checkpoints no config describes (that is why they are unverified):
    # apply's shape check would refuse them, and only their parameter count matters here.
    apply_plan(path, plan, tmp_path / "out", check_shapes=verify)
    after = read_checkpoint(tmp_path / "out")
    assert before.parameters - after.parameters == cost
    if kind == "blocks":
        block = [t for n, t in before.tensors.items() if n.startswith(f"{PREFIX[arch]}.0.")]
        assert sum(t.numel for t in block) == cost


# ------------------------------------------------------------------------------------------------
# GQA: Llama (4 query heads, 2 KV heads, head_dim 24)


def test_llama_kv_groups(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("llama")
    hd, n_rep = 24, 2
    for layer, s in by_layer(graph, "kv_groups").items():
        attn = f"model.layers.{layer}.self_attn"
        assert s.units == 2
        assert touched(s) == {(f"{attn}.{x}_proj.weight", 0) for x in "qkv"} | {(f"{attn}.o_proj.weight", 1)}
        for g in range(2):
            kv_rows = spans((g * hd, (g + 1) * hd))
            q_rows = spans((n_rep * g * hd, n_rep * (g + 1) * hd))  # query heads 2g and 2g+1
            assert covered(s, f"{attn}.k_proj.weight", 0, [g]) == kv_rows
            assert covered(s, f"{attn}.v_proj.weight", 0, [g]) == kv_rows
            assert covered(s, f"{attn}.q_proj.weight", 0, [g]) == q_rows
            assert covered(s, f"{attn}.o_proj.weight", 1, [g]) == q_rows
        assert s.unit_params == 2 * hd * HIDDEN + 2 * n_rep * hd * HIDDEN


def test_llama_query_heads_nest_in_kv_groups(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("llama")
    hd, n_rep = 24, 2
    groups = by_layer(graph, "kv_groups")
    for layer, s in by_layer(graph, "query_heads").items():
        attn = f"model.layers.{layer}.self_attn"
        assert s.nested_in == groups[layer].id and graph.get(s.nested_in).layer == layer
        assert s.units == n_rep
        assert touched(s) == {(f"{attn}.q_proj.weight", 0), (f"{attn}.o_proj.weight", 1)}
        for slot in range(n_rep):
            rows = spans(*[((n_rep * g + slot) * hd, (n_rep * g + slot + 1) * hd) for g in range(2)])
            assert covered(s, f"{attn}.q_proj.weight", 0, [slot]) == rows
            assert covered(s, f"{attn}.o_proj.weight", 1, [slot]) == rows


def test_qwen3_three_query_heads_per_group(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("qwen3")
    hd, n_rep = 16, 3
    groups = by_layer(graph, "kv_groups")
    for layer, s in by_layer(graph, "query_heads").items():
        q = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert s.units == n_rep and s.nested_in == groups[layer].id
        for g in range(2):
            assert covered(groups[layer], q, 0, [g]) == spans((g * n_rep * hd, (g + 1) * n_rep * hd))
        for slot in range(n_rep):
            assert covered(s, q, 0, [slot]) == spans(*[((n_rep * g + slot) * hd, (n_rep * g + slot + 1) * hd) for g in range(2)])
    # q_norm/k_norm act within a head: pinned with head_dim, never a member
    norms = {f"model.layers.0.self_attn.{x}_norm.weight" for x in "qk"}
    assert not norms & {m.param for s in graph.structures for m in s.members}
    for name in norms:
        assert any("head_dim" in r for r in pinned_reasons(graph, name, 0))


def test_llama_channels(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("llama")
    for layer, s in by_layer(graph, "channels").items():
        mlp = f"model.layers.{layer}.mlp"
        assert s.units == 80
        assert touched(s) == {(f"{mlp}.gate_proj.weight", 0), (f"{mlp}.up_proj.weight", 0), (f"{mlp}.down_proj.weight", 1)}
        for u in (0, 37, 79):
            for param, dim in touched(s):
                assert covered(s, param, dim, [u]) == [u]
        assert s.unit_params == 3 * HIDDEN


def llama_hidden_members(layers: int, lm_head: bool) -> Set[Tuple[str, int]]:
    out = {("model.embed_tokens.weight", 1), ("model.norm.weight", 0)}
    if lm_head:
        out.add(("lm_head.weight", 1))
    for i in range(layers):
        p = f"model.layers.{i}"
        out |= {(f"{p}.input_layernorm.weight", 0), (f"{p}.post_attention_layernorm.weight", 0)}
        out |= {(f"{p}.self_attn.{x}_proj.weight", 1) for x in "qkv"} | {(f"{p}.self_attn.o_proj.weight", 0)}
        out |= {(f"{p}.mlp.{x}_proj.weight", 1) for x in ("gate", "up")} | {(f"{p}.mlp.down_proj.weight", 0)}
    return out


@pytest.mark.parametrize("arch,tied", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_hidden_members(graphs: Callable[[str], StructureGraph], arch: str, tied: bool) -> None:
    graph = graphs(arch)
    (hidden,) = graph.by_kind("hidden")
    assert touched(hidden) == llama_hidden_members(LAYERS, lm_head=not tied)
    if tied:
        assert graph.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    # biases of q/k/v run along the attention width, not the hidden one
    assert not any(m.param.endswith("_proj.bias") for m in hidden.members)


def test_pinned_reasons(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("llama")
    for layer in range(LAYERS):
        attn = f"model.layers.{layer}.self_attn"
        for name, dim in [(f"{attn}.{x}_proj.weight", 0) for x in "qkv"] + [(f"{attn}.o_proj.weight", 1)]:
            assert any("head_dim" in r for r in pinned_reasons(graph, name, dim)), (name, dim)
    assert any("embedding rows" in r for r in pinned_reasons(graph, "model.embed_tokens.weight", 0))
    assert any("output" in r for r in pinned_reasons(graph, "lm_head.weight", 0))
    # a dimension pinned whole (not just its within-head part) is never a structure's member
    for arch in CONFIGS:
        g = graphs(arch)
        whole = {(p.param, p.dim) for p in g.pinned if "head_dim" not in p.reason}
        assert not whole & {(m.param, m.dim) for s in g.structures for m in s.members}, arch
    bert = graphs("bert")
    # BertModel returns the hidden state: the residual channels are pinned as a model output
    assert any("output" in r for r in pinned_reasons(bert, "embeddings.word_embeddings.weight", 1))


def test_gemma_mqa_has_query_heads_only(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("gemma")
    hd = 24
    assert not graph.by_kind("kv_groups") and not graph.by_kind("heads")
    layers = by_layer(graph, "query_heads")
    assert sorted(layers) == list(range(LAYERS))
    for layer, s in layers.items():
        attn = f"model.layers.{layer}.self_attn"
        assert s.nested_in is None and s.units == 4
        assert touched(s) == {(f"{attn}.q_proj.weight", 0), (f"{attn}.o_proj.weight", 1)}
        for h in range(4):
            assert covered(s, f"{attn}.q_proj.weight", 0, [h]) == spans((h * hd, (h + 1) * hd))
            assert covered(s, f"{attn}.o_proj.weight", 1, [h]) == spans((h * hd, (h + 1) * hd))


# ------------------------------------------------------------------------------------------------
# fused and interleaved projections


def test_phi3_fused_qkv_and_gate_up(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("phi3")
    hd, inter = 16, 96
    q_width, kv_width = 4 * hd, 2 * hd
    for layer, s in by_layer(graph, "kv_groups").items():
        qkv = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        assert touched(s) == {(qkv, 0), (f"model.layers.{layer}.self_attn.o_proj.weight", 1)}
        for g in range(2):
            q_rows = (2 * g * hd, 2 * (g + 1) * hd)
            assert covered(s, qkv, 0, [g]) == spans(
                q_rows, (q_width + g * hd, q_width + (g + 1) * hd), (q_width + kv_width + g * hd, q_width + kv_width + (g + 1) * hd)
            )
            assert covered(s, f"model.layers.{layer}.self_attn.o_proj.weight", 1, [g]) == spans(q_rows)
    for layer, s in by_layer(graph, "query_heads").items():
        qkv = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        for slot in range(2):
            assert covered(s, qkv, 0, [slot]) == spans(*[((2 * g + slot) * hd, (2 * g + slot + 1) * hd) for g in range(2)])
    for layer, s in by_layer(graph, "channels").items():
        gate_up = f"model.layers.{layer}.mlp.gate_up_proj.weight"
        assert s.units == inter
        assert touched(s) == {(gate_up, 0), (f"model.layers.{layer}.mlp.down_proj.weight", 1)}
        for u in (0, 5, inter - 1):
            assert covered(s, gate_up, 0, [u]) == [u, inter + u]
            assert covered(s, f"model.layers.{layer}.mlp.down_proj.weight", 1, [u]) == [u]


def test_gpt_neox_interleaved_qkv(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("gpt_neox")
    hd = 16
    for layer, s in by_layer(graph, "heads").items():
        attn = f"gpt_neox.layers.{layer}.attention"
        assert s.units == 4
        assert touched(s) == {
            (f"{attn}.query_key_value.weight", 0), (f"{attn}.query_key_value.bias", 0), (f"{attn}.dense.weight", 1)
        }
        for h in range(4):
            rows = spans((h * 3 * hd, (h + 1) * 3 * hd))  # per head: its q | k | v rows together
            assert covered(s, f"{attn}.query_key_value.weight", 0, [h]) == rows
            assert covered(s, f"{attn}.query_key_value.bias", 0, [h]) == rows
            assert covered(s, f"{attn}.dense.weight", 1, [h]) == spans((h * hd, (h + 1) * hd))


def test_gpt2_conv1d_columns(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("gpt2")
    hd = 16
    for layer, s in by_layer(graph, "heads").items():
        attn = f"transformer.h.{layer}.attn"
        assert touched(s) == {(f"{attn}.c_attn.weight", 1), (f"{attn}.c_attn.bias", 0), (f"{attn}.c_proj.weight", 0)}
        for h in range(4):
            cols = spans(*[(part * HIDDEN + h * hd, part * HIDDEN + (h + 1) * hd) for part in range(3)])
            assert covered(s, f"{attn}.c_attn.weight", 1, [h]) == cols  # Conv1D: [in, out]
            assert covered(s, f"{attn}.c_attn.bias", 0, [h]) == cols
            assert covered(s, f"{attn}.c_proj.weight", 0, [h]) == spans((h * hd, (h + 1) * hd))
    for layer, s in by_layer(graph, "channels").items():
        mlp = f"transformer.h.{layer}.mlp"
        assert s.units == 4 * HIDDEN
        assert touched(s) == {(f"{mlp}.c_fc.weight", 1), (f"{mlp}.c_fc.bias", 0), (f"{mlp}.c_proj.weight", 0)}
        for param, dim in touched(s):
            assert covered(s, param, dim, [7]) == [7]


# ------------------------------------------------------------------------------------------------
# invalid selections


INVALID = {
    # label: (selection from (kv_groups, query_heads, channels) by layer, words of the refusal)
    "unit out of range": (lambda kv, qh, ch: Selection(units={kv[0].id: [2]}), "2 units"),
    "negative unit": (lambda kv, qh, ch: Selection(units={ch[1].id: [-1]}), "units"),
    "unknown structure": (lambda kv, qh, ch: Selection(units={10_000: [0]}), "no structure"),
    "duplicate unit": (lambda kv, qh, ch: Selection(units={s.id: [3, 3] for s in ch.values()}), "twice"),
    "per-group counts differ": (lambda kv, qh, ch: Selection(per_group={s.id: [[0], [0, 1]] for s in qh.values()}), "same length"),
    "per-group list per group": (lambda kv, qh, ch: Selection(per_group={s.id: [[0]] for s in qh.values()}), "one list per KV group"),
    "per-group slot out of range": (lambda kv, qh, ch: Selection(per_group={s.id: [[2], [0]] for s in qh.values()}), "units"),
    "per-group on kv_groups": (lambda kv, qh, ch: Selection(per_group={s.id: [[0], [0]] for s in kv.values()}), "query_heads"),
    "every block": (lambda kv, qh, ch: Selection(blocks=list(range(LAYERS))), "blocks"),
    "duplicate block": (lambda kv, qh, ch: Selection(blocks=[1, 1]), "blocks"),
    "block out of range": (lambda kv, qh, ch: Selection(blocks=[LAYERS]), "blocks"),
    "channel counts differ per layer": (
        lambda kv, qh, ch: Selection(units={ch[0].id: [1, 2], ch[1].id: [1], ch[2].id: [5]}), "same number of channels"
    ),
    "kv groups in one layer only": (lambda kv, qh, ch: Selection(units={kv[0].id: [0]}), "same number of kv_groups"),
    "every kv group": (lambda kv, qh, ch: Selection(units={s.id: [0, 1] for s in kv.values()}), "leaves nothing"),
    "every channel": (lambda kv, qh, ch: Selection(units={s.id: list(range(s.units)) for s in ch.values()}), "leaves nothing"),
    "query slots in one layer only": (
        lambda kv, qh, ch: Selection(per_group={qh[2].id: [[0], [1]]}), "same number of query_heads"
    ),
}


@pytest.mark.parametrize("label", list(INVALID))
def test_invalid_selection_is_refused(graphs: Callable[[str], StructureGraph], label: str) -> None:
    graph = graphs("llama")
    make, message = INVALID[label]
    selection = make(by_layer(graph, "kv_groups"), by_layer(graph, "query_heads"), by_layer(graph, "channels"))
    with pytest.raises(PlanError, match=re.escape(message)):
        cut_plan(graph, CONFIGS["llama"]().to_dict(), selection, list(graph.params))


def test_per_group_needs_kv_groups(graphs: Callable[[str], StructureGraph]) -> None:
    graph = graphs("gemma")
    s = graph.by_kind("query_heads")[0]
    with pytest.raises(PlanError, match="query_heads"):
        cut_plan(graph, CONFIGS["gemma"]().to_dict(), Selection(per_group={s.id: [[0]]}), list(graph.params))


def test_valid_selection_is_accepted(graphs: Callable[[str], StructureGraph]) -> None:
    """The control for the refusals above: the same shapes of selection, well formed."""
    graph = graphs("llama")
    config = CONFIGS["llama"]().to_dict()
    qh = by_layer(graph, "query_heads")
    ch = by_layer(graph, "channels")
    selection = Selection(
        units={s.id: [layer, 40 + layer] for layer, s in ch.items()},
        per_group={s.id: [[layer % 2], [(layer + 1) % 2]] for layer, s in qh.items()},
        blocks=[1],
    )
    plan = cut_plan(graph, config, selection, list(graph.params))
    # num_key_value_heads is unchanged (2), so the patch leaves it alone.
    assert plan.config == {"intermediate_size": 78, "num_attention_heads": 2, "num_hidden_layers": 2}
    assert plan.tensors["model.layers.1.mlp.up_proj.weight"].drop
    assert plan.tensors["model.layers.2.mlp.up_proj.weight"].rename == "model.layers.1.mlp.up_proj.weight"


# ------------------------------------------------------------------------------------------------
# the inspect command and tracing errors


def inspect_rows(output: str) -> Dict[str, List[str]]:
    rows: Dict[str, List[str]] = {}
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] in ("heads", "kv_groups", "query_heads", "hidden", "channels", "blocks"):
            rows.setdefault(cells[0], []).append(cells[-1])
    return rows


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_inspect_cli(tmp_path: Path, arch: str) -> None:
    CONFIGS[arch]().save_pretrained(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stock config" in result.output
    rows = inspect_rows(result.output)
    assert set(rows) == KINDS[arch]
    for kind, cells in rows.items():
        assert set(cells) == {"no" if kind in NOT_EXPRESSIBLE[arch] else "yes"}, (kind, cells)
    if NOT_EXPRESSIBLE[arch]:
        assert "not expressible as a stock checkpoint" in result.output
    assert "pinned (never cut)" in result.output and "head_dim" in result.output
    if arch == "llama":
        assert re.search(r"query_heads\s+0-2\s+2/group", result.output)

    as_json = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"], catch_exceptions=False)
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert set(data) >= {"model", "total_params", "structures", "blocks", "pinned", "stock_config", "stock_config_reasons"}
    assert data["stock_config"] == {kind: kind not in NOT_EXPRESSIBLE[arch] for kind in KINDS[arch]}
    assert set(data["stock_config_reasons"]) == set(NOT_EXPRESSIBLE[arch])
    assert data["blocks"]["count"] == LAYERS and data["blocks"]["prefix"] == PREFIX[arch]
    assert data["model"]["architecture"] == CONFIGS[arch]().architectures[0]
    graph = structprune.trace(tmp_path)
    assert data["total_params"] == graph.total_params
    assert len(data["structures"]) == len(graph.structures)
    for s in data["structures"]:
        assert set(s) >= {"id", "kind", "units", "layer", "unit_params", "members", "nested_in", "notes"}
        assert all(set(m) >= {"param", "dim", "offset", "stride", "free"} for m in s["members"])
    assert all(set(p) == {"param", "dim", "reason"} for p in data["pinned"])


def test_trace_without_config(tmp_path: Path) -> None:
    with pytest.raises(StructpruneError, match="config.json"):
        structprune.trace(tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code != 0
    assert "config.json" in result.output


# ------------------------------------------------------------------------------------------------
# checkpoints whose tensor names differ from the model's


def rename_checkpoint(path: Path, rename: Callable[[str], str]) -> None:
    """Rewrites model.safetensors with renamed keys, as older or base-model checkpoints name them."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})


def test_gpt2_checkpoint_without_model_prefix(tmp_path: Path) -> None:
    """Hub GPT-2 stores h.0.… and wte.weight (saved from GPT2Model); the plan must use those names
    and transformers must still load the result into GPT2LMHeadModel."""
    config = CONFIGS["gpt2"]()
    path = tmp_path / "gpt2"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel._from_config(config, dtype=torch.float32).save_pretrained(path)
    rename_checkpoint(path, lambda k: k.removeprefix("transformer."))
    graph = structprune.trace(path)
    channels = graph.by_kind("channels")
    selection = Selection(units={s.id: [0, 5] for s in channels}, blocks=[1])
    plan = checkpoint_cut_plan(path, graph, selection)
    assert "h.1.mlp.c_fc.weight" in plan.tensors and plan.tensors["h.1.mlp.c_fc.weight"].drop
    assert plan.tensors["h.2.mlp.c_fc.weight"].rename == "h.1.mlp.c_fc.weight"
    apply_plan(path, plan, tmp_path / "out")
    model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert model.transformer.h[1].mlp.c_fc.weight.shape == (HIDDEN, 4 * HIDDEN - 2)
    assert len(model.transformer.h) == LAYERS - 1


def test_gpt_neox_embed_out_is_cut_with_hidden_names(tmp_path: Path) -> None:
    """transformers saves GPT-NeoX's lm_head as embed_out.weight and renames it on load."""
    config = CONFIGS["gpt_neox"]()
    path = tmp_path / "neox"
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM._from_config(config, dtype=torch.float32).save_pretrained(path)
    names = list(read_checkpoint(path).tensors)
    mapping = checkpoint_name_map(path, names)
    assert mapping.get("embed_out.weight") == "lm_head.weight"
