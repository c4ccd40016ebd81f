"""The trace cache: what tracing a config found, kept so that the next look at the same config
reads it back in milliseconds and without importing torch or transformers (seconds on their own).

One JSON file per entry in ``$XDG_CACHE_HOME/structprune/traces/`` (``~/.cache`` without
XDG_CACHE_HOME), named by the hash of everything the result depends on: the config's bytes, the
traced layers, what is cached, the IR and structures format versions, structprune's, torch's and
transformers' versions, and the size and modification time of every file of the installed
package (an edited tracer is a different tracer, whatever its version says). A stale entry is
therefore never found; a corrupt one is ignored and rewritten. Deleting the directory is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

from structprune.io.atomic import write_atomically

# The layout of an entry file; a change makes every older entry a miss.
ENTRY_FORMAT = "structprune.trace-cache"
ENTRY_VERSION = 1
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def cache_directory() -> Path:
    """``$XDG_CACHE_HOME/structprune/traces`` (``~/.cache`` without XDG_CACHE_HOME)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "structprune" / "traces"


def key_for(source: Any, *, traced_layers: int, purpose: str) -> Optional[Dict[str, Any]]:
    """The key of ``purpose`` for a model directory or config.json path; ``None`` for a config
    object or a missing config.json (not cached: the tracer says what is wrong with the latter)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    config_file = path if path.is_file() else path / "config.json"
    if not config_file.is_file():
        return None
    return entry_key(config_file.read_bytes(), traced_layers=traced_layers, purpose=purpose)


def entry_key(config_bytes: bytes, *, traced_layers: int, purpose: str) -> Dict[str, Any]:
    """Everything an entry for ``purpose`` (what is cached) of this config depends on."""
    from structprune import _core
    from structprune.tracing.export import VERSION as IR_VERSION
    from structprune.tracing.graph import STRUCTURES_VERSION

    return {
        "format": ENTRY_FORMAT,
        "entry_version": ENTRY_VERSION,
        "purpose": purpose,
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "traced_layers": traced_layers,
        "ir_version": IR_VERSION,
        "structures_version": STRUCTURES_VERSION,
        "structprune": _core.__version__,
        "torch": _installed_version("torch"),
        "transformers": _installed_version("transformers"),
        "package_files": _package_fingerprint(),
    }


def read_entry(key: Dict[str, Any]) -> Optional[Any]:
    """The value cached under ``key``, or ``None`` when there is none or it cannot be read whole."""
    try:
        stored = json.loads(_entry_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # The file name is a hash of the key; the key stored inside is compared in full.
    if not isinstance(stored, dict) or stored.get("key") != key or "value" not in stored:
        return None
    return stored["value"]


def write_entry(key: Dict[str, Any], value: Any) -> None:
    """Caches ``value`` (JSON data) under ``key``. A cache that cannot be written (read-only home,
    full disk) only costs the next run the trace, so the error is not raised."""
    path = _entry_path(key)
    text = json.dumps({"key": key, "value": value}, separators=(",", ":"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    except OSError:
        pass


def _entry_path(key: Dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_directory() / f"{digest}.json"


@lru_cache(maxsize=None)
def _installed_version(distribution: str) -> Optional[str]:
    # From the installed metadata: importing torch to ask would cost the seconds the cache saves.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def _package_fingerprint() -> str:
    """A hash of the path, size and modification time of every Python and extension file of the package."""
    stats = []
    for path in sorted(_PACKAGE_DIR.rglob("*")):
        if path.suffix in (".py", ".so", ".pyd"):
            status = path.stat()
            stats.append(f"{path.relative_to(_PACKAGE_DIR)}:{status.st_size}:{status.st_mtime_ns}")
    return hashlib.sha256("\n".join(stats).encode()).hexdigest()
