"""The cut plan: which indices of which tensors survive (see docs/plan-format.md).

A plan is data, not code: the planner writes one, people can read and edit it, and the Rust engine
applies it. Indices are always in the original checkpoint's coordinates.
"""

from __future__ import annotations

import json
import math
import operator
import re
import dataclasses
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from structprune.errors import PlanError

# A JSON array of numbers as json.dumps(indent=...) lays it out, one number per line.
_NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_NUMBER_LIST = re.compile(rf"\[(?:\s*{_NUMBER},)*\s*{_NUMBER}\s*\]")

PLAN_FORMAT = "structprune.cut-plan"
PLAN_VERSION = 1

Indices = Union[List[int], str]
"""Kept indices along one dimension, or the name of a shared index set."""


@dataclass(frozen=True)
class Values:
    """Contents the plan gives a tensor: every element in row-major order (``values``), one value
    for all (``fill``), or a tensor of a safetensors file (``file`` + ``tensor``: weights that a
    reconstruction computed, too many numbers for JSON; copied byte for byte, so it must have the
    output's dtype and shape). The engine rounds ``values`` and ``fill`` to the tensor's dtype (F16,
    BF16, F32 or F64), so values computed in that dtype are written exactly."""

    values: Optional[Tuple[float, ...]] = None
    fill: Optional[float] = None
    file: Optional[str] = None
    tensor: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.file is None) != (self.tensor is None):
            raise PlanError("tensor values from a file need both 'file' and 'tensor'")
        if sum(x is not None for x in (self.values, self.fill, self.file)) != 1:
            raise PlanError("tensor values need exactly one of 'values' (every element), 'fill' (one value for all) and 'file' + 'tensor'")

    @classmethod
    def of(cls, values: Sequence[float]) -> "Values":
        return cls(values=tuple(float(v) for v in values))

    @classmethod
    def from_file(cls, file: Union[str, "PathLike[str]"], tensor: str) -> "Values":
        return cls(file=str(file), tensor=tensor)

    def to_dict(self) -> Dict[str, Any]:
        if self.values is not None:
            return {"values": list(self.values)}
        if self.file is not None:
            return {"file": self.file, "tensor": self.tensor}
        return {"fill": self.fill}

    @classmethod
    def from_dict(cls, where: str, data: Any) -> "Values":
        if not isinstance(data, Mapping) or set(data) - {"values", "fill", "file", "tensor"}:
            raise PlanError(f"{where} must be an object with 'values', 'fill' or 'file' + 'tensor'")
        for key in ("file", "tensor"):
            if key in data and not isinstance(data[key], str):
                raise PlanError(f"{where}: '{key}' must be a string")
        try:
            values = None if data.get("values") is None else tuple(_finite(v) for v in data["values"])
            fill = None if data.get("fill") is None else _finite(data["fill"])
            return cls(values=values, fill=fill, file=data.get("file"), tensor=data.get("tensor"))
        except (TypeError, ValueError, PlanError) as err:
            raise PlanError(f"{where}: {err}") from None


@dataclass(frozen=True)
class AddedTensor:
    """A tensor the checkpoint does not have, written by the plan (a bias that compensates removed
    channels). Its name is an output name."""

    dtype: str
    shape: Tuple[int, ...]
    contents: Values

    def to_dict(self) -> Dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), **self.contents.to_dict()}

    @classmethod
    def from_dict(cls, where: str, data: Any) -> "AddedTensor":
        if not isinstance(data, Mapping) or not isinstance(data.get("dtype"), str) or not isinstance(data.get("shape"), list):
            raise PlanError(f"{where} must be an object with a 'dtype' name, a 'shape' list and 'values' or 'fill'")
        contents = Values.from_dict(where, {k: v for k, v in data.items() if k not in ("dtype", "shape")})
        return cls(dtype=data["dtype"], shape=tuple(_indices(f"{where}: 'shape'", data["shape"])), contents=contents)


@dataclass
class TensorCut:
    """What happens to one tensor: kept indices per dimension, removal, a new name, new values
    (``replace``), or, for a tensor the checkpoint lacks, its creation (``add``)."""

    keep: Dict[int, Indices] = field(default_factory=dict)
    drop: bool = False
    rename: Optional[str] = None
    add: Optional[AddedTensor] = None
    replace: Optional[Values] = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.keep:
            out["keep"] = {str(dim): _plain(indices) for dim, indices in sorted(self.keep.items())}
        if self.drop:
            out["drop"] = True
        if self.rename is not None:
            out["rename"] = self.rename
        if self.add is not None:
            out["add"] = self.add.to_dict()
        if self.replace is not None:
            out["replace"] = self.replace.to_dict()
        return out

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "TensorCut":
        where = f"invalid cut plan, tensor '{name}'"
        _check_object(where, data)
        unknown = set(data) - {"keep", "drop", "rename", "add", "replace"}
        if unknown:
            raise PlanError(f"{where}: unknown field(s) {sorted(map(str, unknown))}")
        if not isinstance(data.get("drop", False), bool) or not isinstance(data.get("rename"), (str, type(None))):
            raise PlanError(f"{where}: 'drop' must be true or false and 'rename' a tensor name")
        add = AddedTensor.from_dict(f"{where}: 'add'", data["add"]) if "add" in data else None
        replace = Values.from_dict(f"{where}: 'replace'", data["replace"]) if "replace" in data else None
        keep_raw = data.get("keep", {})
        if not isinstance(keep_raw, Mapping):
            raise PlanError(f"invalid cut plan, tensor '{name}': 'keep' must be an object of dim -> indices")
        keep: Dict[int, Indices] = {}
        for dim, indices in keep_raw.items():
            if not str(dim).isdigit():
                raise PlanError(f"invalid cut plan, tensor '{name}': keep dimension {dim!r} is not a non-negative integer")
            keep[int(dim)] = indices if isinstance(indices, str) else _indices(f"{where}: keep {dim}", indices)
        return cls(keep=keep, drop=bool(data.get("drop", False)), rename=data.get("rename"), add=add, replace=replace)


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
        """Deterministic JSON: same plan, same bytes; index and value lists stay on one line each.
        Floats are written in their shortest round-trip form, so values survive exactly."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False)
        return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]", text) + "\n"

    def save(self, path: Union[str, "PathLike[str]"]) -> None:
        """Writes the plan; tensor files below the plan's directory are named relative to it (so a
        plan and its reconstructed weights move together and the text does not depend on where
        they live), others by absolute path."""
        base = Path(path).resolve().parent
        Path(path).write_text(self._with_files(lambda file: _relative_to(file, base)).to_json(), encoding="utf-8")

    def _with_files(self, rename: Callable[[str], str]) -> "CutPlan":
        """A copy whose tensor-file paths (``replace``/``add`` from a file) are ``rename``d."""

        def moved(values: Optional[Values]) -> Optional[Values]:
            if values is None or values.file is None:
                return values
            return dataclasses.replace(values, file=rename(values.file))

        tensors = {}
        for name, cut in self.tensors.items():
            add = cut.add if cut.add is None else dataclasses.replace(cut.add, contents=moved(cut.add.contents))
            tensors[name] = dataclasses.replace(cut, replace=moved(cut.replace), add=add)
        return dataclasses.replace(self, tensors=tensors)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CutPlan":
        _check_object("invalid cut plan", data)
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"invalid cut plan: format is {data.get('format')!r}, expected '{PLAN_FORMAT}'")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"invalid cut plan: version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        for key in ("tensors", "index_sets", "config", "files", "metadata"):
            _check_object(f"invalid cut plan: '{key}'", data.get(key) or {})
        tensors = {name: TensorCut.from_dict(name, cut) for name, cut in (data.get("tensors") or {}).items()}
        index_sets = {name: _indices(f"invalid cut plan: index set '{name}'", ids) for name, ids in (data.get("index_sets") or {}).items()}
        files = data.get("files") or {}
        if not all(isinstance(text, str) for text in files.values()):
            raise PlanError("invalid cut plan: 'files' must map file names to their text")
        return cls(
            tensors=tensors,
            index_sets=index_sets,
            config=dict(data.get("config") or {}),
            files=dict(files),
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
        base = Path(path).resolve().parent
        return cls.from_json(text, source=str(path))._with_files(lambda file: str(base / file))


PlanLike = Union[CutPlan, Mapping[str, Any], str, "PathLike[str]"]


def as_plan_json(plan: PlanLike) -> str:
    """The JSON text of a plan given as a CutPlan, a dict, or a path to a JSON file."""
    if isinstance(plan, CutPlan):
        return plan.to_json()
    if isinstance(plan, Mapping):
        return json.dumps(plan)
    return CutPlan.load(plan).to_json()


def _relative_to(file: str, base: Path) -> str:
    resolved = Path(file).resolve()
    try:
        return str(resolved.relative_to(base))
    except ValueError:
        return str(resolved)


def _plain(indices: Union[Indices, range]) -> Indices:
    return indices if isinstance(indices, str) else [int(i) for i in indices]


def _check_object(where: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise PlanError(f"{where} must be a JSON object, not {type(value).__name__}")


def _indices(where: str, values: Any) -> List[int]:
    """A list of non-negative integers (JSON numbers without a fraction; numpy integers too)."""
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise PlanError(f"{where} must be a list of non-negative integers")
    try:
        indices = [operator.index(v) for v in values if not isinstance(v, bool)]
    except TypeError:
        indices = []
    if len(indices) != len(values) or any(i < 0 for i in indices):
        raise PlanError(f"{where} must be a list of non-negative integers")
    return indices


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"expected a finite number, got {value!r}")
    return float(value)
