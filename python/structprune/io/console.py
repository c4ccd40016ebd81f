"""Keeping the console to what structprune says: the noise that libraries print because of calls
structprune makes, silenced where structprune makes them (never process-wide)."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

BITSANDBYTES_LOGGER = "bitsandbytes"


@contextmanager
def quiet_bitsandbytes_import() -> Iterator[None]:
    """peft imports bitsandbytes whenever it is installed, and importing bitsandbytes on a CPU
    with AVX512-BF16 tries to fetch a 4-bit kernel from the Hugging Face hub and logs "Failed to
    load CPU gemm_4bit_forward…" when it cannot: noise for a run that quantizes nothing. The import
    itself cannot be skipped (peft records once per process whether bitsandbytes is available, so
    hiding it would break a later ``--load-in`` run in the same process); its log is silenced while
    it happens."""
    logger = logging.getLogger(BITSANDBYTES_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def import_peft(*, quantizing: bool) -> Any:
    """peft, imported without bitsandbytes' kernel warning unless the run quantizes (where a missing
    fast kernel is worth knowing)."""
    if quantizing:
        import peft

        return peft
    with quiet_bitsandbytes_import():
        import peft

        return peft


@contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5.x deprecates with a
    FutureWarning on every LoRA model built: peft's call, not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
