"""Resumable scoring: an interrupted run continues from its last finished block and ends with
exactly the scores and plan of an uninterrupted one; state of another run is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from structprune.score.distributed import Workers  # noqa: E402
from structprune.errors import ResumeError  # noqa: E402
from structprune.prune import PruneOptions, PruneResult, make_plan  # noqa: E402
from structprune.score.journal import Journal, default_directory, run_key  # noqa: E402
from structprune.score.streaming import StreamedModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
BLOCKS = 6  # the demo model's depth
TAYLOR2 = PruneOptions(ratio=0.2, importance="taylor2", calib=CALIB, samples=3, seq_len=16, micro_batch=2, reconstruct=False)
WANDA = dataclasses.replace(TAYLOR2, importance="wanda-sp")


@pytest.fixture(scope="module")
def uninterrupted() -> Dict[str, PruneResult]:
    return {options.importance: make_plan(DEMO, options) for options in (TAYLOR2, WANDA)}


@pytest.fixture
def loaded_blocks(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Every block index whose weights are loaded, in order: the blocks a run computes."""
    loads: List[int] = []
    load_block = StreamedModel.load_block

    def counting(self: StreamedModel, index: int) -> None:
        loads.append(index)
        load_block(self, index)

    monkeypatch.setattr(StreamedModel, "load_block", counting)
    return loads


def interrupt_after(stage: str, blocks: int) -> Callable[[str, int, int], None]:
    def progress(current: str, done: int, total: int) -> None:
        if current == stage and done == blocks:
            raise KeyboardInterrupt

    return progress


def assert_same_result(got: PruneResult, want: PruneResult) -> None:
    assert got.plan.to_dict() == want.plan.to_dict()  # kept indices and the score summary in its metadata
    assert got.scores is not None and want.scores is not None
    assert got.scores.loss == want.scores.loss
    assert np.array_equal(got.scores.block_influence, want.scores.block_influence)
    assert got.scores.units.keys() == want.scores.units.keys()
    for sid, values in want.scores.units.items():
        assert np.array_equal(got.scores.units[sid], values), sid
    for sid, values in want.scores.per_group.items():
        assert np.array_equal(got.scores.per_group[sid], values), sid


def test_run_interrupted_in_the_backward_pass_continues_there(tmp_path: Path, uninterrupted: Dict[str, PruneResult], loaded_blocks: List[int]) -> None:
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        make_plan(DEMO, TAYLOR2, resume=state, progress=interrupt_after("backward", 4))
    assert loaded_blocks == [*range(BLOCKS), 5, 4, 3, 2]
    loaded_blocks.clear()
    resumed = make_plan(DEMO, TAYLOR2, resume=state)
    assert loaded_blocks == [1, 0]  # only the two blocks whose backward had not finished
    assert_same_result(resumed, uninterrupted["taylor2"])
    assert not (state / "rank-0" / "activations").exists()
    assert [p.name for p in (state / "rank-0").glob("state-*.pt")] == [f"state-{2 * BLOCKS + 1}.pt"]

    # Finished scores are reused: planning for another ratio scores nothing again.
    loaded_blocks.clear()
    replanned = make_plan(DEMO, dataclasses.replace(TAYLOR2, ratio=0.3), resume=state)
    assert loaded_blocks == []
    assert replanned.scores is not None and replanned.scores.loss == resumed.scores.loss
    assert replanned.params_after < resumed.params_after


def test_run_interrupted_in_the_forward_pass_continues_there(tmp_path: Path, uninterrupted: Dict[str, PruneResult], loaded_blocks: List[int]) -> None:
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        make_plan(DEMO, WANDA, resume=state, progress=interrupt_after("forward", 3))
    assert sorted(p.name for p in (state / "rank-0").glob("state-*.pt")) == ["state-2.pt", "state-3.pt"]
    loaded_blocks.clear()
    resumed = make_plan(DEMO, WANDA, resume=state)
    assert loaded_blocks == [3, 4, 5]
    assert_same_result(resumed, uninterrupted["wanda-sp"])


def test_bonsai_interrupted_between_blocks_continues_there_and_its_scores_are_reused(tmp_path: Path, loaded_blocks: List[int]) -> None:
    bonsai = dataclasses.replace(TAYLOR2, importance="bonsai")
    uninterrupted = make_plan(DEMO, bonsai)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        make_plan(DEMO, bonsai, resume=state, progress=interrupt_after("perturb", 2))
    inputs_left = {p.name.split("-")[0] for p in (state / "rank-0" / "activations").glob("*.pt")}
    assert inputs_left == {"2"}  # only the next block's inputs (every sub-model's) are kept
    loaded_blocks.clear()
    resumed = make_plan(DEMO, bonsai, resume=state)
    assert loaded_blocks == [2, 3, 4, 5]
    assert_same_result(resumed, uninterrupted)
    assert not (state / "rank-0" / "activations").exists()

    loaded_blocks.clear()
    replanned = make_plan(DEMO, dataclasses.replace(bonsai, ratio=0.3), resume=state)
    assert loaded_blocks == []
    assert replanned.params_after < resumed.params_after


def key(**changes: object) -> Dict[str, object]:
    fields = {"calibration_sha256": "0" * 64, "importance": "taylor", "seed": 0, "micro_batch": 4, "dtype": "float32", "device": "cpu", "processes": 1, "kinds": ["channels", "heads"]}
    fields.update(changes)
    return run_key(DEMO, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"importance": "taylor2"}, "importance: 'taylor' there, 'taylor2' here"),
        ({"calibration_sha256": "1" * 64}, "calibration: a different batch"),
        ({"processes": 2}, "processes: 1 there, 2 here"),
        ({"micro_batch": 1}, "micro_batch: 4 there, 1 here"),
    ],
)
def test_state_of_another_run_is_refused(tmp_path: Path, changes: Dict[str, object], named: str) -> None:
    with Journal(tmp_path / "state", key()):
        pass
    with pytest.raises(ResumeError, match="holds scoring state of another run") as refused:
        Journal(tmp_path / "state", key(**changes))
    assert named in str(refused.value)


def test_changed_model_files_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Journal(state, key()):
        pass
    manifest = json.loads((state / "manifest.json").read_text())
    manifest["model"]["files"]["model.safetensors"][1] -= 1  # as if the weights were rewritten since
    (state / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResumeError, match="model: a different checkpoint, or its files changed"):
        Journal(state, key())


def test_unusable_directories_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError, match="not empty and has no manifest.json"):
        Journal(tmp_path, key())
    with pytest.raises(ResumeError, match="inside the model directory"):
        Journal(DEMO / "state", key())
    assert not (DEMO / "state").exists()
    with Journal(tmp_path / "state", key()):
        with pytest.raises(ResumeError, match="another structprune process is using"):
            Journal(tmp_path / "state", key())


def test_default_directory_is_keyed_by_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = default_directory(key())
    assert first.parent == tmp_path / "structprune" / "resume"
    assert first == default_directory(key()) and first != default_directory(key(seed=1))


class PeerWorkers(Workers):
    """Process 0 of two, whose peer contributes the given values to the collectives in turn."""

    def __init__(self, *peer_values: int) -> None:
        super().__init__(rank=0, world_size=2)
        object.__setattr__(self, "peer_values", list(peer_values))

    def minimum(self, value: int) -> int:
        return min(value, self.peer_values.pop(0))  # type: ignore[attr-defined]

    def barrier(self) -> None:
        pass


MANIFEST_ACCEPTED = 1  # what a process contributes when it accepts the manifest


def test_processes_resume_from_the_latest_step_they_all_finished(tmp_path: Path) -> None:
    # Steps need not be consecutive: without gradients the forward pass's last block (B) is followed by the end (2B + 1).
    with Journal(tmp_path, key(processes=2), PeerWorkers(MANIFEST_ACCEPTED)) as journal:
        for step in (5, 6, 13):
            journal.record(step, {"marker": torch.tensor([step])})
    assert sorted(p.name for p in (tmp_path / "rank-0").glob("state-*.pt")) == ["state-13.pt", "state-6.pt"]
    # This process got one step further than its peer before the interruption: both go back.
    with Journal(tmp_path, key(processes=2), PeerWorkers(MANIFEST_ACCEPTED, 6)) as journal:
        state = journal.resume()
    assert state is not None and state["step"] == 6 and state["marker"].item() == 6
    with Journal(tmp_path, key(processes=2), PeerWorkers(MANIFEST_ACCEPTED, 0)) as journal:
        assert journal.resume() is None


def test_cli_resume_dir(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from structprune.cli import main

    runner = CliRunner()
    common = ["prune", str(DEMO), "--ratio", "0.2", "--importance", "taylor", "--calib", str(CALIB), "--samples", "2", "--seq-len", "16", "--dry-run", "--resume-dir", str(tmp_path / "state")]
    first = runner.invoke(main, [*common, "--plan-out", str(tmp_path / "first.json")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(main, [*common, "--plan-out", str(tmp_path / "again.json")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "first.json").read_text() == (tmp_path / "again.json").read_text()
    other = runner.invoke(main, [*common, "--importance", "taylor-vector"])
    assert other.exit_code == 1
    assert "holds scoring state of another run (importance: 'taylor' there, 'taylor-vector' here)" in other.output


def test_temporaries_of_saves_a_killed_run_left_are_removed_when_the_directory_is_opened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with Journal(state, key()) as journal:
        journal.record(1, {"loss": 1.0})
        journal.activations.mkdir()
    # What SIGKILL in the middle of write_atomically leaves behind (no exception handler runs).
    leftovers = [state / "rank-0" / ".state-2.pt.tmp-4242", state / "rank-0" / "activations" / ".3-1.pt.tmp-4242"]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    with Journal(state, key()) as journal:
        assert not any(leftover.exists() for leftover in leftovers)
        assert journal.resume() is not None and (state / "rank-0" / "state-1.pt").is_file()
