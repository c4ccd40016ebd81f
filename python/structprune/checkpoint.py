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


def read_config(model_dir: Path) -> Optional[Dict[str, Any]]:
    """config.json as a dict, ``None`` when absent."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_path}: invalid config: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: invalid config: not a JSON object")
    return config
