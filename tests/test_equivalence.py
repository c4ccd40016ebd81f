"""The correctness proof: a pruned checkpoint computes what the original model computes with the
removed units switched off.

For every architecture in ``arch_configs`` and every structure kind it offers, a tiny random model
is saved, traced, cut (``cut_plan`` → ``apply_plan``) and reloaded with transformers, and its
outputs are compared in fp32 with an independent reference built from the original model:

* heads, kv_groups, query_heads (same slot in every group, and different slots per group),
  channels: the original model with the removed units' *output-side* weights zeroed (the columns of
  an ``nn.Linear`` weight, the rows of a GPT-2 ``Conv1D`` weight), which removes their contribution
  exactly and touches nothing else;
* blocks: the original model with those layers taken out of its layer list;
* hidden: the original state dict sliced in memory along every hidden-sized dimension, loaded into
  a fresh model built from the edited config (RMSNorm/LayerNorm statistics change with the width,
  so the original model is no reference there).

Units are drawn with a seeded RNG: the same count in every layer, different indices per layer.
Kinds a stock config cannot express must be refused with a ``PlanError`` naming the model type.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import zlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from arch_configs import CONFIGS, KINDS, NOT_EXPRESSIBLE, VOCAB  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import structprune  # noqa: E402
from structprune import PlanError, apply_plan, read_checkpoint  # noqa: E402
from structprune.plan.cuts import Selection, _blocks_worth_building, _key_names, checkpoint_cut_plan, cut_plan, stock_config_check  # noqa: E402
from structprune.tracing.graph import Member, StructureGraph  # noqa: E402

BATCH, SEQ = 2, 11
ATOL = RTOL = 1e-4
# A removal must move the outputs by more than this, or the comparison proves nothing.
MIN_EFFECT = 1e-3

# Hidden-sized dimensions that are not hidden channels (the attention width equals hidden_size):
# they keep their size when hidden_size shrinks.
NOT_HIDDEN = {"phi3": ("self_attn.o_proj.weight", 1)}


# ------------------------------------------------------------------------------------------------
# building, saving and tracing the tiny models (once per architecture and module)


@dataclass
class Built:
    arch: str
    path: Path
    model: Any  # the original model, eval mode, fp32 (never modified: references are copies)
    cls: Any
    attn: str
    graph: StructureGraph
    config: Dict[str, Any]  # config.json as saved
    names: List[str]  # tensor names in the checkpoint
    ids: Any  # input ids [BATCH, SEQ]
    expected: Tuple[Any, ...]  # the original model's outputs on ids


def seed_of(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def randomise(model: Any) -> None:
    """Weights of unit scale (so attention is far from uniform and every removal shows), norm
    weights and biases away from their ones/zeros init."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and name == "weight":
                p.data.normal_(0.0, 1.0 / math.sqrt(module.in_features))
            elif isinstance(module, Conv1D) and name == "weight":  # [in, out]
                p.data.normal_(0.0, 1.0 / math.sqrt(p.shape[0]))
            elif isinstance(module, nn.Embedding):
                p.data.normal_(0.0, 0.5)
            elif p.dim() == 1:  # norm weights (ones, or zeros for Gemma's 1 + w) and biases (zeros)
                p.data.add_(torch.randn_like(p) * 0.2)
            else:
                p.data.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))


def run(model: Any, ids: Any) -> Tuple[Any, ...]:
    kwargs: Dict[str, Any] = {"input_ids": ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    if getattr(out, "logits", None) is not None:
        return (out.logits,)
    return tuple(t for t in (out.last_hidden_state, getattr(out, "pooler_output", None)) if t is not None)


def build(arch: str, root: Path) -> Built:
    config = CONFIGS[arch]()
    cls = getattr(transformers, config.architectures[0])
    path = root / "model"
    config.save_pretrained(path)
    graph = structprune.trace(path)
    attn = graph.model["attn_implementation"]
    torch.manual_seed(seed_of(arch, "weights"))
    model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    randomise(model)
    model.eval()
    model.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed_of(arch, "input"))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    config_dict = json.loads((path / "config.json").read_text(encoding="utf-8"))
    names = list(read_checkpoint(path).tensors)
    return Built(arch, path, model, cls, attn, graph, config_dict, names, ids, run(model, ids))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Built]:
    transformers.logging.set_verbosity_error()
    cache: Dict[str, Built] = {}

    def get(arch: str) -> Built:
        if arch not in cache:
            cache[arch] = build(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


# ------------------------------------------------------------------------------------------------
# selections


def distinct_draws(rng: np.random.Generator, n: int, k: int, count: int) -> List[List[int]]:
    """``count`` sorted draws of ``k`` of ``n`` units, not all the same (when that is possible)."""
    while True:
        draws = [sorted(int(u) for u in rng.choice(n, size=k, replace=False)) for _ in range(count)]
        if count < 2 or math.comb(n, k) < 2 or len({tuple(d) for d in draws}) > 1:
            return draws


def removal_count(kind: str, units: int) -> int:
    """Units removed per structure: a third of the MLP, an eighth of the hidden width (64 → 56,
    still a multiple of the head count), half of 4 heads, one of 2 or 3 groups or slots."""
    if kind == "channels":
        return units // 3
    if kind == "hidden":
        return units // 8
    return units // 2 if units > 3 else 1


def select(b: Built, kind: str, rng: np.random.Generator) -> Selection:
    """A random selection of ``kind``: the same number of units in every layer."""
    graph = b.graph
    if kind == "blocks":
        assert graph.blocks is not None
        return Selection(blocks=[int(rng.integers(0, graph.blocks.count - 1))])  # never the last: renames
    if kind == "query_heads_per_group":
        structures = [s for s in graph.by_kind("query_heads")]
        per_group: Dict[int, List[List[int]]] = {}
        for s in structures:
            assert s.nested_in is not None
            groups = graph.get(s.nested_in).units
            per_group[s.id] = distinct_draws(rng, s.units, removal_count("query_heads", s.units), groups)
        return Selection(per_group=per_group)
    structures = graph.by_kind(kind)
    assert structures, kind
    k = removal_count(kind, structures[0].units)
    assert len({s.units for s in structures}) == 1
    draws = distinct_draws(rng, structures[0].units, k, len(structures))
    return Selection(units={s.id: d for s, d in zip(structures, draws)})


def merge(*selections: Selection) -> Selection:
    out = Selection()
    for s in selections:
        out.units.update(s.units)
        out.per_group.update(s.per_group)
        out.blocks.extend(s.blocks)
    return out


# ------------------------------------------------------------------------------------------------
# references


def output_side(model: Any, member: Member) -> bool:
    """Whether zeroing ``member``'s indices removes the unit's contribution: the input columns of a
    Linear weight, or the input rows of a Conv1D weight ([in, out])."""
    module_name, _, leaf = member.param.rpartition(".")
    if leaf != "weight":
        return False
    module = model.get_submodule(module_name)
    return (isinstance(module, nn.Linear) and member.dim == 1) or (isinstance(module, Conv1D) and member.dim == 0)


def zero(model: Any, param: str, dim: int, indices: np.ndarray) -> None:
    if len(indices):
        model.get_parameter(param).data.index_fill_(dim, torch.as_tensor(indices, dtype=torch.long), 0.0)


def zeroed_reference(b: Built, selection: Selection) -> Any:
    """The original model with the selected units' output-side weights zeroed."""
    model = copy.deepcopy(b.model)
    touched = 0
    for sid, units in selection.units.items():
        for member in b.graph.get(sid).members:
            if output_side(model, member):
                zero(model, member.param, member.dim, member.indices(units))
                touched += 1
    for sid, groups in selection.per_group.items():
        inner = b.graph.get(sid)
        assert inner.nested_in is not None
        outer = b.graph.get(inner.nested_in)
        for member in inner.members:
            if not output_side(model, member):
                continue
            same = [m for m in outer.members if (m.param, m.dim) == (member.param, member.dim)]
            assert same, member
            for group, slots in enumerate(groups):
                in_group = np.unique(np.concatenate([m.indices([group]) for m in same]))
                zero(model, member.param, member.dim, np.intersect1d(member.indices(slots), in_group))
            touched += 1
    assert touched or not (selection.units or selection.per_group), "no output-side member to zero"
    return model


def skip_blocks(model: Any, prefix: str, dropped: Sequence[int]) -> None:
    """Takes blocks out of the model's layer list, fixing what the forward reads."""
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    total = len(layers)
    kept = [layer for i, layer in enumerate(layers) if i not in set(dropped)]
    setattr(parent, attr, nn.ModuleList(kept))
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    config.num_hidden_layers = len(kept)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(config, key, [v for i, v in enumerate(value) if i not in set(dropped)])


def blocks_reference(b: Built, selection: Selection) -> Any:
    model = zeroed_reference(b, selection)
    if selection.blocks:
        assert b.graph.blocks is not None
        skip_blocks(model, b.graph.blocks.prefix, selection.blocks)
    return model


def merge_patch(target: Dict[str, Any], patch: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out


def hidden_reference(b: Built, edited: Dict[str, Any], kept: np.ndarray) -> Any:
    """A fresh model of the edited config holding the original weights sliced to the kept hidden
    channels along every hidden-sized dimension."""
    hidden = b.model.config.hidden_size
    config = b.cls.config_class.from_dict(edited)
    fresh = b.cls._from_config(config, attn_implementation=b.attn, dtype=torch.float32)
    target = fresh.state_dict()
    index = torch.as_tensor(kept, dtype=torch.long)
    not_hidden = NOT_HIDDEN.get(b.arch)
    sliced = {}
    for name, tensor in b.model.state_dict().items():
        assert name in target, name
        for dim in range(tensor.dim()):
            if tensor.shape[dim] == hidden and not (not_hidden and name.endswith(not_hidden[0]) and dim == not_hidden[1]):
                tensor = tensor.index_select(dim, index)
        assert tuple(tensor.shape) == tuple(target[name].shape), (name, tuple(tensor.shape), tuple(target[name].shape))
        sliced[name] = tensor
    fresh.load_state_dict(sliced, strict=True)
    fresh.eval()
    return fresh


# ------------------------------------------------------------------------------------------------
# cut, apply, reload, compare


def pruned(b: Built, selection: Selection, out: Path) -> Tuple[Any, Any]:
    plan = checkpoint_cut_plan(b.path, b.graph, selection)
    apply_plan(b.path, plan, out)
    model, info = b.cls.from_pretrained(out, attn_implementation=b.attn, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    return plan, model


def assert_same(actual: Tuple[Any, ...], expected: Tuple[Any, ...], what: str) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape, (what, a.shape, e.shape)
        diff = (a - e).abs().max().item()
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: max abs diff {diff:.3g}\n{m}")


def assert_effect(reference: Tuple[Any, ...], original: Tuple[Any, ...]) -> None:
    """The removal changes the outputs (else the comparison would prove nothing)."""
    effect = max((r - o).abs().max().item() for r, o in zip(reference, original) if r.shape == o.shape)
    assert effect > MIN_EFFECT, effect


def kinds_to_test(arch: str) -> List[str]:
    kinds = sorted(KINDS[arch] - NOT_EXPRESSIBLE[arch])
    if "query_heads" in kinds and "kv_groups" in kinds:
        kinds.append("query_heads_per_group")
    return kinds + ["combined"]


CASES = [(arch, kind) for arch in CONFIGS for kind in kinds_to_test(arch)]


def combined_selection(b: Built, rng: np.random.Generator) -> Selection:
    """Every expressible per-layer kind at once (same-slot query heads with KV groups), plus a block."""
    parts = [select(b, kind, rng) for kind in ("kv_groups", "query_heads", "channels", "blocks") if kind in KINDS[b.arch] - NOT_EXPRESSIBLE[b.arch]]
    return merge(*parts)


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_pruned_model_matches_reference(built: Callable[[str], Built], tmp_path: Path, arch: str, kind: str) -> None:
    b = built(arch)
    rng = np.random.default_rng(seed_of(arch, kind, "units"))
    what = f"{arch} {kind}"
    if kind == "hidden":
        (structure,) = b.graph.by_kind("hidden")
        assert all((m.offset, m.stride, m.free) == (0, 1, ()) for m in structure.members)  # unit u is channel u
        selection = select(b, kind, rng)
        plan, model = pruned(b, selection, tmp_path / "out")
        hidden_key = "n_embd" if "n_embd" in b.config else "hidden_size"
        removed = selection.units[structure.id]
        kept = np.setdiff1d(np.arange(structure.units), removed)
        assert plan.config.get(hidden_key) == len(kept), plan.config
        assert set(plan.config) <= {hidden_key, "head_dim"}, plan.config
        if "head_dim" in plan.config:
            assert plan.config["head_dim"] == b.config[hidden_key] // b.config["num_attention_heads"]
        edited = merge_patch(b.config, plan.config)
        saved = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
        assert saved == edited
        reference = run(hidden_reference(b, edited, kept), b.ids)
    else:
        selection = combined_selection(b, rng) if kind == "combined" else select(b, kind, rng)
        plan, model = pruned(b, selection, tmp_path / "out")
        reference = run(blocks_reference(b, selection), b.ids)
        assert_effect(reference, b.expected)
    assert_same(run(model, b.ids), reference, what)


# ------------------------------------------------------------------------------------------------
# what a stock config can hold


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_kinds_offered(built: Callable[[str], Built], arch: str) -> None:
    b = built(arch)
    offered = {s.kind for s in b.graph.structures} | ({"blocks"} if b.graph.blocks else set())
    assert offered == KINDS[arch]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_stock_config_check(built: Callable[[str], Built], arch: str) -> None:
    b = built(arch)
    model_type = b.config["model_type"]
    for kind in sorted(KINDS[arch]):
        reason = stock_config_check(b.graph, b.config, kind)
        if kind in NOT_EXPRESSIBLE[arch]:
            assert reason is not None and model_type in reason, (kind, reason)
        else:
            assert reason is None, (kind, reason)
    for kind in sorted({"heads", "kv_groups", "query_heads", "hidden", "channels"} - KINDS[arch]):
        assert stock_config_check(b.graph, b.config, kind) == f"the model has no {kind} structure"


def full_plan_answer(graph: StructureGraph, config: Dict[str, Any], kind: str) -> Optional[str]:
    """The stock check as it was: the whole plan (every kept index of every tensor) verified
    against the whole model."""
    selection = Selection()
    if kind == "blocks":
        selection.blocks = [graph.blocks.count - 1]
    else:
        step = int(config[_key_names(config)["num_attention_heads"]]) if kind == "hidden" else 1
        selection.units = {s.id: list(range(s.units - step, s.units)) for s in graph.by_kind(kind)}
    try:
        cut_plan(graph, config, selection, list(graph.params))
    except PlanError as err:
        return str(err)
    return None


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_stock_config_check_from_widths_agrees_with_the_full_plan(built: Callable[[str], Built], arch: str) -> None:
    b = built(arch)
    # The fast check builds two of the three blocks: the path under test.
    assert _blocks_worth_building(b.graph, b.config) == 2
    for kind in sorted(KINDS[arch]):
        assert stock_config_check(b.graph, b.config, kind) == full_plan_answer(b.graph, b.config, kind), kind


def test_blocks_that_differ_are_all_built(built: Callable[[str], Built]) -> None:
    b = built("llama")
    last = f"model.layers.{b.graph.blocks.count - 1}.mlp.up_proj.weight"
    params = {**b.graph.params, last: (b.graph.params[last][0] + 1, b.graph.params[last][1])}
    assert _blocks_worth_building(dataclasses.replace(b.graph, params=params), b.config) is None
    # Tensors outside the blocks that the config cut to two blocks does not build as the graph has them.
    params = {**b.graph.params, "model.norm.weight": (b.graph.params["model.norm.weight"][0] + 1,)}
    assert _blocks_worth_building(dataclasses.replace(b.graph, params=params), b.config) is None


NOT_EXPRESSIBLE_CASES = [(arch, kind) for arch in CONFIGS for kind in sorted(NOT_EXPRESSIBLE[arch])]


@pytest.mark.parametrize("arch,kind", NOT_EXPRESSIBLE_CASES, ids=[f"{a}-{k}" for a, k in NOT_EXPRESSIBLE_CASES])
def test_inexpressible_cut_is_refused(built: Callable[[str], Built], arch: str, kind: str) -> None:
    b = built(arch)
    selection = select(b, kind, np.random.default_rng(seed_of(arch, kind, "units")))
    with pytest.raises(PlanError, match=b.config["model_type"]):
        checkpoint_cut_plan(b.path, b.graph, selection)
