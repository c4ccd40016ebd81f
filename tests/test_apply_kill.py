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
TRIALS = 6
LAYERS = 6
ROWS, COLS = 1024, 1024  # 4 MiB of F32 per tensor; 2 tensors per layer = 48 MiB in all

# The child writes to its own output; small memory budget and several output shards make the
# run long enough, and full of distinct write/rename points, to be interrupted mid-way.
CHILD = """
import sys
import structprune
structprune.apply_plan(sys.argv[1], sys.argv[2], sys.argv[3], threads=2,
                       memory_budget="64KiB", max_shard_size="8MB")
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


def spawn(model_dir: Path, plan: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model_dir), str(plan), str(out)],
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
    ref_out = tmp_path / "reference"
    duration = timed_child_run(model_dir, plan, ref_out)
    reference = tree_bytes(ref_out)

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
    assert killed_mid_run >= TRIALS // 2, f"only {killed_mid_run} of {TRIALS} kills hit a running apply"
