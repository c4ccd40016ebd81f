"""Scoring split over processes: ``torchrun --nproc-per-node N -m structprune prune ...``.

Every process draws the same seeded calibration batch and scores its contiguous share of the
samples; the statistics the scores are made of are sums over samples (gradients of the loss
averaged over *all* samples, squared per-sample gradients, activation sums and counts, cosine sums
of Block Influence, the loss), so summing them over processes once per block gives the scores of one
process on every sample, up to the order of float additions. Shares may be uneven: nothing is
averaged per process. Collectives run on gloo for CPU scoring and on NCCL for CUDA, where process
``r`` computes on ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence

import torch
import torch.distributed as dist

from structprune.errors import DistributedError

# Low-precision statistics are summed in float32 so that adding many processes loses nothing more.
_WIDENED = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


@dataclass(frozen=True)
class Workers:
    """This process's place among the scoring processes (one process when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    collective_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where tensors must be for the backend's collectives (CUDA for NCCL)."""

    @property
    def is_main(self) -> bool:
        """Whether this process reports and writes results (rank 0)."""
        return self.rank == 0

    def share(self, samples: int) -> slice:
        """This process's contiguous share of ``samples`` calibration samples (sizes differ by at most one)."""
        if samples < self.world_size:
            raise DistributedError(f"--samples {samples} cannot be split over {self.world_size} processes: each needs at least one sample")
        return slice(self.rank * samples // self.world_size, (self.rank + 1) * samples // self.world_size)

    def compute_device(self, requested: str) -> str:
        """The device this process scores on: ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun."""
        if self.world_size == 1 or not requested.startswith("cuda"):
            return requested
        if requested != "cuda":
            raise DistributedError(f"--device {requested} names one GPU, but {self.world_size} processes run: pass --device cuda and each process uses cuda:LOCAL_RANK")
        return f"cuda:{self.local_rank}"

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replaces every tensor by its sum over processes, with one collective per dtype.

        Every process must pass tensors of the same shapes and dtypes in the same order."""
        if self.world_size == 1 or not tensors:
            return
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = defaultdict(list)
        for tensor in tensors:
            by_dtype[tensor.dtype].append(tensor)
        for dtype in sorted(by_dtype, key=str):
            group = by_dtype[dtype]
            wide = _WIDENED.get(dtype, dtype)
            flat = torch.cat([t.detach().reshape(-1).to(self.collective_device, wide) for t in group])
            dist.all_reduce(flat)
            offset = 0
            with torch.no_grad():
                for tensor in group:
                    tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
                    offset += tensor.numel()

    def sum_values(self, values: Sequence[float]) -> List[float]:
        """Python numbers summed over processes (in float64)."""
        tensor = torch.tensor(list(values), dtype=torch.float64)
        self.sum_([tensor])
        return tensor.tolist()

    def minimum(self, value: int) -> int:
        """The smallest of every process's ``value``."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def barrier(self) -> None:
        """Waits until every process gets here."""
        if self.world_size > 1:
            # An all-reduce rather than dist.barrier(): NCCL's barrier guesses a device to use.
            self.minimum(0)


SINGLE = Workers()


def current() -> Workers:
    """The process group this process is already in (set up by the caller), or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return _workers(dist.get_backend() == "nccl")


@contextmanager
def joined(device: str) -> Iterator[Workers]:
    """Joins the process group that torchrun describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) for the duration, and leaves it.
    Without ``WORLD_SIZE`` (or with 1) this is one process and nothing is set up; a group the
    caller already set up is used as it is."""
    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    world_size = _environment_int("WORLD_SIZE", 1)
    if world_size <= 1:
        yield SINGLE
        return
    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE is {world_size} but this torch build has no torch.distributed")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(_environment_int("LOCAL_RANK", 0))
    try:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    except (ValueError, RuntimeError) as err:
        raise DistributedError(f"cannot join the torchrun process group (WORLD_SIZE={world_size}): {err}") from err
    try:
        yield _workers(cuda)
    finally:
        dist.destroy_process_group()


def _workers(nccl: bool) -> Workers:
    local_rank = _environment_int("LOCAL_RANK", 0)
    collective = torch.device(f"cuda:{torch.cuda.current_device()}") if nccl else torch.device("cpu")
    return Workers(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, collective_device=collective)


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name} must be an integer, got {value!r}") from None
