"""The cut plan: which indices of which tensors survive (see docs/plan-format.md).

A plan is data, not code: the planner writes one, people can read and edit it, and the Rust engine
applies it. Indices are always in the original checkpoint's coordinates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from structprune.errors import PlanError

# A JSON array of integers as json.dumps(indent=...) lays it out, one number per line.
_INT_LIST = re.compile(r"\[(?:\s*-?\d+,)*\s*-?\d+\s*\]")

PLAN_FORMAT = "structprune.cut-plan"
PLAN_VERSION = 1

Indices = Union[List[int], str]
"""Kept indices along one dimension, or the name of a shared index set."""


@dataclass
class TensorCut:
    """What happens to one tensor: kept indices per dimension, removal, or a new name."""

    keep: Dict[int, Indices] = field(default_factory=dict)
    drop: bool = False
    rename: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.keep:
            out["keep"] = {str(dim): _plain(indices) for dim, indices in sorted(self.keep.items())}
        if self.drop:
            out["drop"] = True
        if self.rename is not None:
            out["rename"] = self.rename
        return out

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "TensorCut":
        unknown = set(data) - {"keep", "drop", "rename"}
        if unknown:
            raise PlanError(f"invalid cut plan, tensor '{name}': unknown field(s) {sorted(unknown)}")
        keep_raw = data.get("keep", {})
        if not isinstance(keep_raw, Mapping):
            raise PlanError(f"invalid cut plan, tensor '{name}': 'keep' must be an object of dim -> indices")
        keep: Dict[int, Indices] = {}
        for dim, indices in keep_raw.items():
            if not str(dim).isdigit():
                raise PlanError(f"invalid cut plan, tensor '{name}': keep dimension {dim!r} is not a non-negative integer")
            keep[int(dim)] = indices if isinstance(indices, str) else [int(i) for i in indices]
        return cls(keep=keep, drop=bool(data.get("drop", False)), rename=data.get("rename"))


@dataclass
class CutPlan:
    """A whole plan. ``tensors`` names only the tensors that change; ``files`` are text files to
    write into the output (file name → content), such as the model code a DeciLM checkpoint needs."""

    tensors: Dict[str, TensorCut] = field(default_factory=dict)
    index_sets: Dict[str, List[int]] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"format": PLAN_FORMAT, "version": PLAN_VERSION}
        if self.index_sets:
            out["index_sets"] = {name: _plain(ids) for name, ids in sorted(self.index_sets.items())}
        out["tensors"] = {name: cut.to_dict() for name, cut in sorted(self.tensors.items())}
        if self.config:
            out["config"] = self.config
        if self.files:
            out["files"] = dict(sorted(self.files.items()))
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def to_json(self) -> str:
        """Deterministic JSON: same plan, same bytes; index lists stay on one line each."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False)
        return _INT_LIST.sub(lambda m: "[" + ", ".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]", text) + "\n"

    def save(self, path: Union[str, "PathLike[str]"]) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CutPlan":
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"invalid cut plan: format is {data.get('format')!r}, expected '{PLAN_FORMAT}'")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"invalid cut plan: version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        tensors = {name: TensorCut.from_dict(name, cut) for name, cut in data.get("tensors", {}).items()}
        index_sets = {name: [int(i) for i in ids] for name, ids in data.get("index_sets", {}).items()}
        return cls(
            tensors=tensors,
            index_sets=index_sets,
            config=dict(data.get("config") or {}),
            files={str(name): str(text) for name, text in (data.get("files") or {}).items()},
            metadata=dict(data.get("metadata") or {}),
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "") -> "CutPlan":
        where = f"{source}: " if source else ""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"{where}invalid cut plan: not JSON ({err})") from err
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}invalid cut plan: the top level must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Union[str, "PathLike[str]"]) -> "CutPlan":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise PlanError(f"{path}: cannot read plan: {err.strerror}") from err
        return cls.from_json(text, source=str(path))


PlanLike = Union[CutPlan, Mapping[str, Any], str, "PathLike[str]"]


def as_plan_json(plan: PlanLike) -> str:
    """The JSON text of a plan given as a CutPlan, a dict, or a path to a JSON file."""
    if isinstance(plan, CutPlan):
        return plan.to_json()
    if isinstance(plan, Mapping):
        return json.dumps(plan)
    return CutPlan.load(plan).to_json()


def _plain(indices: Union[Indices, range]) -> Indices:
    return indices if isinstance(indices, str) else [int(i) for i in indices]
