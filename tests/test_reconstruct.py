"""Reconstruction after removal (``--reconstruct``): the refit is the closed-form least-squares
solution, computed sequentially on the pruned model's own activations, never worse than the plain
cut, and the output stays a stock checkpoint.

The references are built here, independently of the streaming engine: a plain transformers model
whose o_proj/down_proj weights are the pruned checkpoint's, scattered back to full width with zeros
in the removed columns (it computes exactly what the pruned model computes, and also the inputs the
removed columns would have seen), hooks collecting each layer's inputs, and torch.linalg.lstsq."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

import structprune  # noqa: E402
from structprune import SettingError  # noqa: E402
from structprune.score.calibration import calibration_batch, load_texts  # noqa: E402
from structprune.models.loading import load_tokenizer  # noqa: E402
from structprune.plan.cut_plan import CutPlan  # noqa: E402
from structprune.prune import PruneOptions, PruneResult, make_plan, prune  # noqa: E402
from structprune.plan.reconstruct import fit_kept_columns, obs_removals  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
SAMPLES, SEQ_LEN = 8, 64
CONSUMERS = ("self_attn.o_proj", "mlp.down_proj")


# ------------------------------------------------------------------------------------------------
# the closed form


def test_undamped_fit_is_the_least_squares_solution() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 12, generator=generator, dtype=torch.float64)
    inputs = torch.randn(12, 300, generator=generator, dtype=torch.float64)  # features × tokens
    # Removed features correlated with kept ones (1 with 0, 3 with 2 and 5): the fit has something to do.
    inputs[1] = inputs[0] + 0.1 * inputs[1]
    inputs[3] = 0.7 * inputs[2] + 0.3 * inputs[5]
    kept = torch.tensor([0, 2, 4, 5, 8, 9, 11])
    fit = fit_kept_columns(weight, inputs @ inputs.T, kept, damping=0.0)
    reference = torch.linalg.lstsq(inputs[kept].T, (weight @ inputs).T).solution.T
    torch.testing.assert_close(fit.weight, reference, rtol=1e-5, atol=1e-8)
    residual = lambda columns: float(((weight @ inputs - columns @ inputs[kept]) ** 2).sum())  # noqa: E731
    assert fit.error_after == pytest.approx(residual(reference), rel=1e-6)
    assert fit.error_before == pytest.approx(residual(weight[:, kept]), rel=1e-6)
    assert fit.error_after < 0.8 * fit.error_before


@pytest.mark.parametrize("damping", [0.0, 0.01, 1.0, 100.0])
def test_a_fit_never_increases_the_output_error(damping: float) -> None:
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        weight = torch.randn(5, 9, generator=generator, dtype=torch.float64)
        inputs = torch.randn(9, 40, generator=generator, dtype=torch.float64) * torch.rand(9, 1, generator=generator, dtype=torch.float64) * 3
        kept = torch.randperm(9, generator=generator)[: 1 + trial % 8].sort().values
        fit = fit_kept_columns(weight, inputs @ inputs.T, kept, damping=damping)
        residual = float(((weight @ inputs - fit.weight @ inputs[kept]) ** 2).sum())
        plain = float(((weight @ inputs - weight[:, kept] @ inputs[kept]) ** 2).sum())
        assert residual <= plain * (1 + 1e-9) + 1e-9
        assert fit.error_after <= fit.error_before


def test_a_fit_to_another_target_is_its_least_squares_solution() -> None:
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 10, generator=generator, dtype=torch.float64)
    inputs = torch.randn(10, 200, generator=generator, dtype=torch.float64)
    # The target: what the layer gave on other inputs (the dense model's), plus a drift to take up.
    targets = weight @ (inputs + 0.3 * torch.randn(10, 200, generator=generator, dtype=torch.float64)) + 0.1
    kept = torch.tensor([1, 2, 3, 6, 7, 9])
    fit = fit_kept_columns(weight, inputs @ inputs.T, kept, damping=0.0, cross=targets @ inputs.T, energy=float((targets**2).sum()))
    reference = torch.linalg.lstsq(inputs[kept].T, targets.T).solution.T
    torch.testing.assert_close(fit.weight, reference, rtol=1e-5, atol=1e-8)
    residual = lambda columns: float(((targets - columns @ inputs[kept]) ** 2).sum())  # noqa: E731
    assert fit.error_after == pytest.approx(residual(reference), rel=1e-6)
    assert fit.error_before == pytest.approx(residual(weight[:, kept]), rel=1e-6)
    with pytest.raises(ValueError, match="both or neither"):
        fit_kept_columns(weight, inputs @ inputs.T, kept, cross=targets @ inputs.T)


def test_a_singular_gram_matrix_still_gives_a_fit() -> None:
    weight = torch.ones(3, 4, dtype=torch.float64)
    inputs = torch.zeros(4, 10, dtype=torch.float64)  # a layer whose inputs are all zero
    fit = fit_kept_columns(weight, inputs @ inputs.T, torch.tensor([0, 1]), damping=0.0)
    assert torch.isfinite(fit.weight).all()
    assert fit.error_after == fit.error_before == 0.0


# ------------------------------------------------------------------------------------------------
# the demo model (Llama, GQA) through prune


def calibration() -> torch.Tensor:
    return calibration_batch(load_texts(CALIB), load_tokenizer(DEMO), samples=SAMPLES, seq_len=SEQ_LEN, seed=0)


def options(**overrides: object) -> PruneOptions:
    base = dict(
        ratio=0.3, importance="l2", calib=CALIB, samples=SAMPLES, seq_len=SEQ_LEN, micro_batch=4, reconstruct=True, damping=0.0,
        reconstruction_target="layer",
    )
    base.update(overrides)
    return PruneOptions(**base)  # type: ignore[arg-type]


def load_checked(path: Path) -> nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set(), info
    return model.eval()


def kept_columns(plan: CutPlan, weight: str) -> torch.Tensor:
    indices = plan.tensors[weight].keep[1]
    return torch.tensor(plan.index_sets[indices] if isinstance(indices, str) else indices)


def scattered(dense: nn.Module, pruned: nn.Module, plan: CutPlan) -> nn.Module:
    """The dense model with every consumer's weight replaced by the pruned one at its kept columns
    and zeros at the removed ones: it computes what the pruned model computes."""
    masked = dense
    for i, layer in enumerate(pruned.model.layers):
        for path in CONSUMERS:
            name = f"model.layers.{i}.{path}.weight"
            full = masked.get_submodule(f"model.layers.{i}.{path}").weight
            new = torch.zeros_like(full)
            new[:, kept_columns(plan, name)] = layer.get_submodule(path).weight.detach()
            full.data.copy_(new)
    return masked


def layer_inputs(model: nn.Module, modules: List[str], ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every token's input of each named module, as [features, tokens] in float64."""
    seen: Dict[str, List[torch.Tensor]] = {name: [] for name in modules}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach().double().reshape(-1, args[0].shape[-1])))
        for name in modules
    ]
    try:
        with torch.no_grad():
            for batch in ids.split(4):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts).T for name, parts in seen.items()}


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory: pytest.TempPathFactory) -> Tuple[PruneResult, Path]:
    out = tmp_path_factory.mktemp("reconstruct") / "pruned"
    return prune(DEMO, out, options()), out


def test_every_layer_is_the_least_squares_fit_on_the_pruned_models_own_inputs(reconstructed: Tuple[PruneResult, Path]) -> None:
    result, out = reconstructed
    pruned = load_checked(out)
    dense = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    original = {name: p.detach().double().clone() for name, p in dense.named_parameters()}
    masked = scattered(dense, pruned, result.plan)
    modules = [f"model.layers.{i}.{path}" for i in range(len(pruned.model.layers)) for path in CONSUMERS]
    inputs = layer_inputs(masked, modules, calibration())
    refitted = 0
    for name in modules:
        weight = original[f"{name}.weight"]
        kept = kept_columns(result.plan, f"{name}.weight")
        if len(kept) == weight.shape[1]:
            continue
        x = inputs[name]
        reference = torch.linalg.lstsq(x[kept].T, (weight @ x).T).solution.T
        got = pruned.get_submodule(name).weight.detach().double()
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5, msg=name)
        plain_error = float(((weight @ x - weight[:, kept] @ x[kept]) ** 2).sum())
        fitted_error = float(((weight @ x - got @ x[kept]) ** 2).sum())
        assert fitted_error <= plain_error
        refitted += 1
    assert refitted == 2 * len(pruned.model.layers), "both heads and MLP channels are removed in every layer"
    report = result.plan.metadata["reconstruction"]
    assert report["layers"] == refitted and 0 < report["output_error_ratio"] < 1


@pytest.fixture(scope="module")
def reconstructed_to_dense(tmp_path_factory: pytest.TempPathFactory) -> Tuple[PruneResult, Path]:
    out = tmp_path_factory.mktemp("reconstruct-dense") / "pruned"
    return prune(DEMO, out, options(reconstruction_target="dense")), out


def test_the_dense_target_is_the_least_squares_fit_of_the_dense_models_outputs(reconstructed_to_dense: Tuple[PruneResult, Path]) -> None:
    """o_proj reproduces its dense weights' output on its pruned inputs, as with the layer target;
    down_proj, whose output is added straight to the block's, reproduces its own output plus what
    the block's output misses of the dense block's: dense block output − pruned block output + its
    own output."""
    result, out = reconstructed_to_dense
    pruned = load_checked(out)
    dense = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    original = {name: p.detach().double().clone() for name, p in dense.named_parameters()}
    layers = len(pruned.model.layers)
    modules = [f"model.layers.{i}.{path}" for i in range(layers) for path in CONSUMERS]
    # A block's output is the next block's input (the final norm's for the last block).
    block_outputs = [f"model.layers.{i + 1}" for i in range(layers - 1)] + ["model.norm"]
    ids = calibration()
    dense_seen = layer_inputs(dense, modules + block_outputs, ids)
    masked = scattered(dense, pruned, result.plan)
    pruned_seen = layer_inputs(masked, modules + block_outputs, ids)
    for i in range(layers):
        for path in CONSUMERS:
            name = f"model.layers.{i}.{path}"
            weight, kept = original[f"{name}.weight"], kept_columns(result.plan, f"{name}.weight")
            x = pruned_seen[name]
            got = pruned.get_submodule(name).weight.detach().double()
            if path == "mlp.down_proj":
                target = dense_seen[block_outputs[i]] - pruned_seen[block_outputs[i]] + got @ x[kept]
            else:
                target = weight @ x
            reference = torch.linalg.lstsq(x[kept].T, target.T).solution.T
            # Relative to the whole matrix: undamped fits on 512 tokens are ill-conditioned, so the
            # float32 forward passes and weights move single entries by more than 1e-5 of themselves
            # (the other targets differ from this one by 10% and more).
            assert float(torch.linalg.norm(got - reference) / torch.linalg.norm(reference)) < 1e-4, name
    assert result.plan.metadata["reconstruction"]["target"] == "dense"


def test_the_dense_target_brings_the_logits_closer_than_the_layer_target(
    reconstructed: Tuple[PruneResult, Path], reconstructed_to_dense: Tuple[PruneResult, Path]
) -> None:
    ids = calibration()
    with torch.no_grad():
        dense = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()(input_ids=ids).logits
        layer = load_checked(reconstructed[1])(input_ids=ids).logits
        to_dense = load_checked(reconstructed_to_dense[1])(input_ids=ids).logits
    assert float(((to_dense - dense) ** 2).mean()) < float(((layer - dense) ** 2).mean())


def test_every_decoder_architecture_reconstructs_and_only_residual_layers_take_the_block_output(tmp_path: Path) -> None:
    """The probe, not a list of models, decides which layers take up the residual drift: the MLP's
    output projection everywhere, except Gemma 2's, whose output passes a post-feedforward norm
    before the residual add. Every refit keeps or lowers its layer's error, and the written
    checkpoint loads as the stock architecture."""
    from arch_configs import CONFIGS, VOCAB

    from structprune import apply_plan, trace
    from structprune.plan.cuts import Selection, checkpoint_cut_plan
    from structprune.plan.reconstruct import apply_to_plan, reconstruct, stored_dtype_map
    from structprune.score.streaming import StreamedModel
    from structprune.tracing.export import checkpoint_name_map

    transformers.logging.set_verbosity_error()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "opt", "gpt2"):
        config = CONFIGS[arch]()
        torch.manual_seed(0)
        path = tmp_path / arch
        getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.float32).save_pretrained(path)
        graph = trace(path)
        assert graph.blocks is not None
        selection = Selection(units={s.id: sorted((7 * s.layer + 5 * k) % s.units for k in range(8)) for s in graph.by_kind("channels")})
        names = list(structprune.read_checkpoint(path).tensors)
        stored = {model_name: name for name, model_name in checkpoint_name_map(path, names).items()}
        model = StreamedModel(path, blocks_prefix=graph.blocks.prefix)
        result = reconstruct(model, graph, selection, ids, tmp_path / f"{arch}-weights", stored_names=stored, stored_dtypes=stored_dtype_map(path), micro_batch=2)
        assert len(result.layers) == 3, arch
        assert all(r.to_block_output == (arch != "gemma2") for r in result.layers), (arch, result.layers)
        assert all(r.error_after <= r.error_before for r in result.layers), arch
        plan = checkpoint_cut_plan(path, graph, selection)
        apply_to_plan(plan, result)
        apply_plan(path, plan, tmp_path / f"{arch}-pruned")
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{arch}-pruned", output_loading_info=True, attn_implementation="eager")
        assert not any(info.values()), (arch, info)
        with torch.no_grad():
            assert torch.isfinite(loaded(input_ids=ids).logits).all(), arch


def test_reconstruction_moves_the_pruned_model_towards_the_dense_one(reconstructed: Tuple[PruneResult, Path], tmp_path: Path) -> None:
    _, out = reconstructed
    plain_out = tmp_path / "plain"
    prune(DEMO, plain_out, options(reconstruct=False))
    ids = calibration()
    with torch.no_grad():
        dense = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()(input_ids=ids).logits
        fitted = load_checked(out)(input_ids=ids).logits
        plain = load_checked(plain_out)(input_ids=ids).logits
    assert float(((fitted - dense) ** 2).mean()) < 0.8 * float(((plain - dense) ** 2).mean())
    # Only o_proj/down_proj values change: every other tensor is the plain cut's, byte for byte.
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(plain_out / "model.safetensors")
    assert a.keys() == b.keys()
    changed = {name for name in a if not torch.equal(a[name], b[name])}
    assert changed and all(name.endswith(("o_proj.weight", "down_proj.weight")) for name in changed)


def test_cli_reconstruct_is_byte_reproducible_and_keeps_its_weights_beside_the_plan(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from structprune.cli import main

    common = ["prune", str(DEMO), "--ratio", "0.2", "--importance", "l2", "--calib", str(CALIB), "--samples", "4", "--seq-len", "32", "--reconstruct"]
    for run in ("a", "b"):
        outcome = CliRunner().invoke(main, [*common, "-o", str(tmp_path / run), "--plan-out", str(tmp_path / f"{run}.json")])
        assert outcome.exit_code == 0, outcome.output
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "b" / "model.safetensors")
    plan = CutPlan.load(tmp_path / "a.json")
    sources = {cut.replace.file for cut in plan.tensors.values() if cut.replace is not None and cut.replace.file}
    assert sources and all(Path(s).parent == (tmp_path / "structprune-reconstructed").resolve() for s in sources)
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    # The saved plan still applies: its weights stayed beside it.
    outcome = CliRunner().invoke(main, ["apply", str(DEMO), str(tmp_path / "a.json"), "-o", str(tmp_path / "again")])
    assert outcome.exit_code == 0, outcome.output
    assert digest(tmp_path / "again" / "model.safetensors") == digest(tmp_path / "a" / "model.safetensors")
    load_checked(tmp_path / "a")
    # Without --plan-out nothing is left beside the output.
    outcome = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "c")])
    assert outcome.exit_code == 0, outcome.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_reconstruction_refuses_what_it_cannot_do() -> None:
    with pytest.raises(SettingError, match="hidden"):
        make_plan(DEMO, options(structures=("heads", "mlp", "hidden")), reconstruction_dir=Path("/nonexistent"))
    with pytest.raises(SettingError, match="bias compensation"):
        make_plan(DEMO, options(bias_compensation=True), reconstruction_dir=Path("/nonexistent"))
    with pytest.raises(SettingError, match="rules out --no-reconstruct"):
        make_plan(DEMO, options(importance="obs", reconstruct=False))


def test_a_plan_naming_a_missing_reconstruction_file_is_refused_before_writing(tmp_path: Path) -> None:
    from structprune import TensorCut, apply_plan
    from structprune.errors import StructpruneError
    from structprune.plan.cut_plan import Values

    name = "model.layers.0.mlp.down_proj.weight"
    plan = CutPlan(tensors={name: TensorCut(replace=Values.from_file(tmp_path / "gone.safetensors", name))})
    with pytest.raises(StructpruneError, match="gone.safetensors"):
        apply_plan(DEMO, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert np.array_equal(sorted(p.name for p in tmp_path.iterdir()), [])


# ------------------------------------------------------------------------------------------------
# OBS selection (--importance obs)


def test_greedy_obs_takes_the_cheapest_single_removal_first_and_respects_buckets() -> None:
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    inputs = torch.randn(8, 60, generator=generator, dtype=torch.float64)
    inputs[2] = inputs[1] + 0.05 * inputs[2]  # 1 and 2 nearly duplicate: one of them is nearly free to remove
    gram = inputs @ inputs.T

    def error(removed: List[int]) -> float:
        kept = torch.tensor([i for i in range(8) if i not in removed])
        return fit_kept_columns(weight, gram, kept, damping=0.0).error_after

    singles = [torch.tensor([i]) for i in range(8)]
    order = obs_removals(weight, gram, singles, 3, damping=0.0)
    assert order[0] == min(range(8), key=lambda i: error([i])) and order[0] in (1, 2)
    # The batched single-column path and the general path agree when rounds are single removals.
    assert obs_removals(weight, gram, singles, 3, damping=0.0, buckets=[0] * 8, per_bucket=8) == [order[0], *obs_removals_general_rest(weight, gram, order[0])]
    pairs = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7])]
    chosen = obs_removals(weight, gram, pairs, 2, damping=0.0, buckets=[0, 0, 1, 1], per_bucket=1)
    assert sorted(g // 2 for g in chosen) == [0, 1], "one pair from each bucket"


def obs_removals_general_rest(weight: torch.Tensor, gram: torch.Tensor, first: int) -> List[int]:
    """The next two greedy choices after ``first``, recomputed from scratch by brute force over the
    optimal fits (what greedy OBS with exact updates must pick)."""
    chosen = [first]
    for _ in range(2):
        def error(extra: int) -> float:
            kept = torch.tensor([i for i in range(8) if i not in chosen and i != extra])
            return fit_kept_columns(weight, gram, kept, damping=0.0).error_after

        chosen.append(min((i for i in range(8) if i not in chosen), key=error))
    return chosen[1:]


@pytest.mark.parametrize("structure", ["heads", "mlp"])
def test_obs_chooses_layer_zeros_units_by_greedy_obs_on_its_inputs_then_fits_them(structure: str, tmp_path: Path) -> None:
    result = prune(DEMO, tmp_path / "obs", options(importance="obs", structures=(structure,), ratio=0.15))
    pruned = load_checked(tmp_path / "obs")
    dense = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    # Block 0's o_proj sees the dense model's inputs; so does its down_proj when no head is removed.
    name = "model.layers.0." + ("self_attn.o_proj" if structure == "heads" else "mlp.down_proj")
    x = layer_inputs(dense, [name], calibration())[name]
    weight = dense.get_submodule(name).weight.detach().double()
    kept = kept_columns(result.plan, f"{name}.weight")
    gone = sorted(set(range(weight.shape[1])) - set(kept.tolist()))
    if structure == "heads":
        head_dim, per_kv = 32, 3  # the demo model: 6 query heads in 2 KV groups
        removed = sorted({c // head_dim for c in gone})
        pieces = [torch.arange(h * head_dim, (h + 1) * head_dim) for h in range(weight.shape[1] // head_dim)]
        expected = obs_removals(weight, x @ x.T, pieces, len(removed), damping=0.0, buckets=[h // per_kv for h in range(len(pieces))], per_bucket=len(removed) // 2)
    else:
        removed = gone
        expected = obs_removals(weight, x @ x.T, [torch.tensor([c]) for c in range(weight.shape[1])], len(removed), damping=0.0)
    assert removed and sorted(expected) == removed
    reference = torch.linalg.lstsq(x[kept].T, (weight @ x).T).solution.T
    torch.testing.assert_close(pruned.get_submodule(name).weight.detach().double(), reference, rtol=1e-4, atol=1e-5)
    assert result.plan.metadata["method"]["importance"] == "obs"


# ------------------------------------------------------------------------------------------------
# the block refit (--refit-steps)

REFIT_STEPS = 30
REFIT_LR = 1e-4


def refit_reconstruction(path: Path, ids: torch.Tensor, selection: object, out: Path, steps: int) -> Tuple[object, Path]:
    """``reconstruct`` of ``selection`` (dense target) with ``steps`` refit steps, applied to a
    checkpoint at ``out``: the Reconstruction and the output folder."""
    from structprune import apply_plan, trace
    from structprune.plan.cuts import checkpoint_cut_plan
    from structprune.plan.reconstruct import apply_to_plan, reconstruct, stored_dtype_map
    from structprune.plan.refit import RefitSettings
    from structprune.score.streaming import StreamedModel
    from structprune.tracing.export import checkpoint_name_map

    graph = trace(path)
    assert graph.blocks is not None
    names = list(structprune.read_checkpoint(path).tensors)
    stored = {model_name: name for name, model_name in checkpoint_name_map(path, names).items()}
    model = StreamedModel(path, blocks_prefix=graph.blocks.prefix)
    refit = RefitSettings(steps=steps, lr=REFIT_LR, samples=4, seed=0) if steps else None
    result = reconstruct(
        model, graph, selection, ids, out.with_suffix(".weights"), stored_names=stored, stored_dtypes=stored_dtype_map(path), micro_batch=2, refit=refit,  # type: ignore[arg-type]
    )
    plan = checkpoint_cut_plan(path, graph, selection, layout="auto")  # type: ignore[arg-type]
    apply_to_plan(plan, result)
    apply_plan(path, plan, out)
    return result, out


def test_the_block_refit_lowers_every_blocks_error_below_the_least_squares_fit_and_loads(tmp_path: Path) -> None:
    """A tiny random Llama, half of every MLP removed: after the least-squares fits every block
    is refitted as a whole, its output error on the calibration data (against the dense block's
    output) drops below the least-squares fit's, the logits come closer to the dense model's than
    without the refit, weights beyond o_proj/down_proj change (q/k/v, gate/up, the norms) and the
    checkpoint loads as the stock architecture with the same shapes."""
    from arch_configs import CONFIGS, VOCAB

    from structprune import trace
    from structprune.plan.cuts import Selection
    from safetensors.torch import load_file

    transformers.logging.set_verbosity_error()
    config = CONFIGS["llama"]()
    torch.manual_seed(0)
    path = tmp_path / "llama"
    transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32).save_pretrained(path)
    graph = trace(path)
    selection = Selection(units={s.id: list(range(s.layer % 2, s.units, 2)) for s in graph.by_kind("channels")})
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(3))
    plain, plain_out = refit_reconstruction(path, ids, selection, tmp_path / "ls", 0)
    refit, refit_out = refit_reconstruction(path, ids, selection, tmp_path / "refit", REFIT_STEPS)
    assert not plain.refits  # type: ignore[attr-defined]
    assert [r.block for r in refit.refits] == list(range(config.num_hidden_layers))  # type: ignore[attr-defined]
    assert all(r.error_after < r.error_before for r in refit.refits)  # type: ignore[attr-defined]
    # Block 0 sees the same inputs in both: its refit starts from exactly the least-squares fit.
    assert refit.refits[0].error_before == pytest.approx(_block_error(path, plain_out, ids, 0), rel=1e-4)  # type: ignore[attr-defined]
    with torch.no_grad():
        dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=ids).logits
        fitted = load_checked(plain_out)(input_ids=ids).logits
        refitted = load_checked(refit_out)(input_ids=ids).logits
    assert float(((refitted - dense) ** 2).mean()) < float(((fitted - dense) ** 2).mean())
    a, b = load_file(refit_out / "model.safetensors"), load_file(plain_out / "model.safetensors")
    assert {n: t.shape for n, t in a.items()} == {n: t.shape for n, t in b.items()}
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    for leaf in ("q_proj.weight", "gate_proj.weight", "up_proj.weight", "input_layernorm.weight", "o_proj.weight", "down_proj.weight"):
        assert any(n.endswith(leaf) for n in changed), leaf
    assert not any(n.startswith(("model.embed_tokens", "lm_head", "model.norm")) for n in changed)


def _block_error(dense_path: Path, pruned_path: Path, ids: torch.Tensor, index: int) -> float:
    """Mean squared error of block ``index``'s output in the pruned checkpoint against the dense
    model's, both on the dense model's inputs to it (equal for block 0)."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.float32).eval()
    pruned = load_checked(pruned_path)
    with torch.no_grad():
        a = dense(input_ids=ids, output_hidden_states=True).hidden_states[index + 1]
        b = pruned(input_ids=ids, output_hidden_states=True).hidden_states[index + 1]
    return float(((a - b) ** 2).mean())


def test_the_block_refit_of_a_post_norm_encoder_with_padded_passages(tmp_path: Path) -> None:
    """A tiny random BERT with heads and MLP channels removed per layer, calibrated on padded
    passages: every block's refit lowers its error, and the written checkpoint's last hidden states
    (on the tokens, not the padding) come closer to the dense model's than without the refit."""
    from test_encoders import TEXTS, per_layer_selection, save_model, tokenizer

    from structprune import trace
    from structprune.models.loading import load_pruned
    from structprune.score.calibration import attention_mask, passage_batch

    dense = save_model("bert", tmp_path / "bert")
    selection = per_layer_selection(trace(tmp_path / "bert"))
    ids = passage_batch(TEXTS, tokenizer(), samples=8, seq_len=24, seed=1)
    mask = attention_mask(ids, 0)
    assert not bool(mask.all())  # some passages are padded
    _, plain_out = refit_reconstruction(tmp_path / "bert", ids, selection, tmp_path / "ls", 0)
    refit, refit_out = refit_reconstruction(tmp_path / "bert", ids, selection, tmp_path / "refit", REFIT_STEPS)
    assert len(refit.refits) == 3 and all(r.error_after < r.error_before for r in refit.refits)  # type: ignore[attr-defined]
    with torch.no_grad():
        states = {name: model(input_ids=ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1) for name, model in (
            ("dense", dense), ("ls", load_pruned(plain_out)), ("refit", load_pruned(refit_out)),
        )}
    assert float(((states["refit"] - states["dense"]) ** 2).mean()) < float(((states["ls"] - states["dense"]) ** 2).mean())


def test_prune_with_the_block_refit_is_byte_reproducible_and_closer_to_the_dense_model(tmp_path: Path) -> None:
    """``prune --refit-steps N`` through the CLI twice gives identical bytes; the plan records the
    refit; its logits on the calibration windows are closer to the dense model's than those of the
    same prune without the refit."""
    from click.testing import CliRunner

    from structprune.cli import main

    common = ["prune", str(DEMO), "--ratio", "0.3", "--importance", "l2", "--calib", str(CALIB), "--samples", str(SAMPLES), "--seq-len", str(SEQ_LEN)]
    for run, extra in (("a", ["--refit-steps", "12"]), ("b", ["--refit-steps", "12"]), ("ls", [])):
        outcome = CliRunner().invoke(main, [*common, *extra, "-o", str(tmp_path / run), "--plan-out", str(tmp_path / f"{run}.json")])
        assert outcome.exit_code == 0, outcome.output
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "b" / "model.safetensors")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    refit = CutPlan.load(tmp_path / "a.json").metadata["reconstruction"]["refit"]
    assert refit["steps"] == 12 and refit["lr"] == pytest.approx(1e-3) and 0 < refit["block_error_ratio"] < 1
    ids = calibration()
    with torch.no_grad():
        dense = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()(input_ids=ids).logits
        refitted = load_checked(tmp_path / "a")(input_ids=ids).logits
        fitted = load_checked(tmp_path / "ls")(input_ids=ids).logits
    assert float(((refitted - dense) ** 2).mean()) < float(((fitted - dense) ** 2).mean())


def test_the_block_refit_needs_reconstruction() -> None:
    with pytest.raises(SettingError, match="--refit-steps"):
        make_plan(DEMO, options(reconstruct=False, refit_steps=5))
    with pytest.raises(SettingError, match="--refit-steps"):
        make_plan(DEMO, options(refit_steps=-1))
