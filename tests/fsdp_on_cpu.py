"""Runs the ``structprune`` CLI with accelerate's FSDP (version 2) switched on for CPU processes.

accelerate turns FSDP on only for accelerator devices: CPU processes given an FSDP config silently
train with DDP. torch's FSDP2 itself runs on gloo, so for the tests this switches accelerate's
distributed state to FSDP2 once accelerate has set it up, and structprune's FSDP path (sharded
``prepare``, full state dict gathered from every process, merge) runs as it would on GPUs.
Used by ``tests/test_recover.py`` under ``torchrun``; not a test module itself.
"""

from __future__ import annotations

import sys

from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from structprune.cli import main

_set_up = state.AcceleratorState.__init__


def _set_up_with_fsdp(self: state.AcceleratorState, *args: object, **kwargs: object) -> None:
    _set_up(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)


if __name__ == "__main__":
    state.AcceleratorState.__init__ = _set_up_with_fsdp  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:], prog_name="structprune"))
