"""Prunable structures of a model: which weight rows and columns go together.

``trace`` runs the meta-device tracer (``structprune.tracing.export``) and hands the traced graph to the Rust
core, which propagates index couplings op by op and returns every structure that can be removed
unit by unit (docs/architecture.md explains the algebra). Nothing here reads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from structprune import _core
from structprune.errors import GraphError

KINDS = ("heads", "kv_groups", "query_heads", "hidden", "channels", "experts", "expert_channels")
# The structures document this module reads (docs/structures-format.md). The compiled core writes
# it, so an extension built from other sources than this package is refused here, not misread.
STRUCTURES_FORMAT = "structprune.structures"
STRUCTURES_VERSION = 2


@dataclass(frozen=True)
class Member:
    """Where a structure's units sit along one dimension of one parameter.

    Unit ``u`` covers indices ``offset + u * stride + Σ j_k * free_stride_k`` (``j_k < free_count_k``)
    along ``dim`` of ``param``: a head of a q projection is ``head_dim`` rows, a KV group is all the
    rows of its query heads.
    """

    param: str
    dim: int
    offset: int
    stride: int
    free: Tuple[Tuple[int, int], ...]

    def index_matrix(self, units: int) -> np.ndarray:
        """``[units, width]``: row u holds the indices of unit u (same order for every unit)."""
        within = np.zeros(1, dtype=np.int64)
        for count, stride in self.free:
            within = (within[:, None] + np.arange(count, dtype=np.int64)[None, :] * stride).ravel()
        return self.offset + np.arange(units, dtype=np.int64)[:, None] * self.stride + within[None, :]

    def indices(self, units: Sequence[int]) -> np.ndarray:
        """Sorted indices along ``dim`` covered by ``units``."""
        within = np.zeros(1, dtype=np.int64)
        for count, stride in self.free:
            within = (within[:, None] + np.arange(count, dtype=np.int64)[None, :] * stride).ravel()
        starts = self.offset + np.asarray(units, dtype=np.int64) * self.stride
        return np.sort((starts[:, None] + within[None, :]).ravel())


@dataclass(frozen=True)
class Structure:
    id: int
    kind: str
    units: int
    layer: Optional[int]
    unit_params: int
    members: Tuple[Member, ...]
    nested_in: Optional[int]
    notes: Tuple[str, ...]

    def params(self) -> List[str]:
        return sorted({m.param for m in self.members})


@dataclass(frozen=True)
class PinnedDim:
    param: str
    dim: int
    reason: str


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks (decoder layers), removable whole."""

    prefix: str
    count: int
    unit_params: int


@dataclass
class StructureGraph:
    structures: List[Structure]
    pinned: List[PinnedDim]
    blocks: Optional[Blocks]
    params: Dict[str, Tuple[int, ...]]
    model: Dict[str, Any] = field(default_factory=dict)
    tied: Dict[str, str] = field(default_factory=dict)

    def by_kind(self, kind: str) -> List[Structure]:
        return [s for s in self.structures if s.kind == kind]

    def get(self, structure_id: int) -> Structure:
        return self.structures[structure_id]

    @property
    def total_params(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.params.values())

    @classmethod
    def from_core(cls, data: Mapping[str, Any], model: Mapping[str, Any], tied: Mapping[str, str]) -> "StructureGraph":
        found = (data.get("format"), data.get("version"))
        if found != (STRUCTURES_FORMAT, STRUCTURES_VERSION):
            raise GraphError(
                f"structprune._core returned structures in format {found[0]!r} version {found[1]!r}, but this "
                f"package reads {STRUCTURES_FORMAT!r} version {STRUCTURES_VERSION}: the compiled extension does "
                "not match the Python sources (rebuild it: pip install -e .)"
            )
        structures = [
            Structure(
                id=s["id"],
                kind=s["kind"],
                units=s["units"],
                layer=s["layer"],
                unit_params=s["unit_params"],
                members=tuple(
                    Member(m["param"], m["dim"], m["offset"], m["stride"], tuple(tuple(f) for f in m["free"]))
                    for m in s["members"]
                ),
                nested_in=s["nested_in"],
                notes=tuple(s["notes"]),
            )
            for s in data["structures"]
        ]
        pinned = [PinnedDim(p["param"], p["dim"], p["reason"]) for p in data["pinned"]]
        blocks = Blocks(**data["blocks"]) if data.get("blocks") else None
        params = {name: tuple(shape) for name, shape in data["params"].items()}
        return cls(structures, pinned, blocks, params, dict(model), dict(tied))


def structures_from_ir(ir_json: str) -> StructureGraph:
    """Runs the Rust grouping on a traced-graph IR (JSON text)."""
    ir = json.loads(ir_json)
    data = json.loads(_core.build_structures(ir_json))
    return StructureGraph.from_core(data, ir.get("model") or {}, ir.get("tied") or {})


def trace(source: Any, *, traced_layers: int = 2, cache: bool = False) -> StructureGraph:
    """Prunable structures of a model directory or ``PretrainedConfig`` (meta device, no weights).

    With ``cache``, a model directory (or config.json) seen before is read from the trace cache
    (``structprune.tracing.cache``) without importing torch, and one not seen before is cached.
    """
    from structprune.tracing import cache as trace_cache

    key = trace_cache.key_for(source, traced_layers=traced_layers, purpose="structures") if cache else None
    if key is None:
        return StructureGraph.from_core(*_traced_structures(source, traced_layers))
    cached = _graph_from_entry(trace_cache.read_entry(key))
    if cached is not None:
        return cached
    data, model, tied = _traced_structures(source, traced_layers)
    trace_cache.write_entry(key, {"structures": data, "model": model, "tied": tied})
    return StructureGraph.from_core(data, model, tied)


def read_cached_trace(source: Any, *, traced_layers: int = 2) -> Optional[StructureGraph]:
    """What ``trace(source, traced_layers=..., cache=True)`` returns when the trace cache holds it,
    else ``None``; never traces, never imports torch."""
    from structprune.tracing import cache as trace_cache

    key = trace_cache.key_for(source, traced_layers=traced_layers, purpose="structures")
    return None if key is None else _graph_from_entry(trace_cache.read_entry(key))


def _graph_from_entry(entry: Any) -> Optional[StructureGraph]:
    # An entry this code cannot read is a miss: traced again and rewritten.
    try:
        return StructureGraph.from_core(entry["structures"], entry["model"], entry["tied"])
    except (KeyError, TypeError, ValueError, GraphError):
        return None


def _traced_structures(source: Any, traced_layers: int) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, str]]:
    """The Rust core's structures document for ``source``, with the traced model's description and tied names."""
    from structprune.tracing.export import trace_model

    traced = trace_model(source, traced_layers=traced_layers)
    return json.loads(_core.build_structures(traced.to_json())), traced.model or {}, traced.tied or {}


@dataclass(frozen=True)
class SummaryRow:
    """Structures of one kind that look alike across a run of layers."""

    kind: str
    layers: Tuple[int, ...]
    units: int
    unit_params: int
    count: int

    @property
    def total_params(self) -> int:
        return self.units * self.unit_params * self.count


def summarize(graph: StructureGraph) -> List[SummaryRow]:
    """Structures grouped by kind, size and cost, in kind order."""
    groups: Dict[Tuple[str, int, int], List[Structure]] = {}
    for s in graph.structures:
        groups.setdefault((s.kind, s.units, s.unit_params), []).append(s)
    rows = [
        SummaryRow(kind, tuple(sorted(s.layer for s in items if s.layer is not None)), units, cost, len(items))
        for (kind, units, cost), items in groups.items()
    ]
    return sorted(rows, key=lambda r: (KINDS.index(r.kind), r.layers[:1], r.units))


def layer_ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``0-2, 5``."""
    if not layers:
        return "all"
    parts: List[str] = []
    start = prev = layers[0]
    for layer in [*layers[1:], None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    return ", ".join(parts)
