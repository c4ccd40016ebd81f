"""FLAP's bias compensation (``--bias-compensation``): the pruned checkpoint computes what the dense
model computes with the removed input channels of o_proj/down_proj (GPT-2's c_proj, OPT's fc2)
held at their calibration means, loads as a stock checkpoint, and the plan entries that carry the
biases (``add``, ``replace``) are validated before anything is written.

The references are built here, independently of structprune: the means with forward pre-hooks on
the dense transformers model over the calibration batch, the compensated model as the dense model
whose hooks overwrite the removed input channels with those means.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from arch_configs import CONFIGS, VOCAB  # noqa: E402
from ckpt import CheckpointFactory  # noqa: E402
from torch import nn  # noqa: E402

import structprune  # noqa: E402
from structprune import PlanError, SettingError, apply_plan  # noqa: E402
from structprune.score.calibration import calibration_batch, load_texts  # noqa: E402
from structprune.plan.compensation import compensate_biases  # noqa: E402
from structprune.plan.cuts import Selection, checkpoint_cut_plan  # noqa: E402
from structprune.score.importance import estimator  # noqa: E402
from structprune.models.loading import load_tokenizer  # noqa: E402
from structprune.plan.cut_plan import CutPlan  # noqa: E402
from structprune.prune import PruneOptions, PruneResult, make_plan  # noqa: E402
from structprune.score.scorer import score  # noqa: E402
from structprune.score.streaming import StreamedModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
DEMO_LAYERS = 6
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Holding channels at their means instead of removing them must move the logits by more than this,
# or the comparison proves nothing.
MIN_EFFECT = 1e-3


# ------------------------------------------------------------------------------------------------
# references


def mean_inputs(model: nn.Module, modules: List[str], ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The mean over every token of each input channel of ``modules``, in float64."""
    sums: Dict[str, Tuple[torch.Tensor, int]] = {}

    def recorder(name: str) -> Any:
        def record(module: nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            total, count = sums.get(name, (torch.zeros(x.shape[1], dtype=torch.float64), 0))
            sums[name] = (total + x.sum(0), count + x.shape[0])

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in modules]
    try:
        logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / count for name, (total, count) in sums.items()}


def hold_inputs(model: nn.Module, held: Dict[str, Tuple[np.ndarray, torch.Tensor]]) -> None:
    """Overwrites input channels of the named modules: ``{module: (channels, values)}``."""

    def overwrite(channels: np.ndarray, values: torch.Tensor) -> Any:
        index = torch.as_tensor(channels, dtype=torch.long)

        def hook(module: nn.Module, args: Tuple[torch.Tensor, ...]) -> Tuple[Any, ...]:
            x = args[0].clone()
            x[..., index] = values[index].to(x.dtype)
            return (x, *args[1:])

        return hook

    for name, (channels, values) in held.items():
        model.get_submodule(name).register_forward_pre_hook(overwrite(channels, values))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def dense(path: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_checked(path: Path) -> nn.Module:
    """A stock load that must find exactly the tensors the model has."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set(), info
    return model.eval()


def removed_inputs(plan: CutPlan, weight: str, size: int) -> np.ndarray:
    """The input columns (dim 1) of ``weight`` the plan removes."""
    kept = plan.tensors[weight].keep.get(1) if weight in plan.tensors else None
    if kept is None:
        return np.array([], dtype=np.int64)
    kept_list = plan.index_sets[kept] if isinstance(kept, str) else kept
    return np.setdiff1d(np.arange(size), kept_list)


def assert_compensated(pruned: torch.Tensor, at_means: torch.Tensor, at_zero: torch.Tensor) -> None:
    torch.testing.assert_close(pruned, at_means, **TOLERANCE)
    assert (at_means - at_zero).abs().max() > MIN_EFFECT, "the means change nothing: the test would prove nothing"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# the demo model (Llama, GQA, no biases) through make_plan


@pytest.fixture(scope="module")
def demo_pruned(tmp_path_factory: pytest.TempPathFactory) -> Tuple[PruneResult, Path]:
    """FLAP at 50% of heads + MLP with compensation: both o_proj and down_proj lose inputs."""
    options = PruneOptions(ratio=0.5, importance="flap", calib=CALIB, samples=4, seq_len=32, micro_batch=2, bias_compensation=True)
    result = make_plan(DEMO, options)
    out = tmp_path_factory.mktemp("flap-bias") / "pruned"
    apply_plan(DEMO, result.plan, out)
    return result, out


def test_compensated_demo_equals_the_dense_model_with_removed_channels_at_their_means(demo_pruned: Tuple[PruneResult, Path]) -> None:
    result, out = demo_pruned
    ids = calibration_batch(load_texts(CALIB), load_tokenizer(DEMO), samples=4, seq_len=32, seed=0)
    consumers = {
        f"model.layers.{i}.{module}": size
        for i in range(DEMO_LAYERS)
        for module, size in (("self_attn.o_proj", 6 * 32), ("mlp.down_proj", 512))
    }
    reference = dense(DEMO)
    means = mean_inputs(reference, list(consumers), ids)
    assert result.scores is not None
    for name, mean in means.items():
        np.testing.assert_allclose(result.scores.input_means[f"{name}.weight"].mean, mean.numpy(), rtol=1e-5, atol=1e-6)
    removed = {name: removed_inputs(result.plan, f"{name}.weight", size) for name, size in consumers.items()}
    assert all(len(removed[f"model.layers.0.{m}"]) for m in ("self_attn.o_proj", "mlp.down_proj")), "heads and MLP both pruned"
    probe = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    zeroed = dense(DEMO)
    hold_inputs(zeroed, {name: (channels, torch.zeros(consumers[name])) for name, channels in removed.items()})
    hold_inputs(reference, {name: (channels, means[name]) for name, channels in removed.items()})
    assert_compensated(logits(load_checked(out), probe), logits(reference, probe), logits(zeroed, probe))


def test_compensated_demo_is_a_stock_checkpoint_with_zero_biases_beside_the_compensated_ones(demo_pruned: Tuple[PruneResult, Path]) -> None:
    result, out = demo_pruned
    model = load_checked(out)
    config = model.config
    assert config.attention_bias and config.mlp_bias
    assert result.plan.metadata["bias_compensation"] == {"layers": 2 * DEMO_LAYERS, "added_tensors": 7 * DEMO_LAYERS, "config": ["attention_bias", "mlp_bias"]}
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        assert attention.q_proj.bias.shape == (config.num_attention_heads * config.head_dim,)
        for zero in (attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias, mlp.gate_proj.bias, mlp.up_proj.bias):
            assert torch.count_nonzero(zero) == 0
        assert torch.count_nonzero(attention.o_proj.bias) > 0 and torch.count_nonzero(mlp.down_proj.bias) > 0
    assert result.params_after == sum(p.numel() for p in model.parameters())


def test_cli_bias_compensation_is_byte_reproducible(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from structprune.cli import main

    common = ["prune", str(DEMO), "--ratio", "0.2", "--importance", "flap", "--calib", str(CALIB), "--samples", "4", "--seq-len", "32", "--bias-compensation"]
    for run in ("a", "b"):
        outcome = CliRunner().invoke(main, [*common, "-o", str(tmp_path / run), "--plan-out", str(tmp_path / f"{run}.json")])
        assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "b" / "model.safetensors")
    plan = CutPlan.load(tmp_path / "a.json")
    assert plan.tensors["model.layers.0.mlp.down_proj.bias"].add is not None
    load_checked(tmp_path / "a")


def test_global_plans_with_compensation_use_the_layers_format() -> None:
    options = PruneOptions(ratio=0.3, importance="flap", calib=CALIB, samples=4, seq_len=32, planning="global", bias_compensation=True)
    result = make_plan(DEMO, options)
    assert result.plan.metadata["format"] == "layers"
    assert result.plan.config["mlp_bias"] is True


def test_refusals_before_scoring(tmp_path: Path) -> None:
    base = dict(ratio=0.3, importance="flap", calib=CALIB, samples=4, seq_len=32, bias_compensation=True)
    with pytest.raises(SettingError, match="hidden channels"):
        make_plan(DEMO, PruneOptions(structures=("heads", "hidden"), **base))  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="DeciLM"):
        make_plan(DEMO, PruneOptions(layout="decilm", planning="global", **base))  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="with bias compensation needs calibration text"):
        make_plan(DEMO, PruneOptions(ratio=0.3, importance="l1", bias_compensation=True))


# ------------------------------------------------------------------------------------------------
# tiny random models of other architectures, cut by a direct selection


def randomise(model: nn.Module) -> None:
    """Unit-scale weights, and biases and norm weights away from their zeros/ones init (so that
    compensation has a stored bias to add to)."""
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.dim() == 1:
            p.data = (1.0 if "norm" in name or "ln" in name else 0.0) + 0.2 * noise
        else:
            p.data = noise / math.sqrt(min(p.shape))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    transformers.logging.set_verbosity_error()
    built: Dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            config = CONFIGS[arch]()
            model = getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.float32)
            randomise(model)
            built[arch] = tmp_path_factory.mktemp(arch) / "model"
            model.save_pretrained(built[arch])
        return built[arch]

    yield get


def compensated_plan(path: Path, selection_of: Any, ids: torch.Tensor) -> Tuple[CutPlan, Any, Selection]:
    graph = structprune.trace(path)
    assert graph.blocks is not None
    scores = score(StreamedModel(path, blocks_prefix=graph.blocks.prefix), graph, estimator("flap"), ids, record_means=True)
    selection = selection_of(graph)
    plan = checkpoint_cut_plan(path, graph, selection)
    compensate_biases(path, graph, selection, plan, scores.input_means)
    return plan, graph, selection


def channel_selection(graph: Any) -> Selection:
    """Eight MLP channels of every layer, different ones per layer."""
    return Selection(units={s.id: sorted((7 * s.layer + 5 * k) % s.units for k in range(8)) for s in graph.by_kind("channels")})


@pytest.mark.parametrize(("arch", "consumer", "width"), [("gpt2", "transformer.h.{}.mlp.c_proj", 256), ("opt", "model.decoder.layers.{}.fc2", 96)])
def test_biased_architectures_fold_compensation_into_their_own_bias(tiny: Any, tmp_path: Path, arch: str, consumer: str, width: int) -> None:
    path = tiny(arch)
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    plan, graph, selection = compensated_plan(path, channel_selection, ids)
    assert not any(cut.add for cut in plan.tensors.values()) and "mlp_bias" not in plan.config
    assert sum(cut.replace is not None for cut in plan.tensors.values()) == 3
    apply_plan(path, plan, tmp_path / "out")
    reference, zeroed = dense(path), dense(path)
    layers = [consumer.format(i) for i in range(3)]
    means = mean_inputs(reference, layers, ids)
    removed = {layers[s.layer]: np.asarray(selection.units[s.id]) for s in graph.by_kind("channels")}
    hold_inputs(reference, {name: (channels, means[name]) for name, channels in removed.items()})
    hold_inputs(zeroed, {name: (channels, torch.zeros(width)) for name, channels in removed.items()})
    assert_compensated(logits(load_checked(tmp_path / "out"), ids), logits(reference, ids), logits(zeroed, ids))


def test_llama_with_blocks_removed_names_the_added_biases_after_renumbering(tiny: Any, tmp_path: Path) -> None:
    """KV groups, MLP channels and the middle block: the biases of the last block are added as
    block 1's, and the result equals the dense model without block 1, inputs held at their means."""
    path = tiny("llama")
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(3))

    def selection_of(graph: Any) -> Selection:
        selection = channel_selection(graph)
        selection.units.update({s.id: [s.layer % 2] for s in graph.by_kind("kv_groups")})
        selection.blocks = [1]
        return selection

    plan, graph, selection = compensated_plan(path, selection_of, ids)
    assert plan.tensors["model.layers.1.self_attn.o_proj.bias"].add is not None
    assert "model.layers.2.self_attn.o_proj.bias" not in plan.tensors
    apply_plan(path, plan, tmp_path / "out")
    reference, zeroed = dense(path), dense(path)
    removed = {f"model.layers.{s.layer}.mlp.down_proj": np.asarray(selection.units[s.id]) for s in graph.by_kind("channels")}
    # A KV group's query heads are 2 × head_dim 24 = 48 consecutive o_proj inputs.
    removed.update({f"model.layers.{s.layer}.self_attn.o_proj": 48 * (s.layer % 2) + np.arange(48) for s in graph.by_kind("kv_groups")})
    means = mean_inputs(reference, list(removed), ids)
    hold_inputs(reference, {name: (channels, means[name]) for name, channels in removed.items()})
    hold_inputs(zeroed, {name: (channels, torch.zeros(len(means[name]))) for name, channels in removed.items()})
    for model in (reference, zeroed):
        del model.model.layers[1]
        model.config.num_hidden_layers = 2
        model.model.layers[1].self_attn.layer_idx = 1
    assert_compensated(logits(load_checked(tmp_path / "out"), ids), logits(reference, ids), logits(zeroed, ids))


@pytest.mark.parametrize(("arch", "kind", "model_type"), [("mistral", "channels", "mistral"), ("qwen2", "kv_groups", "qwen2")])
def test_architectures_whose_stock_config_has_no_bias_switch_are_refused(tiny: Any, arch: str, kind: str, model_type: str) -> None:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))

    def selection_of(graph: Any) -> Selection:
        return Selection(units={s.id: [0] for s in graph.by_kind(kind)})

    with pytest.raises(PlanError, match=f"stock {model_type} config cannot give"):
        compensated_plan(tiny(arch), selection_of, ids)


def test_hidden_selections_are_refused(tiny: Any) -> None:
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    with pytest.raises(PlanError, match="hidden channels"):
        compensated_plan(tiny("llama"), lambda graph: Selection(units={s.id: [0, 1, 2, 3] for s in graph.by_kind("hidden")}), ids)


# ------------------------------------------------------------------------------------------------
# the plan entries themselves


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ({"add": {"dtype": "F32", "shape": [2], "values": [1.0, float("nan")]}}, None, "numbers must be finite"),
        ({"add": {"dtype": "F32", "shape": [2], "values": [1, 2], "fill": 0}}, ".add", "exactly one of"),
        ({"add": {"dtype": "F32", "values": [1, 2]}}, ".add.shape", "missing"),
        ({"replace": {"values": [1], "colour": 2}}, ".replace.colour", "unknown field"),
        ({"replace": {"fill": "0"}}, ".replace.fill", "expected a number, got the string \"0\""),
    ],
)
def test_python_plan_model_rejects_malformed_entries(entry: Dict[str, Any], field: Optional[str], message: str) -> None:
    with pytest.raises(PlanError, match=re.escape(message)) as raised:
        CutPlan.from_dict({"format": "structprune.cut-plan", "version": 1, "tensors": {"x.bias": entry}})
    assert raised.value.field == (None if field is None else f'tensors["x.bias"]{field}')


@pytest.mark.parametrize(
    ("tensors", "tensor", "message"),
    [
        ({"layers.0.up.weight": {"add": {"dtype": "F32", "shape": [6], "fill": 0}}}, "layers.0.up.weight", "already has"),
        ({"layers.0.up.bias": {"add": {"dtype": "F32", "shape": [6], "values": [0.5] * 5}}}, "layers.0.up.bias", "5 values given for shape [6]"),
        ({"layers.0.up.bias": {"add": {"dtype": "F31", "shape": [6], "fill": 0}}}, "layers.0.up.bias", "unknown safetensors dtype"),
        ({"layers.0.up.bias": {"add": {"dtype": "I32", "shape": [6], "fill": 0}}}, "layers.0.up.bias", "not I32"),
        ({"layers.0.down.weight": {"replace": {"values": [70000.0] * 48}}}, "layers.0.down.weight", "out of range for F16"),
    ],
)
def test_engine_refuses_bad_added_and_replaced_tensors_naming_them(
    make_checkpoint: CheckpointFactory, small_tensors: Dict[str, np.ndarray], tmp_path: Path, tensors: Dict[str, Any], tensor: str, message: str
) -> None:
    plan = {"format": "structprune.cut-plan", "version": 1, "tensors": tensors}
    with pytest.raises(PlanError, match=re.escape(message)) as raised:
        apply_plan(make_checkpoint(small_tensors), plan, tmp_path / "out")
    assert raised.value.tensor == tensor
    assert not (tmp_path / "out").exists()


def test_replaced_values_take_the_cut_shape(make_checkpoint: CheckpointFactory, small_tensors: Dict[str, np.ndarray], tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    plan = {"format": "structprune.cut-plan", "version": 1, "tensors": {"layers.0.up.weight": {"keep": {"0": [0, 1]}, "replace": {"fill": 1}}}}
    apply_plan(make_checkpoint(small_tensors), plan, tmp_path / "out")
    assert np.array_equal(load_file(tmp_path / "out" / "model.safetensors")["layers.0.up.weight"], np.ones((2, 8), dtype=np.float32))


def test_added_values_are_written_exactly_in_their_dtype(make_checkpoint: CheckpointFactory, small_tensors: Dict[str, np.ndarray], tmp_path: Path) -> None:
    values = torch.randn(6, generator=torch.Generator().manual_seed(6))
    plan = CutPlan.from_dict({"format": "structprune.cut-plan", "version": 1, "tensors": {
        "layers.0.up.bias": {"add": {"dtype": "BF16", "shape": [6], "values": values.to(torch.bfloat16).double().tolist()}},
        "layers.0.down.bias": {"add": {"dtype": "F32", "shape": [6], "values": values.double().tolist()}},
    }})
    apply_plan(make_checkpoint(small_tensors), CutPlan.from_json(plan.to_json()), tmp_path / "out")
    from safetensors.torch import load_file

    written = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(written["layers.0.up.bias"], values.to(torch.bfloat16))
    assert torch.equal(written["layers.0.down.bias"], values)


def test_resumed_scoring_keeps_the_means_and_gradient_estimators_record_them_too(tmp_path: Path) -> None:
    """Taylor scores with gradients; the means come from the forward pass all the same, and a rerun
    on the finished resume directory plans the same compensation without scoring."""
    options = PruneOptions(ratio=0.2, importance="taylor", structures=("mlp",), calib=CALIB, samples=4, seq_len=32, bias_compensation=True)
    first = make_plan(DEMO, options, resume=tmp_path / "resume")
    assert first.plan.tensors["model.layers.0.mlp.down_proj.bias"].add is not None
    again = make_plan(DEMO, options, resume=tmp_path / "resume")
    assert again.plan.to_json() == first.plan.to_json()
