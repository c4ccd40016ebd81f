"""The CUDA paths: streamed scoring, pruning, loading and recovery (autocast, QLoRA) on a GPU.
Skipped where CUDA is not available (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available (these tests check the GPU paths)", allow_module_level=True)

import structprune  # noqa: E402
from structprune.evaluate.perplexity import perplexity_of_text  # noqa: E402
from structprune.prune import PruneOptions, make_plan  # noqa: E402
from structprune.score.streaming import ActivationStore, StreamedModel, backward_pass, forward_pass  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
HELDOUT = ROOT / "demo" / "text" / "heldout.txt"


@pytest.fixture(autouse=True)
def exact_float32() -> None:
    # TF32 matmuls would make fp32 comparisons loose; the tests compare exact arithmetic.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_streamed_gradients_on_cuda_equal_full_autograd_on_cuda() -> None:
    ids = torch.randint(0, 4096, (4, 24), generator=torch.Generator().manual_seed(0))
    full = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32, attn_implementation="sdpa").to("cuda").eval()
    full(input_ids=ids.cuda(), labels=ids.cuda()).loss.backward()
    model = StreamedModel(DEMO, device="cuda", blocks_prefix="model.layers")
    stats = {}
    store = ActivationStore()
    try:
        streamed = forward_pass(model, ids, micro_batch=2, store=store)
        backward_pass(model, streamed, fisher=False, on_params=lambda block: stats.update({n: s.grad.clone() for n, s in block.items()}))
    finally:
        store.close()
    for name, param in full.named_parameters():
        scale = param.grad.abs().max().item() or 1.0
        worst = (stats[name].to("cuda") - param.grad).abs().max().item() / scale
        assert worst <= 1e-4, f"{name}: relative difference {worst:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_prune_on_cuda_plans_like_the_cpu(dtype: str) -> None:
    options = PruneOptions(ratio=0.2, importance="taylor", calib=CALIB, samples=8, seq_len=64, device="cuda", dtype=dtype)
    result = make_plan(DEMO, options)
    assert result.peak_gpu_bytes and result.peak_gpu_bytes > 0
    assert 0.15 < result.removed_fraction < 0.25
    if dtype == "float32":
        on_cpu = make_plan(DEMO, PruneOptions(ratio=0.2, importance="taylor", calib=CALIB, samples=8, seq_len=64))
        assert result.widths == on_cpu.widths


def test_pruned_model_evaluates_on_cuda(tmp_path: Path) -> None:
    result = make_plan(DEMO, PruneOptions(ratio=0.2, importance="taylor", calib=CALIB, samples=8, seq_len=64, device="cuda", planning="global"))
    structprune.apply_plan(DEMO, result.plan, tmp_path / "out")
    on_gpu = perplexity_of_text(tmp_path / "out", HELDOUT, window=128, device="cuda")
    on_cpu = perplexity_of_text(tmp_path / "out", HELDOUT, window=128, device="cpu")
    assert on_gpu.perplexity == pytest.approx(on_cpu.perplexity, rel=1e-3)


@pytest.fixture(scope="module")
def pruned_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("cuda-recover") / "pruned"
    structprune.apply_plan(DEMO, ROOT / "demo" / "example-plan.json", output)
    return output


@pytest.mark.parametrize(("mixed_precision", "load_in"), [("bf16", None), ("fp16", None), ("no", "4bit"), ("no", "8bit")])
def test_recover_on_cuda_lowers_the_loss_and_writes_a_stock_checkpoint(pruned_demo: Path, tmp_path: Path, mixed_precision: str, load_in: Optional[str]) -> None:
    from structprune.recover.training import RecoverOptions, recover

    options = RecoverOptions(data=CALIB, seq_len=64, batch_size=8, max_steps=12, lr=3e-3, dropout=0.0, device="cuda",
                             mixed_precision=mixed_precision, load_in=load_in)
    result = recover(pruned_demo, tmp_path / "out", options)
    assert result.steps == 12 and all(math.isfinite(loss) for loss in result.losses)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert merged.config.intermediate_size == json.loads((pruned_demo / "config.json").read_text())["intermediate_size"]
