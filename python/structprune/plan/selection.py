"""Planning: from scores and a target to a selection of units (then ``cuts`` makes it a plan).

Uniform planning keeps every layer the same width, so the result is a stock checkpoint that any
loader of the architecture reads: k units of each targeted kind are removed in every layer (each
layer its own lowest-scoring ones). How the parameter budget is split between kinds follows the
scores: for every possible head count, MLP and hidden steps are taken greedily by lowest summed
score per parameter until the target is reached, and the split with the least summed importance
within tolerance of the target wins. Widths are rounded to hardware-friendly multiples; heads are
whole, and the head count always divides the hidden size, as transformers' configs require.

Global planning gives every layer its own widths: each structure (one layer's MLP, one layer's
heads…) offers removal steps cheapest first (``multiple`` channels, one head, or one query-head
slot in every KV group), and steps are taken across all layers by lowest score per parameter
removed until the target is reached. Scores are compared across layers as they are (a Taylor score
estimates a change of the loss, which is comparable everywhere) or after normalising each
structure's scores (``normalize``). The result needs a non-uniform checkpoint format
(``structprune.models.formats``).

Depth and width combine: with ``blocks`` next to other structures, ``Target.blocks`` whole blocks
(the lowest block influence outside protected layers) go first and the rest of the budget comes
from widths in the blocks that stay. Block influence and width scores are not on one scale, so the
split between depth and width is the user's choice: depth makes every token step cheaper (fewer
layers to run, which matters most where per-layer overhead dominates, as in small-batch decoding),
width usually costs less quality per parameter.

Protected layers (the first and last few) are never pruned; LLM-Pruner prunes layers 4–29 of 32,
which :func:`default_protection` scales to other depths.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from structprune.plan.cuts import Selection, removed_count
from structprune.errors import PlanError
from structprune.tracing.graph import Structure, StructureGraph

if TYPE_CHECKING:  # scoring needs torch; planning reads scores only, so the CLI stays light
    from structprune.score.scorer import Scores

STRUCTURE_CHOICES = ("heads", "mlp", "hidden", "blocks", "experts", "expert-channels")
NORMALIZATIONS = ("none", "mean", "max", "sum", "l2")
PLANNINGS = ("uniform", "global")
GQA_MODES = ("query-heads", "kv-groups")
"""Under grouped-query attention: remove query heads inside every KV group, or whole KV groups."""


@dataclass(frozen=True)
class Target:
    """What to remove: ``ratio`` of all parameters, from the structure kinds named in ``structures``
    (heads, mlp, hidden, blocks). ``gqa`` chooses, for grouped-query attention, whether "heads"
    removes whole KV groups (``kv-groups``) or the same number of query heads inside every KV group
    (``query-heads``). Kept widths are multiples of ``multiple`` (MLP and hidden). ``protect``:
    how many of the first and of the last blocks are left unpruned. ``normalize``: how global
    planning makes scores of different structures comparable (one of ``NORMALIZATIONS``).
    ``blocks``: whole blocks to remove when "blocks" is combined with width structures (``None``
    when blocks are pruned on their own: then the ratio sets their number). ``experts``: routed
    experts to remove in every MoE layer, exactly (the rest of the ratio from the other structures;
    ``None``: the planner chooses the count). ``min_experts``: experts every MoE layer keeps at
    least (the router's top-k)."""

    ratio: float
    structures: Tuple[str, ...] = ("heads", "mlp")
    gqa: str = "query-heads"
    multiple: int = 8
    protect: Tuple[int, int] = (0, 0)
    normalize: str = "none"
    blocks: Optional[int] = None
    experts: Optional[int] = None
    min_experts: int = 1


def default_protection(depth: int) -> Tuple[int, int]:
    """LLM-Pruner's choice for 32 layers (prune 4–29: keep the first 4 and the last 2) scaled to
    ``depth`` layers, rounding halves up."""
    return int(depth / 8 + 0.5), int(depth / 16 + 0.5)


def protected_layers(graph: StructureGraph, target: Target) -> FrozenSet[int]:
    if graph.blocks is None:
        return frozenset()
    depth = graph.blocks.count
    first, last = target.protect
    if first < 0 or last < 0 or first + last >= depth:
        raise PlanError(f"cannot protect the first {first} and last {last} of {depth} blocks: nothing would be left to prune")
    return frozenset(list(range(first)) + list(range(depth - last, depth)))


def _targeted(graph: StructureGraph, kind: str, protected: FrozenSet[int]) -> List[Structure]:
    return [s for s in graph.by_kind(kind) if s.layer is None or s.layer not in protected]


def _kinds_for(graph: StructureGraph, target: Target) -> List[str]:
    kinds = []
    for name in target.structures:
        if name == "heads":
            if graph.by_kind("heads"):
                kinds.append("heads")
            elif target.gqa == "kv-groups" and graph.by_kind("kv_groups"):
                kinds.append("kv_groups")
            elif graph.by_kind("query_heads"):
                kinds.append("query_heads")
        elif name == "mlp":
            if graph.by_kind("channels"):  # Mixtral's only MLPs are its experts
                kinds.append("channels")
        elif name == "hidden":
            if not graph.by_kind("hidden"):
                raise PlanError(
                    "the model's hidden width is pinned, so 'hidden' has nothing to remove (an encoder's hidden "
                    "states are its output, the embeddings; `structprune inspect MODEL` lists what is pinned and why)"
                )
            kinds.append("hidden")
        elif name == "blocks":
            kinds.append("blocks")
        elif name in ("experts", "expert-channels"):
            # A dense model has no MoE structures: nothing to add (an error if nothing else is named).
            kind = name.replace("-", "_")
            if graph.by_kind(kind):
                kinds.append(kind)
        else:
            raise PlanError(f"unknown structure '{name}'; choose from {', '.join(STRUCTURE_CHOICES)}")
    return kinds


_HEAD_KINDS = ("heads", "kv_groups", "query_heads")


@dataclass
class _Kind:
    """One targeted structure kind: cumulative cost of removing k units in every layer."""

    name: str
    units: int
    params_per_step: int
    """Parameters removed by one more unit in every structure of the kind."""
    cumulative: np.ndarray
    """cumulative[k]: summed scores of each structure's k lowest units (k = 0 … units)."""
    per_unit_of_heads: int = 1
    keep_at_least: int = 0
    """Units every structure keeps whatever the step (experts: the router's top-k)."""


def _removal_costs(structure: Structure, scores: Scores) -> np.ndarray:
    """Cost of each successive unit removal in one structure, cheapest first."""
    if structure.kind == "query_heads" and structure.id in scores.per_group:
        # Each KV group drops its own lowest slots; the k-th removal costs the k-th lowest of each.
        return np.sort(scores.per_group[structure.id], axis=1).sum(axis=0)
    if structure.kind == "expert_channels" and structure.id in scores.per_expert:
        return np.sort(scores.per_expert[structure.id], axis=1).sum(axis=0)  # each expert its own lowest, likewise
    return np.sort(scores.units[structure.id])


def _kind(graph: StructureGraph, scores: Scores, name: str, head_count: int, protected: FrozenSet[int] = frozenset()) -> _Kind:
    structures = _targeted(graph, name, protected)
    _refuse_mixed_widths(name, structures)
    per_step = np.stack([_removal_costs(s, scores) for s in structures]).sum(axis=0)
    units = structures[0].units
    return _Kind(
        name=name,
        units=units,
        params_per_step=sum(s.unit_params for s in structures),
        cumulative=np.concatenate([[0.0], np.cumsum(per_step)]),
        per_unit_of_heads=head_count // units if name != "heads" and units else 1,
    )


# The --structures entry that names each kind, for messages.
_OPTION_OF_KIND = {"channels": "mlp", "expert_channels": "expert-channels", "kv_groups": "heads", "query_heads": "heads"}


def _refuse_mixed_widths(name: str, structures: Sequence[Structure]) -> None:
    """A uniform plan removes as many units from every structure of a kind, which needs one width:
    refused, naming the widths, where they differ (DeepSeek's and Qwen-MoE's dense MLP blocks
    beside shared experts, DeepSeek's MLA ranks: channels of several widths, each its own config key)."""
    layers: Dict[int, List[str]] = {}
    for s in structures:
        layers.setdefault(s.units, []).append("all" if s.layer is None else str(s.layer))
    if len(layers) > 1:
        widths = "; ".join(f"{units} in layer(s) {', '.join(dict.fromkeys(where))}" for units, where in sorted(layers.items()))
        raise PlanError(
            f"--structures {_OPTION_OF_KIND.get(name, name)}: the model's {name} structures differ in width ({widths}); a uniform plan "
            f"removes as many units from each, which one stock config width cannot hold: leave it out of --structures"
        )


def _heads_left(kind: _Kind, removed: int) -> int:
    return (kind.units - removed) * kind.per_unit_of_heads


def _fill(fine: List[_Kind], steps: Dict[str, int], budget: float) -> Tuple[Dict[str, int], float, int]:
    """Greedy over fine-grained kinds (MLP, hidden): repeatedly take the step with the lowest score
    per parameter while it brings the removed parameters closer to ``budget``."""
    counts = {k.name: 0 for k in fine}
    score, removed = 0.0, 0
    while True:
        best = None
        for k in fine:
            step = steps[k.name]
            # Kept widths stay multiples of the step: remove units ≡ units (mod step).
            new = counts[k.name] + step if counts[k.name] or k.units % step == 0 else k.units % step
            if new > k.units - max(step, k.keep_at_least):
                continue
            cost = float(k.cumulative[new] - k.cumulative[counts[k.name]])
            params = (new - counts[k.name]) * k.params_per_step
            if abs(removed + params - budget) >= abs(removed - budget):
                continue
            if best is None or cost / params < best[0]:
                best = (cost / params, k, new, cost, params)
        if best is None:
            return counts, score, removed
        _, k, new, cost, params = best
        counts[k.name] = new
        score += cost
        removed += params


def plan_uniform(graph: StructureGraph, scores: Scores, target: Target, head_count: int, hidden_size: int) -> Selection:
    """The selection closest to removing ``target.ratio`` of all parameters with the least summed
    importance, the same width in every layer for each kind (a stock checkpoint)."""
    if not 0 < target.ratio < 1:
        raise PlanError(f"ratio must be between 0 and 1, got {target.ratio}")
    kinds = _kinds_for(graph, target)
    if not kinds:
        raise PlanError(f"the model has none of the structures {', '.join(target.structures)}")
    wanted = target.ratio * graph.total_params
    if kinds == ["blocks"]:
        return _plan_blocks(graph, scores, wanted)
    removed_blocks = _blocks_with_widths(graph, scores, target, kinds)
    kinds = [k for k in kinds if k != "blocks"]
    wanted -= len(removed_blocks) * _block_params(graph)
    protected = protected_layers(graph, target) | frozenset(removed_blocks)
    fixed = _fixed_experts(graph, scores, target, kinds, protected)
    if fixed is not None:
        kinds = [k for k in kinds if k != "experts"]
        wanted -= _removed_params(graph, fixed)
        if not kinds:
            fixed.blocks = removed_blocks
            return fixed
    head_kind = next((_kind(graph, scores, k, head_count, protected) for k in kinds if k in _HEAD_KINDS), None)
    fine = [_kind(graph, scores, k, head_count, protected) for k in kinds if k not in _HEAD_KINDS]
    for k in fine:
        if k.name == "experts":
            k.keep_at_least = target.min_experts
    best: Optional[Tuple[float, float, Dict[str, int]]] = None
    tolerance = max([k.params_per_step * target.multiple for k in fine] + [0.005 * graph.total_params])
    for removed_heads in range(head_kind.units if head_kind else 1):
        heads = _heads_left(head_kind, removed_heads) if head_kind else head_count
        hidden_pruned = any(k.name == "hidden" for k in fine)
        if heads and not hidden_pruned and hidden_size % heads:
            continue  # transformers' configs need hidden_size to be a multiple of the head count
        head_params = removed_heads * head_kind.params_per_step if head_kind else 0
        head_score = float(head_kind.cumulative[removed_heads]) if head_kind else 0.0
        steps = {k.name: _step(k.name, target, heads) for k in fine}
        counts, score, removed = _fill(fine, steps, wanted - head_params)
        if head_kind:
            counts[head_kind.name] = removed_heads
        gap = abs(head_params + removed - wanted)
        key = (0.0 if gap <= tolerance else gap, head_score + score)
        if best is None or key < best[:2]:
            best = (key[0], key[1], counts)
    assert best is not None
    selection = _select(graph, scores, kinds, best[2], protected)
    selection.blocks = removed_blocks
    if fixed is not None:
        selection.units.update(fixed.units)
    return selection


def _step(kind: str, target: Target, heads: int) -> int:
    """Units one uniform step removes in every layer: experts one at a time, hidden widths a
    multiple of the head count too, other widths ``target.multiple``."""
    if kind == "experts":
        return 1
    if kind == "hidden" and heads:
        return int(np.lcm(target.multiple, heads))
    return target.multiple


def _fixed_experts(graph: StructureGraph, scores: Scores, target: Target, kinds: Sequence[str], protected: FrozenSet[int]) -> Optional[Selection]:
    """With ``target.experts``: that many lowest-scoring experts of every unprotected MoE layer
    (``None`` without it). Refused where a layer would keep fewer than the router picks, or where
    the experts alone remove the ratio or more."""
    if target.experts is None:
        return None
    if "experts" not in kinds:
        raise PlanError(f"--experts {target.experts} removes routed experts: it needs experts among --structures")
    structures = _targeted(graph, "experts", protected)
    if not structures:
        raise PlanError("--experts: the model has no routed experts (no router top-k gathering stacked expert weights was found)")
    fewest = min(s.units for s in structures)
    if not 0 <= target.experts <= fewest - target.min_experts:
        raise PlanError(
            f"--experts {target.experts}: layers have {fewest} experts and the router picks {target.min_experts} per token, "
            f"so at most {fewest - target.min_experts} can go"
        )
    selection = _select_per_structure(graph, scores, {s.id: target.experts for s in structures})
    removed = _removed_params(graph, selection)
    if removed >= target.ratio * graph.total_params:
        raise PlanError(
            f"removing {target.experts} experts per layer already removes {removed / graph.total_params:.1%} of the parameters, "
            f"not less than the ratio {target.ratio:.1%}; ask for fewer experts or a larger ratio"
        )
    return selection


def _removed_params(graph: StructureGraph, selection: Selection) -> int:
    return sum(len(units) * graph.get(sid).unit_params for sid, units in selection.units.items())


def _plan_blocks(graph: StructureGraph, scores: Scores, wanted: float) -> Selection:
    count = min(_block_count(graph) - 1, max(1, int(round(wanted / _block_params(graph)))))
    return Selection(blocks=_lowest(_block_influence(scores), count))


def _blocks_with_widths(graph: StructureGraph, scores: Scores, target: Target, kinds: Sequence[str]) -> List[int]:
    """The blocks removed before widths are planned: ``target.blocks`` of them, those with the lowest
    influence outside protected layers (none when blocks are not targeted)."""
    if "blocks" not in kinds:
        return []
    if target.blocks is None:
        raise PlanError(
            "blocks combined with other structures need the number of whole blocks to remove (--blocks N); "
            "the rest of the ratio then comes from widths"
        )
    protected = protected_layers(graph, target)
    candidates = [b for b in range(_block_count(graph)) if b not in protected]
    if not 0 <= target.blocks < len(candidates):
        raise PlanError(f"cannot remove {target.blocks} blocks: {len(candidates)} unprotected blocks, and one must keep its widths to prune")
    influence = _block_influence(scores)
    chosen = _lowest(influence[candidates], target.blocks)
    removed = sorted(candidates[i] for i in chosen)
    if len(removed) * _block_params(graph) >= target.ratio * graph.total_params:
        raise PlanError(
            f"removing {len(removed)} blocks already removes {len(removed) * _block_params(graph) / graph.total_params:.1%} "
            f"of the parameters, not less than the ratio {target.ratio:.1%}; ask for fewer blocks or a larger ratio"
        )
    return removed


def _block_count(graph: StructureGraph) -> int:
    if graph.blocks is None:
        raise PlanError("the model has no repeated blocks to remove")
    return graph.blocks.count


def _block_params(graph: StructureGraph) -> int:
    if graph.blocks is None:
        raise PlanError("the model has no repeated blocks to remove")
    return graph.blocks.unit_params


def _block_influence(scores: Scores) -> np.ndarray:
    if scores.block_influence is None:
        raise PlanError("removing blocks needs calibration data (block influence)")
    return np.asarray(scores.block_influence)


def _lowest(values: np.ndarray, count: int) -> List[int]:
    """Indices of the ``count`` lowest scores; ties broken by index, so results are reproducible."""
    order = np.lexsort((np.arange(len(values)), values))
    return sorted(int(i) for i in order[:count])


def _select(graph: StructureGraph, scores: Scores, kinds: Sequence[str], counts: Dict[str, int], protected: FrozenSet[int] = frozenset()) -> Selection:
    per_structure = {s.id: counts.get(kind, 0) for kind in kinds for s in _targeted(graph, kind, protected)}
    return _select_per_structure(graph, scores, per_structure)


def _select_per_structure(graph: StructureGraph, scores: Scores, counts: Dict[int, int]) -> Selection:
    """Removes the ``counts[id]`` lowest-scoring units of each structure."""
    selection = Selection()
    for sid, count in sorted(counts.items()):
        if count == 0:
            continue
        if graph.get(sid).kind == "query_heads" and sid in scores.per_group:
            selection.per_group[sid] = [_lowest(row, count) for row in scores.per_group[sid]]
        elif graph.get(sid).kind == "expert_channels" and sid in scores.per_expert:
            selection.per_expert[sid] = [_lowest(row, count) for row in scores.per_expert[sid]]
        else:
            selection.units[sid] = _lowest(scores.units[sid], count)
    return selection


def normalized(graph: StructureGraph, scores: Scores, how: str) -> Scores:
    """``scores`` with each structure's unit scores divided by their mean, max, sum or L2 norm
    (``none``: unchanged), so that structures of different layers and kinds can be ranked together."""
    if how not in NORMALIZATIONS:
        raise PlanError(f"unknown normalisation '{how}'; choose one of {', '.join(NORMALIZATIONS)}")
    if how == "none":
        return scores
    reducers: Dict[str, Callable[..., Any]] = {"mean": np.mean, "max": np.max, "sum": np.sum, "l2": np.linalg.norm}
    reduce = reducers[how]
    units: Dict[int, np.ndarray] = {}
    per_group: Dict[int, np.ndarray] = {}
    per_expert: Dict[int, np.ndarray] = {}
    for sid, values in scores.units.items():
        scale = float(reduce(np.abs(values)))
        scale = scale if scale > 0 else 1.0
        units[sid] = values / scale
        if sid in scores.per_group:
            per_group[sid] = scores.per_group[sid] / scale
        if sid in scores.per_expert:
            per_expert[sid] = scores.per_expert[sid] / scale
    return replace(scores, units=units, per_group=per_group, per_expert=per_expert)


@dataclass
class _Ladder:
    """One structure's allowed removal counts (``stops``, increasing) and the summed cost of each."""

    structure: Structure
    stops: List[int]
    costs: List[float]
    position: int = 0

    def next_step(self) -> Optional[Tuple[float, int]]:
        """(cost per parameter, parameters) of moving to the next stop; ``None`` at the last one."""
        if self.position + 1 >= len(self.stops):
            return None
        units = self.stops[self.position + 1] - self.stops[self.position]
        params = units * self.structure.unit_params
        cost = self.costs[self.position + 1] - self.costs[self.position]
        return cost / max(params, 1), params


def _ladder(structure: Structure, scores: Scores, step: int, keep_at_least: int = 0) -> _Ladder:
    """Kept widths stay multiples of ``step`` and at least ``step`` (one unit for heads) and
    ``keep_at_least`` (experts: the router's top-k)."""
    cumulative = np.concatenate([[0.0], np.cumsum(_removal_costs(structure, scores))])
    floor = max(step, keep_at_least)
    stops = [0] + [r for r in range(1, structure.units) if (structure.units - r) % step == 0 and structure.units - r >= floor]
    return _Ladder(structure, stops, [float(cumulative[r]) for r in stops])


def plan_global(graph: StructureGraph, scores: Scores, target: Target) -> Selection:
    """Per-layer widths: removal steps of every structure outside protected layers are taken by lowest
    (normalised) score per parameter, across all layers, until ``target.ratio`` of all parameters is
    removed (as close as the steps allow)."""
    if not 0 < target.ratio < 1:
        raise PlanError(f"ratio must be between 0 and 1, got {target.ratio}")
    kinds = _kinds_for(graph, target)
    if kinds == ["blocks"]:
        raise PlanError("global planning chooses widths per layer; remove blocks on their own with uniform planning, or name width structures too")
    if not kinds:
        raise PlanError(f"the model has none of the structures {', '.join(target.structures)}")
    removed_blocks = _blocks_with_widths(graph, scores, target, kinds)
    kinds = [k for k in kinds if k != "blocks"]
    protected = protected_layers(graph, target) | frozenset(removed_blocks)
    fixed = _fixed_experts(graph, scores, target, kinds, protected)
    if fixed is not None:
        kinds = [k for k in kinds if k != "experts"]
    ranked = normalized(graph, scores, target.normalize)
    ladders = [
        _ladder(s, ranked, 1 if kind in _HEAD_KINDS or kind == "experts" else target.multiple, target.min_experts if kind == "experts" else 0)
        for kind in kinds
        for s in _targeted(graph, kind, protected)
    ]
    budget = target.ratio * graph.total_params - len(removed_blocks) * _block_params(graph)
    budget -= _removed_params(graph, fixed) if fixed is not None else 0
    removed = 0
    queue: List[Tuple[float, int, int]] = []
    for position, ladder in enumerate(ladders):
        step = ladder.next_step()
        if step is not None:
            queue.append((step[0], ladder.structure.id, position))
    heapq.heapify(queue)
    while queue:
        _, _, position = heapq.heappop(queue)
        ladder = ladders[position]
        step = ladder.next_step()
        assert step is not None
        if abs(removed + step[1] - budget) >= abs(removed - budget):
            continue  # this ladder's next step overshoots; smaller steps elsewhere may still fit
        removed += step[1]
        ladder.position += 1
        following = ladder.next_step()
        if following is not None:
            heapq.heappush(queue, (following[0], ladder.structure.id, position))
    counts = {ladder.structure.id: ladder.stops[ladder.position] for ladder in ladders}
    selection = _select_per_structure(graph, scores, counts)
    selection.blocks = removed_blocks
    if fixed is not None:
        selection.units.update(fixed.units)
    return selection


def layer_widths(graph: StructureGraph, selection: Selection) -> Dict[str, List[int]]:
    """Units kept per layer for each per-layer kind (for the closing summary)."""
    widths: Dict[str, List[int]] = {}
    for s in graph.structures:
        if s.layer is None or s.layer in selection.blocks:
            continue
        widths.setdefault(s.kind, []).append(s.units - removed_count(selection, s.id))
    return widths
