"""From "remove these units" to a cut plan: kept indices per tensor, dropped and renamed blocks,
and the config edits that make the result a stock checkpoint.

The config edits are checked, not trusted: the edited config is instantiated on the meta device
and every parameter shape it implies must equal the shape the plan produces, otherwise a
``PlanError`` names the tensor and both shapes. That is how a cut the stock config cannot express
(per-layer widths, GPT-2's attention width tied to hidden_size…) is refused instead of written.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

import numpy as np

from structprune.models import formats
from structprune.models.meta import config_class, meta_model_of
from structprune.errors import PlanError
from structprune.tracing.graph import StructureGraph
from structprune.plan.cut_plan import CutPlan, TensorCut
from structprune.tracing.export import ExpertPiece

# Config keys that hold an MLP width, by model family (DistilBERT: hidden_dim); the one whose value
# matches the structure wins.
CHANNEL_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff", "hidden_dim", "shared_expert_intermediate_size")
# Mixture of experts: the key holding the number of routed experts, and the one holding an expert's
# width (Mixtral and OLMoE call it intermediate_size, having no dense MLP), matched by value.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
EXPERT_CHANNEL_KEYS = ("moe_intermediate_size", "intermediate_size")
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_topk")


@dataclass
class Selection:
    """What to remove. ``units`` maps a structure id to unit indices removed in it; ``per_group``
    maps a ``query_heads`` structure id to, for every KV group, the query-head slots removed in that
    group (the same count in each); ``per_expert`` maps an ``expert_channels`` structure id to, for
    every expert, the channels removed in that expert (the same count in each: a stock config has
    one expert width); ``blocks`` lists whole blocks to remove."""

    units: Dict[int, List[int]] = field(default_factory=dict)
    per_group: Dict[int, List[List[int]]] = field(default_factory=dict)
    per_expert: Dict[int, List[List[int]]] = field(default_factory=dict)
    blocks: List[int] = field(default_factory=list)


def removed_count(selection: Selection, sid: int) -> int:
    """How many units structure ``sid`` loses (in each KV group or expert, where chosen per one)."""
    for nested in (selection.per_group, selection.per_expert):
        if sid in nested:
            return len(nested[sid][0])
    return len(selection.units.get(sid, []))


def cut_plan(
    graph: StructureGraph,
    config: Mapping[str, Any],
    selection: Selection,
    tensor_names: Iterable[str],
    *,
    model_names: Optional[Mapping[str, str]] = None,
    expert_pieces: Optional[Mapping[str, ExpertPiece]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    verify: bool = True,
    layout: str = "stock",
) -> CutPlan:
    """The plan removing ``selection`` from a checkpoint holding ``tensor_names``, written in the
    checkpoint format ``layout`` (``structprune.models.formats``: stock, decilm, layers or auto).

    ``model_names`` maps checkpoint names to the model's state-dict names where transformers renames
    keys on load (``tracing.checkpoint_name_map``); ``expert_pieces`` the per-expert tensors it
    stacks into one parameter (``tracing.checkpoint_layout``). The plan is written in checkpoint names.
    """
    names = sorted(set(tensor_names))
    pieces = dict(expert_pieces or {})
    to_model = {name: (model_names or {}).get(name, name) for name in names if name not in pieces}
    _validate(graph, selection)
    removed = removed_indices(graph, selection)
    by_expert = expert_removals(graph, selection)
    dropped_layers = set(selection.blocks)
    new_layer = _layer_renumbering(graph, dropped_layers)
    plan = CutPlan(metadata=dict(metadata or {}))
    shared: Dict[Tuple[int, ...], str] = {}
    for name in names:
        piece = pieces.get(name)
        model_name = piece.param if piece is not None else to_model[name]
        source = graph.tied.get(model_name, model_name)
        layer = _layer_of(graph, model_name)
        if layer is not None and layer in dropped_layers:
            plan.tensors[name] = TensorCut(drop=True)
            continue
        if piece is not None:
            cut = _expert_piece_cut(name, piece, graph.params[source], _with_expert_removals(removed.get(source, {}), by_expert.get(source, {}), piece.expert), shared, plan)
        elif source in by_expert:
            raise PlanError(
                f"tensor '{name}' holds every expert's weights in one tensor, which keeps one list of channels for all of them: "
                f"channels chosen per expert need each expert's tensors apart in the checkpoint"
            )
        else:
            cut = TensorCut()
            for dim, gone in sorted(removed.get(source, {}).items()):
                cut.keep[dim] = _shared_set(_kept(graph.params[source][dim], gone), shared, plan)
        if cut.drop:
            plan.tensors[name] = cut
            continue
        if layer is not None and new_layer[layer] != layer:
            cut.rename = _renumber(graph, cut.rename or name, layer, new_layer[layer])
        if cut.keep or cut.rename:
            plan.tensors[name] = cut
    plan.config, chosen = _config_patch(graph, config, selection, layout, verify=verify)
    if chosen == "decilm":
        plan.files = formats.decilm_files()
    plan.metadata.setdefault("format", chosen)
    if verify:
        stacked = _stacked_shapes(graph, pieces, _counted_removals(removed, by_expert))
        _verify_with_head_dim(config, plan.config, lambda: verify_config(graph, config, plan, to_model, dropped_layers, stacked=stacked))
    return plan


def _kept(size: int, gone: Iterable[int]) -> Tuple[int, ...]:
    return tuple(int(i) for i in np.setdiff1d(np.arange(size), np.fromiter(gone, dtype=np.int64)))


def _expert_piece_cut(
    name: str, piece: ExpertPiece, fused_shape: Tuple[int, ...], removed: Mapping[int, Set[int]], shared: Dict[Tuple[int, ...], str], plan: CutPlan
) -> TensorCut:
    """The cut of one per-expert checkpoint tensor, given what is removed from the stacked
    parameter it is loaded into (``fused_shape``, dimension 0 the experts): dropped with its
    expert, renamed to its expert's new number (the experts after a removed one move down, as the
    stacked parameter's rows do), its rows and columns cut where the stacked dimensions 1 and 2 are
    (dimension 1 only inside this piece's segment of the fused gate/up rows)."""
    gone_experts = removed.get(0, set())
    if piece.expert in gone_experts:
        return TensorCut(drop=True)
    cut = TensorCut()
    expert = piece.expert - sum(1 for e in gone_experts if e < piece.expert)
    if expert != piece.expert:
        cut.rename = piece.renamed(name, expert)
    for dim, gone in sorted(removed.items()):
        if dim == 0:
            continue
        size, start = fused_shape[dim], 0
        if dim == 1:
            size = fused_shape[1] // piece.segments
            start = piece.offset(fused_shape[1])
        local = [i - start for i in gone if start <= i < start + size]
        if local:
            cut.keep[dim - 1] = _shared_set(_kept(size, local), shared, plan)
    return cut


def _with_expert_removals(removed: Mapping[int, Set[int]], by_expert: Mapping[int, List[Set[int]]], expert: int) -> Dict[int, Set[int]]:
    """What one expert of a stacked parameter loses: what all its experts lose, and its own channels."""
    merged = {dim: set(gone) for dim, gone in removed.items()}
    for dim, per_expert in by_expert.items():
        merged.setdefault(dim, set()).update(per_expert[expert])
    return merged


def _counted_removals(removed: Mapping[str, Mapping[int, Set[int]]], by_expert: Mapping[str, Mapping[int, List[Set[int]]]]) -> Dict[str, Dict[int, Set[int]]]:
    """``removed`` with expert 0's own removals added: every expert loses as many, so shapes follow."""
    merged = {param: {dim: set(gone) for dim, gone in dims.items()} for param, dims in removed.items()}
    for param, dims in by_expert.items():
        for dim, per_expert in dims.items():
            merged.setdefault(param, {}).setdefault(dim, set()).update(per_expert[0])
    return merged


def _stacked_shapes(graph: StructureGraph, pieces: Mapping[str, ExpertPiece], removed: Mapping[str, Mapping[int, Set[int]]]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the stacked expert parameters the cut pieces load into (by model name)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for param in {piece.param for piece in pieces.values()}:
        gone = removed.get(param, {})
        shapes[param] = tuple(size - len(gone.get(dim, ())) for dim, size in enumerate(graph.params[param]))
    return shapes


def _verify_with_head_dim(config: Mapping[str, Any], patch: Dict[str, Any], verify: Callable[[], None]) -> None:
    """Runs ``verify`` (a check of ``patch``); when heads or hidden width change and the model
    derives head_dim from them (hidden_size / num_attention_heads), retries with head_dim stated
    explicitly in ``patch``, which most modern attention classes read when present."""
    try:
        verify()
        return
    except PlanError as first:
        head_dim = _head_dim(config)
        # A config stating head_dim null (Mixtral's) derives it, like one without the key.
        if head_dim is None or "head_dim" in patch or config.get("head_dim") is not None or not patch:
            raise
        patch["head_dim"] = head_dim
        try:
            verify()
        except PlanError as second:
            del patch["head_dim"]
            raise PlanError(f"{first} (with head_dim={head_dim} stated explicitly: {second})") from None


def _validate(graph: StructureGraph, selection: Selection) -> None:
    for sid, units in list(selection.units.items()) + [(s, [u for g in groups for u in g]) for s, groups in selection.per_group.items()]:
        if not 0 <= sid < len(graph.structures):
            raise PlanError(f"invalid selection: no structure {sid} (the model has {len(graph.structures)})")
        size = graph.structures[sid].units
        bad = [u for u in units if not 0 <= u < size]
        if bad:
            raise PlanError(f"invalid selection: structure {sid} has {size} units, not {bad[0]}")
    for sid, units in selection.units.items():
        if len(set(units)) != len(units):
            raise PlanError(f"invalid selection: structure {sid} lists a unit twice")
        structure = graph.structures[sid]
        if units and len(units) >= structure.units:
            where = f" of layer {structure.layer}" if structure.layer is not None else ""
            raise PlanError(f"invalid selection: removing all {structure.units} units of {structure.kind} structure {sid}{where} leaves nothing")
    for sid, per_expert in selection.per_expert.items():
        structure = graph.structures[sid]
        experts = {graph.params[m.param][0] for m in structure.members}
        if structure.kind != "expert_channels" or len(experts) != 1 or any(m.dim == 0 for m in structure.members):
            raise PlanError(f"invalid selection: per-expert removal needs an expert_channels structure, {sid} is {structure.kind}")
        if len(per_expert) != min(experts) or len({len(set(c)) for c in per_expert} | {len(c) for c in per_expert}) != 1:
            raise PlanError(f"invalid selection: structure {sid} needs one list of distinct channels per expert ({min(experts)}), each of the same length")
        if not 0 < len(per_expert[0]) < structure.units or any(not 0 <= c < structure.units for channels in per_expert for c in channels):
            raise PlanError(f"invalid selection: structure {sid} has {structure.units} channels per expert, and each expert must keep some")
    for sid, groups in selection.per_group.items():
        structure = graph.structures[sid]
        if structure.kind != "query_heads" or structure.nested_in is None:
            raise PlanError(f"invalid selection: per-group removal needs a query_heads structure, {sid} is {structure.kind}")
        outer = graph.structures[structure.nested_in]
        if len(groups) != outer.units or len({len(g) for g in groups}) != 1:
            raise PlanError(
                f"invalid selection: structure {sid} needs one list per KV group ({outer.units}), each of the same length"
            )
    if graph.blocks is None and selection.blocks:
        raise PlanError("invalid selection: this model has no repeated blocks to remove")
    if graph.blocks is not None:
        bad_blocks = [b for b in selection.blocks if not 0 <= b < graph.blocks.count]
        if bad_blocks or len(set(selection.blocks)) != len(selection.blocks) or len(selection.blocks) >= graph.blocks.count:
            raise PlanError(f"invalid selection: blocks {selection.blocks} are not distinct indices below {graph.blocks.count} leaving one")


def removed_indices(graph: StructureGraph, selection: Selection) -> Dict[str, Dict[int, Set[int]]]:
    """Parameter (model name) → dimension → the indices ``selection`` removes along it."""
    removed: Dict[str, Dict[int, Set[int]]] = defaultdict(lambda: defaultdict(set))
    for sid, units in selection.units.items():
        if units:
            for member in graph.structures[sid].members:
                removed[member.param][member.dim].update(member.indices(units).tolist())
    for sid, groups in selection.per_group.items():
        inner = graph.structures[sid]
        outer = graph.structures[inner.nested_in]  # type: ignore[index]
        for member in inner.members:
            # A fused projection has several members of the group on one dimension (its q, k and v parts).
            group_members = [m for m in outer.members if (m.param, m.dim) == (member.param, member.dim)]
            for group, slots in enumerate(groups):
                if slots:
                    in_group = np.concatenate([m.indices([group]) for m in group_members])
                    both = np.intersect1d(member.indices(slots), in_group)
                    removed[member.param][member.dim].update(both.tolist())
    return removed


def expert_removals(graph: StructureGraph, selection: Selection) -> Dict[str, Dict[int, List[Set[int]]]]:
    """Stacked expert parameter (model name) → dimension → for each expert, the indices that
    expert alone loses along it (``Selection.per_expert``; not in ``removed_indices``)."""
    removed: Dict[str, Dict[int, List[Set[int]]]] = defaultdict(dict)
    for sid, per_expert in selection.per_expert.items():
        for member in graph.structures[sid].members:
            sets = removed[member.param].setdefault(member.dim, [set() for _ in per_expert])
            for expert, channels in enumerate(per_expert):
                sets[expert].update(member.indices(channels).tolist())
    return removed


def _shared_set(kept: Tuple[int, ...], shared: Dict[Tuple[int, ...], str], plan: CutPlan) -> Any:
    """Identical kept lists (a hidden set touches hundreds of tensors) are stored once."""
    if kept not in shared:
        name = f"keep{len(shared)}"
        shared[kept] = name
        plan.index_sets[name] = list(kept)
    return shared[kept]


def _layer_of(graph: StructureGraph, name: str) -> Optional[int]:
    if graph.blocks is None:
        return None
    prefix = graph.blocks.prefix + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _layer_renumbering(graph: StructureGraph, dropped: Set[int]) -> Dict[int, int]:
    if graph.blocks is None:
        return {}
    kept = [i for i in range(graph.blocks.count) if i not in dropped]
    return {old: new for new, old in enumerate(kept)}


def _renumber(graph: StructureGraph, name: str, old: int, new: int) -> str:
    """``name`` with its block index changed; works on checkpoint names too, whose prefix may differ
    from the model's (``h.3.`` in a checkpoint saved from GPT2Model, ``transformer.h.3.`` in the model)."""
    assert graph.blocks is not None
    stack = graph.blocks.prefix.rsplit(".", 1)[-1]
    pattern = re.compile(rf"(^|\.){re.escape(stack)}\.{old}\.")
    renamed, count = pattern.subn(lambda m: f"{m.group(1)}{stack}.{new}.", name, count=1)
    if count != 1:
        raise PlanError(f"cannot find block {old} in tensor name '{name}'")
    return renamed


def _remaining_per_layer(graph: StructureGraph, kind: str, selection: Selection, dropped: Set[int]) -> Dict[Optional[int], int]:
    remaining: Dict[Optional[int], int] = {}
    for s in graph.by_kind(kind):
        if s.layer is not None and s.layer in dropped:
            continue
        remaining[s.layer] = s.units - removed_count(selection, s.id)
    return remaining


@dataclass
class _Widths:
    """What a selection does to the config: ``uniform`` edits (same in every layer) and, for width
    attributes that differ between layers, their value in each kept layer (``per_layer``)."""

    uniform: Dict[str, Any] = field(default_factory=dict)
    per_layer: Dict[str, List[int]] = field(default_factory=dict)
    kinds: Dict[str, str] = field(default_factory=dict)
    """Config attribute → the structure kind that sets it (for error messages)."""
    remaining: Dict[str, Dict[Optional[int], int]] = field(default_factory=dict)

    def set(self, key: str, kind: str, before: Any, values: Dict[Optional[int], int]) -> None:
        distinct = set(values.values())
        if len(distinct) == 1:
            value = distinct.pop()
            if value != before:
                self.uniform[key] = value
            return
        self.per_layer[key] = [values[layer] for layer in sorted(values, key=lambda layer: layer or 0)]
        self.kinds[key] = kind
        self.remaining[key] = values


def _widths(graph: StructureGraph, config: Mapping[str, Any], selection: Selection) -> _Widths:
    keys = _key_names(config)
    dropped = set(selection.blocks)
    widths = _Widths()
    heads = _remaining_per_layer(graph, "heads", selection, dropped)
    if heads:
        widths.set(keys["num_attention_heads"], "heads", graph.by_kind("heads")[0].units, heads)
        if "num_key_value_heads" in config:
            widths.set("num_key_value_heads", "heads", graph.by_kind("heads")[0].units, heads)
    groups = _remaining_per_layer(graph, "kv_groups", selection, dropped)
    slots = _remaining_per_layer(graph, "query_heads", selection, dropped)
    if groups or slots:
        kv_before = int(config.get("num_key_value_heads") or 0)  # groups imply the config has it
        rep_before = graph.by_kind("query_heads")[0].units if slots else 1
        layers = groups or slots
        kv = {layer: groups.get(layer, kv_before) for layer in layers}
        query = {layer: kv[layer] * slots.get(layer, rep_before) for layer in layers}
        widths.set("num_key_value_heads", "kv_groups", kv_before, kv)
        widths.set(keys["num_attention_heads"], "query_heads", config.get(keys["num_attention_heads"]), query)
    channels = _remaining_per_layer(graph, "channels", selection, dropped)
    if channels and _cuts_any(graph, "channels", selection):
        widths.set(_channel_key(config, graph.by_kind("channels")[0].units), "channels", graph.by_kind("channels")[0].units, channels)
    _expert_widths(graph, config, selection, widths)
    hidden = graph.by_kind("hidden")
    if hidden and selection.units.get(hidden[0].id):
        widths.uniform[keys["hidden_size"]] = hidden[0].units - len(selection.units[hidden[0].id])
    if dropped:
        assert graph.blocks is not None
        total = graph.blocks.count
        widths.uniform[keys["num_hidden_layers"]] = total - len(dropped)
        for key, value in config.items():
            if isinstance(value, list) and len(value) == total:
                widths.uniform[key] = [v for i, v in enumerate(value) if i not in dropped]
    return widths


def _cuts_any(graph: StructureGraph, kind: str, selection: Selection) -> bool:
    """Whether the selection removes units of ``kind``: the config key of a width left whole is
    not looked for (DeepSeek's channels: MLA ranks, dense and shared-expert MLPs, each its own key)."""
    return any(selection.units.get(s.id) for s in graph.by_kind(kind))


def _expert_widths(graph: StructureGraph, config: Mapping[str, Any], selection: Selection, widths: _Widths) -> None:
    """The expert count and expert width the selection leaves, into ``widths``. Fewer experts
    than the router's top-k is refused: every token must still find k experts."""
    dropped = set(selection.blocks)
    experts = _remaining_per_layer(graph, "experts", selection, dropped)
    if experts:
        before = graph.by_kind("experts")[0].units
        widths.set(_moe_key(config, EXPERT_KEYS, before, "number of experts"), "experts", before, experts)
        top_k = router_top_k(config)
        if min(experts.values()) < top_k:
            layer = min(experts, key=lambda layer: experts[layer])
            raise PlanError(
                f"removing experts leaves {experts[layer]} in layer {layer}, fewer than the {top_k} the router picks per token "
                f"(num_experts_per_tok): keep at least {top_k} experts in every layer"
            )
    channels = _remaining_per_layer(graph, "expert_channels", selection, dropped)
    if channels:
        before = graph.by_kind("expert_channels")[0].units
        widths.set(_moe_key(config, EXPERT_CHANNEL_KEYS, before, "expert width"), "expert_channels", before, channels)


def router_top_k(config: Mapping[str, Any]) -> int:
    """How many experts the router picks per token (1 where the config does not say)."""
    return next((int(config[key]) for key in TOP_K_KEYS if isinstance(config.get(key), int)), 1)


def _moe_key(config: Mapping[str, Any], keys: Tuple[str, ...], value: int, what: str) -> str:
    for key in keys:
        if config.get(key) == value:
            return key
    raise PlanError(f"cannot find the config key holding the {what} {value} (looked for {', '.join(keys)})")


# A stock MoE config has one expert count and one expert width for all layers.
NON_UNIFORM_EXPERTS = (
    "the stock {model_type} config holds one {key} for every layer, this selection leaves {detail}; "
    "remove the same number in every layer: plan without --global (uniform), or set the count with --experts N"
)


def _refuse_non_uniform_experts(config: Mapping[str, Any], widths: _Widths) -> None:
    """Per-layer expert counts or widths: no format structprune writes loads them (the layers
    format rebuilds dense MLPs), so they are refused whatever the layout, naming the options."""
    for key, kind in widths.kinds.items():
        if kind in ("experts", "expert_channels"):
            detail = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(widths.remaining[key].items(), key=lambda kv: kv[0] or 0))
            raise PlanError(NON_UNIFORM_EXPERTS.format(model_type=config.get("model_type"), key=key, detail=detail))


def _config_patch(graph: StructureGraph, config: Mapping[str, Any], selection: Selection, layout: str, *, verify: bool = True) -> Tuple[Dict[str, Any], str]:
    """The config merge patch and the format it is written in (``structprune.models.formats``);
    without ``verify``, a stock patch is written even where no stock config can hold the cut."""
    widths = _widths(graph, config, selection)
    _refuse_non_uniform_experts(config, widths)
    head_key = _key_names(config)["num_attention_heads"]
    per_layer = widths.per_layer
    patch = dict(widths.uniform)
    encoder_heads = config.get("model_type") in formats.ENCODER_ATTENTION and (head_key in per_layer or head_key in patch)
    if encoder_heads and layout == "auto":
        layout = "layers"
    elif encoder_heads and layout == "stock" and verify:
        raise PlanError(formats.ENCODER_HEADS_REFUSAL.format(model_type=config.get("model_type")))
    chosen = formats.choose_format(layout, config, per_layer, head_key)
    if chosen == "stock":
        for key in widths.per_layer:
            detail = ", ".join(f"layer {layer}: {n}" for layer, n in sorted(widths.remaining[key].items(), key=lambda kv: kv[0] or 0))
            raise PlanError(f"a stock config needs the same number of {widths.kinds[key]} in every layer, this selection leaves {detail}")
        return patch, chosen
    assert graph.blocks is not None, "per-layer widths need repeated blocks"
    layer_count = graph.blocks.count - len(selection.blocks)
    if encoder_heads and head_key in patch:
        # The dense head count stays model-wide, each layer states its own (formats' docstring).
        per_layer = {**per_layer, head_key: [int(patch.pop(head_key))] * layer_count}
    if head_key in per_layer or head_key in patch or "hidden_size" in patch:
        head_dim = _head_dim(config)
        if head_dim is not None:
            patch["head_dim"] = head_dim
    if chosen == "decilm":
        refusal = formats.decilm_refusal(config, widths.per_layer, head_key)
        if refusal:
            raise PlanError(f"cannot write this plan as a DeciLM checkpoint: {refusal}")
        patch.update(formats.decilm_patch(config, widths.per_layer, patch, layer_count))
    else:
        patch.update(formats.layers_patch(config, per_layer, graph.blocks.prefix, layer_count))
    return patch, chosen


def _key_names(config: Mapping[str, Any]) -> Dict[str, str]:
    """Standard attribute names → the keys this model's config.json uses (GPT-2 says n_embd)."""
    attribute_map = config_class(config).attribute_map
    standard = ("hidden_size", "num_attention_heads", "num_hidden_layers")
    return {name: attribute_map.get(name, name) for name in standard}


def _head_dim(config: Mapping[str, Any]) -> Optional[int]:
    """The head size the model uses now: hidden_size / num_attention_heads unless stated."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    keys = _key_names(config)
    hidden, heads = config.get(keys["hidden_size"]), config.get(keys["num_attention_heads"])
    return int(hidden) // int(heads) if hidden and heads else None


def _channel_key(config: Mapping[str, Any], units: int) -> str:
    for key in CHANNEL_KEYS:
        if config.get(key) == units:
            return key
    for key in CHANNEL_KEYS:
        if key in config and config[key] is None:
            return key
    raise PlanError(f"cannot find the config key holding the MLP width {units} (looked for {', '.join(CHANNEL_KEYS)})")


def planned_shapes(
    graph: StructureGraph,
    plan: CutPlan,
    to_model: Mapping[str, str],
    dropped_layers: Set[int],
    *,
    stacked: Optional[Mapping[str, Tuple[int, ...]]] = None,
) -> Dict[str, Tuple[int, ...]]:
    """Output shapes of ``plan`` by the model's state-dict names (tied aliases take their source's
    shape). Tensors the plan adds are named as in the output already, in ``to_model`` as well;
    ``stacked`` gives the shapes of stacked expert parameters (written as per-expert pieces)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for param, stacked_shape in (stacked or {}).items():
        layer = _layer_of(graph, param)
        if layer is None or layer not in dropped_layers:
            shapes[output_name(graph, param, dropped_layers)] = stacked_shape
    for name, model_name in to_model.items():
        cut = plan.tensors.get(name, TensorCut())
        if cut.add is not None:
            shapes[model_name] = cut.add.shape
            continue
        source = graph.tied.get(model_name, model_name)
        if source not in graph.params or cut.drop:
            continue
        shape = list(graph.params[source])
        for dim, indices in cut.keep.items():
            shape[dim] = len(plan.index_sets[indices]) if isinstance(indices, str) else len(indices)
        shapes[output_name(graph, model_name, dropped_layers)] = tuple(shape)
    return shapes


def output_name(graph: StructureGraph, model_name: str, dropped_layers: Set[int]) -> str:
    """The state-dict name the tensor ``model_name`` (of a layer that stays) has in the output:
    its block renumbered past the removed ones."""
    layer = _layer_of(graph, model_name)
    renumbered = _layer_renumbering(graph, dropped_layers)
    if layer is None or renumbered[layer] == layer:
        return model_name
    return _renumber(graph, model_name, layer, renumbered[layer])


def verify_config(
    graph: StructureGraph,
    config: Mapping[str, Any],
    plan: CutPlan,
    to_model: Mapping[str, str],
    dropped_layers: Set[int],
    *,
    stacked: Optional[Mapping[str, Tuple[int, ...]]] = None,
) -> None:
    """Raises ``PlanError`` unless the edited config implies exactly the shapes the plan writes."""
    produced = planned_shapes(graph, plan, to_model, dropped_layers, stacked=stacked)
    _check_shapes(graph, merge_patch(dict(config), plan.config), produced)


def _check_shapes(graph: StructureGraph, edited: Mapping[str, Any], produced: Mapping[str, Tuple[int, ...]]) -> None:
    """Raises ``PlanError`` unless the model the config ``edited`` builds has the ``produced``
    shapes, and no tensor the plan does not produce. A model built with fewer blocks than the
    output has is compared on the tensors it has."""
    model_type = edited.get("model_type")
    try:
        model = meta_model_of(edited)
    except PlanError:
        raise
    except Exception as err:  # noqa: BLE001 - config classes raise many kinds of validation errors
        reason = str(err).strip().splitlines()[-1].strip()
        raise PlanError(f"the edited {model_type} config is not valid: {reason}") from err
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for name, shape in sorted(produced.items()):
        if name in expected and expected[name] != shape:
            raise PlanError(
                f"the stock {model_type} config cannot express this cut: tensor '{name}' would be {list(shape)} "
                f"but the edited config builds {list(expected[name])}"
            )
    missing = sorted(n for n in expected if n not in produced and n not in graph.tied and not _is_buffer(model, n))
    if missing:
        raise PlanError(f"the edited {model_type} config expects tensor '{missing[0]}', which the plan does not produce")


def _is_buffer(model: Any, name: str) -> bool:
    return name in dict(model.named_buffers())


def merge_patch(target: Dict[str, Any], patch: Mapping[str, Any]) -> Dict[str, Any]:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            target[key] = merge_patch(dict(target[key]), value)
        else:
            target[key] = value
    return target


def stock_config_check(graph: StructureGraph, config: Mapping[str, Any], kind: str) -> Optional[str]:
    """Why removing one unit of ``kind`` in every layer cannot be written as a stock checkpoint,
    or ``None`` when it can: what ``cut_plan`` answers for that selection, decided from widths. The
    shapes the plan would write follow from the numbers of indices removed (not from the kept
    indices of every tensor), and a model whose blocks are all alike is built with two of them, so
    the answer takes milliseconds whatever the depth and width."""
    selection = Selection()
    if kind == "blocks":
        if graph.blocks is None or graph.blocks.count < 2:
            return "the model has fewer than two repeated blocks"
        selection.blocks = [graph.blocks.count - 1]
    else:
        structures = graph.by_kind(kind)
        if not structures:
            return f"the model has no {kind} structure"
        # Hidden widths must stay a multiple of the head count in most configs.
        step = int(config.get(_key_names(config)["num_attention_heads"]) or 1) if kind == "hidden" else 1
        if any(s.units <= step for s in structures):
            return f"fewer than {step + 1} units"
        selection.units = {s.id: list(range(s.units - step, s.units)) for s in structures}
    try:
        patch, _ = _config_patch(graph, config, selection, "stock")
        produced = _counted_shapes(graph, selection)
        blocks = _blocks_worth_building(graph, config)
        _verify_with_head_dim(config, patch, lambda: _check_shapes(graph, _first_blocks(merge_patch(dict(config), patch), blocks), produced))
    except PlanError as err:
        return str(err)
    return None


# Blocks built to check a config when every block is alike (the tracer traces as many).
CHECKED_BLOCKS = 2


def _counted_shapes(graph: StructureGraph, selection: Selection) -> Dict[str, Tuple[int, ...]]:
    """What ``planned_shapes`` gives for ``cut_plan(graph, config, selection, list(graph.params))``,
    from the number of indices removed along each dimension."""
    removed = _counted_removals(removed_indices(graph, selection), expert_removals(graph, selection))
    dropped = set(selection.blocks)
    renumbered = _layer_renumbering(graph, dropped)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name in graph.params:
        layer = _layer_of(graph, name)
        source = graph.tied.get(name, name)
        if (layer is not None and layer in dropped) or source not in graph.params:
            continue
        shape = list(graph.params[source])
        for dim, gone in removed.get(source, {}).items():
            shape[dim] -= len(gone)
        # output_name's renaming, with the renumbering worked out once.
        if layer is not None and renumbered[layer] != layer:
            name = _renumber(graph, name, layer, renumbered[layer])
        shapes[name] = tuple(shape)
    return shapes


def _blocks_worth_building(graph: StructureGraph, config: Mapping[str, Any]) -> Optional[int]:
    """``CHECKED_BLOCKS`` when a model of that many blocks tells all the full one does: every block
    holds the same tensors with the same shapes, and the config cut to that many blocks builds the
    graph's tensors outside the blocks and in the first ones, name for name and shape for shape
    (the tracer's test of a truncated model). ``None``: build every block."""
    if graph.blocks is None or graph.blocks.count <= CHECKED_BLOCKS:
        return None
    prefix = graph.blocks.prefix
    layouts: Dict[int, Dict[str, Tuple[int, ...]]] = defaultdict(dict)
    for name, shape in graph.params.items():
        layer = _layer_of(graph, name)
        if layer is not None:
            layouts[layer][name[len(prefix) + len(str(layer)) + 2 :]] = shape
    if len(layouts) != graph.blocks.count or any(layout != layouts[0] for layout in layouts.values()):
        return None
    try:
        model = meta_model_of(_first_blocks(dict(config), CHECKED_BLOCKS))
    except Exception:  # noqa: BLE001 - the check at full depth reports what is wrong with the config
        return None
    built = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False) if name not in graph.tied}
    wanted = {
        name: shape for name, shape in graph.params.items() if (_layer_of(graph, name) or 0) < CHECKED_BLOCKS and name not in graph.tied
    }
    return CHECKED_BLOCKS if built == wanted else None


def _first_blocks(config: Dict[str, Any], blocks: Optional[int]) -> Dict[str, Any]:
    """``config`` describing its first ``blocks`` blocks only (per-block lists cut to match), or
    unchanged for ``None``."""
    key = _key_names(config)["num_hidden_layers"]
    total = config.get(key)
    if blocks is None or not isinstance(total, int) or total <= blocks:
        return config
    cut = {k: v[:blocks] if isinstance(v, list) and len(v) == total and k != "architectures" else v for k, v in config.items()}
    cut[key] = blocks
    return cut


def checkpoint_cut_plan(
    model_dir: Union[str, "PathLike[str]"],
    graph: StructureGraph,
    selection: Selection,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    layout: str = "stock",
) -> CutPlan:
    """``cut_plan`` for a checkpoint directory: its tensor names, its config.json, and the renames
    transformers applies to its keys on load."""
    from structprune.io.checkpoint import read_checkpoint, read_config
    from structprune.tracing.export import checkpoint_layout

    names = list(read_checkpoint(model_dir).tensors)
    config = read_config(Path(model_dir)) or {}
    names_on_load = checkpoint_layout(model_dir, names)
    return cut_plan(
        graph, config, selection, names,
        model_names=names_on_load.renamed, expert_pieces=names_on_load.experts, metadata=metadata, layout=layout,
    )
