"""The one table of dtypes: the compute dtypes options name (``--dtype float32``), and the torch
dtype of every safetensors dtype code torch can hold."""

from __future__ import annotations

from typing import Union

import torch

from structprune.errors import SettingError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Dtypes a model is loaded, scored or trained in, by the names the options take."""

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
"""Torch dtypes by safetensors dtype code. Codes torch has no dtype for (the sub-byte ones) are absent:
the Rust engine copies those tensors without torch."""

STORED_COMPUTE_DTYPES = {code: name for code, stored in SAFETENSORS_DTYPES.items() for name, dtype in COMPUTE_DTYPES.items() if stored == dtype}
"""The compute dtype's name of each stored dtype code that is one (``BF16`` → ``bfloat16``)."""

DtypeLike = Union[str, torch.dtype]


def compute_dtype(dtype: DtypeLike, *, option: str = "--dtype") -> torch.dtype:
    """A compute dtype from its name or itself; anything else is a :class:`SettingError` naming ``option``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in COMPUTE_DTYPES.values():
            raise SettingError(f"{option}: must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype}", option=option)
        return dtype
    if dtype not in COMPUTE_DTYPES:
        raise SettingError(f"{option}: must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}", option=option)
    return COMPUTE_DTYPES[dtype]
