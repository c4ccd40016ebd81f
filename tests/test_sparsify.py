"""Unstructured and N:M sparsity (``structprune sparsify``): the masks are the ones asked for
(magnitude's are ``torch.nn.utils.prune.l1_unstructured``'s), SparseGPT's update is the optimal
brain surgeon's, and the output is a stock checkpoint with zeros, its config unchanged.

The end-to-end tests run on a tiny random Llama (64 hidden, 96 MLP channels, two blocks) built here
from a config, with the demo model's tokenizer for calibration text."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from torch.nn.utils import prune as torch_prune  # noqa: E402

from structprune import SettingError  # noqa: E402
from structprune.plan.sparsify import (  # noqa: E402
    SPARSITY_FILE, Pattern, SparsifyOptions, keep_mask, magnitude_scores, sparsegpt, sparsify, wanda_scores,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-block Llama saved as a checkpoint, with the demo model's tokenizer."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
        vocab_size=4096, max_position_embeddings=128, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, directory / name)
    return directory


def _options(**overrides: object) -> SparsifyOptions:
    settings: Dict[str, object] = dict(calib=CALIB, samples=4, seq_len=32)
    settings.update(overrides)
    return SparsifyOptions(**settings)  # type: ignore[arg-type]


def _block_weights(directory: Path) -> Dict[str, torch.Tensor]:
    tensors = load_file(str(directory / "model.safetensors"))
    return {name: tensor for name, tensor in tensors.items() if name.split(".")[-2] in LINEARS}


def _digest(directory: Path) -> Dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# masks on one tensor


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.77])
def test_magnitude_mask_is_l1_unstructured_row_by_row(sparsity: float) -> None:
    weight = torch.randn(9, 40, generator=torch.Generator().manual_seed(3))
    keep = keep_mask(magnitude_scores(weight), sparsity)
    for row in range(weight.shape[0]):
        layer = torch.nn.Linear(40, 1, bias=False)
        layer.weight.data.copy_(weight[row : row + 1])
        torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
        assert torch.equal(keep[row], layer.weight_mask[0].bool())


def test_pattern_masks_keep_the_largest_n_of_every_m() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.1, 0.9]])
    assert keep_mask(scores, Pattern(2, 4)).tolist() == [[True, False, True, False, False, True, False, True]]
    assert keep_mask(scores, Pattern(1, 2)).tolist() == [[True, False, True, False, False, True, False, True]]
    assert keep_mask(scores, Pattern(3, 8)).tolist() == [[True, False, True, True, False, False, False, False]]


def test_wanda_scores_weigh_each_column_by_its_input_norm() -> None:
    weight = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    squares = torch.tensor([4.0, 1.0])  # input norms 2 and 1
    assert wanda_scores(weight, squares).tolist() == [[2.0, 2.0], [6.0, 0.5]]


def _correlated_inputs(features: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator, dtype=torch.float64)
    return mixing @ torch.randn(features, tokens, generator=generator, dtype=torch.float64)


def test_sparsegpt_removing_the_first_column_leaves_the_least_squares_fit_of_the_rest() -> None:
    """One weight per row, all in column 0 (the smallest): the OBS update of the other columns is
    then the exact least-squares fit of the dense output from the remaining inputs."""
    generator = torch.Generator().manual_seed(4)
    inputs = _correlated_inputs(12, 500, seed=5)  # features × tokens
    weight = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    weight[:, 0] *= 1e-3
    new, keep = sparsegpt(weight, inputs @ inputs.T, 1 / 12, damping=0.0)
    assert keep[:, 0].logical_not().all() and keep[:, 1:].all()
    assert (new[:, 0] == 0).all()
    reference = torch.linalg.lstsq(inputs[1:].T, (weight @ inputs).T).solution.T
    torch.testing.assert_close(new[:, 1:], reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("target", [0.5, Pattern(2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_update_beats_zeroing_its_own_mask_and_magnitudes(target: object) -> None:
    generator = torch.Generator().manual_seed(6)
    inputs = _correlated_inputs(64, 800, seed=7)
    weight = torch.randn(16, 64, generator=generator, dtype=torch.float64)
    new, keep = sparsegpt(weight, inputs @ inputs.T, target, block_size=16)  # type: ignore[arg-type]
    error = lambda w: float(((weight @ inputs - w @ inputs) ** 2).sum())  # noqa: E731
    assert torch.equal(new == 0, ~keep)
    assert (keep.sum(1) == 32).all()
    magnitude = torch.where(keep_mask(weight.abs(), target), weight, 0.0)  # type: ignore[arg-type]
    assert error(new) < 0.7 * error(torch.where(keep, weight, 0.0))
    assert error(new) < 0.7 * error(magnitude)


def test_sparsegpt_spreads_a_rows_removals_exactly_over_the_blocks() -> None:
    inputs = _correlated_inputs(40, 300, seed=8)
    weight = torch.randn(5, 40, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    _, keep = sparsegpt(weight, inputs @ inputs.T, 0.3, block_size=16)  # blocks of 16, 16 and 8 columns
    assert (keep.logical_not().sum(1) == round(0.3 * 40)).all()


# ------------------------------------------------------------------------------------------------
# whole checkpoints


def test_magnitude_checkpoint_zeroes_l1_unstructureds_weights_and_nothing_else(tiny: Path, tmp_path: Path) -> None:
    before = _digest(tiny)
    result = sparsify(tiny, tmp_path / "out", SparsifyOptions(sparsity=0.5, method="magnitude"))
    assert _digest(tiny) == before
    source, output = load_file(str(tiny / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert list(source) == list(output)
    sparsified = 0
    for name, tensor in source.items():
        if name.split(".")[-2] not in LINEARS:
            assert torch.equal(output[name], tensor), name  # embeddings, norms: untouched
            continue
        layer = torch.nn.Linear(tensor.shape[1], tensor.shape[0], bias=False)
        layer.weight.data.copy_(tensor)
        for row in range(tensor.shape[0]):  # the comparison group is the output row
            expected = tensor[row].clone()
            single = torch.nn.Linear(tensor.shape[1], 1, bias=False)
            single.weight.data.copy_(expected[None])
            torch_prune.l1_unstructured(single, "weight", amount=0.5)
            assert torch.equal(output[name][row], single.weight[0].detach()), (name, row)
        sparsified += tensor.numel()
    assert result.sparsified_parameters == sparsified
    assert result.zeroed == sparsified // 2
    assert (tmp_path / "out" / "config.json").read_bytes() == (tiny / "config.json").read_bytes()
    recorded = json.loads((tmp_path / "out" / SPARSITY_FILE).read_text())
    assert recorded["method"] == "magnitude" and recorded["sparsity"] == 0.5 and recorded["pattern"] is None
    assert recorded["zeroed_fraction_of_sparsified"] == 0.5


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_2_4_output_has_at_most_two_nonzeros_in_every_four_inputs(method: str, tiny: Path, tmp_path: Path) -> None:
    result = sparsify(tiny, tmp_path / "out", _options(pattern="2:4", method=method))
    source = _block_weights(tiny)
    for name, tensor in _block_weights(tmp_path / "out").items():
        groups = tensor.reshape(tensor.shape[0], -1, 4)
        assert ((groups != 0).sum(2) <= 2).all(), name
        if method != "sparsegpt":  # zeroing only: the kept weights are the input's, bit for bit
            assert torch.equal(tensor[tensor != 0], source[name][tensor != 0]), name
    assert result.zeroed == result.sparsified_parameters // 2
    assert json.loads((tmp_path / "out" / SPARSITY_FILE).read_text())["pattern"] == "2:4"


def test_sparsegpt_output_is_byte_reproducible_and_its_kept_weights_change(tiny: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        sparsify(tiny, tmp_path / name, _options(sparsity=0.5, method="sparsegpt"))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    source, output = _block_weights(tiny), _block_weights(tmp_path / "a")
    down = "model.layers.1.mlp.down_proj.weight"
    kept = output[down] != 0
    assert (kept.sum(1) == source[down].shape[1] // 2).all()
    assert not torch.equal(output[down][kept], source[down][kept])


def test_wanda_uses_the_calibration_inputs(tiny: Path, tmp_path: Path) -> None:
    """Wanda's masks differ from magnitude's, and follow ``|W|·‖X‖`` recomputed here for block 0's
    q_proj (whose inputs, the normed embeddings of the calibration windows, are computed directly)."""
    from structprune.models.loading import load_tokenizer
    from structprune.score.calibration import calibration_batch, load_texts

    sparsify(tiny, tmp_path / "wanda", _options(sparsity=0.5, method="wanda"))
    sparsify(tiny, tmp_path / "magnitude", _options(sparsity=0.5, method="magnitude"))
    wanda, magnitude = _block_weights(tmp_path / "wanda"), _block_weights(tmp_path / "magnitude")
    assert any(not torch.equal(wanda[name] != 0, magnitude[name] != 0) for name in wanda)
    model = transformers.LlamaForCausalLM.from_pretrained(tiny)
    batch = calibration_batch(load_texts(CALIB), load_tokenizer(tiny), samples=4, seq_len=32, seed=0)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(batch)).reshape(-1, 64).double()
    name = "model.layers.0.self_attn.q_proj.weight"
    weight = model.model.layers[0].self_attn.q_proj.weight.detach()
    expected = torch.where(keep_mask(wanda_scores(weight, x.square().sum(0)), 0.5), weight, 0.0)
    assert torch.equal(wanda[name], expected)


def test_bad_requests_are_refused_naming_the_option(tiny: Path, tmp_path: Path) -> None:
    refusals = [
        (SparsifyOptions(method="magnitude"), "exactly one of sparsity"),
        (SparsifyOptions(sparsity=0.5, pattern="2:4", method="magnitude"), "exactly one of sparsity"),
        (SparsifyOptions(sparsity=1.0, method="magnitude"), r"sparsity \(--sparsity\)"),
        (SparsifyOptions(pattern="4:2", method="magnitude"), r"pattern \(--pattern\).*0 < N < M"),
        (SparsifyOptions(pattern="two of four", method="magnitude"), r"pattern \(--pattern\): expected N:M"),
        (SparsifyOptions(sparsity=0.5, method="obs"), r"method \(--method\): unknown 'obs'"),
        (SparsifyOptions(sparsity=0.5, method="wanda"), r"needs calibration text.*--calib"),
        (_options(pattern="2:4", method="sparsegpt", block_size=6), r"block_size \(--block-size\)"),
        (SparsifyOptions(pattern="3:7", method="magnitude"), r"'model\.layers\.0\.self_attn\.q_proj\.weight' has 64 inputs, not a multiple of 7"),
    ]
    for options, message in refusals:
        with pytest.raises(SettingError, match=message):
            sparsify(tiny, tmp_path / "out", options)
        assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir()]  # no work directory left behind


def test_sparsify_command_writes_the_checkpoint_and_refuses_bad_patterns(tiny: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from structprune.cli import main

    runner = CliRunner()
    done = runner.invoke(main, ["sparsify", str(tiny), "-o", str(tmp_path / "out"), "--pattern", "2:4", "--method", "magnitude"])
    assert done.exit_code == 0, done.output
    assert "zeroed      " in done.output and "config unchanged" in done.output
    assert json.loads((tmp_path / "out" / SPARSITY_FILE).read_text())["pattern"] == "2:4"
    refused = runner.invoke(main, ["sparsify", str(tiny), "-o", str(tmp_path / "bad"), "--pattern", "4:2", "--method", "magnitude"])
    assert refused.exit_code == 2  # a bad option, as click exits for its own
    assert "error: pattern (--pattern): N:M needs 0 < N < M, got '4:2'" in refused.output
    assert not (tmp_path / "bad").exists()


def test_sweep_puts_sparsified_rows_beside_pruned_ones_with_the_dense_size(tiny: Path, tmp_path: Path) -> None:
    """A ``sparse-METHOD`` row zeroes the ratio of every row and keeps the dense parameters and
    MACs per token: the table says plainly that zeros on dense kernels save nothing."""
    from click.testing import CliRunner

    from structprune.cli import main

    heldout = ROOT / "demo" / "text" / "heldout.txt"
    args = ["sweep", str(tiny), "-o", str(tmp_path / "sweep"), "--ratios", "0.5", "--importance", "l2", "--sparsify", "magnitude",
            "--ppl", str(heldout), "--window", "32", "--no-reconstruct"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    rows = {row["importance"]: row for row in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]}
    assert sorted(rows) == ["dense", "l2", "sparse-magnitude"]
    sparse, dense, pruned = rows["sparse-magnitude"], rows["dense"], rows["l2"]
    assert (sparse["parameters"], sparse["macs_per_token"]) == (dense["parameters"], dense["macs_per_token"])
    assert pruned["parameters"] < dense["parameters"]
    linear = sum(t.numel() for t in _block_weights(tiny).values())
    assert sparse["removed_fraction"] == pytest.approx(0.5 * linear / dense["parameters"])
    for method, message in (("wanda", "--sparsify: wanda needs calibration text: pass --calib FILE"), ("obs", "--sparsify: unknown method 'obs'")):
        refused = CliRunner().invoke(main, [*args, "--sparsify", method, "-o", str(tmp_path / "refused")])
        assert refused.exit_code == 2 and message in refused.output  # before any work
        assert not (tmp_path / "refused").exists()
