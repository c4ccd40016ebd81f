"""Half-precision linears computed in float32 on CPUs without half-precision matrix units."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from structprune.score import float32_compute  # noqa: E402
from structprune.score.float32_compute import Float32Linear, float32_linears, needs_float32_compute  # noqa: E402
from structprune.score.streaming import ActivationStore, ParamStats, StreamedModel, backward_pass, forward_pass  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "model"


def half_inputs(dtype: torch.dtype) -> List[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=generator).to(dtype).requires_grad_(True)
    weight = (0.1 * torch.randn(40, 48, generator=generator)).to(dtype).requires_grad_(True)
    bias = torch.randn(40, generator=generator).to(dtype).requires_grad_(True)
    return [x, weight, bias]


def float32_reference(inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """Output and gradients of the same half-precision values in float32 arithmetic."""
    leaves = [t.detach().float().requires_grad_(True) for t in inputs]
    out = F.linear(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [32 << 20, 48 * 4 * 7])  # one slice; slices of 7 rows
def test_float32_linear_matches_float32_arithmetic_on_half_values(dtype: torch.dtype, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(float32_compute, "CHUNK_BYTES", chunk_bytes)
    inputs = half_inputs(dtype)
    out = Float32Linear.apply(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(dtype))
    assert out.dtype == dtype and out.shape == (2, 5, 40)
    assert all(t.grad is not None and t.grad.dtype == dtype for t in inputs)
    want = float32_reference(inputs)
    for got, expected in zip([out.detach()] + [t.grad for t in inputs], want):
        # The only error left is rounding the float32 result to the half-precision dtype once.
        torch.testing.assert_close(got, expected.to(dtype), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


def test_mode_reroutes_half_precision_cpu_linears_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(float32_compute, "needs_float32_compute", lambda device, dtype: True)
    half = torch.nn.Linear(48, 40).to(torch.bfloat16)
    full = torch.nn.Linear(48, 40)
    x = torch.randn(3, 48)
    with float32_linears(torch.device("cpu"), torch.bfloat16):
        rerouted = half(x.to(torch.bfloat16).requires_grad_(True))
        untouched = full(x.requires_grad_(True))
    assert type(rerouted.grad_fn).__name__ == "Float32LinearBackward"
    assert type(untouched.grad_fn).__name__ != "Float32LinearBackward"
    assert not needs_float32_compute(torch.device("cpu"), torch.float32)
    assert not needs_float32_compute(torch.device("cuda"), torch.bfloat16)


def test_streamed_bfloat16_gradients_follow_float32_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """BF16 streamed scoring through the float32 path (forced, so every CPU runs it) against full-model
    float32 autograd on the same bf16-rounded weights: bf16 activations leave ~1% differences."""
    monkeypatch.setattr(float32_compute, "needs_float32_compute", lambda device, dtype: True)
    ids = torch.randint(0, 4096, (4, 24), generator=torch.Generator().manual_seed(0))
    model = StreamedModel(DEMO, blocks_prefix="model.layers", dtype=torch.bfloat16)
    store = ActivationStore(1 << 30)
    stats: Dict[str, ParamStats] = {}
    try:
        streamed = forward_pass(model, ids, micro_batch=2, store=store)
        backward_pass(model, streamed, fisher=False, on_params=lambda block: stats.update({n: ParamStats(n, s.weight.clone(), s.grad.clone()) for n, s in block.items()}))
    finally:
        store.close()
    reference = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    reference(input_ids=ids, labels=ids).loss.backward()
    for name, param in reference.named_parameters():
        assert stats[name].grad.dtype == torch.bfloat16
        scale = param.grad.abs().max().item()
        worst = (stats[name].grad.float() - param.grad).abs().max().item() / scale
        assert worst < 0.05, f"{name}: relative difference {worst:.3f}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradients_of_micro_batches_sum_in_place(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked to, the backward adds each micro-batch's weight gradient into the one ``weight.grad``
    (no second weight-sized buffer) and the sum equals float32 arithmetic over the whole batch."""
    monkeypatch.setattr(float32_compute, "CHUNK_BYTES", 48 * 4 * 7)
    inputs = half_inputs(dtype)
    x, weight, bias = inputs
    seed = torch.linspace(-1, 1, 2 * 5 * 40).reshape(2, 5, 40)
    buffers = []
    for sample in range(2):
        out = Float32Linear.apply(x[sample], weight, bias, True)
        out.backward(seed[sample].to(dtype))
        buffers.append(weight.grad.data_ptr())
    assert buffers[0] == buffers[1] and weight.grad.dtype == dtype
    want = float32_reference(inputs)
    torch.testing.assert_close(weight.grad.float(), want[2], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad.float(), want[1], rtol=1e-2, atol=1e-2)


def test_weight_gradients_of_computed_weights_still_flow_through_autograd() -> None:
    """A weight that is not a leaf (computed from another tensor) has no ``.grad`` to add into; its
    gradient goes back through autograd as usual."""
    base = torch.randn(40, 48).to(torch.bfloat16).requires_grad_(True)
    x = torch.randn(3, 48).to(torch.bfloat16)
    out = Float32Linear.apply(x, base * 2, None, True)
    out.backward(torch.ones_like(out))
    expected = 2 * torch.ones(3, 40).T @ x.float()
    torch.testing.assert_close(base.grad.float(), expected, rtol=1e-2, atol=1e-2)
