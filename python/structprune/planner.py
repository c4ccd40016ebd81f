"""Planning: from scores and a target to a selection of units (then ``cuts`` makes it a plan).

Uniform planning keeps every layer the same width, so the result is a stock checkpoint that any
loader of the architecture reads: one fraction ``r`` of the units of each targeted structure kind is
removed in every layer (each layer choosing its own lowest-scoring units), and ``r`` is searched so
that the parameters removed come closest to the target. Widths are rounded to hardware-friendly
multiples; heads are whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from structprune.cuts import Selection
from structprune.errors import PlanError
from structprune.graph import Structure, StructureGraph
from structprune.scoring import Scores

STRUCTURE_CHOICES = ("heads", "mlp", "hidden", "blocks")


@dataclass(frozen=True)
class Target:
    """What to remove: ``ratio`` of all parameters, from the structure kinds named in ``structures``
    (heads, mlp, hidden, blocks). ``gqa`` chooses, for grouped-query attention, whether "heads"
    removes whole KV groups (``kv-groups``) or the same number of query heads inside every KV group
    (``query-heads``). Kept widths are multiples of ``multiple`` (MLP and hidden)."""

    ratio: float
    structures: Tuple[str, ...] = ("heads", "mlp")
    gqa: str = "query-heads"
    multiple: int = 8


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
            kinds.append("channels")
        elif name == "hidden":
            kinds.append("hidden")
        elif name == "blocks":
            kinds.append("blocks")
        else:
            raise PlanError(f"unknown structure '{name}'; choose from {', '.join(STRUCTURE_CHOICES)}")
    return kinds


def _removable(structure: Structure, fraction: float, step: int) -> int:
    """How many units to remove from a structure for a fraction, keeping the width a multiple of step."""
    kept = structure.units - int(round(fraction * structure.units))
    kept = max(step, int(round(kept / step)) * step) if structure.units >= step else structure.units
    return max(0, min(structure.units - 1, structure.units - kept))


_HEAD_KINDS = ("heads", "kv_groups", "query_heads")


def _heads_after(graph: StructureGraph, kind: str, removed: int, head_count: int) -> int:
    """Query heads per layer once ``removed`` units of a head kind go (hidden widths must divide)."""
    structure = graph.by_kind(kind)[0]
    if kind == "heads":
        return structure.units - removed
    per_unit = head_count // structure.units
    return (structure.units - removed) * per_unit


def _cost(graph: StructureGraph, kinds: Sequence[str], fraction: float, target: Target, head_count: int) -> Tuple[int, Dict[str, int]]:
    removed = 0
    counts: Dict[str, int] = {}
    heads_after = head_count
    # Head kinds first: the hidden width must stay a multiple of the head count that remains.
    for kind in sorted(kinds, key=lambda k: k not in _HEAD_KINDS):
        if kind == "blocks":
            assert graph.blocks is not None
            n = min(graph.blocks.count - 1, int(round(fraction * graph.blocks.count)))
            counts[kind] = n
            removed += n * graph.blocks.unit_params
            continue
        if kind in _HEAD_KINDS:
            step = 1
        elif kind == "hidden":
            step = int(np.lcm(target.multiple, heads_after)) if heads_after else target.multiple
        else:
            step = target.multiple
        for s in graph.by_kind(kind):
            # Structures of one kind are alike across layers, so they share one count. Overlaps
            # (hidden and MLP cuts share weights) make this an estimate; the plan counts exactly.
            k = _removable(s, fraction, step)
            counts[kind] = k
            removed += k * s.unit_params
        if kind in _HEAD_KINDS and head_count:
            heads_after = _heads_after(graph, kind, counts[kind], head_count)
    return removed, counts


def plan_uniform(graph: StructureGraph, scores: Scores, target: Target, head_count: int) -> Tuple[Selection, float]:
    """The selection whose removed parameters come closest to ``target.ratio`` of the total, with
    the same count per layer for each kind; returns it and the structure fraction used."""
    if not 0 < target.ratio < 1:
        raise PlanError(f"ratio must be between 0 and 1, got {target.ratio}")
    kinds = _kinds_for(graph, target)
    if not kinds:
        raise PlanError(f"the model has none of the structures {', '.join(target.structures)}")
    wanted = target.ratio * graph.total_params
    best: Optional[Tuple[float, float]] = None
    for fraction in np.linspace(0, 0.95, 191):
        removed, _ = _cost(graph, kinds, float(fraction), target, head_count)
        gap = abs(removed - wanted)
        if best is None or gap < best[0]:
            best = (gap, float(fraction))
    assert best is not None
    fraction = best[1]
    _, counts = _cost(graph, kinds, fraction, target, head_count)
    return _select(graph, scores, kinds, counts), fraction


def _lowest(values: np.ndarray, count: int) -> List[int]:
    """Indices of the ``count`` lowest scores; ties broken by index, so results are reproducible."""
    order = np.lexsort((np.arange(len(values)), values))
    return sorted(int(i) for i in order[:count])


def _select(graph: StructureGraph, scores: Scores, kinds: Sequence[str], counts: Dict[str, int]) -> Selection:
    selection = Selection()
    for kind in kinds:
        count = counts.get(kind, 0)
        if count == 0:
            continue
        if kind == "blocks":
            if scores.block_influence is None:
                raise PlanError("removing blocks needs calibration data (block influence)")
            selection.blocks = _lowest(scores.block_influence, count)
            continue
        for s in graph.by_kind(kind):
            if kind == "query_heads" and s.id in scores.per_group:
                selection.per_group[s.id] = [_lowest(row, count) for row in scores.per_group[s.id]]
            else:
                selection.units[s.id] = _lowest(scores.units[s.id], count)
    return selection


def layer_widths(graph: StructureGraph, selection: Selection) -> Dict[str, List[int]]:
    """Units kept per layer for each per-layer kind (for the closing summary)."""
    widths: Dict[str, List[int]] = {}
    for s in graph.structures:
        if s.layer is None or s.layer in selection.blocks:
            continue
        gone = len(selection.units.get(s.id, []))
        if s.id in selection.per_group:
            gone = len(selection.per_group[s.id][0])
        widths.setdefault(s.kind, []).append(s.units - gone)
    return widths
