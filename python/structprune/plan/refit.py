"""Block-wise joint refit (``prune --refit-steps N``): after the least-squares fits of
``structprune.plan.reconstruct`` have refitted a block's layers that lose inputs, every kept weight
of the block (the attention's and the MLP's projections, what remains of the cut ones, the
norms' scales and biases) is fitted together, by ``N`` Adam steps, so that the pruned block's
output on its own (pruned-model) inputs matches the dense block's output on the dense model's
inputs: the same local target as the ``dense`` reconstruction target, reached through the
nonlinearities instead of one linear layer at a time (layer-wise distillation, as in ZipLM and
the block reconstruction of post-training quantisation). It is still local: one block at a time,
on the calibration windows, no end-to-end loss and no adapter.

The block is run as reconstruction runs it, at full width with the removed inputs' columns at
zero; the gradient of every removed slice (rows of a cut producer, columns of a cut consumer) is
masked, so removed units stay removed and the kept weights are what is written. The step's loss is
the mean squared error over the tokens of ``samples`` calibration windows, as whole micro-batches
(``ceil(samples / micro-batch)`` of them, drawn without replacement, by a generator seeded from the run's seed and the block's index; an encoder's padding
does not count), the learning rate warms up over the first 5% of the steps and decays as a cosine.
Deterministic for given inputs, seed and number of threads. With several processes the gradients
are summed, each process drawing from its share of the micro-batches.

Measured on all-MiniLM-L6-v2 at 20% removed (docs/benchmarks.md): see ``DEFAULT_REFIT_LR``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import nn

from structprune.io.sizes import DEFAULT_REFIT_LR
from structprune.score.distributed import SINGLE, Workers

DEFAULT_REFIT_SAMPLES = 64
"""Calibration windows per Adam step (16 micro-batches of prune's default 4; a larger
``--micro-batch`` makes fewer, larger block calls, which is faster on a CPU)."""
WARMUP = 0.05
"""Fraction of the steps over which the learning rate warms up linearly."""


@dataclass(frozen=True)
class BlockRefit:
    """The outcome of one block's refit: the mean squared error of its output against the dense
    block's output, over all calibration tokens, before (after the least-squares fits) and after."""

    block: int
    error_before: float
    error_after: float
    steps: int


@dataclass(frozen=True)
class RefitSettings:
    steps: int
    lr: float = DEFAULT_REFIT_LR
    samples: int = DEFAULT_REFIT_SAMPLES
    """Calibration windows per step (rounded up to whole micro-batches)."""
    seed: int = 0


def trainable(block: nn.Module, prefix: str, stored_names: Mapping[str, str]) -> Dict[str, nn.Parameter]:
    """The block's floating-point parameters stored as tensors of their own (model name →
    parameter): those the refit may change and write back."""
    return {
        f"{prefix}{name}": parameter
        for name, parameter in block.named_parameters()
        if parameter.is_floating_point() and parameter.numel() and f"{prefix}{name}" in stored_names
    }


def kept_mask(parameter: torch.Tensor, removed: Mapping[int, set]) -> Optional[torch.Tensor]:
    """1 on the parameter's kept entries, 0 on removed slices (``removed``: dim → indices), or
    ``None`` when nothing of it is removed."""
    mask: Optional[torch.Tensor] = None
    for dim, indices in removed.items():
        if not indices or dim >= parameter.dim():
            continue
        if mask is None:
            mask = torch.ones_like(parameter)
        mask.index_fill_(dim, torch.tensor(sorted(indices), dtype=torch.long, device=parameter.device), 0)
    return mask


def kept_values(parameter: torch.Tensor, removed: Mapping[int, set]) -> torch.Tensor:
    """The parameter cut to its kept slices along every dimension with removals."""
    out = parameter.detach()
    for dim, indices in sorted(removed.items()):
        if not indices or dim >= out.dim():
            continue
        keep = torch.ones(out.shape[dim], dtype=torch.bool)
        keep[torch.tensor(sorted(indices), dtype=torch.long)] = False
        out = out.index_select(dim, torch.nonzero(keep).flatten().to(out.device))
    return out


def refit_block(
    run: Callable[[int], torch.Tensor],
    target: Callable[[int], torch.Tensor],
    token_mask: Callable[[int], Optional[torch.Tensor]],
    micro_batches: int,
    micro_batch: int,
    parameters: Mapping[str, nn.Parameter],
    removed: Mapping[str, Mapping[int, set]],
    settings: RefitSettings,
    index: int,
    *,
    workers: Workers = SINGLE,
    progress: Optional[Callable[[int], None]] = None,
) -> BlockRefit:
    """Fits ``parameters`` in place by ``settings.steps`` Adam steps so that ``run(m)`` (the block's
    output on this process's micro-batch ``m`` of ``micro_batch`` windows, differentiable in the
    parameters) matches
    ``target(m)``; ``token_mask(m)``: the tokens that count (``None``: all). ``removed``: model name
    → dim → removed indices, whose gradients are masked. ``progress(step)`` after every step."""
    names = sorted(parameters)
    params = [parameters[n] for n in names]
    masks = [kept_mask(parameters[n], removed.get(n, {})) for n in names]
    before = _error(run, target, token_mask, micro_batches, workers)
    if settings.steps < 1 or micro_batches < 1 or not params:
        return BlockRefit(index, before, before, 0)
    saved = [p.requires_grad for p in params]
    originals = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=settings.lr, foreach=False)
    warmup = max(1, round(WARMUP * settings.steps))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / settings.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    per_step = min(max(1, math.ceil(settings.samples / max(1, micro_batch))), micro_batches)
    # Each micro-batch's token count is fixed: read its target once for it, not at every step.
    counted = [_count(token_mask(m), target(m)) for m in range(micro_batches)]
    try:
        for p in params:
            p.requires_grad_(True)
        for step in range(settings.steps):
            chosen = torch.randperm(micro_batches, generator=generator)[:per_step].tolist()
            counts = [counted[m] for m in chosen]
            total = sum(counts) if workers.world_size == 1 else workers.sum_values([sum(counts)])[0]
            optimizer.zero_grad(set_to_none=False)
            for m in chosen:
                with torch.enable_grad():
                    squared = _squared(run(m), target(m), token_mask(m))
                    (squared / max(total, 1.0)).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if workers.world_size > 1:
                workers.sum_(grads)
            for p, g, mask in zip(params, grads, masks):
                if mask is not None:
                    g.mul_(mask)
                p.grad = g
            optimizer.step()
            schedule.step()
            if progress:
                progress(step + 1)
    finally:
        for p, flag in zip(params, saved):
            p.grad = None
            p.requires_grad_(flag)
    after = _error(run, target, token_mask, micro_batches, workers)
    if not after < before:  # never worse than the least-squares fits on the calibration data
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        after = before
    return BlockRefit(index, before, after, settings.steps)


def _squared(output: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    difference = (output.float() - target.float()) ** 2
    if mask is not None:
        difference = difference * mask.reshape(*mask.shape, *([1] * (difference.dim() - mask.dim()))).to(difference)
    return difference.sum()


def _count(mask: Optional[torch.Tensor], target: torch.Tensor) -> float:
    if mask is None:
        return float(target.numel())
    return float(mask.sum()) * target.numel() / mask.numel()


def _error(
    run: Callable[[int], torch.Tensor],
    target: Callable[[int], torch.Tensor],
    token_mask: Callable[[int], Optional[torch.Tensor]],
    micro_batches: int,
    workers: Workers,
) -> float:
    """Mean squared error of the block's output over all micro-batches (and processes)."""
    sums = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for m in range(micro_batches):
            sums[0] += float(_squared(run(m), target(m), token_mask(m)))
            sums[1] += _count(token_mask(m), target(m))
    if workers.world_size > 1:
        workers.sum_([sums])
    return float(sums[0] / sums[1]) if float(sums[1]) else 0.0


__all__ = ["BlockRefit", "DEFAULT_REFIT_SAMPLES", "DEFAULT_REFIT_LR", "RefitSettings", "kept_mask", "kept_values", "refit_block", "trainable"]
