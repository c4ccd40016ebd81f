"""Global (per-layer) planning and the checkpoint formats that hold its result: DeciLM /
Nemotron-NAS for Llama models, the ``layers`` format for any model, ``structprune.load_pruned``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import structprune  # noqa: E402
from structprune.io.checkpoint import read_config  # noqa: E402
from structprune.cli import main  # noqa: E402
from structprune.plan.cuts import Selection, checkpoint_cut_plan  # noqa: E402
from structprune.errors import PlanError  # noqa: E402
from structprune.models.loading import load_pruned  # noqa: E402
from structprune.plan.selection import Target, default_protection, normalized, plan_global, plan_uniform  # noqa: E402
from structprune.prune import PruneOptions, make_plan  # noqa: E402
from structprune.score.scorer import Scores  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
IDS = torch.tensor([[5, 17, 300, 2048, 4000, 9, 77, 1], [3, 3, 1000, 12, 600, 4095, 0, 8]])


def layered_scores(graph: structprune.StructureGraph) -> Scores:
    """Unit scores that grow with depth (layer L's units score L+1 times more), so a global
    planner must take most from the first layers it may touch."""
    rng = np.random.default_rng(0)
    scores = Scores("synthetic", "sum")
    for s in graph.structures:
        scale = (s.layer + 1) if s.layer is not None else 10.0
        scores.units[s.id] = scale * (1 + rng.random(s.units))
        if s.kind == "query_heads" and s.nested_in is not None:
            scores.per_group[s.id] = scale * (1 + rng.random((graph.get(s.nested_in).units, s.units)))
    return scores


def kept_per_layer(graph: structprune.StructureGraph, selection: Selection, kind: str) -> List[int]:
    out = []
    for s in graph.by_kind(kind):
        gone = len(selection.per_group[s.id][0]) if s.id in selection.per_group else len(selection.units.get(s.id, []))
        out.append(s.units - gone)
    return out


def test_default_protection_scales_llm_pruners_choice() -> None:
    assert default_protection(32) == (4, 2)
    assert default_protection(8) == (1, 1)
    assert default_protection(6) == (1, 0)


def test_global_plan_follows_scores_across_layers_and_keeps_protected_layers(demo_graph: structprune.StructureGraph) -> None:
    scores = layered_scores(demo_graph)
    target = Target(ratio=0.2, structures=("heads", "mlp"), multiple=8, protect=(1, 1))
    selection = plan_global(demo_graph, scores, target)
    channels = kept_per_layer(demo_graph, selection, "channels")
    heads = kept_per_layer(demo_graph, selection, "query_heads")
    assert channels[0] == 512 and channels[-1] == 512 and heads[0] == 3 and heads[-1] == 3
    assert all(width % 8 == 0 and width >= 8 for width in channels)
    assert channels[1] < channels[4], channels  # cheaper (shallower) layers lose more
    removed = sum((512 - w) * demo_graph.by_kind("channels")[0].unit_params for w in channels)
    removed += sum((3 - h) * demo_graph.by_kind("query_heads")[0].unit_params for h in heads)
    assert abs(removed - 0.2 * demo_graph.total_params) <= 8 * demo_graph.by_kind("channels")[0].unit_params
    assert plan_global(demo_graph, scores, target) == selection  # deterministic


def test_normalisation_and_planning_errors(demo_graph: structprune.StructureGraph) -> None:
    scores = layered_scores(demo_graph)
    mean = normalized(demo_graph, scores, "mean")
    for sid, values in mean.units.items():
        assert np.mean(np.abs(values)) == pytest.approx(1.0)
    assert normalized(demo_graph, scores, "none") is scores
    with pytest.raises(PlanError, match="unknown normalisation"):
        normalized(demo_graph, scores, "zscore")
    with pytest.raises(PlanError, match="nothing would be left"):
        plan_global(demo_graph, scores, Target(ratio=0.2, protect=(3, 3)))
    with pytest.raises(PlanError, match="remove blocks on their own with uniform planning"):
        plan_global(demo_graph, scores, Target(ratio=0.2, structures=("blocks",)))


def test_format_choice_and_refusals(demo_graph: structprune.StructureGraph) -> None:
    channels = demo_graph.by_kind("channels")
    slots = demo_graph.by_kind("query_heads")
    per_layer_mlp = Selection(units={channels[1].id: list(range(64))})
    auto = checkpoint_cut_plan(DEMO, demo_graph, per_layer_mlp, layout="auto")
    assert auto.metadata["format"] == "decilm" and set(auto.files) == {"configuration_decilm.py", "modeling_decilm.py"}
    blocks = auto.config["block_configs"]
    assert [b["ffn"]["intermediate_size"] for b in blocks] == [512, 448, 512, 512, 512, 512]
    assert {b["attention"]["n_heads_in_group"] for b in blocks} == {3}
    with pytest.raises(PlanError, match="same number of channels in every layer"):
        checkpoint_cut_plan(DEMO, demo_graph, per_layer_mlp, layout="stock")
    per_layer_heads = Selection(per_group={slots[2].id: [[0], [2]]})
    assert checkpoint_cut_plan(DEMO, demo_graph, per_layer_heads, layout="auto").metadata["format"] == "layers"
    with pytest.raises(PlanError, match="one query-head count for every layer"):
        checkpoint_cut_plan(DEMO, demo_graph, per_layer_heads, layout="decilm")
    uniform = Selection(units={c.id: [0, 1, 2, 3, 4, 5, 6, 7] for c in channels})
    stock = checkpoint_cut_plan(DEMO, demo_graph, uniform, layout="auto")
    assert stock.metadata["format"] == "stock" and stock.config == {"intermediate_size": 504} and not stock.files
    with pytest.raises(PlanError, match="unknown checkpoint format"):
        checkpoint_cut_plan(DEMO, demo_graph, uniform, layout="gguf")


def masked_dense(weights: Dict[str, torch.Tensor], selection: Selection, graph: structprune.StructureGraph) -> torch.nn.Module:
    """The dense demo model with the selected units' weights zeroed: it computes what the pruned
    model must compute (a zero MLP channel or a zero query head adds nothing)."""
    from structprune.plan.cuts import removed_indices

    state = {k: v.clone() for k, v in weights.items()}
    for param, dims in removed_indices(graph, selection).items():
        for dim, gone in dims.items():
            index = torch.tensor(sorted(gone))
            state[param].index_fill_(dim, index, 0.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO)
    model.load_state_dict(state, strict=False)
    return model.eval()


@pytest.mark.parametrize("layout", ["decilm", "layers"])
def test_non_uniform_checkpoints_compute_what_the_masked_model_computes(
    tmp_path: Path, demo_graph: structprune.StructureGraph, demo_weights: Dict[str, torch.Tensor], layout: str
) -> None:
    channels = demo_graph.by_kind("channels")
    selection = Selection(units={channels[1].id: list(range(0, 128, 2)), channels[3].id: list(range(300, 492))})
    if layout == "layers":
        selection.per_group[demo_graph.by_kind("query_heads")[4].id] = [[1], [2]]
    plan = checkpoint_cut_plan(DEMO, demo_graph, selection, layout=layout)
    structprune.apply_plan(DEMO, plan, tmp_path / "out")
    pruned = structprune.load_pruned(tmp_path / "out")
    assert pruned.model.layers[1].mlp.up_proj.out_features == 448
    assert pruned.model.layers[3].mlp.up_proj.out_features == 320
    with torch.no_grad():
        expected = masked_dense(demo_weights, selection, demo_graph)(IDS).logits
        got = pruned(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if layout == "layers":
        assert pruned.model.layers[4].self_attn.q_proj.out_features == 4 * 32
        with pytest.raises(Exception):  # a stock loader must refuse it, never load it wrongly
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_decilm_checkpoint_loads_with_plain_transformers_remote_code(tmp_path: Path, demo_graph: structprune.StructureGraph) -> None:
    channels = demo_graph.by_kind("channels")
    plan = checkpoint_cut_plan(DEMO, demo_graph, Selection(units={channels[2].id: list(range(256))}), layout="decilm")
    out = tmp_path / "decilm"
    structprune.apply_plan(DEMO, plan, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
    assert (out / "modeling_decilm.py").read_text() == (ROOT / "python/structprune/models/decilm/modeling_decilm.py").read_text()
    script = (
        "import sys, torch\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        f"path = {str(out)!r}\n"
        "config = AutoConfig.from_pretrained(path, trust_remote_code=True)\n"
        "assert config.block_configs[2].ffn.intermediate_size == 256 and not config.block_configs[2].attention.no_op\n"
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()\n"
        "assert 'structprune' not in sys.modules\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad():\n"
        "    torch.save(model(ids).logits, sys.argv[1])\n"
    )
    logits_file = tmp_path / "logits.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", script, str(logits_file)], check=True, cwd=tmp_path, env=env)
    with torch.no_grad():
        expected = load_pruned(out)(IDS).logits
    torch.testing.assert_close(torch.load(logits_file), expected, atol=0, rtol=0)


def test_decilm_no_op_sublayers_are_skipped() -> None:
    from structprune.models.decilm.configuration_decilm import DeciLMConfig
    from structprune.models.decilm.modeling_decilm import DeciLMForCausalLM

    base = json.loads((DEMO / "config.json").read_text())
    blocks = [
        {"attention": {"no_op": i == 1, "n_heads_in_group": 3}, "ffn": {"no_op": i == 2, "intermediate_size": 256}} for i in range(6)
    ]
    config = DeciLMConfig(**{**base, "block_configs": blocks})
    model = DeciLMForCausalLM(config).eval()
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.1.self_attn.q_proj.weight" not in names and "model.layers.1.input_layernorm.weight" not in names
    assert "model.layers.2.mlp.up_proj.weight" not in names and "model.layers.0.mlp.up_proj.weight" in names
    layer = model.model.layers[1]
    hidden = torch.randn(1, 4, 192)
    position = model.model.rotary_emb(hidden, torch.arange(4)[None])
    direct = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    torch.testing.assert_close(layer(hidden, position_embeddings=position), direct)
    with pytest.raises(ValueError, match="block_configs has 2 entries"):
        DeciLMConfig(**{**base, "block_configs": blocks[:2]})


def test_cli_global_prune_writes_a_checkpoint_load_pruned_reads(tmp_path: Path) -> None:
    from click.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "global"
    args = ["prune", str(DEMO), "--ratio", "0.2", "--importance", "l2", "--global", "--protect", "1,1", "-o", str(out), "--plan-out", str(tmp_path / "plan.json")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["metadata"]["method"]["planning"] == "global" and plan["metadata"]["method"]["protect"] == [1, 1]
    model = load_pruned(out)
    widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    assert widths[0] == widths[-1] == 512 and len(set(widths)) > 1, widths
    assert "  mlp    512 -> 512, " in result.output and " channels per layer" in result.output
    bad = runner.invoke(main, ["prune", str(DEMO), "--ratio", "0.2", "--importance", "l2", "--global", "--protect", "1", "--dry-run"])
    assert bad.exit_code == 2 and "FIRST,LAST" in bad.output


def test_global_planning_through_make_plan_defaults_to_scaled_protection() -> None:
    result = make_plan(DEMO, PruneOptions(ratio=0.2, importance="l2", planning="global"))
    assert result.plan.metadata["method"]["protect"] == [1, 0]
    assert result.widths["channels"][0] == 512
    assert 0.17 < result.removed_fraction < 0.23
    config = read_config(DEMO)
    assert config is not None and result.plan.metadata["format"] in ("decilm", "layers")


def with_block_influence(scores: Scores, influence: List[float]) -> Scores:
    scores.block_influence = np.asarray(influence)
    return scores


def test_depth_and_width_together(demo_graph: structprune.StructureGraph) -> None:
    """``blocks=N`` with width structures: the N least influential unprotected blocks go, the rest
    of the budget comes from widths of the blocks that stay, in both plannings."""
    scores = with_block_influence(layered_scores(demo_graph), [0.1, 0.9, 0.2, 0.8, 0.3, 0.7])
    block_params = demo_graph.blocks.unit_params
    channel_step = 8 * demo_graph.by_kind("channels")[0].unit_params
    uniform = plan_uniform(demo_graph, scores, Target(ratio=0.3, structures=("mlp", "blocks"), blocks=1), 6, 192)
    assert uniform.blocks == [0]
    assert demo_graph.by_kind("channels")[0].id not in uniform.units  # a removed block is not also narrowed
    widths = kept_per_layer(demo_graph, uniform, "channels")[1:]
    assert len(set(widths)) == 1 and widths[0] < 512
    removed = block_params + (512 - widths[0]) * 5 * demo_graph.by_kind("channels")[0].unit_params
    assert abs(removed - 0.3 * demo_graph.total_params) <= 5 * channel_step
    protected = plan_global(demo_graph, scores, Target(ratio=0.3, structures=("heads", "mlp", "blocks"), blocks=2, protect=(1, 0)))
    assert protected.blocks == [2, 4]  # block 0 is protected, so the next two lowest go
    assert kept_per_layer(demo_graph, protected, "channels")[0] == 512
    for sid in list(protected.units) + list(protected.per_group):
        assert demo_graph.get(sid).layer not in (0, 2, 4)
    with pytest.raises(PlanError, match="--blocks N"):
        plan_global(demo_graph, scores, Target(ratio=0.3, structures=("mlp", "blocks")))
    with pytest.raises(PlanError, match="cannot remove 5 blocks"):
        plan_global(demo_graph, scores, Target(ratio=0.3, structures=("mlp", "blocks"), blocks=5, protect=(1, 0)))
    with pytest.raises(PlanError, match="already removes"):
        plan_global(demo_graph, scores, Target(ratio=0.1, structures=("mlp", "blocks"), blocks=1))
    with pytest.raises(PlanError, match="block influence"):
        plan_global(demo_graph, layered_scores(demo_graph), Target(ratio=0.3, structures=("mlp", "blocks"), blocks=1))


def test_depth_and_width_checkpoint_computes_what_the_masked_model_computes(
    tmp_path: Path, demo_graph: structprune.StructureGraph, demo_weights: Dict[str, torch.Tensor]
) -> None:
    """A removed Llama block with zero o_proj and down_proj is the identity (the residual passes
    through), so the dense model with those zeroed and the narrowed units zeroed is the reference."""
    result = make_plan(DEMO, PruneOptions(ratio=0.3, importance="taylor", structures=("heads", "mlp", "blocks"), blocks=1,
                                          calib=ROOT / "demo" / "text" / "calib.txt", samples=4, seq_len=32, reconstruct=False))
    assert len(result.blocks_removed) == 1 and result.plan.config["num_hidden_layers"] == 5
    assert result.plan.metadata["method"]["blocks"] == 1 and 0.27 < result.removed_fraction < 0.33
    structprune.apply_plan(DEMO, result.plan, tmp_path / "out")
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    selection = plan_uniform(demo_graph, result.scores, Target(ratio=0.3, structures=("heads", "mlp", "blocks"), blocks=1), 6, 192)
    reference = masked_dense(demo_weights, selection, demo_graph)
    gone = selection.blocks[0]
    with torch.no_grad():
        reference.model.layers[gone].self_attn.o_proj.weight.zero_()
        reference.model.layers[gone].mlp.down_proj.weight.zero_()
        torch.testing.assert_close(pruned(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)
