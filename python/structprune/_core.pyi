"""Native core of structprune (Rust, PyO3). Errors are raised as ``structprune.errors`` classes."""

from os import PathLike
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypedDict, Union, final

_Path = Union[str, PathLike[str]]
# (name, dtype, shape, file, nbytes)
_TensorRow = tuple[str, str, list[int], str, int]
# (name, dtype, shape, file, nbytes, offset of the first byte in the file)
_StoredTensorRow = tuple[str, str, list[int], str, int, int]

__all__ = [
    "__version__",
    "MAX_MEMORY_BUDGET",
    "MAX_THREADS",
    "ERROR_CLASSES",
    "parse_plan",
    "read_checkpoint",
    "plan_layout",
    "apply_plan",
    "write_checkpoint",
    "build_structures",
    "check_output",
    "Staging",
]

__version__: str
MAX_MEMORY_BUDGET: int
"""The largest ``memory_budget`` ``apply_plan`` accepts (1 TiB)."""
MAX_THREADS: int
"""The most ``threads`` ``apply_plan`` accepts."""
ERROR_CLASSES: tuple[str, ...]
"""The names of the ``structprune.errors`` classes the core raises."""

class _CheckpointDict(TypedDict):
    shards: list[str]
    sharded: bool
    tensors: list[_StoredTensorRow]

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

def parse_plan(data: bytes) -> dict[str, Any]:
    """Reads a cut plan's JSON text by the engine's rules (strict JSON, every field known and of its
    type, canonical dimensions, no code but structprune's DeciLM files, no other ``auto_map``) and
    returns the document. Raises ``PlanError`` whose ``field`` is the JSON path at fault."""

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
    folders: Sequence[_Path] = ...,
) -> _ReportDict:
    """Writes the pruned checkpoint atomically; ``progress(done_bytes, total_bytes)`` is called
    about ten times a second with the GIL held. Ctrl-C cancels and leaves no output. ``folders``
    (relative to ``model_dir``) are copied whole into the output inside the same commit."""

def write_checkpoint(
    output_dir: _Path,
    tensors: list[tuple[str, str, list[int]]],
    read_tensor: Callable[[int], bytes],
    source_dir: Optional[_Path],
    includes: list[tuple[_Path, _Path]],
    config_json: Optional[str],
    max_shard_size: int,
    overwrite: bool,
    progress: Optional[Callable[[int, int], None]] = None,
) -> _ReportDict:
    """Writes caller-held tensors as a checkpoint with the shard engine's layout and staging.

    ``tensors`` are ``(name, safetensors dtype, shape)`` in output order; the layout is fixed from
    them before any data is asked for. ``read_tensor(i)`` returns tensor ``i``'s raw little-endian
    bytes (called once per tensor with the GIL held; the write runs with it released).
    ``source_dir``: the checkpoint these tensors replace, whose files other than weights are copied
    (``config.json`` too, unless ``config_json`` is given). ``includes``: ``(file or directory,
    path inside the output)`` copied as well. ``progress(done_bytes, total_bytes)`` is called after
    every tensor. Any error or Ctrl-C leaves no output."""

def build_structures(ir_json: str) -> str:
    """Traced-graph IR (docs/traced-graph.md) in, the prunable structures as JSON text out, tagged
    with ``format`` and ``version`` (docs/structures-format.md). Raises ``GraphError``."""

def check_output(model_dir: Optional[_Path], output_dir: _Path, overwrite: bool) -> Path:
    """Refuses an output that is, contains or lies inside ``model_dir`` (device and inode of the
    resolved paths), an existing one without ``overwrite``, and with it one that is neither an
    earlier structprune output (holding ``.structprune-output``) nor empty. Returns the resolved
    output path."""

@final
class Staging:
    """A hidden sibling of ``output_dir`` to fill, moved onto it by ``commit`` (after
    ``check_output``; leftovers of dead runs for the same output are removed first)."""

    def __new__(cls, output_dir: _Path, model_dir: Optional[_Path], overwrite: bool) -> Staging: ...
    @property
    def path(self) -> Path: ...
    def commit(self) -> None:
        """Writes the output marker, syncs, and renames the staged directory onto the output."""
    def discard(self) -> None:
        """Removes the staged directory."""
