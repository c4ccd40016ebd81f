"""Mixture-of-experts models: the routed-expert pattern found in the traced graph, whole experts and
expert channels cut from per-expert checkpoint tensors, and the pruned model checked against the
original with those experts masked out of the router (or those channels zeroed); the estimators that
read layer inputs (wanda-sp, flap, entropy, head-gate, bonsai) checked on expert channels against
hand computations from each expert's routed tokens."""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner, Result
from torch.nn.utils import parametrize

from structprune import apply_plan, trace
from structprune.cli import main
from structprune.errors import PlanError
from structprune.models.loading import load_tokenizer
from structprune.plan.cut_plan import CutPlan, TensorCut
from structprune.plan.cuts import Selection, checkpoint_cut_plan
from structprune.plan.selection import Target, plan_global
from structprune.score.calibration import calibration_batch, load_texts
from structprune.score.distributed import SINGLE
from structprune.score.importance import Bonsai, estimator
from structprune.score.routing import calibration_routing
from structprune.score.scorer import Scores, _Folder, _MaskedScoring, score
from structprune.score.streaming import ActivationStore, StreamedModel
from structprune.tracing.graph import StructureGraph

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

# Tiny random configs, fp32: Mixtral (experts only), Qwen2-MoE (a shared expert beside the routed
# ones, its own sigmoid gate), OLMoE (q/k norms over the whole projection), Qwen3-MoE (per-head q/k
# norms, top-k weights renormalised).
CONFIGS: Dict[str, Callable[[], Any]] = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], **COMMON,
    ),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=24, num_experts=6, num_experts_per_tok=2, **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=64, moe_intermediate_size=16, num_experts=5, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], head_dim=8, **COMMON,
    ),
}
EXPERTS = {"mixtral": 4, "qwen2_moe": 6, "olmoe": 6, "qwen3_moe": 5}
WIDTH = {"mixtral": 48, "qwen2_moe": 24, "olmoe": 24, "qwen3_moe": 16}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def moe_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    config.pad_token_id = config.eos_token_id = config.bos_token_id = 0
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(path)
    return path


def _model_type(path: Path) -> str:
    return str(transformers.AutoConfig.from_pretrained(path).model_type)


def _ids() -> torch.Tensor:
    return torch.randint(1, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _load(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _routers(model: Any) -> List[torch.Tensor]:
    """Each MoE layer's router weight, in layer order."""
    return [layer.mlp.gate.weight for layer in model.model.layers]


@contextlib.contextmanager
def _experts_masked(model: Any, removed: Mapping[int, List[int]]) -> Iterator[None]:
    """Router logits of the ``removed`` experts (per layer) set to -inf before the softmax: the
    original model choosing among the other experts only."""
    routers = {id(weight): layer for layer, weight in enumerate(_routers(model))}
    linear = torch.nn.functional.linear

    def masked(x: torch.Tensor, weight: torch.Tensor, bias: Any = None) -> torch.Tensor:
        out = linear(x, weight, bias)
        layer = routers.get(id(weight))
        if layer is not None and removed.get(layer):
            out = out.clone()
            out[..., removed[layer]] = float("-inf")
        return out

    torch.nn.functional.linear = masked
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def _prune(path: Path, graph: StructureGraph, selection: Selection, out: Path) -> Any:
    plan = checkpoint_cut_plan(path, graph, selection)
    report = apply_plan(path, plan, out)
    assert report.shape_check.checked, report.shape_check.note
    return plan


def test_traced_structures_hold_experts_and_expert_channels_and_keep_heads_and_hidden(moe_model: Path) -> None:
    model_type = _model_type(moe_model)
    graph = trace(moe_model)
    experts, channels = graph.by_kind("experts"), graph.by_kind("expert_channels")
    assert [s.layer for s in experts] == [0, 1, 2] and [s.layer for s in channels] == [0, 1, 2]
    assert {s.units for s in experts} == {EXPERTS[model_type]}
    assert {s.units for s in channels} == {WIDTH[model_type]}
    members = {(m.param.split(".", 3)[-1], m.dim) for m in experts[0].members}
    assert members == {("mlp.experts.gate_up_proj", 0), ("mlp.experts.down_proj", 0), ("mlp.gate.weight", 0)}
    assert any("renormalises over the experts that stay" in note for note in experts[0].notes)
    # The routing gathers no longer pin the hidden stream or the attention heads.
    assert graph.by_kind("hidden") and (graph.by_kind("kv_groups") or graph.by_kind("heads"))
    shared = [s for s in graph.by_kind("channels") if s.layer == 0]
    assert [s.units for s in shared] == ([40] if model_type == "qwen2_moe" else [])


def test_pruning_experts_equals_masking_them_out_of_the_router(moe_model: Path, tmp_path: Path) -> None:
    graph = trace(moe_model)
    removed = {0: [1], 1: [0], 2: [EXPERTS[_model_type(moe_model)] - 1]}
    selection = Selection(units={s.id: removed[s.layer] for s in graph.by_kind("experts")})
    plan = _prune(moe_model, graph, selection, tmp_path / "out")
    original = _load(moe_model)
    with _experts_masked(original, removed):
        expected = _logits(original)
    pruned = _load(tmp_path / "out")
    assert pruned.config.num_experts_per_tok == 2
    assert all(weight.shape[0] == EXPERTS[_model_type(moe_model)] - 1 for weight in _routers(pruned))
    torch.testing.assert_close(_logits(pruned), expected, rtol=1e-5, atol=1e-5)
    # The experts above a removed one moved down a place, on disk.
    renamed = [cut.rename for cut in plan.tensors.values() if cut.rename]
    assert renamed and all(".experts." in name for name in renamed)


def test_pruning_expert_channels_equals_zeroing_them(moe_model: Path, tmp_path: Path) -> None:
    graph = trace(moe_model)
    # Four channels: transformers' grouped GEMM wants expert rows of a multiple of 16 bytes on CPU.
    channels = [0, 3, 7, 9]
    selection = Selection(units={s.id: channels for s in graph.by_kind("expert_channels")})
    _prune(moe_model, graph, selection, tmp_path / "out")
    original = _load(moe_model)
    with torch.no_grad():
        for layer in original.model.layers:
            layer.mlp.experts.down_proj[:, :, channels] = 0
    pruned = _load(tmp_path / "out")
    width = WIDTH[_model_type(moe_model)]
    assert pruned.model.layers[0].mlp.experts.down_proj.shape[-1] == width - len(channels)
    torch.testing.assert_close(_logits(pruned), _logits(original), rtol=1e-5, atol=1e-5)


def test_experts_and_expert_channels_cut_together_equal_masking_and_zeroing(moe_model: Path, tmp_path: Path) -> None:
    graph = trace(moe_model)
    units = {s.id: [0] for s in graph.by_kind("experts")}
    units.update({s.id: [1, 2, 5, 8] for s in graph.by_kind("expert_channels")})
    _prune(moe_model, graph, Selection(units=units), tmp_path / "out")
    original = _load(moe_model)
    with torch.no_grad():
        for layer in original.model.layers:
            layer.mlp.experts.down_proj[:, :, [1, 2, 5, 8]] = 0
    with _experts_masked(original, {layer: [0] for layer in range(3)}):
        expected = _logits(original)
    torch.testing.assert_close(_logits(_load(tmp_path / "out")), expected, rtol=1e-5, atol=1e-5)


def test_hidden_channels_of_an_moe_model_are_cut_through_the_experts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "mixtral"
    transformers.AutoModelForCausalLM.from_config(CONFIGS["mixtral"](), dtype=torch.float32).save_pretrained(path)
    graph = trace(path)
    selection = Selection(units={s.id: [5, 6, 9, 20] for s in graph.by_kind("hidden")})
    _prune(path, graph, selection, tmp_path / "out")
    pruned = _load(tmp_path / "out")
    assert pruned.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 96, 28)
    assert torch.isfinite(_logits(pruned)).all()


def test_non_uniform_expert_counts_are_refused_naming_the_options(moe_model: Path) -> None:
    graph = trace(moe_model)
    experts = graph.by_kind("experts")
    selection = Selection(units={experts[0].id: [0], experts[1].id: [0, 1]})
    with pytest.raises(PlanError, match=r"one (num_local_experts|num_experts) for every layer.*layer 0: \d+, layer 1: \d+.*--global.*--experts N"):
        checkpoint_cut_plan(moe_model, graph, selection)


def test_fewer_experts_than_the_router_picks_are_refused(moe_model: Path) -> None:
    graph = trace(moe_model)
    keep_one = list(range(EXPERTS[_model_type(moe_model)] - 1))
    selection = Selection(units={s.id: keep_one for s in graph.by_kind("experts")})
    with pytest.raises(PlanError, match="fewer than the 2 the router picks per token"):
        checkpoint_cut_plan(moe_model, graph, selection)


DEMO = Path(__file__).resolve().parent.parent / "demo"


@pytest.fixture(scope="module")
def mixtral_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mixtral over the demo model's 4096-token vocabulary, with its tokenizer."""
    torch.manual_seed(0)
    config = CONFIGS["mixtral"]()
    config.vocab_size = 4096
    config.pad_token_id = config.eos_token_id = config.bos_token_id = 0
    path = tmp_path_factory.mktemp("mixtral-tok") / "model"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "model" / name, path / name)
    return path


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


CALIB = ("--calib", str(DEMO / "text" / "calib.txt"), "--samples", "4", "--seq-len", "32")


@pytest.mark.parametrize("saliency", ["reap", "frequency", "importance"])
def test_experts_option_removes_exactly_that_many_per_layer(mixtral_with_tokenizer: Path, tmp_path: Path, saliency: str) -> None:
    out = tmp_path / "out"
    result = _cli(
        "prune", str(mixtral_with_tokenizer), "-o", str(out), "--ratio", "0.3", "--structures", "experts,expert-channels",
        "--experts", "1", "--expert-saliency", saliency, "--importance", "taylor", *CALIB,
    )
    assert result.exit_code == 0, result.output
    pruned = _load(out)
    assert pruned.config.num_local_experts == 3
    assert all(weight.shape[0] == 3 for weight in _routers(pruned))
    assert pruned.config.intermediate_size < 48 and pruned.config.intermediate_size % 8 == 0
    assert torch.isfinite(_logits(pruned)).all()


def test_reap_ranks_experts_by_gate_weight_times_output_norm(mixtral_with_tokenizer: Path) -> None:
    graph = trace(mixtral_with_tokenizer)
    stats = calibration_routing(mixtral_with_tokenizer, graph, DEMO / "text" / "calib.txt", samples=2, seq_len=16)
    model = _load(mixtral_with_tokenizer)
    ids = calibration_batch(load_texts(DEMO / "text" / "calib.txt"), load_tokenizer(mixtral_with_tokenizer), samples=2, seq_len=16, seed=0)
    hidden: Dict[str, torch.Tensor] = {}

    def keep_input(_module: Any, args: Any) -> None:
        hidden["x"] = args[0].reshape(-1, args[0].shape[-1])

    model.model.layers[0].mlp.register_forward_pre_hook(keep_input)
    with torch.no_grad():
        model(ids)
        moe = model.model.layers[0].mlp
        _, weights, index = moe.gate(hidden["x"])
        expected_chosen = torch.bincount(index.reshape(-1), minlength=4).double()
        expected = torch.zeros(4, dtype=torch.float64)
        for e in range(4):
            # The expert's own output, computed from its slices of the stacked weights.
            gate, up = torch.nn.functional.linear(hidden["x"], moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
            out = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, moe.experts.down_proj[e])
            tokens, slots = torch.nonzero(index == e, as_tuple=True)
            expected[e] = (weights[tokens, slots].double() * out[tokens].double().norm(dim=-1)).sum() / max(len(tokens), 1)
    torch.testing.assert_close(torch.from_numpy(stats[0].chosen), expected_chosen)
    torch.testing.assert_close(torch.from_numpy(stats[0].saliency("reap")), expected, rtol=1e-4, atol=1e-7)


def test_routing_runs_each_expert_once_on_its_tokens_not_a_weight_copy_per_token(mixtral_with_tokenizer: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``batched_mm`` gathers an expert's weights for every (token, slot): hundreds of GB per
    micro-batch on a real model, so the routing pass must not run through it."""
    from transformers.integrations import moe

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the routing pass ran the experts through batched_mm")

    graph = trace(mixtral_with_tokenizer)  # tracing does use it, on the meta device (plain ATen ops to follow)
    monkeypatch.setitem(moe.ALL_EXPERTS_FUNCTIONS._global_mapping, "batched_mm", refuse)
    stats = calibration_routing(mixtral_with_tokenizer, graph, DEMO / "text" / "calib.txt", samples=2, seq_len=16)
    assert stats[0].chosen.sum() == 2 * 16 * 2  # every token chose its top 2


def test_global_planning_of_experts_is_refused_when_counts_differ_per_layer(mixtral_with_tokenizer: Path) -> None:
    graph = trace(mixtral_with_tokenizer)
    experts = graph.by_kind("experts")
    scores = Scores(estimator="test", reduction="sum", units={s.id: np.arange(float(s.units)) * (1 + 100 * (s.layer or 0)) for s in graph.structures})
    target = Target(ratio=0.05, structures=("experts",), min_experts=2)
    selection = plan_global(graph, scores, target)
    assert len({len(selection.units.get(s.id, [])) for s in experts}) > 1, "the scores favour layer 0's experts"
    with pytest.raises(PlanError, match="--global.*--experts N"):
        checkpoint_cut_plan(mixtral_with_tokenizer, graph, selection)


def test_inspect_shows_experts_and_their_routing_share(mixtral_with_tokenizer: Path) -> None:
    result = _cli("inspect", str(mixtral_with_tokenizer), "--no-cache", *CALIB)
    assert result.exit_code == 0, result.output
    assert re.search(r"^experts\s+0-2\s+4\s", result.output, re.MULTILINE)
    assert re.search(r"^expert_channels\s+0-2\s+48\s", result.output, re.MULTILINE)
    shares = re.findall(r"layer\s+(\d)\s+((?:[\d.]+%\s*){4})", result.output)
    assert [layer for layer, _ in shares] == ["0", "1", "2"]
    for _, cells in shares:
        assert sum(float(c) for c in re.findall(r"([\d.]+)%", cells)) == pytest.approx(100, abs=0.3)


@pytest.mark.parametrize(
    ("importance", "saliency"), [("wanda-sp", "importance"), ("flap", "reap"), ("entropy", "frequency"), ("head-gate", "reap"), ("bonsai", "reap")],
)
def test_estimators_reading_layer_inputs_prune_expert_channels_end_to_end(mixtral_with_tokenizer: Path, tmp_path: Path, importance: str, saliency: str) -> None:
    out = tmp_path / "out"
    result = _cli(
        "prune", str(mixtral_with_tokenizer), "-o", str(out), "--ratio", "0.2", "--structures", "experts,expert-channels",
        "--experts", "1", "--expert-saliency", saliency, "--importance", importance, *CALIB,
    )
    assert result.exit_code == 0, result.output
    pruned = _load(out)
    assert pruned.config.num_local_experts == 3
    assert pruned.config.intermediate_size < 48
    assert torch.isfinite(_logits(pruned)).all()


@pytest.mark.parametrize("importance", ["head-gate", "bonsai"])
def test_gate_and_mask_estimators_prune_the_heads_of_an_moe_model(mixtral_with_tokenizer: Path, tmp_path: Path, importance: str) -> None:
    """Whole experts, which no layer consumes, are left out of what they score (the routing scores them)."""
    out = tmp_path / "out"
    result = _cli("prune", str(mixtral_with_tokenizer), "-o", str(out), "--ratio", "0.1", "--structures", "heads", "--importance", importance, "--no-reconstruct", *CALIB)
    assert result.exit_code == 0, result.output
    config = _load(out).config
    assert (config.num_attention_heads, config.num_key_value_heads) != (4, 2) and config.num_local_experts == 4


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (("--structures", "experts", "--expert-saliency", "importance", "--importance", "flap"), "'flap' cannot score whole experts"),
        (("--structures", "experts", "--expert-saliency", "importance", "--importance", "entropy"), "consumed by the router's weighted sum"),
        (("--structures", "experts", "--expert-saliency", "importance", "--importance", "bonsai"), "'bonsai' cannot score whole experts: it masks"),
        (("--structures", "experts", "--expert-saliency", "importance", "--importance", "head-gate"), "'head-gate' cannot score whole experts: it gates"),
        (("--structures", "experts,expert-channels", "--expert-saliency", "importance", "--importance", "obs"), "'obs' cannot score whole experts: it scores"),
    ],
)
def test_estimators_that_cannot_read_stacked_experts_are_refused_naming_why(mixtral_with_tokenizer: Path, options: Sequence[str], refusal: str) -> None:
    result = CliRunner().invoke(main, ["prune", str(mixtral_with_tokenizer), "--dry-run", "--ratio", "0.2", *options, *CALIB])
    assert result.exit_code == 2
    assert "--importance" in result.output and refusal in result.output, result.output


def test_apply_refuses_a_plan_that_drops_an_expert_but_leaves_the_config_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "mixtral"
    transformers.AutoModelForCausalLM.from_config(CONFIGS["mixtral"](), dtype=torch.float32).save_pretrained(path)
    # Expert 3's tensors dropped, its router row and the config left as they are.
    dropped = [f"model.layers.{layer}.block_sparse_moe.experts.3.{w}.weight" for layer in range(3) for w in ("w1", "w2", "w3")]
    plan = CutPlan(tensors={name: TensorCut(drop=True) for name in dropped})
    with pytest.raises(PlanError, match=r"lacks expert 3 of 'model\.layers\.0\.mlp\.experts\.down_proj'.*4 experts"):
        apply_plan(path, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (("--structures", "heads", "--experts", "1", "--importance", "taylor"), "--experts: removes routed experts: it needs experts among --structures"),
        (("--structures", "experts", "--importance", "obs"), "--importance: 'obs' (the default) chooses units while reconstructing, and whole experts go by the routing"),
        (("--structures", "expert-channels", "--importance", "flap", "--bias-compensation"), "--bias-compensation: routed experts' stacked down projections have no bias"),
    ],
)
def test_moe_options_are_refused_before_any_work(mixtral_with_tokenizer: Path, tmp_path: Path, options: Sequence[str], refusal: str) -> None:
    result = CliRunner().invoke(main, ["prune", str(mixtral_with_tokenizer), "-o", str(tmp_path / "out"), "--ratio", "0.2", *options, *CALIB])
    assert result.exit_code == 2 and refusal in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_more_experts_than_the_router_can_spare_are_refused(mixtral_with_tokenizer: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "prune", str(mixtral_with_tokenizer), "-o", str(tmp_path / "out"), "--ratio", "0.5", "--structures", "experts",
        "--experts", "3", "--importance", "taylor", *CALIB,
    ])
    assert result.exit_code != 0
    assert "--experts 3: layers have 4 experts and the router picks 2 per token, so at most 2 can go" in result.output


def _routed_inputs(path: Path, ids: torch.Tensor) -> List[Dict[str, Any]]:
    """Per MoE layer of the model on ``ids``: the stacked weights and, per expert, the hidden states
    routed to it and its down_proj input computed by hand (silu(gate)·up from its slices), in float64."""
    model = _load(path)
    layers: List[Dict[str, Any]] = []

    def keep(_module: Any, args: Any, kwargs: Any) -> None:
        layers.append({"hidden": args[0].reshape(-1, args[0].shape[-1]).double(), "index": args[1]})

    for layer in model.model.layers:
        layer.mlp.experts.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    for layer, record in zip(model.model.layers, layers):
        experts = layer.mlp.experts
        record["gate_up"], record["down"] = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
        record["routed"], record["inner"] = [], []
        for e in range(experts.down_proj.shape[0]):
            x = record["hidden"][(record["index"] == e).any(dim=-1)]
            gate, up = torch.nn.functional.linear(x, record["gate_up"][e]).chunk(2, dim=-1)
            record["routed"].append(x)
            record["inner"].append(torch.nn.functional.silu(gate) * up)
    return layers


def _variance(x: torch.Tensor) -> torch.Tensor:
    """Per column, over the rows; 0 without rows (an expert no token chose)."""
    return x.var(dim=0, unbiased=False) if len(x) else torch.zeros(x.shape[1], dtype=x.dtype)


@pytest.mark.parametrize("importance", ["wanda-sp", "flap", "entropy"])
def test_activation_estimators_score_expert_channels_from_each_experts_routed_inputs(moe_model: Path, importance: str) -> None:
    graph = trace(moe_model)
    # float32: transformers' grouped GEMM, the experts' default kernel, has no float64.
    streamed = StreamedModel(moe_model, blocks_prefix="model.layers")
    scores = score(streamed, graph, estimator(importance), _ids(), micro_batch=1, kinds=["expert_channels"])
    for structure, layer in zip(graph.by_kind("expert_channels"), _routed_inputs(moe_model, _ids())):
        width = structure.units
        expected = torch.zeros(width, dtype=torch.float64)
        for e, (x, z) in enumerate(zip(layer["routed"], layer["inner"])):
            down, gate_up = layer["down"][e], layer["gate_up"][e]
            if importance == "wanda-sp":  # |W|·‖X‖ on the consuming columns of down_proj and the gate and up rows
                expected += (down.abs() * z.norm(dim=0)).sum(0)
                rows = (gate_up.abs() * x.norm(dim=0)).sum(1)
                expected += rows[:width] + rows[width:]
            elif importance == "flap":  # Var(X_j)·‖W[:, j]‖², consuming side only
                expected += _variance(z) * down.square().sum(0)
            else:  # ½·log(2πe·Var(X_j)), summed over the experts; a variance of 0 at the smallest float
                expected += 0.5 * torch.log(2 * torch.pi * torch.e * _variance(z).clamp_min(torch.finfo(torch.float64).tiny))
        torch.testing.assert_close(torch.from_numpy(scores.units[structure.id]), expected, rtol=1e-5, atol=1e-6)


class _ChannelGates(torch.nn.Module):
    """A parametrization of ``down_proj`` (``[E, H, I]``) scaling input channel c of every expert by ξ_c."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gates = torch.nn.Parameter(torch.ones(width, dtype=torch.float32))

    def forward(self, down: torch.Tensor) -> torch.Tensor:
        return down * self.gates


def test_head_gate_scores_an_expert_channel_by_its_gates_mean_absolute_derivative(moe_model: Path) -> None:
    graph = trace(moe_model)
    ids = _ids()
    scores = score(StreamedModel(moe_model, blocks_prefix="model.layers"), graph, estimator("head-gate"), ids, micro_batch=2, kinds=["expert_channels"])
    reference = _load(moe_model)
    gates = []
    for layer in reference.model.layers:
        gates.append(_ChannelGates(layer.mlp.experts.down_proj.shape[-1]))
        parametrize.register_parametrization(layer.mlp.experts, "down_proj", gates[-1])
    derivatives = []
    for sample in ids:
        loss = reference(input_ids=sample[None], labels=sample[None]).loss
        derivatives.append(torch.autograd.grad(loss, [g.gates for g in gates]))
    for structure in graph.by_kind("expert_channels"):
        expected = torch.stack([d[structure.layer] for d in derivatives]).double().abs().mean(0)
        torch.testing.assert_close(torch.from_numpy(scores.units[structure.id]), expected, rtol=1e-4, atol=1e-9)


class _FewMasks(Bonsai):
    masks = 6


def test_bonsai_drops_expert_channels_by_zeroing_them_in_every_expert(mixtral_with_tokenizer: Path) -> None:
    """The sub-models' losses measured again on a transformers model with the same channels of
    every expert's down_proj zeroed, regressed in the primal form: the scorer's dual form must
    agree (to the float32 rounding of the losses: grouped GEMM, the experts' kernel, has no float64)."""
    graph = trace(mixtral_with_tokenizer)
    ids = torch.randint(1, 4096, (3, 12), generator=torch.Generator().manual_seed(3))
    importance = _FewMasks(seed=5)
    folder = _Folder(graph, importance, ["expert_channels"])
    streamed = StreamedModel(mixtral_with_tokenizer, blocks_prefix="model.layers")
    run = _MaskedScoring(streamed, folder, importance, micro_batch=2, store=ActivationStore(), workers=SINGLE, progress=None)
    run.run(ids)
    units, _, _ = folder.result("sum")
    reference = _load(mixtral_with_tokenizer)
    dense = {name: reference.get_parameter(name).detach().clone() for name, _, _ in run.atoms}
    losses = []
    for mask in range(importance.masks):
        with torch.no_grad():
            for (name, dim, labels), drops in zip(run.atoms, run.drops):
                assert name.endswith(".mlp.experts.down_proj") and dim == 2 and (labels >= 0).all()  # a channel is an atom
                weight = reference.get_parameter(name)
                weight.copy_(dense[name])
                weight[:, :, drops[mask, torch.from_numpy(labels)]] = 0
            losses.append(float(reference(input_ids=ids, labels=ids).loss))
    drops = torch.cat(run.drops, dim=1).double()
    centred = drops - drops.mean(0)
    target = torch.tensor(losses, dtype=torch.float64)
    damping = importance.ridge * float(centred.square().sum(1).mean())
    coefficients = torch.linalg.solve(centred.T @ centred + damping * torch.eye(drops.shape[1], dtype=torch.float64), centred.T @ (target - target.mean()))
    # The losses of a tiny random model move by ~1e-5 per channel; float32 rounds them to ~5e-7.
    assert float(coefficients.abs().max()) > 1e-5
    start = 0
    for structure, (_, _, labels), layer_drops in zip(graph.by_kind("expert_channels"), run.atoms, run.drops):
        mine = coefficients[start : start + layer_drops.shape[1]]
        start += layer_drops.shape[1]
        assert units[structure.id] == pytest.approx(mine[torch.from_numpy(labels)].tolist(), rel=1e-3, abs=1e-7)


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepSeek-V3: grouped routing (8 experts in 4 groups, the top 2 groups' experts
    eligible), a shared expert, a dense first layer; with the demo tokenizer."""
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=4096, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        norm_topk_prob=True, routed_scaling_factor=2.5, pad_token_id=0, eos_token_id=0, bos_token_id=0,
    )
    path = tmp_path_factory.mktemp("deepseek-v3") / "model"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "model" / name, path / name)
    return path


def test_deepseek_v3_grouped_router_offers_no_whole_experts_and_says_why(deepseek_v3: Path, tmp_path: Path) -> None:
    """DeepSeek-V3's router is no softmax over experts: sigmoid scores plus a per-expert correction
    bias (a buffer) choose the top groups of contiguous experts, then the top-k experts in them.
    Removing experts would regroup them (and a logit at −inf still leaves its bias in the contest),
    so pruning is not masking: the tracer pins the experts dimension, naming the buffer, and
    ``--structures experts`` is refused before any scoring. Expert channels stay offered."""
    graph = trace(deepseek_v3)
    assert not graph.by_kind("experts")
    assert [s.layer for s in graph.by_kind("expert_channels")] == [1, 2]
    pins = [p for p in graph.pinned if p.param == "model.layers.1.mlp.gate.weight" and p.dim == 0]
    assert pins and "e_score_correction_bias" in pins[0].reason
    result = CliRunner().invoke(main, [
        "prune", str(deepseek_v3), "-o", str(tmp_path / "out"), "--ratio", "0.2", "--structures", "experts", "--importance", "taylor", *CALIB,
    ])
    assert result.exit_code == 2, result.output
    assert "--structures: experts: the model's experts cannot be removed, their dimension is pinned" in result.output
    assert "e_score_correction_bias" in result.output and "scoring" not in result.output
    assert not (tmp_path / "out").exists()


def test_deepseek_v3_dense_and_moe_blocks_are_scored_and_pruned_end_to_end(deepseek_v3: Path, tmp_path: Path) -> None:
    """DeepSeek-V3's first block is dense and the others are MoE: streaming runs each block in a
    module built as the model builds that block, so Taylor's streamed backward goes through both.
    Of what the graph offers (MLA pins the heads), the hidden width is what a stock config holds:
    the output loads as the stock architecture. The MLP channels are of several widths, each its
    own config key (MLA ranks, the dense MLP, the shared expert): a uniform plan is refused by name."""
    out = tmp_path / "out"
    result = _cli("prune", str(deepseek_v3), "-o", str(out), "--ratio", "0.2", "--multiple", "4", "--structures", "hidden", "--importance", "taylor", *CALIB)
    assert result.exit_code == 0, result.output
    pruned, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert pruned.config.hidden_size < 32 and pruned.config.first_k_dense_replace == 1
    with torch.no_grad():
        assert torch.isfinite(pruned(_ids()).logits).all()
    result = CliRunner().invoke(main, [
        "prune", str(deepseek_v3), "-o", str(tmp_path / "mlp"), "--ratio", "0.2", "--structures", "mlp", "--importance", "taylor", *CALIB,
    ])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "--structures mlp: the model's channels structures differ in width" in result.output
    assert not (tmp_path / "mlp").exists()


def test_deepseek_v3_expert_channels_are_refused_before_scoring_naming_the_shared_expert(deepseek_v3: Path, tmp_path: Path) -> None:
    """DeepSeek's shared experts are ``moe_intermediate_size × n_shared_experts`` wide: narrower
    routed experts would narrow them too, which no cut of theirs does. Refused at once, not after
    the scoring passes."""
    result = CliRunner().invoke(main, [
        "prune", str(deepseek_v3), "-o", str(tmp_path / "out"), "--ratio", "0.05", "--structures", "expert-channels", "--importance", "taylor", *CALIB,
    ])
    assert result.exit_code == 2, result.output
    assert "--structures: expert-channels: narrower experts cannot be written for this model" in result.output
    assert "shared_experts.down_proj.weight" in result.output and "scoring" not in result.output
    assert not (tmp_path / "out").exists()


def test_deepseek_v3_reconstruction_refits_consumers_in_dense_and_moe_blocks(deepseek_v3: Path, tmp_path: Path) -> None:
    """Reconstruction streams the pruned model block by block through blocks of both kinds: the
    dense MLP's down projection (block 0) and the shared expert's (blocks 1 and 2) are refitted,
    none to a larger error."""
    from structprune.io.checkpoint import read_checkpoint
    from structprune.plan.reconstruct import reconstruct, stored_dtype_map
    from structprune.tracing.export import checkpoint_layout

    graph = trace(deepseek_v3)
    mlps = [s for s in graph.by_kind("channels") if any(".mlp." in m.param for m in s.members)]
    selection = Selection(units={s.id: [1, 4, 6, 11] for s in mlps})
    layout = checkpoint_layout(deepseek_v3, list(read_checkpoint(deepseek_v3).tensors))
    stored = {model_name: name for name, model_name in layout.renamed.items()}
    model = StreamedModel(deepseek_v3, blocks_prefix="model.layers")
    ids = torch.randint(1, 4096, (4, 16), generator=torch.Generator().manual_seed(2))
    result = reconstruct(
        model, graph, selection, ids, tmp_path / "weights", stored_names=stored, stored_dtypes=stored_dtype_map(deepseek_v3),
        expert_pieces=layout.experts, micro_batch=2,
    )
    refitted = [report.weight for report in result.layers]
    assert refitted == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.2.mlp.shared_experts.down_proj.weight"]
    assert all(report.error_after <= report.error_before for report in result.layers), result.layers


def _kept(plan: CutPlan, name: str) -> List[int]:
    indices = plan.tensors[name].keep[1]
    return plan.index_sets[indices] if isinstance(indices, str) else list(indices)


@pytest.mark.parametrize("importance", ["taylor", "wanda-sp", "head-gate", "bonsai", "lora-grad"])
def test_moe_blocks_after_a_dense_one_prune_heads_and_expert_channels_equal_to_masking(tmp_path: Path, importance: str) -> None:
    """Qwen2-MoE with ``mlp_only_layers=[0]``: a dense MLP block, then MoE blocks, each run in a
    module of its own structure (the gate and mask estimators hook their consumers in both).
    Scored and pruned without reconstruction, the output loads as the stock architecture and
    computes what the original computes with the removed heads' o_proj columns and each
    expert's removed channels zeroed."""
    torch.manual_seed(0)
    config = CONFIGS["qwen2_moe"]()
    config.vocab_size, config.mlp_only_layers = 4096, [0]
    config.pad_token_id = config.eos_token_id = config.bos_token_id = 0
    path = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "model" / name, path / name)
    out, plan_file = tmp_path / "out", tmp_path / "plan.json"
    result = _cli(
        "prune", str(path), "-o", str(out), "--ratio", "0.1", "--structures", "heads,expert-channels", "--importance", importance,
        "--no-reconstruct", "--plan-out", str(plan_file), *CALIB,
    )
    assert result.exit_code == 0, result.output
    plan = CutPlan.load(plan_file)
    original = _load(path)
    assert type(original.model.layers[0].mlp).__name__ == "Qwen2MoeMLP"
    with torch.no_grad():
        for i, layer in enumerate(original.model.layers):
            kept = _kept(plan, f"model.layers.{i}.self_attn.o_proj.weight")
            assert len(kept) < layer.self_attn.o_proj.weight.shape[1]
            layer.self_attn.o_proj.weight[:, [c for c in range(layer.self_attn.o_proj.weight.shape[1]) if c not in kept]] = 0
            if i == 0:
                continue
            for expert in range(EXPERTS["qwen2_moe"]):
                kept = _kept(plan, f"model.layers.{i}.mlp.experts.{expert}.down_proj.weight")
                assert len(kept) < WIDTH["qwen2_moe"]
                layer.mlp.experts.down_proj[expert, :, [c for c in range(WIDTH["qwen2_moe"]) if c not in kept]] = 0
    pruned, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(_logits(pruned.eval()), _logits(original), rtol=1e-5, atol=1e-5)
