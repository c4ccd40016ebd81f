"""Byte sizes as people write them: ``5GB`` (10⁹), ``256MiB`` (2²⁰), ``500KB``, or plain integers."""

from __future__ import annotations

import re
from typing import Union

from structprune.errors import SettingError

DEFAULT_ACTIVATION_MEMORY = 4 << 30
"""Bytes of saved block inputs scoring keeps in memory before further ones go to disk (here, not in
the streaming module, so that the CLI can show it without importing torch)."""

DEFAULT_DAMPING = 0.01
"""Reconstruction's λ relative to the mean diagonal of the kept inputs' Gram matrix (SparseGPT's
1%); here for the same reason as the activation budget."""

DEFAULT_SAMPLES = 128
"""Calibration windows (of 128 tokens) for scoring and reconstruction: 16,384 tokens. On SmolLM2-135M
at 20% removed, 128 windows gave 22.5 held-out perplexity where 32 gave 26.4-27.0: reconstruction
fits thousands of weights per output row and overfits a few thousand tokens (docs/benchmarks.md)."""

RECONSTRUCTION_TARGETS = ("dense", "layer")
"""What reconstruction fits refitted layers to (``structprune.plan.reconstruct``); here for the same reason."""

DEFAULT_REFIT_LR = 1e-3
"""Adam's peak learning rate for the block refit (``prune --refit-steps``, ``structprune.plan.refit``);
here for the same reason. On all-MiniLM-L6-v2 at 20%, 1e-4 took a fifth off block 0's output error
where 1e-3 took two fifths (docs/benchmarks.md)."""

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


MAX_SIZE = 2**64 - 1
"""The largest size any option takes (the engine counts bytes in 64 bits)."""


def parse_size(size: Union[int, str], *, allow_zero: bool = False, maximum: int = MAX_SIZE, what: str = "size") -> int:
    """Returns ``size`` in bytes; raises :class:`~structprune.errors.SettingError` (a ``ValueError``)
    naming the accepted units otherwise. Zero is refused unless ``allow_zero`` (for a budget, where
    it means "nothing in memory"); more than ``maximum`` (at most 2⁶⁴ − 1) is refused naming ``what``
    and the cap."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise SettingError(f"{what} must be bytes or a string like '5GB', got {size!r}")
    smallest = 0 if allow_zero else 1
    if isinstance(size, int):
        value = size
    else:
        match = _PATTERN.match(size)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise SettingError(f"cannot read {what} {size!r}: use bytes or a number with one of KB, MB, GB, TB, KiB, MiB, GiB, TiB")
        number = match.group(1)
        # Exact for whole numbers however long; a fraction goes through float, past which no size is exact anyway.
        value = int(number) * _UNITS[unit] if "." not in number else int(float(number) * _UNITS[unit])
    if value < smallest:
        raise SettingError(f"{what} must be {'non-negative' if allow_zero else 'positive'}, got {size!r}")
    limit = min(maximum, MAX_SIZE)
    if value > limit:
        raise SettingError(f"{what} {size!r} is above the cap of {limit:,} bytes ({format_size(limit)})")
    return value


def format_size(nbytes: int) -> str:
    """Human-readable binary size, e.g. ``12.3 MiB``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} EiB"
