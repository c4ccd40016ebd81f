"""Scoring, planning and `structprune prune` on the bundled demo model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import structprune  # noqa: E402
from structprune.cli import main  # noqa: E402
from structprune.score.importance import ESTIMATORS, estimator  # noqa: E402
from structprune.prune import PruneOptions, make_plan  # noqa: E402
from structprune.score.scorer import score  # noqa: E402
from structprune.score.streaming import ParamStats, StreamedModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"


def test_estimator_formulas() -> None:
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    g = torch.tensor([[0.5, 0.5], [-1.0, 2.0]])
    f = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    stats = ParamStats("w", w, g, f)
    assert torch.allclose(estimator("taylor").index_scores(stats, 0, None), torch.tensor([1.5, 11.0]))
    assert torch.allclose(estimator("taylor-vector").index_scores(stats, 0, None), torch.tensor([-0.5, 5.0]))
    second = (w * g - 0.5 * w.square() * f).abs().sum(1)
    assert torch.allclose(estimator("taylor2").index_scores(stats, 0, None), second)
    assert torch.allclose(estimator("l1").index_scores(stats, 1, None), torch.tensor([4.0, 6.0]))
    assert torch.allclose(estimator("l2").finalize(estimator("l2").index_scores(stats, 1, None)), torch.tensor([10.0, 20.0]).sqrt())
    first = estimator("random", seed=3).index_scores(stats, 0, None)
    assert torch.equal(first, estimator("random", seed=3).index_scores(stats, 0, None))
    assert not torch.equal(first, estimator("random", seed=4).index_scores(stats, 0, None))
    with pytest.raises(structprune.SettingError, match="--importance: unknown estimator"):
        estimator("nope")


def test_kv_group_score_holds_its_own_query_heads(demo_graph: structprune.StructureGraph, demo_weights: Dict[str, torch.Tensor]) -> None:
    """L1 score of KV group g = |k rows g| + |v rows g| + |q rows of query heads g·n_rep … (g+1)·n_rep − 1|
    + |o_proj columns of those heads|: n_rep consecutive query heads share KV head g (not j % n_kv)."""
    model = StreamedModel(DEMO, blocks_prefix="model.layers")
    scores = score(model, demo_graph, estimator("l1"), None)
    config = json.loads((DEMO / "config.json").read_text())
    d, kv, heads = config["head_dim"], config["num_key_value_heads"], config["num_attention_heads"]
    rep = heads // kv
    for s in demo_graph.by_kind("kv_groups"):
        p = f"model.layers.{s.layer}.self_attn."
        for g in range(kv):
            rows = slice(g * d, (g + 1) * d)
            q_rows = slice(g * rep * d, (g + 1) * rep * d)
            expected = sum(
                float(t.abs().sum())
                for t in (
                    demo_weights[p + "k_proj.weight"][rows],
                    demo_weights[p + "v_proj.weight"][rows],
                    demo_weights[p + "q_proj.weight"][q_rows],
                    demo_weights[p + "o_proj.weight"][:, q_rows],
                )
            )
            assert scores.units[s.id][g] == pytest.approx(expected, rel=1e-6)


def test_every_estimator_plans_a_loadable_stock_checkpoint(tmp_path: Path) -> None:
    for name in sorted(ESTIMATORS):
        options = PruneOptions(ratio=0.2, importance=name, calib=CALIB, samples=4, seq_len=32, micro_batch=2)
        result = make_plan(DEMO, options)
        assert 0.15 < result.removed_fraction < 0.25, name
        assert all(len(set(widths)) == 1 for widths in result.widths.values()), name
        assert result.widths["channels"][0] % 8 == 0
        out = tmp_path / name
        structprune.apply_plan(DEMO, result.plan, out)
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        logits = model(torch.zeros((1, 5), dtype=torch.long)).logits
        assert logits.shape == (1, 5, 4096) and torch.isfinite(logits).all()


def test_structures_and_gqa_choices(tmp_path: Path) -> None:
    kv = make_plan(DEMO, PruneOptions(ratio=0.25, importance="l2", structures=("heads",), gqa="kv-groups"))
    assert kv.widths["kv_groups"] == [1] * 6 and kv.widths["query_heads"] == [3] * 6
    slots = make_plan(DEMO, PruneOptions(ratio=0.1, importance="l2", structures=("heads",), gqa="query-heads"))
    assert slots.widths["kv_groups"] == [2] * 6 and slots.widths["query_heads"][0] < 3
    hidden = make_plan(DEMO, PruneOptions(ratio=0.2, importance="l2", structures=("hidden",)))
    assert hidden.plan.config["hidden_size"] % 8 == 0 and hidden.plan.config["hidden_size"] < 192
    combined = make_plan(DEMO, PruneOptions(ratio=0.3, importance="l2", structures=("heads", "mlp", "hidden")))
    config = combined.plan.config
    assert config["hidden_size"] % config["num_attention_heads"] == 0 and config["num_attention_heads"] < 6
    structprune.apply_plan(DEMO, combined.plan, tmp_path / "combined")
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "combined").config.hidden_size == config["hidden_size"]
    blocks = make_plan(DEMO, PruneOptions(ratio=0.15, importance="taylor", structures=("blocks",), calib=CALIB, samples=4, seq_len=32))
    assert len(blocks.blocks_removed) == 1 and blocks.plan.config["num_hidden_layers"] == 5
    assert blocks.scores is not None and blocks.scores.loss is None and not blocks.scores.units  # no backward pass
    structprune.apply_plan(DEMO, blocks.plan, tmp_path / "blocks")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "blocks").num_hidden_layers == 5


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_prune_is_reproducible_and_matches_its_plan(tmp_path: Path) -> None:
    from click.testing import CliRunner

    runner = CliRunner()
    common = ["prune", str(DEMO), "--ratio", "0.2", "--calib", str(CALIB), "--samples", "4", "--seq-len", "32"]
    first = runner.invoke(main, [*common, "-o", str(tmp_path / "a"), "--plan-out", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    assert "parameters  3,148,224 ->" in first.output and "% removed" in first.output
    # Saved block inputs all on disk: the same plan and bytes.
    second = runner.invoke(main, [*common, "-o", str(tmp_path / "b"), "--plan-out", str(tmp_path / "b.json"), "--activation-memory", "0"])
    assert second.exit_code == 0, second.output
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "b" / "model.safetensors")
    applied = runner.invoke(main, ["apply", str(DEMO), str(tmp_path / "a.json"), "-o", str(tmp_path / "c"), "--quiet"])
    assert applied.exit_code == 0, applied.output
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "c" / "model.safetensors")
    plan = json.loads((tmp_path / "a.json").read_text())
    assert plan["metadata"]["method"]["importance"] == "obs" and plan["metadata"]["calibration"]["samples"] == 4
    assert plan["metadata"]["method"]["reconstruct"] is True and "reconstruction" in plan["metadata"]


def test_cli_prune_dry_run_and_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    runner = CliRunner()
    dry = runner.invoke(main, ["prune", str(DEMO), "--ratio", "0.3", "--importance", "l1", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output and not list(tmp_path.iterdir())
    no_calib = runner.invoke(main, ["prune", str(DEMO), "--ratio", "0.3", "-o", str(tmp_path / "x")])
    assert no_calib.exit_code == 2 and "--calib" in no_calib.output
    assert not (tmp_path / "x").exists()
    bad = runner.invoke(main, ["prune", str(DEMO), "--ratio", "0.3", "--importance", "l1", "--structures", "wings", "--dry-run"])
    assert bad.exit_code == 2 and "--structures: 'wings' given" in bad.output


def test_cli_prune_combines_blocks_and_widths() -> None:
    from click.testing import CliRunner

    runner = CliRunner()
    common = ["prune", str(DEMO), "--ratio", "0.3", "--structures", "heads,mlp,blocks", "--calib", str(CALIB), "--samples", "4", "--seq-len", "32", "--dry-run"]
    missing = runner.invoke(main, common)
    assert missing.exit_code == 1 and "--blocks N" in missing.output
    combined = runner.invoke(main, [*common, "--blocks", "1"])
    assert combined.exit_code == 0, combined.output
    assert "blocks removed:" in combined.output and "  mlp    512 -> " in combined.output
