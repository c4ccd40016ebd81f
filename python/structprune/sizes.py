"""Byte sizes as people write them: ``5GB`` (10⁹), ``256MiB`` (2²⁰), ``500KB``, or plain integers."""

from __future__ import annotations

import re
from typing import Union

DEFAULT_ACTIVATION_MEMORY = 4 << 30
"""Bytes of saved block inputs scoring keeps in memory before further ones go to disk (here, not in
the streaming module, so that the CLI can show it without importing torch)."""

DEFAULT_DAMPING = 0.01
"""Reconstruction's λ relative to the mean diagonal of the kept inputs' Gram matrix (SparseGPT's
1%); here for the same reason as the activation budget."""

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(size: Union[int, str], *, allow_zero: bool = False) -> int:
    """Returns ``size`` in bytes; raises ``ValueError`` naming the accepted units otherwise. Zero is
    refused unless ``allow_zero`` (for a budget, where it means "nothing in memory")."""
    if isinstance(size, bool):
        raise ValueError(f"size must be bytes or a string like '5GB', got {size!r}")
    smallest = 0 if allow_zero else 1
    if isinstance(size, int):
        if size < smallest:
            raise ValueError(f"size must be {'non-negative' if allow_zero else 'positive'}, got {size}")
        return size
    match = _PATTERN.match(size)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read size {size!r}: use bytes or a number with one of KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < smallest:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def format_size(nbytes: int) -> str:
    """Human-readable binary size, e.g. ``12.3 MiB``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
