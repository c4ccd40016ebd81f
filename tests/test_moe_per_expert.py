"""Expert channels chosen expert by expert: channel c of one expert has nothing to do with channel c
of another, so where the checkpoint stores each expert's tensors apart (Mixtral, Qwen-MoE, OLMoE),
each expert keeps its own best channels (the same number in each: a stock config has one expert
width). Scores per expert equal Taylor's by hand; the pruned model equals the original with each
expert's own channels zeroed; a checkpoint holding all experts in one tensor cannot take them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from structprune import apply_plan, trace  # noqa: E402
from structprune.cli import main  # noqa: E402
from structprune.errors import PlanError  # noqa: E402
from structprune.io.checkpoint import read_config  # noqa: E402
from structprune.plan.cuts import Selection, checkpoint_cut_plan, cut_plan  # noqa: E402
from structprune.plan.selection import Target, plan_uniform  # noqa: E402
from structprune.score.importance import estimator  # noqa: E402
from structprune.score.scorer import score  # noqa: E402
from structprune.score.streaming import StreamedModel  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo"
COMMON = dict(vocab_size=4096, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONFIGS: Dict[str, Callable[[], Any]] = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=64, moe_intermediate_size=32, num_experts=5, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], head_dim=8, **COMMON,
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def moe_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    config.pad_token_id = config.eos_token_id = config.bos_token_id = 0
    path = tmp_path_factory.mktemp(request.param) / "model"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "model" / name, path / name)
    return path


def _load(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids() -> torch.Tensor:
    return torch.randint(1, 4096, (3, 12), generator=torch.Generator().manual_seed(5))


def _taylor_per_expert(path: Path, ids: torch.Tensor) -> List[torch.Tensor]:
    """Per layer, ``[experts, channels]``: Σ |w·g| over each expert's gate and up rows and down
    column of the channel, from transformers' own backward."""
    model = _load(path)
    model(input_ids=ids, labels=ids).loss.backward()
    out = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        gate_up = (experts.gate_up_proj * experts.gate_up_proj.grad).abs().sum(dim=2).detach()
        down = (experts.down_proj * experts.down_proj.grad).abs().sum(dim=1).detach()
        width = down.shape[1]
        out.append(gate_up[:, :width] + gate_up[:, width:] + down)
    return out


def test_taylor_scores_each_experts_channels_on_their_own(moe_model: Path) -> None:
    ids = _ids()
    graph = trace(moe_model)
    scores = score(StreamedModel(moe_model, blocks_prefix="model.layers"), graph, estimator("taylor"), ids, micro_batch=3, kinds=["expert_channels"])
    expected = _taylor_per_expert(moe_model, ids)
    structures = graph.by_kind("expert_channels")
    assert structures and all(s.id in scores.per_expert for s in structures)
    for s in structures:
        per_expert = scores.per_expert[s.id]
        assert per_expert.shape == tuple(expected[s.layer].shape)
        np_expected = expected[s.layer].double().numpy()
        assert per_expert == pytest.approx(np_expected, rel=1e-4, abs=1e-9)
        # The channel in all experts, as the shared choice scores it, is the sum over them.
        assert scores.units[s.id] == pytest.approx(per_expert.sum(axis=0), rel=1e-6)


def _own_channels(graph: Any, experts: int, count: int) -> Dict[int, List[List[int]]]:
    """Different channels for every expert (shifted windows), the same number in each."""
    return {s.id: [[(4 * e + 3 * s.layer + k) % s.units for k in range(count)] for e in range(experts)] for s in graph.by_kind("expert_channels")}


def test_pruning_each_experts_own_channels_equals_zeroing_them(moe_model: Path, tmp_path: Path) -> None:
    graph = trace(moe_model)
    original = _load(moe_model)
    experts = original.model.layers[0].mlp.experts.down_proj.shape[0]
    selection = Selection(per_expert=_own_channels(graph, experts, 8))
    plan = checkpoint_cut_plan(moe_model, graph, selection)
    report = apply_plan(moe_model, plan, tmp_path / "out")
    assert report.shape_check.checked, report.shape_check.note
    with torch.no_grad():
        for s in graph.by_kind("expert_channels"):
            down = original.model.layers[s.layer].mlp.experts.down_proj
            for expert, channels in enumerate(selection.per_expert[s.id]):
                down[expert, :, channels] = 0
    pruned = _load(tmp_path / "out")
    width = graph.by_kind("expert_channels")[0].units
    assert pruned.model.layers[0].mlp.experts.down_proj.shape[-1] == width - 8
    with torch.no_grad():
        torch.testing.assert_close(pruned(_ids()).logits, original(_ids()).logits, rtol=1e-5, atol=1e-5)
    kept_lists = {tuple(cut.keep[1]) if not isinstance(cut.keep[1], str) else tuple(plan.index_sets[cut.keep[1]])
                  for name, cut in plan.tensors.items() if "down_proj" in name or ".w2." in name}
    assert len(kept_lists) > 1  # the experts' tensors keep different columns


def test_uniform_planning_removes_each_experts_lowest_channels(moe_model: Path) -> None:
    graph = trace(moe_model)
    scores = score(StreamedModel(moe_model, blocks_prefix="model.layers"), graph, estimator("taylor"), _ids(), kinds=["expert_channels"])
    config = read_config(moe_model) or {}
    selection = plan_uniform(graph, scores, Target(ratio=0.02, structures=("expert-channels",), multiple=8), int(config["num_attention_heads"]), int(config["hidden_size"]))
    assert selection.per_expert and not any(s.id in selection.units for s in graph.by_kind("expert_channels"))
    for sid, per_expert in selection.per_expert.items():
        for expert, channels in enumerate(per_expert):
            values = scores.per_expert[sid][expert]
            assert max(values[channels]) <= min(values[[c for c in range(len(values)) if c not in channels]])


def test_one_tensor_for_all_experts_cannot_keep_per_expert_channels(moe_model: Path) -> None:
    graph = trace(moe_model)
    experts = graph.params[graph.by_kind("expert_channels")[0].members[0].param][0]
    selection = Selection(per_expert=_own_channels(graph, experts, 8))
    stacked_names = list(graph.params)  # the model's own names: every experts' weights in one tensor
    with pytest.raises(PlanError, match="channels chosen per expert need each expert's tensors apart"):
        cut_plan(graph, read_config(moe_model) or {}, selection, stacked_names)


def test_invalid_per_expert_selections_are_refused(moe_model: Path) -> None:
    graph = trace(moe_model)
    structure = graph.by_kind("expert_channels")[0]
    experts = graph.params[structure.members[0].param][0]
    for bad, why in (
        ({structure.id: [[0, 1]] * (experts - 1)}, "one list of distinct channels per expert"),
        ({structure.id: [[0, 1]] + [[2]] * (experts - 1)}, "each of the same length"),
        ({structure.id: [list(range(structure.units))] * experts}, "each expert must keep some"),
        ({graph.by_kind("experts")[0].id: [[0]] * experts}, "needs an expert_channels structure"),
    ):
        with pytest.raises(PlanError, match=why):
            checkpoint_cut_plan(moe_model, graph, Selection(per_expert=bad))


def test_cli_prunes_expert_channels_per_expert(moe_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "prune", str(moe_model), "-o", str(out), "--ratio", "0.02", "--structures", "expert-channels", "--importance", "taylor",
        "--no-reconstruct", "--calib", str(DEMO / "text" / "calib.txt"), "--samples", "4", "--seq-len", "32",
    ])
    assert result.exit_code == 0, result.output
    original, pruned = _load(moe_model), _load(out)
    kept: List[Tuple[int, ...]] = []
    for before, after in zip(original.model.layers, pruned.model.layers):
        for expert in range(before.mlp.experts.down_proj.shape[0]):
            columns_before = before.mlp.experts.down_proj[expert].T
            columns_after = after.mlp.experts.down_proj[expert].T
            # Each kept column is one of the expert's own, in order.
            matches = [int(torch.nonzero((columns_before == column).all(dim=1))[0]) for column in columns_after]
            assert matches == sorted(matches)
            kept.append(tuple(matches))
    assert len(set(kept)) > 1
