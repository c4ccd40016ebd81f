"""Crash safety: kill an apply at random moments. The input must stay untouched, the output must be
absent or complete, and a later apply to the same path must succeed. SIGTERM and SIGINT must also
take the staged directory with them; after SIGKILL the next run removes it, and says so."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import structprune
from ckpt import plan_dict, read_checkpoint_raw, tree_bytes, tree_hashes, write_checkpoint, write_plan

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

SEED = 20240611
TRIALS = 20  # random moments per signal
LAYERS = 20
ROWS, COLS = 1024, 1024  # 4 MiB of F32 per tensor; 2 tensors per layer = 160 MiB in all

# A tiny memory budget and many output shards make the run take about a second here, and fill it
# with distinct write/sync/rename points to be interrupted.
API_CHILD = """
import sys
import structprune
structprune.apply_plan(sys.argv[1], sys.argv[2], sys.argv[3], threads=2,
                       memory_budget="4KiB", max_shard_size="8MB", overwrite=sys.argv[4] == "1")
"""
CLI_CHILD = [sys.executable, "-m", "structprune", "apply", "-q", "--threads", "2", "--memory-budget", "4KiB", "--max-shard-size", "8MB"]


def build_input(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(SEED)
    tensors = {}
    for layer in range(LAYERS):
        tensors[f"layers.{layer}.up.weight"] = rng.standard_normal((ROWS, COLS), dtype=np.float32)
        tensors[f"layers.{layer}.down.weight"] = rng.standard_normal((COLS, ROWS), dtype=np.float32)
    names = list(tensors)
    model_dir = write_checkpoint(
        root / "in",
        tensors,
        shards=[names[: len(names) // 2], names[len(names) // 2 :]],
        config={"intermediate_size": ROWS},
        extra_files={"tokenizer.json": b"{}"},
    )
    keep = list(range(0, ROWS, 2))  # every other channel: strided gathers, not one memcpy
    entries = {}
    for layer in range(LAYERS):
        entries[f"layers.{layer}.up.weight"] = {"keep": {"0": "mlp"}}
        entries[f"layers.{layer}.down.weight"] = {"keep": {"1": "mlp"}}
    plan = plan_dict(entries, index_sets={"mlp": keep}, config={"intermediate_size": len(keep)})
    return model_dir, write_plan(root / "plan.json", plan)


def spawn(model_dir: Path, plan: Path, out: Path, overwrite: bool = False, cli: bool = False) -> subprocess.Popen[bytes]:
    if cli:
        command = CLI_CHILD + [str(model_dir), str(plan), "-o", str(out)] + (["--overwrite"] if overwrite else [])
    else:
        command = [sys.executable, "-c", API_CHILD, str(model_dir), str(plan), str(out), str(int(overwrite))]
    # A shell starts background jobs with SIGINT ignored, children inherit that, and Python then
    # installs no KeyboardInterrupt handler: the child gets Ctrl-C's default, as a user's would.
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def timed_child_run(model_dir: Path, plan: Path, out: Path) -> float:
    start = time.monotonic()
    child = spawn(model_dir, plan, out)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()
    return time.monotonic() - start


def check_complete_or_absent(out: Path, reference: dict[str, bytes]) -> bool:
    """True when the killed run's output exists: then it must equal the reference run."""
    if not out.exists():
        return False
    assert tree_bytes(out) == reference, "a killed run left an incomplete output"
    from safetensors.numpy import load_file

    for shard in read_checkpoint_raw(out).shards:
        load_file(str(out / shard))  # also loadable by the reference implementation
    return True


def stats(model_dir: Path) -> dict[str, tuple[int, int, int]]:
    """Size, modification time and inode of every input file: a cheap per-trial check that nothing
    touched the input (the test hashes it in full at the end)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(model_dir.iterdir())}


def kill_at_random_moment(child: subprocess.Popen[bytes], signum: int, delay: float) -> tuple[bool, int]:
    """Sends ``signum`` after ``delay`` seconds unless the child has finished; returns whether it
    was still running and its exit status."""
    time.sleep(delay)
    running = child.poll() is None
    if running:
        os.kill(child.pid, signum)
    child.communicate(timeout=60)
    return running, child.returncode


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float, dict[str, bytes]]:
    """(input, plan, duration of one run, the reference output's files), shared by the tests."""
    tmp_path = tmp_path_factory.mktemp("kill")
    model_dir, plan = build_input(tmp_path)
    # Two timed runs: the first one also warms the page cache, the faster one sets the scale.
    duration = min(timed_child_run(model_dir, plan, tmp_path / f"reference{i}") for i in range(2))
    reference = tree_bytes(tmp_path / "reference0")
    assert tree_bytes(tmp_path / "reference1") == reference
    shutil.rmtree(tmp_path / "reference1")
    return model_dir, plan, duration, reference


def test_sigkill_leaves_input_intact_and_output_absent_or_complete(tmp_path: Path, prepared: tuple[Path, Path, float, dict[str, bytes]], capfd: pytest.CaptureFixture[str]) -> None:
    model_dir, plan, duration, reference = prepared
    input_hashes, input_stats = tree_hashes(model_dir), stats(model_dir)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    rng = random.Random(SEED)
    killed_mid_run = leftovers_removed = 0
    for trial in range(TRIALS):
        # Spread the kill moments over the whole run (interpreter start-up included).
        running, _ = kill_at_random_moment(spawn(model_dir, plan, out), signal.SIGKILL, duration * (trial + rng.random()) / TRIALS)
        killed_mid_run += running
        assert stats(model_dir) == input_stats, f"trial {trial}: input modified"
        complete = check_complete_or_absent(out, reference)
        left_behind = [p.name for p in work.iterdir() if p.name.startswith(".out.structprune-")]
        capfd.readouterr()
        # A stale temp dir from the killed run must not block the next apply to the same path.
        structprune.apply_plan(model_dir, plan, out, max_shard_size="8MB", threads=2, overwrite=complete)
        assert tree_bytes(out) == reference, f"trial {trial}: re-run differs from reference"
        # The next run for a target removes the hidden leftovers of dead runs for that target, and says so.
        assert [p.name for p in work.iterdir()] == ["out"]
        message = capfd.readouterr().err
        for name in left_behind:
            assert f"removed {work / name}, left behind by an interrupted run" in message, message
        leftovers_removed += len(left_behind)
        shutil.rmtree(out)
    assert tree_hashes(model_dir) == input_hashes
    assert killed_mid_run >= TRIALS // 3, f"only {killed_mid_run} of {TRIALS} kills hit a running apply"
    assert leftovers_removed >= 1, "no kill left a staged directory to clean up"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_remove_the_staged_output(tmp_path: Path, prepared: tuple[Path, Path, float, dict[str, bytes]], signum: int) -> None:
    """The process ends (by the signal, or finishes first) and leaves nothing but a complete
    output: the staged directory goes with it. Every other trial runs the CLI."""
    model_dir, plan, duration, reference = prepared
    input_hashes, input_stats = tree_hashes(model_dir), stats(model_dir)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    rng = random.Random(SEED + signum)
    trials = TRIALS if signum == signal.SIGTERM else TRIALS // 4
    interrupted = 0
    for trial in range(trials):
        child = spawn(model_dir, plan, out, cli=trial % 2 == 1)
        running, status = kill_at_random_moment(child, signum, duration * (trial + rng.random()) / trials)
        # The API re-raises SIGTERM (and Python SIGINT) after cleaning up; the CLI exits 130 on
        # Ctrl-C, and Python 1 when it comes during its own start-up.
        assert status in ((0, -signum) if signum == signal.SIGTERM else (0, -signum, 1, 130)), f"trial {trial}: exit status {status}"
        interrupted += running and status != 0
        assert stats(model_dir) == input_stats, f"trial {trial}: input modified"
        complete = check_complete_or_absent(out, reference)
        assert [p.name for p in work.iterdir()] == (["out"] if complete else []), f"trial {trial}: staged data left behind"
        if complete:
            shutil.rmtree(out)
    assert tree_hashes(model_dir) == input_hashes
    assert interrupted >= trials // 4, f"only {interrupted} of {trials} signals interrupted a running apply"


def test_sigkill_during_overwrite_keeps_old_or_new(tmp_path: Path, prepared: tuple[Path, Path, float, dict[str, bytes]]) -> None:
    """Killing an --overwrite run leaves the previous output or the new one, never a mix."""
    model_dir, plan, duration, new = prepared
    work = tmp_path / "work"
    work.mkdir()
    # The "old" output: the identity plan, so old and new differ in every shard.
    structprune.apply_plan(model_dir, plan_dict(), tmp_path / "old", max_shard_size="8MB")
    old = tree_bytes(tmp_path / "old")
    rng = random.Random(SEED + 1)
    outcomes = {"old": 0, "new": 0, "absent": 0}
    trials = 5
    for trial in range(trials):
        out = work / "out"
        structprune.apply_plan(model_dir, plan_dict(), out, max_shard_size="8MB", overwrite=True)
        kill_at_random_moment(spawn(model_dir, plan, out, overwrite=True), signal.SIGKILL, duration * (trial + rng.random()) / trials)
        if not out.exists():
            # Only possible between moving the old output aside and moving the new one in.
            outcomes["absent"] += 1
            continue
        files = tree_bytes(out)
        assert files in (old, new), f"trial {trial}: output is neither the old nor the new one"
        outcomes["old" if files == old else "new"] += 1
    assert outcomes["old"] + outcomes["new"] >= 1, outcomes
