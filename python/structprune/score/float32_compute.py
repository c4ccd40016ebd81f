"""Half-precision linear layers computed in float32, for CPUs without half-precision matrix units.

Scoring a large checkpoint on a CPU keeps block weights and gradients in bfloat16 to halve their
memory. But where the CPU has no bfloat16 (or float16) matrix instructions, PyTorch multiplies
half-precision matrices with a plain reference loop: a Llama-7B MLP projection's forward and
backward on 512 tokens takes minutes instead of seconds. Here every ``F.linear`` on half-precision
CPU tensors is computed in float32 instead, in slices of output rows so that the float32 copy of a
weight never exceeds ``CHUNK_BYTES`` at a time. Weights, activations and gradients stay in their own
dtype; autograd saves the half-precision inputs, not float32 copies. The result is as accurate as
float32 arithmetic on the half-precision values (more accurate than half-precision accumulation).

Asked to (``accumulate_weight_grads``), the backward adds a leaf weight's gradient into
``weight.grad`` itself, slice by slice, instead of handing autograd a whole new gradient to add:
summing micro-batches then never holds two weight-sized gradients at once (86 MiB for one Llama-7B
MLP projection in bfloat16). Autograd's gradient hooks do not see such a gradient, so this is only
for callers that read ``.grad`` directly (the streamed scorer), never under DDP or optimizers' hooks.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF_DTYPES = (torch.bfloat16, torch.float16)
CHUNK_BYTES = 16 << 20
"""Largest float32 slice of a weight made at once (the head of a 7B model is 500 MB in float32);
a slice has two or three float32 companions of its size at once in the backward, all transient."""


def needs_float32_compute(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether half-precision matrix products on ``device`` would take PyTorch's slow reference path."""
    if device.type != "cpu" or dtype not in HALF_DTYPES:
        return False
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return not torch.ops.mkldnn._is_mkldnn_fp16_supported()


def float32_linears(device: torch.device, dtype: torch.dtype, *, accumulate_weight_grads: bool = False) -> ContextManager[None]:
    """A context in which half-precision CPU linears compute in float32, when the CPU needs it; with
    ``accumulate_weight_grads``, leaf weights' gradients are added into ``weight.grad`` in place."""
    return _Float32Linears(accumulate_weight_grads) if needs_float32_compute(device, dtype) else nullcontext()


class _Float32Linears(TorchFunctionMode):
    def __init__(self, accumulate_weight_grads: bool) -> None:
        super().__init__()
        self.accumulate_weight_grads = accumulate_weight_grads

    def __torch_function__(self, func: Any, types: Sequence[type], args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if weight.device.type == "cpu" and weight.dtype in HALF_DTYPES:
                return Float32Linear.apply(x, weight, bias, self.accumulate_weight_grads)
        return func(*args, **kwargs)


def _row_slices(rows: int, columns: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // max(1, columns * 4))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class Float32Linear(torch.autograd.Function):
    """``F.linear`` of half-precision tensors, computed in float32 slice by slice of output rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], accumulate_weight_grad: bool = False) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.accumulate_weight_grad = accumulate_weight_grad and weight.is_leaf
        inputs = x.reshape(-1, x.shape[-1]).float()
        out = torch.empty(inputs.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        for rows in _row_slices(weight.shape[0], weight.shape[1]):
            part = inputs @ weight[rows].float().T
            if bias is not None:
                part += bias[rows].float()
            out[:, rows] = part
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        grads = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            summed = torch.zeros(grads.shape[0], weight.shape[1], dtype=torch.float32, device=x.device)
            for rows in _row_slices(weight.shape[0], weight.shape[1]):
                summed += grads[:, rows] @ weight[rows].float()
            grad_x = summed.to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            inputs = x.reshape(-1, x.shape[-1]).float()
            if not ctx.accumulate_weight_grad:
                grad_weight = torch.empty_like(weight)
                _weight_grad_into(grad_weight, grads, inputs, add=False)
            elif weight.grad is None:
                weight.grad = torch.empty_like(weight)
                _weight_grad_into(weight.grad, grads, inputs, add=False)
            else:
                _weight_grad_into(weight.grad, grads, inputs, add=True)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grads.sum(dim=0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None


def _weight_grad_into(target: torch.Tensor, grads: torch.Tensor, inputs: torch.Tensor, *, add: bool) -> None:
    """``target = grads.T @ inputs`` (``+=`` with ``add``), in float32 slice by slice, rounded once per slice."""
    for rows in _row_slices(target.shape[0], target.shape[1]):
        part = grads[:, rows].T @ inputs
        if add:
            part += target[rows]  # promoted element by element: no float32 copy of the slice
        target[rows] = part
