"""Crash safety: SIGKILL an apply at random moments. The input must stay untouched, the output
must be absent or complete, and a later apply to the same path must succeed."""

from __future__ import annotations

import os
import random
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
TRIALS = 10
LAYERS = 6
ROWS, COLS = 1024, 1024  # 4 MiB of F32 per tensor; 2 tensors per layer = 48 MiB in all

# A tiny memory budget and several output shards make the run long enough (~0.2 s here), and
# full of distinct write/sync/rename points, to be interrupted mid-way.
CHILD = """
import sys
import structprune
structprune.apply_plan(sys.argv[1], sys.argv[2], sys.argv[3], threads=2,
                       memory_budget="4KiB", max_shard_size="8MB", overwrite=sys.argv[4] == "1")
"""


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


def spawn(model_dir: Path, plan: Path, out: Path, overwrite: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model_dir), str(plan), str(out), str(int(overwrite))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


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


def test_sigkill_leaves_input_intact_and_output_absent_or_complete(tmp_path: Path) -> None:
    model_dir, plan = build_input(tmp_path)
    input_hashes = tree_hashes(model_dir)
    work = tmp_path / "work"
    work.mkdir()
    # Two timed runs: the first one also warms the page cache, the faster one sets the scale.
    duration = min(timed_child_run(model_dir, plan, tmp_path / f"reference{i}") for i in range(2))
    reference = tree_bytes(tmp_path / "reference0")
    assert tree_bytes(tmp_path / "reference1") == reference

    rng = random.Random(SEED)
    killed_mid_run = 0
    for trial in range(TRIALS):
        out = work / f"out{trial}"
        # Spread the kill moments over the whole run (interpreter start-up included).
        delay = duration * (trial + rng.random()) / TRIALS
        child = spawn(model_dir, plan, out)
        time.sleep(delay)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            killed_mid_run += 1
        child.communicate(timeout=60)

        assert tree_hashes(model_dir) == input_hashes, f"trial {trial}: input modified"
        complete = check_complete_or_absent(out, reference)
        # A stale temp dir from the killed run must not block the next apply to the same path.
        structprune.apply_plan(model_dir, plan, out, max_shard_size="8MB", threads=2, overwrite=complete)
        assert tree_bytes(out) == reference, f"trial {trial}: re-run differs from reference"
        assert tree_hashes(model_dir) == input_hashes
        # The next run for a target removes the hidden leftovers of dead runs for that target.
        assert sorted(p.name for p in work.iterdir()) == sorted(f"out{t}" for t in range(trial + 1))
    assert killed_mid_run >= 3, f"only {killed_mid_run} of {TRIALS} kills hit a running apply"


def test_sigkill_during_overwrite_keeps_old_or_new(tmp_path: Path) -> None:
    """Killing an --overwrite run leaves the previous output or the new one, never a mix."""
    model_dir, plan = build_input(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    duration = timed_child_run(model_dir, plan, tmp_path / "new")
    new = tree_bytes(tmp_path / "new")
    # The "old" output: the identity plan, so old and new differ in every shard.
    structprune.apply_plan(model_dir, plan_dict(), tmp_path / "old", max_shard_size="8MB")
    old = tree_bytes(tmp_path / "old")
    rng = random.Random(SEED + 1)
    outcomes = {"old": 0, "new": 0, "absent": 0}
    for trial in range(TRIALS // 2):
        out = work / "out"
        structprune.apply_plan(model_dir, plan_dict(), out, max_shard_size="8MB", overwrite=True)
        child = spawn(model_dir, plan, out, overwrite=True)
        time.sleep(duration * (trial + rng.random()) / (TRIALS // 2))
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=60)
        if not out.exists():
            # Only possible between moving the old output aside and moving the new one in.
            outcomes["absent"] += 1
            continue
        files = tree_bytes(out)
        assert files in (old, new), f"trial {trial}: output is neither the old nor the new one"
        outcomes["old" if files == old else "new"] += 1
    assert outcomes["old"] + outcomes["new"] >= 1, outcomes
