"""Perplexity: the reference figures of the demo model and the team fixture, and agreement with
transformers' own loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import torch

from structprune.score.calibration import load_texts, token_stream
from structprune.errors import CalibrationError
from structprune.evaluate.perplexity import PerplexityResult, perplexity, perplexity_of_text

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "model"
DEMO_HELDOUT = REPO / "demo" / "text" / "heldout.txt"
FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURE_MODEL = FIXTURES / "tiny-llama"
FIXTURE_HELDOUT = FIXTURES / "text" / "heldout.txt"

needs_fixture = pytest.mark.skipif(
    not (FIXTURE_MODEL / "model.safetensors").is_file() or not FIXTURE_HELDOUT.is_file(),
    reason=f"team fixture absent: {FIXTURE_MODEL} and {FIXTURE_HELDOUT} are needed to check the "
    "reference perplexities in ../shared/fixtures/README.md",
)

# (model dir, held-out text) -> (model, token stream), loaded once per module.
_loaded: Dict[Tuple[Path, Path], Tuple[Any, torch.Tensor]] = {}


def model_and_stream(model_dir: Path, text: Path) -> Tuple[Any, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = (model_dir, text)
    if key not in _loaded:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        stream = token_stream(load_texts(text), AutoTokenizer.from_pretrained(model_dir))
        _loaded[key] = (model, stream)
    return _loaded[key]


@pytest.fixture(scope="module", autouse=True)
def _free_models() -> Any:
    yield
    _loaded.clear()


# The reference figures: demo/README.md ("Held-out perplexity") and ../shared/fixtures/README.md.
# Stream lengths are what the file tokenizes to as one string (demo/README.md states 134,561).
REFERENCES = [
    pytest.param(DEMO_MODEL, DEMO_HELDOUT, 134_561, 128, 1051, 83.96, id="demo-128", marks=pytest.mark.slow),
    pytest.param(DEMO_MODEL, DEMO_HELDOUT, 134_561, 256, 525, 81.75, id="demo-256", marks=pytest.mark.slow),
    pytest.param(FIXTURE_MODEL, FIXTURE_HELDOUT, 51_890, 128, 405, 40.26, id="tiny-llama-128", marks=needs_fixture),
    pytest.param(FIXTURE_MODEL, FIXTURE_HELDOUT, 51_890, 256, 202, 38.84, id="tiny-llama-256", marks=needs_fixture),
]


@pytest.mark.parametrize(("model_dir", "text", "tokens", "window", "windows", "expected"), REFERENCES)
def test_reference_perplexity(
    model_dir: Path, text: Path, tokens: int, window: int, windows: int, expected: float
) -> None:
    model, stream = model_and_stream(model_dir, text)
    # A larger batch than the default only to save time: windows are evaluated independently.
    result = perplexity(model, stream, window=window, batch_size=32)
    assert (result.tokens, result.windows, result.window) == (tokens, windows, window)
    assert round(result.perplexity, 2) == expected, result
    assert result.perplexity == pytest.approx(math.exp(result.mean_loss), rel=1e-12)


def test_perplexity_of_text_loads_model_and_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Held-out documents written in the .txt format: cheaper than the whole file.
    texts = [load_texts(DEMO_HELDOUT)[i] for i in (0, 3)]  # two short ones, about 1,600 tokens
    path = tmp_path / "short.txt"
    path.write_text("\n<|endoftext|>\n".join(texts), encoding="utf-8")
    stream = token_stream(texts, AutoTokenizer.from_pretrained(DEMO_MODEL))
    model, _ = model_and_stream(DEMO_MODEL, DEMO_HELDOUT)
    expected = perplexity(model, stream, window=128)
    assert perplexity_of_text(DEMO_MODEL, path) == expected  # window 128 is the default
    # A loaded model finds its tokenizer through name_or_path; without one it must be passed.
    loaded = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    assert perplexity_of_text(loaded, path, window=128) == expected
    loaded.name_or_path = ""
    with pytest.raises(ValueError, match="pass tokenizer="):
        perplexity_of_text(loaded, path)


def direct_perplexity(model: Any, stream: torch.Tensor, window: int) -> float:
    """The protocol written out with transformers' loss, one window at a time."""
    losses = []
    with torch.no_grad():
        for start in range(0, stream.numel() - window + 1, window):
            ids = stream[start : start + window].unsqueeze(0)
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize(("window", "batch_size"), [(64, 7), (100, 8), (33, 1)])
def test_matches_transformers_loss(window: int, batch_size: int) -> None:
    model, stream = model_and_stream(DEMO_MODEL, DEMO_HELDOUT)
    model.eval()
    # 40-odd windows plus a partial tail that must be dropped.
    part = stream[: window * 41 + window // 2]
    result = perplexity(model, part, window=window, batch_size=batch_size)
    assert result.windows == 41 and result.tokens == part.numel()
    assert result.perplexity == pytest.approx(direct_perplexity(model, part, window), rel=1e-6)


def test_restores_training_mode_and_runs_in_eval() -> None:
    model, stream = model_and_stream(DEMO_MODEL, DEMO_HELDOUT)
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        model.train()
        perplexity(model, stream[:200], window=50)
        assert seen == [False] and model.training
        model.eval()
        perplexity(model, stream[:200], window=50)
        assert not model.training
    finally:
        handle.remove()
        model.eval()


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    model, stream = model_and_stream(DEMO_MODEL, DEMO_HELDOUT)
    perplexity(model, stream[:300], window=100, progress=True)
    assert "perplexity @ 100" in capsys.readouterr().err
    perplexity(model, stream[:300], window=100)
    assert capsys.readouterr().err == ""


def test_bad_inputs() -> None:
    model, stream = model_and_stream(DEMO_MODEL, DEMO_HELDOUT)
    with pytest.raises(CalibrationError, match="has 100 tokens, fewer than one 128-token window"):
        perplexity(model, stream[:100], window=128)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, stream[:256].view(2, 128), window=128)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, stream[:256], window=1)
    with pytest.raises(ValueError, match="integer"):
        perplexity(model, stream[:256].float(), window=128)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, stream[:256], window=128, batch_size=0)


def test_result_fields() -> None:
    model, stream = model_and_stream(DEMO_MODEL, DEMO_HELDOUT)
    result = perplexity(model, stream[:1000], window=300)
    assert isinstance(result, PerplexityResult)
    assert (result.windows, result.tokens, result.window) == (3, 1000, 300)
    assert result.mean_loss > 0
