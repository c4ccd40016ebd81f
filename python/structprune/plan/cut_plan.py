"""The cut plan: which indices of which tensors survive (see docs/plan-format.md).

A plan is data, not code: the planner writes one, people can read and edit it, and the Rust engine
applies it. Indices are always in the original checkpoint's coordinates.
"""

from __future__ import annotations

import json
import re
import dataclasses
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from structprune import _core
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
    def _from_document(cls, data: Mapping[str, Any]) -> "Values":
        values = data.get("values")
        return cls(values=None if values is None else tuple(float(v) for v in values), fill=None if data.get("fill") is None else float(data["fill"]), file=data.get("file"), tensor=data.get("tensor"))


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
    def _from_document(cls, data: Mapping[str, Any]) -> "AddedTensor":
        return cls(dtype=data["dtype"], shape=tuple(data["shape"]), contents=Values._from_document(data))


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
    def _from_document(cls, data: Mapping[str, Any]) -> "TensorCut":
        return cls(
            keep={int(dim): indices for dim, indices in data.get("keep", {}).items()},
            drop=data.get("drop", False),
            rename=data.get("rename"),
            add=AddedTensor._from_document(data["add"]) if "add" in data else None,
            replace=Values._from_document(data["replace"]) if "replace" in data else None,
        )


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

        def moved(values: Values) -> Values:
            return values if values.file is None else dataclasses.replace(values, file=rename(values.file))

        tensors = {}
        for name, cut in self.tensors.items():
            add = None if cut.add is None else dataclasses.replace(cut.add, contents=moved(cut.add.contents))
            tensors[name] = dataclasses.replace(cut, replace=None if cut.replace is None else moved(cut.replace), add=add)
        return dataclasses.replace(self, tensors=tensors)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CutPlan":
        """A plan from JSON-shaped data, checked by the engine's own rules (see :meth:`from_json`)."""
        return cls.from_json(_json_text(data))

    @classmethod
    def from_json(cls, text: Union[str, bytes], *, source: str = "") -> "CutPlan":
        """Parses a plan by the rules the engine applies, in the engine's own parser: UTF-8 JSON with
        no key twice in an object, no unknown fields, every value of its type (no ``"no"`` for
        ``false``, no ``1.9``, ``"1"`` or ``true`` for an index, no ``1.0`` for the version),
        dimensions written canonically (``"1"``, not ``"01"`` or ``"+1"``). Raises
        :class:`~structprune.errors.PlanError` whose ``field`` is the JSON path of the field at
        fault; ``source`` (a file name) prefixes the message and is its ``path``."""
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        try:
            document = _core.parse_plan(data)
        except PlanError as err:
            if not source:
                raise
            located = PlanError(f"{source}: {err}")
            located.path, located.tensor, located.field = source, err.tensor, err.field
            raise located from None
        return cls(
            tensors={name: TensorCut._from_document(cut) for name, cut in document.get("tensors", {}).items()},
            index_sets=dict(document.get("index_sets", {})),
            config=dict(document.get("config") or {}),
            files=dict(document.get("files", {})),
            metadata=dict(document.get("metadata", {})),
        )

    @classmethod
    def load(cls, path: Union[str, "PathLike[str]"]) -> "CutPlan":
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise PlanError(f"{path}: cannot read plan: {err.strerror}") from err
        base = Path(path).resolve().parent
        return cls.from_json(data, source=str(path))._with_files(lambda file: str(base / file))


PlanLike = Union[CutPlan, Mapping[str, Any], str, "PathLike[str]"]


def as_plan_json(plan: PlanLike) -> str:
    """The JSON text of a plan given as a CutPlan, a dict, or a path to a JSON file."""
    if isinstance(plan, CutPlan):
        return plan.to_json()
    if isinstance(plan, Mapping):
        return _json_text(plan)
    return CutPlan.load(plan).to_json()


def _relative_to(file: str, base: Path) -> str:
    resolved = Path(file).resolve()
    try:
        return str(resolved.relative_to(base))
    except ValueError:
        return str(resolved)


def _plain(indices: Union[Indices, range]) -> Indices:
    return indices if isinstance(indices, str) else [int(i) for i in indices]


def _json_text(data: Mapping[str, Any]) -> str:
    """JSON text of plan data given as Python objects (which the engine then reads strictly)."""
    try:
        return json.dumps(data, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise PlanError(f"invalid cut plan: not JSON data (numbers must be finite, keys strings, nesting shallow): {err}") from None
