"""Scoring split over processes (torchrun, gloo on CPU) equals scoring in one process.

The test launches this file under torchrun: run as a script, it is the worker side.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from structprune.score.distributed import Workers  # noqa: E402
from structprune.errors import DistributedError  # noqa: E402
from structprune.prune import PruneOptions, PruneResult, make_plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
# Five samples over two processes: an uneven split (2 and 3), which must not weigh them differently.
TAYLOR2 = PruneOptions(ratio=0.2, importance="taylor2", calib=CALIB, samples=5, seq_len=16, micro_batch=2, reconstruct=False)
WANDA = dataclasses.replace(TAYLOR2, importance="wanda-sp")
# The defaults: OBS selection and reconstruction to the dense model's outputs.
RECONSTRUCTED = PruneOptions(ratio=0.3, calib=CALIB, samples=5, seq_len=16, micro_batch=2)
CLI_ARGS = ["prune", str(DEMO), "--ratio", "0.2", "--importance", "taylor2", "--no-reconstruct", "--calib", str(CALIB), "--samples", "5", "--seq-len", "16", "--dry-run"]


def described(result: PruneResult) -> Dict[str, Any]:
    """A plan's JSON with every unit score added."""
    assert result.scores is not None
    return {**result.plan.to_dict(), "units": {str(sid): values.tolist() for sid, values in result.scores.units.items()}}


def assert_same_cut_and_scores(got: Dict[str, Any], want: Dict[str, Any]) -> None:
    """Same kept indices; scores equal up to the order of float additions."""
    assert got["tensors"] == want["tensors"] and got["index_sets"] == want["index_sets"]
    summary, wanted = got["metadata"]["scores"], want["metadata"]["scores"]
    assert summary.keys() == wanted.keys()
    if "calibration_loss" in wanted:
        assert summary["calibration_loss"] == pytest.approx(wanted["calibration_loss"], rel=1e-9)
    for kind, figures in wanted["per_kind"].items():
        for name, value in figures.items():
            assert summary["per_kind"][kind][name] == pytest.approx(value, rel=1e-6), (kind, name)
    np.testing.assert_allclose(summary["block_influence"], wanted["block_influence"], atol=2e-6)  # rounded to 6 digits
    for sid, values in want.get("units", {}).items():
        np.testing.assert_allclose(got["units"][sid], values, rtol=1e-6, atol=1e-12, err_msg=sid)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_processes_score_like_one(tmp_path: Path) -> None:
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    # Only process 0 reports (and writes the plan).
    assert launched.stdout.count("parameters  3,148,224 ->") == 1, launched.stdout

    from click.testing import CliRunner

    from structprune.cli import main

    single = CliRunner().invoke(main, [*CLI_ARGS, "--plan-out", str(tmp_path / "single.json")])
    assert single.exit_code == 0, single.output
    two, one = (json.loads((tmp_path / name).read_text()) for name in ("taylor2.json", "single.json"))
    assert_same_cut_and_scores(two, one)

    # Activation statistics (Wanda-sp) summed over processes: every process ends with the scores of one.
    reference = described(make_plan(DEMO, WANDA))
    for rank in (0, 1):
        assert_same_cut_and_scores(json.loads((tmp_path / f"wanda-{rank}.json").read_text()), reference)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_processes_reconstruct_like_one(tmp_path: Path) -> None:
    """Statistics summed over processes: the same units chosen and the same refitted weights as in
    one process, up to the order of float additions."""
    from safetensors.torch import load_file

    from structprune import apply_plan
    from structprune.plan.cut_plan import CutPlan

    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(tmp_path), "reconstruct"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    single = make_plan(DEMO, RECONSTRUCTED, reconstruction_dir=tmp_path / "single-weights")
    two = CutPlan.load(tmp_path / "reconstructed.json")
    assert two.index_sets == single.plan.index_sets
    assert {n: c.keep for n, c in two.tensors.items()} == {n: c.keep for n, c in single.plan.tensors.items()}
    assert two.metadata["reconstruction"]["layers"] == single.plan.metadata["reconstruction"]["layers"] > 0
    apply_plan(DEMO, two, tmp_path / "two")
    apply_plan(DEMO, single.plan, tmp_path / "one")
    got, want = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_shares_cover_every_sample_once() -> None:
    for samples in (2, 5, 8):
        for world_size in (1, 2, 3):
            if samples < world_size:
                continue
            shares = [Workers(rank=r, world_size=world_size).share(samples) for r in range(world_size)]
            assert [i for share in shares for i in range(samples)[share]] == list(range(samples))
            sizes = [share.stop - share.start for share in shares]
            assert max(sizes) - min(sizes) <= 1


def test_what_cannot_be_split_is_refused() -> None:
    with pytest.raises(DistributedError, match="--samples 1 cannot be split over 2 processes"):
        Workers(rank=1, world_size=2).share(1)
    with pytest.raises(DistributedError, match="pass --device cuda"):
        Workers(rank=1, world_size=2, local_rank=1).compute_device("cuda:0")
    assert Workers(rank=1, world_size=2, local_rank=1).compute_device("cuda") == "cuda:1"
    assert Workers(rank=1, world_size=2, local_rank=1).compute_device("cpu") == "cpu"


def run_worker(out: Path, task: str) -> None:
    """One torchrun process: Wanda-sp through the library, then taylor2 through the CLI; or
    (``reconstruct``) the default OBS selection and reconstruction, whose plan process 0 saves."""
    from structprune.cli import main
    from structprune.score.distributed import joined

    with joined("cpu") as workers:
        if task == "reconstruct":
            result = make_plan(DEMO, RECONSTRUCTED, workers=workers, reconstruction_dir=out / "weights")
            if workers.is_main:
                result.plan.save(out / "reconstructed.json")
            return
        result = make_plan(DEMO, WANDA, workers=workers)
        (out / f"wanda-{workers.rank}.json").write_text(json.dumps(described(result)))
        main([*CLI_ARGS, "--plan-out", str(out / "taylor2.json")], standalone_mode=False)


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "score")
