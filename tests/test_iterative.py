"""Iterative pruning (`prune --iterations K --recover-steps N`): the steps reach the one-shot
target as a stock checkpoint, an interrupted run resumes without redoing finished steps and ends
with the bytes of an uninterrupted one, runs are reproducible, what cannot work is refused naming
the flag, and the CLI runs it end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ckpt import tree_bytes  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import structprune.recover.iterative  # noqa: E402
from structprune.io.checkpoint import read_checkpoint  # noqa: E402
from structprune.cli import main  # noqa: E402
from structprune.errors import OutputError, PlanError  # noqa: E402
from structprune.recover.iterative import REPORT_FILE, IterativeOptions, prune_iteratively  # noqa: E402
from structprune.prune import PruneOptions, make_plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
LAYERS, HIDDEN, MLP = 3, 64, 128
MLP_UNIT_PARAMS = 3 * HIDDEN * LAYERS
"""Parameters one MLP channel holds in all layers (gate and up rows, down column)."""
# MLP channels only: the widths are then set by the target alone, so the steps must land where one prune does.
OPTIONS = PruneOptions(ratio=0.1, structures=("mlp",), calib=CALIB, samples=4, seq_len=32, micro_batch=2)
ITERATIVE = IterativeOptions(iterations=2, recover_steps=2, recover_batch_size=4)
# Data-free and without reconstruction: for tests about the run, not about what the steps compute.
QUICK = PruneOptions(ratio=0.1, importance="l2", reconstruct=False)


class Interrupted(Exception):
    pass


def counting(real: Callable[..., Any], calls: List[Path], *, fail_on: Optional[int] = None) -> Callable[..., Any]:
    """``real``, recording the model directory of every call, and raising ``Interrupted`` on call
    number ``fail_on``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        if len(calls) == fail_on:
            raise Interrupted
        return real(*args, **kwargs)

    return wrapper


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random three-block Llama with the demo model's tokenizer (calibration and recovery need one)."""
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=LAYERS, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("iterative") / "model"
    transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, path / name)
    return path


@pytest.fixture(scope="module")
def pruned_in_two(tiny: Path) -> Path:
    output = tiny.parent / "two-steps"
    prune_iteratively(tiny, output, OPTIONS, ITERATIVE)
    return output


def work_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.structprune-iterative"


def test_two_steps_with_recovery_reach_the_one_shot_widths_as_a_stock_checkpoint(tiny: Path, pruned_in_two: Path) -> None:
    original = read_checkpoint(tiny).parameters
    after = read_checkpoint(pruned_in_two).parameters
    one_shot = make_plan(tiny, replace(QUICK, structures=("mlp",)))
    assert after == one_shot.params_after
    assert abs(after - original * (1 - OPTIONS.ratio)) <= 8 * MLP_UNIT_PARAMS / 2  # half a rounding step (--multiple 8)
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned_in_two)
    assert all(layer.mlp.up_proj.out_features == one_shot.widths["channels"][0] for layer in model.model.layers)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    report = json.loads((pruned_in_two / REPORT_FILE).read_text())
    first, second = report["steps"]
    assert first["params_after"] == second["params_before"] and second["params_after"] == after
    assert len(first["recovery_losses"]) == 2 and second["recovery_losses"] is None
    # Step one removed half the target; step two the rest of it, relative to the smaller model.
    assert first["ratio"] == pytest.approx(OPTIONS.ratio / 2)
    assert second["ratio"] == pytest.approx(1 - original * (1 - OPTIONS.ratio) / first["params_after"])
    assert not (pruned_in_two / "recovery.json").exists() and not (pruned_in_two / "adapter").exists()
    assert not work_dir(pruned_in_two).exists()


def test_an_interrupted_run_resumes_after_its_last_finished_step(tiny: Path, pruned_in_two: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tiny.parent / "resumed"
    plans: List[Path] = []
    recoveries: List[Path] = []
    monkeypatch.setattr(structprune.recover.iterative, "make_plan", counting(make_plan, plans, fail_on=2))
    monkeypatch.setattr(structprune.recover.iterative, "recover", counting(structprune.recover.iterative.recover, recoveries))
    with pytest.raises(Interrupted):
        prune_iteratively(tiny, output, OPTIONS, ITERATIVE)
    assert not output.exists() and work_dir(output).is_dir() and len(recoveries) == 1

    plans.clear()
    recoveries.clear()
    monkeypatch.setattr(structprune.recover.iterative, "make_plan", counting(make_plan, plans))
    result = prune_iteratively(tiny, output, OPTIONS, ITERATIVE, resume=True)
    assert len(plans) == 1 and plans[0] != tiny and not recoveries, "step one was neither pruned nor recovered again"
    assert result.resumed_steps == 1 and [s.step for s in result.steps] == [1, 2]
    assert tree_bytes(output) == tree_bytes(pruned_in_two)
    assert not work_dir(output).exists()


def test_two_runs_with_the_same_seed_write_the_same_bytes(tiny: Path, pruned_in_two: Path) -> None:
    again = tiny.parent / "again"
    prune_iteratively(tiny, again, OPTIONS, ITERATIVE)
    assert tree_bytes(again) == tree_bytes(pruned_in_two)


def test_an_earlier_runs_work_directory_is_removed_unless_resumed(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "out"
    work_dir(output).mkdir()
    (work_dir(output) / "leftover").write_text("from a killed run")
    prune_iteratively(tiny, output, QUICK, IterativeOptions(iterations=2))
    assert "removing" in capsys.readouterr().err and not work_dir(output).exists()

    monkeypatch.setattr(structprune.recover.iterative, "make_plan", counting(make_plan, [], fail_on=2))
    with pytest.raises(Interrupted):
        prune_iteratively(tiny, tmp_path / "other", QUICK, IterativeOptions(iterations=2))
    assert "rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(structprune.recover.iterative, "make_plan", make_plan)
    # Other options than the saved run's: its steps are not reused.
    result = prune_iteratively(tiny, tmp_path / "other", replace(QUICK, ratio=0.15), IterativeOptions(iterations=2), resume=True)
    assert "starting over" in capsys.readouterr().err and result.resumed_steps == 0


def test_blocks_with_widths_are_spread_over_the_steps(tiny: Path, tmp_path: Path) -> None:
    options = replace(QUICK, ratio=0.2, structures=("heads", "mlp", "blocks"), blocks=1, calib=CALIB, samples=4, seq_len=32)
    result = prune_iteratively(tiny, tmp_path / "out", options, IterativeOptions(iterations=2))
    assert [s.step for s in result.steps] == [1, 2]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").num_hidden_layers == LAYERS - 1
    assert result.removed_fraction == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize(
    ("options", "iterative", "flag"),
    [
        (QUICK, IterativeOptions(iterations=0), "--iterations must be at least 1"),
        (QUICK, IterativeOptions(iterations=2, recover_steps=-1), "--recover-steps must be at least 0"),
        (QUICK, IterativeOptions(iterations=1, recover_steps=2), "--recover-steps recovers between the steps of --iterations"),
        (QUICK, IterativeOptions(iterations=2, recover_steps=2), "--recover-steps needs training text: pass --recover-data"),
        (QUICK, IterativeOptions(iterations=2, recover_data=CALIB), "--recover-data is training text for --recover-steps"),
        (replace(QUICK, planning="global"), IterativeOptions(iterations=2), "--iterations K > 1 needs --uniform planning: --global"),
        (replace(QUICK, layout="decilm"), IterativeOptions(iterations=2), "--format decilm cannot be pruned again"),
        (replace(QUICK, protect=(1, 0)), IterativeOptions(iterations=2), "--protect leaves layers wider"),
        (replace(QUICK, structures=("blocks",)), IterativeOptions(iterations=2), "--structures blocks alone"),
    ],
)
def test_what_cannot_work_is_refused_naming_the_flag(tiny: Path, tmp_path: Path, options: PruneOptions, iterative: IterativeOptions, flag: str) -> None:
    with pytest.raises(PlanError, match=flag):
        prune_iteratively(tiny, tmp_path / "out", options, iterative)
    assert sorted(tmp_path.iterdir()) == []


def test_the_output_is_checked_before_any_work(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(OutputError):
        prune_iteratively(tiny, tiny / "inside", QUICK, IterativeOptions(iterations=2))
    assert not work_dir(tiny / "inside").exists()
    # Starting over empties the work directory, so a model kept there (say, copied out of a run) is refused.
    kept = work_dir(tmp_path / "out") / "model"
    shutil.copytree(tiny, kept)
    with pytest.raises(OutputError, match="work directory"):
        prune_iteratively(kept, tmp_path / "out", QUICK, IterativeOptions(iterations=2))
    assert (kept / "model.safetensors").is_file()


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_the_cli_prunes_in_steps_with_recovery(tiny: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = invoke(
        "prune", str(tiny), "--ratio", "0.1", "--calib", str(CALIB), "--samples", "4", "--seq-len", "32", "--iterations", "2",
        "--recover-steps", "1", "--recover-batch-size", "4", "--no-distill", "-o", str(output),
    )
    assert result.exit_code == 0, result.output
    assert "step 1/2: pruning 5.0% of the current model" in result.stderr and "step 1/2: recovering for 1 steps" in result.stderr
    assert "step 2/2: pruning" in result.stderr
    assert "target 10.0%" in result.stdout and f"wrote {output}" in result.stdout
    report: Dict[str, Any] = json.loads((output / REPORT_FILE).read_text())
    assert report["recovery"]["distill"] is False and len(report["steps"]) == 2
    assert read_checkpoint(output).parameters == report["params"]["after"]
    assert transformers.AutoModelForCausalLM.from_pretrained(output).config.num_hidden_layers == LAYERS


@pytest.mark.parametrize("flag", [["--plan-out", "plan.json"], ["--dry-run"], ["--resume-dir", "state"]])
def test_the_cli_refuses_what_has_no_meaning_in_steps(tiny: Path, tmp_path: Path, flag: List[str]) -> None:
    result = invoke("prune", str(tiny), "--ratio", "0.1", "--importance", "l2", "--iterations", "2", "-o", str(tmp_path / "out"), *flag)
    assert result.exit_code == 2 and flag[0] in result.stderr
    assert sorted(tmp_path.iterdir()) == []
