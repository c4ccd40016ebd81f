"""Files that appear whole or not at all: written to a temporary sibling (``.NAME.tmp-PID``),
flushed to disk, then renamed over ``NAME``. A reader, or a run resumed after a kill or a power
cut, sees the old file or the new one, never a part; a failed write leaves no temporary behind.
(Whole output directories are staged by the Rust engine instead: ``structprune._core.Staging``.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

TEMPORARY_GLOB = ".*.tmp-*"
"""The names of temporaries, for cleaning up after a process killed while writing."""


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary)`` fills the file; it becomes ``path`` once flushed."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    """``data`` as indented JSON (one space), ending in a newline."""
    text = json.dumps(data, indent=1, sort_keys=sort_keys) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
