"""What a plain run prints (issue 20): long steps say what they do, bars leave no escape codes in
a log, rates are real, busy-machine timings are flagged, and libraries' noise caused by
structprune's own calls stays off the console."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import structprune  # noqa: E402
from structprune import apply as apply_module  # noqa: E402
from structprune.evaluate import costs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
HELDOUT = ROOT / "demo" / "text" / "heldout.txt"
QUICK_TIMING = ("--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--context", "16")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "structprune", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_prune_says_what_it_does_and_leaves_no_escape_codes(tmp_path: Path) -> None:
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(HELDOUT.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    result = run_cli(
        "prune", str(DEMO), "--ratio", "0.2", "--importance", "taylor", "--no-reconstruct", "--samples", "4", "--seq-len", "32",
        "--calib", str(CALIB), "--eval", str(heldout), "-o", str(tmp_path / "out"), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    order = ["loading torch and transformers…", f"tracing {DEMO}…", "scoring: forward pass", "scoring: backward pass", f"perplexity of {DEMO}"]
    positions = [next(i for i, line in enumerate(said) if line.startswith(message)) for message in order]
    assert positions == sorted(positions), said
    assert "perplexity @ 128" in result.stderr  # eval's window bar
    assert "\x1b[" not in result.stderr  # stderr is no terminal: no block bars, no cursor moves
    assert "  mlp    512 -> " in result.stdout and "query heads per layer (KV groups 2" in result.stdout


def test_apply_bar_rate_counts_from_the_start_of_the_copy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The bar is created on the first progress report; the rate must still count the time before
    it (a run reporting 10 MB after 0.3 s wrote at most ~33 MB/s, not GB/s)."""
    total = 10 * 1024 * 1024

    with apply_module._progress_reporter(True) as progress:
        assert progress is not None
        time.sleep(0.3)
        progress(total, total)
    rates = re.findall(r"([\d.]+)([kMG]?)B/s", capsys.readouterr().err)
    assert rates
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}
    value, unit = rates[-1]
    assert float(value) * scale[unit] < 40e6, rates


@pytest.mark.parametrize(
    "before,after,cpus,warns",
    [(0.2, 2.1, 2, False), (0.9, 2.9, 2, False), (1.5, 2.0, 2, True), (0.3, 3.5, 2, True), (3.0, 8.0, 16, False), (9.0, 9.0, 16, True)],
)
def test_busy_machine_warning(before: float, after: float, cpus: int, warns: bool) -> None:
    warning = costs.MachineLoad(before=before, after=after, cpus=cpus).warning(comparing=True)
    assert (warning is not None) == warns
    if warning:
        assert "speed ratios are unreliable" in warning and f"{cpus} CPU(s)" in warning


def test_eval_compare_warns_on_a_busy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from structprune.cli import main

    monkeypatch.setattr(costs, "load_average", lambda: 40.0)
    monkeypatch.setattr(costs, "usable_cpus", lambda: 2)
    result = CliRunner().invoke(main, ["eval", str(DEMO), "--compare", str(DEMO), *QUICK_TIMING])
    assert result.exit_code == 0, result.output
    assert "warning: the machine was busy while timing (load average 40.0 before, 40.0 after, 2 CPU(s)): speed ratios are unreliable" in result.stderr
    untimed = CliRunner().invoke(main, ["eval", str(DEMO), "--no-timing"])
    assert untimed.exit_code == 0 and "busy" not in untimed.stderr


def test_eval_timing_and_recovery_print_no_library_warnings(tmp_path: Path) -> None:
    """transformers' deprecation of `past_key_values` (decode timing), peft's use of
    `is_gradient_checkpointing`, and bitsandbytes' kernel warning when peft imports it for a run
    that quantizes nothing."""
    timed = run_cli("eval", str(DEMO), *QUICK_TIMING, cwd=tmp_path)
    assert timed.returncode == 0, timed.stderr
    assert "deprecated" not in timed.stderr and "Warning" not in timed.stderr, timed.stderr
    recovered = run_cli("recover", str(DEMO), "-o", str(tmp_path / "out"), "--data", str(CALIB), "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", cwd=tmp_path)
    assert recovered.returncode == 0, recovered.stderr
    assert "gemm_4bit" not in recovered.stderr and "Warning" not in recovered.stderr and "Loading weights" not in recovered.stderr, recovered.stderr


def test_apply_progress_through_the_api_still_works(tmp_path: Path) -> None:
    report = structprune.apply_plan(DEMO, {"format": "structprune.cut-plan", "version": 1}, tmp_path / "copy", progress=True)
    assert report.shape_check.checked and report.total_size > 0
