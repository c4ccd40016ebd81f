"""Native core of structprune (Rust, PyO3). Errors are raised as ``structprune.errors`` classes."""

from os import PathLike
from typing import Callable, Optional, TypedDict, Union

_Path = Union[str, PathLike[str]]
# (name, dtype, shape, file, nbytes)
_TensorRow = tuple[str, str, list[int], str, int]

__version__: str

class _CheckpointDict(TypedDict):
    shards: list[str]
    sharded: bool
    tensors: list[_TensorRow]

class _LayoutDict(TypedDict):
    shards: list[str]
    tensors: list[_TensorRow]
    total_size: int

class _ReportDict(TypedDict):
    output_dir: str
    tensors: int
    bytes_written: int
    total_size: int
    shards: list[str]
    copied_files: list[str]
    skipped_files: list[str]

def read_checkpoint(model_dir: _Path) -> _CheckpointDict:
    """Validates every shard header and the index; returns tensors in storage order."""

def plan_layout(model_dir: _Path, plan_json: str, max_shard_size: int) -> _LayoutDict:
    """Validates a plan against a checkpoint and returns the output it would write."""

def apply_plan(
    model_dir: _Path,
    plan_json: str,
    output_dir: _Path,
    max_shard_size: int,
    memory_budget: int,
    threads: int,
    overwrite: bool,
    progress: Optional[Callable[[int, int], None]] = None,
) -> _ReportDict:
    """Writes the pruned checkpoint atomically; ``progress(done_bytes, total_bytes)`` is called
    about ten times a second with the GIL held. Ctrl-C cancels and leaves no output."""
