"""What a checkpoint holds, read from its safetensors headers only (no tensor data is touched)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from math import prod
from os import PathLike
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from structprune import _core
from structprune.errors import ConfigError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: str
    nbytes: int
    offset: Optional[int] = None
    """Where the tensor's bytes start in ``file``; ``None`` for a tensor a plan would write."""

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: Dict[str, TensorInfo]
    shards: List[str]
    config: Optional[Dict[str, Any]]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def bytes_by_dtype(self) -> Dict[str, int]:
        counts: Counter[str] = Counter()
        for t in self.tensors.values():
            counts[t.dtype] += t.nbytes
        return dict(sorted(counts.items()))


def read_checkpoint(model_dir: Union[str, "PathLike[str]"]) -> Checkpoint:
    """Validates every header (and the index) of ``model_dir`` and describes its tensors."""
    path = Path(model_dir)
    raw = _core.read_checkpoint(str(path))
    tensors = {
        name: TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=file, nbytes=nbytes, offset=offset)
        for name, dtype, shape, file, nbytes, offset in raw["tensors"]
    }
    return Checkpoint(path=path, tensors=tensors, shards=list(raw["shards"]), config=read_config(path))


MAX_CONFIG_BYTES = 16 << 20
"""Largest ``config.json`` read (real ones are a few KB); the Rust engine has the same limit."""
_MAX_CONFIG_DEPTH = 128
"""Deepest nesting of objects and lists in ``config.json`` (serde_json's limit, which the engine uses)."""


def read_config(model_dir: Path) -> Optional[Dict[str, Any]]:
    """config.json as a dict, ``None`` when absent.

    Raises :class:`ConfigError` naming the file for one that is larger than ``MAX_CONFIG_BYTES``,
    not UTF-8, not JSON, nested deeper than 128 levels, holds a key twice in one object, is not an
    object, or whose ``architectures`` is not a list of class names or ``model_type`` not a string.
    """
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return None
    invalid = f"{config_path}: invalid config"
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{invalid}: {size} bytes is past the {MAX_CONFIG_BYTES}-byte limit for a config.json")
    raw = config_path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{invalid}: not UTF-8 text ({err})") from err
    depth = _nesting_depth(text)
    if depth > _MAX_CONFIG_DEPTH:
        raise ConfigError(f"{invalid}: nested {depth} levels deep, past the limit of {_MAX_CONFIG_DEPTH}")
    try:
        config = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except (json.JSONDecodeError, _DuplicateKey, RecursionError) as err:
        raise ConfigError(f"{invalid}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{invalid}: not a JSON object")
    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"{invalid}: 'architectures' must be a list of class names, got {json.dumps(architectures)[:80]}")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"{invalid}: 'model_type' must be a string, got {json.dumps(model_type)[:80]}")
    return config


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"duplicate key {key!r}")
        result[key] = value
    return result


def _nesting_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings (before parsing, so that a deep
    document is refused without the recursion that parsing it would need)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
