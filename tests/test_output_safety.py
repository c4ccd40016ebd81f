"""Never lose a user's data: an output that would touch the input is refused however it is spelled,
--overwrite replaces only an earlier structprune output or an empty directory, and only the
checkpoint's own regular files are read from a model directory (no FIFO, no directory link)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import structprune
from ckpt import plan_dict, tree_hashes, write_checkpoint, write_plan
from click.testing import CliRunner, Result
from structprune.cli import main
from structprune.errors import CheckpointError, OutputError, OutputExistsError

MARKER = ".structprune-output"
TENSORS = {"w": np.arange(12, dtype=np.float32).reshape(4, 3)}
KEEP_ROWS = plan_dict({"w": {"keep": {"0": [0, 2]}}})
# Spellings of the input directory `model` (relative to the working directory, tmp_path) that a
# plain string check misses: a missing directory and `..`, two of them, a link to the model.
SPELLINGS = ["newdir/../model", "a/b/../../model", "alias", "alias/../model", "./model/", "model/sub/.."]


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working directory, holding the checkpoint `model` and the link `alias` to it."""
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "model", TENSORS, config={"hidden_size": 3}, extra_files={"tokenizer.json": b"{}"})
    (tmp_path / "model" / "sub").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "model")
    write_plan(tmp_path / "plan.json", KEEP_ROWS)
    return tmp_path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_the_input_is_refused_through_the_api(workspace: Path, spelling: str, overwrite: bool) -> None:
    before = tree_hashes(workspace / "model")
    with pytest.raises(OutputError, match="outside the model directory"):
        structprune.apply_plan("model", KEEP_ROWS, spelling, overwrite=overwrite)
    assert tree_hashes(workspace / "model") == before
    assert entries(workspace) == ["alias", "model", "plan.json"], "nothing created, not even newdir"


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_output_that_is_the_input_is_refused_through_the_cli(workspace: Path, spelling: str) -> None:
    before = tree_hashes(workspace / "model")
    result = invoke("apply", "model", "plan.json", "-o", spelling, "--overwrite", "-q")
    assert result.exit_code == 1
    assert "outside the model directory" in result.stderr and str(workspace / "model") in result.stderr
    assert tree_hashes(workspace / "model") == before
    assert entries(workspace) == ["alias", "model", "plan.json"]


@pytest.mark.parametrize("spelling", ["model/new", "alias/new", "newdir/../model/sub", "..", "."])
def test_output_inside_or_containing_the_input_is_refused(workspace: Path, spelling: str) -> None:
    before = tree_hashes(workspace / "model")
    with pytest.raises(OutputError, match="outside the model directory"):
        structprune.apply_plan("alias", KEEP_ROWS, spelling, overwrite=True)
    assert tree_hashes(workspace / "model") == before


def test_output_through_a_bind_mount_is_refused(workspace: Path) -> None:
    """A bind mount shows the model under another path that no link resolves: only device and
    inode tell. Run in a private mount namespace, so nothing outside the test sees the mount."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces")
    (workspace / "mnt").mkdir()
    check = textwrap.dedent(
        """
        import sys, structprune
        try:
            structprune.apply_plan("model", sys.argv[1], "mnt/model/sub/..", overwrite=True)
        except structprune.OutputError as err:
            print(err)
            sys.exit(3)
        """
    )
    script = f'mount --bind "{workspace}" mnt && exec "{sys.executable}" -c \'{check}\' plan.json'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "outside the model directory" in result.stdout


def test_prune_recover_and_sweep_share_the_check(workspace: Path) -> None:
    """Each writer refuses the input as its output before any scoring, training or measuring."""
    (workspace / "text.txt").write_text("some text\n")
    commands = [
        ["prune", "model", "--ratio", "0.2", "--calib", "text.txt", "-o", "newdir/../model", "--overwrite"],
        ["recover", "model", "--data", "text.txt", "-o", "newdir/../model", "--overwrite"],
        ["sweep", "model", "--ratios", "0.2", "--importance", "l2", "--ppl", "text.txt", "-o", "newdir/../model", "--overwrite"],
    ]
    before = tree_hashes(workspace / "model")
    for command in commands:
        result = invoke(*command)
        assert result.exit_code == 1, (command, result.output)
        assert "outside the model directory" in result.stderr, (command, result.stderr)
    assert tree_hashes(workspace / "model") == before
    assert "newdir" not in entries(workspace)


def test_check_output_is_the_public_check(workspace: Path) -> None:
    assert structprune.check_output("model", "newdir/../out", overwrite=False) == workspace / "out"
    with pytest.raises(OutputError):
        structprune.check_output("model", "a/b/../../model", overwrite=True)


# ---------------------------------------------------------------------------------------------
# What --overwrite may replace


def test_overwrite_refuses_a_directory_of_other_files(workspace: Path) -> None:
    out = workspace / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError) as info:
        structprune.apply_plan("model", KEEP_ROWS, out, overwrite=True)
    assert not isinstance(info.value, OutputExistsError)
    assert MARKER in str(info.value) and "thesis.tex" in str(info.value) and "choose another output path" in str(info.value)
    assert (out / "thesis.tex").read_text() == "precious"
    assert entries(out) == ["thesis.tex"]
    result = invoke("apply", "model", "plan.json", "-o", "mine", "--overwrite", "-q")
    assert result.exit_code == 1 and "did not write" in result.stderr
    assert entries(workspace) == ["alias", "mine", "model", "plan.json"], "no staging left behind"


def test_overwrite_refuses_a_file_and_a_link(workspace: Path) -> None:
    (workspace / "notes").write_text("precious")
    (workspace / "link").symlink_to(workspace / "elsewhere")
    for name, what in [("notes", "not a directory"), ("link", "symbolic link")]:
        with pytest.raises(OutputError, match=what):
            structprune.apply_plan("model", KEEP_ROWS, name, overwrite=True)
    assert (workspace / "notes").read_text() == "precious"
    assert (workspace / "link").is_symlink() and not (workspace / "elsewhere").exists()


def test_overwrite_replaces_an_empty_directory_and_an_earlier_output(workspace: Path) -> None:
    (workspace / "out").mkdir()
    structprune.apply_plan("model", KEEP_ROWS, "out", overwrite=True)
    assert (workspace / "out" / MARKER).is_file()
    (workspace / "out" / "extra.txt").write_text("from an earlier run")
    structprune.apply_plan("model", plan_dict(), "out", overwrite=True)
    assert not (workspace / "out" / "extra.txt").exists()
    with pytest.raises(OutputExistsError):
        structprune.apply_plan("model", plan_dict(), "out")


def test_every_writer_marks_its_output(workspace: Path) -> None:
    """A recovered checkpoint (written by the shard writer) and a sweep's directory (Python code
    in the engine's staging) are marked like apply's output, so each can be overwritten."""
    staging = structprune._core.Staging(str(workspace / "swept"), str(workspace / "model"), False)
    (staging.path / "sweep.csv").write_text("x\n")
    staging.commit()
    assert entries(workspace / "swept") == [MARKER, "sweep.csv"]
    structprune._core.write_checkpoint(str(workspace / "written"), [], lambda i: b"", str(workspace / "model"), [], None, 1 << 30, False)
    assert MARKER in entries(workspace / "written")
    # The input's marker (an earlier output pruned again) is written anew, not copied or reported.
    report = structprune.apply_plan(workspace / "written", plan_dict(), "again")
    assert MARKER not in report.copied_files + report.skipped_files


# ---------------------------------------------------------------------------------------------
# Reading a model directory: regular files of the checkpoint only

CHILD = """
import sys, structprune
try:
    report = structprune.apply_plan(sys.argv[1], {"format": "structprune.cut-plan", "version": 1}, sys.argv[2])
except structprune.StructpruneError as err:
    print(type(err).__name__, err)
    sys.exit(3)
print("copied", report.copied_files, "skipped", report.skipped_files)
"""


def apply_in_child(model_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """apply in a subprocess with a timeout, so a regression that blocks on a FIFO fails the test."""
    return subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(out)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["pipe", "tokenizer_config.json", "model.safetensors"])
def test_a_fifo_is_refused_and_never_opened(tmp_path: Path, name: str) -> None:
    model_dir = write_checkpoint(tmp_path / "model", TENSORS, config={"hidden_size": 3})
    if name == "model.safetensors":
        (model_dir / name).unlink()
    os.mkfifo(model_dir / name)
    result = apply_in_child(model_dir, tmp_path / "out")
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith("ShardIndexError") and name in result.stdout and "FIFO" in result.stdout
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="FIFO"):
        structprune.read_checkpoint(model_dir) if name == "model.safetensors" else structprune.apply_plan(model_dir, plan_dict(), tmp_path / "out")


def test_a_directory_link_out_of_the_model_is_not_followed(tmp_path: Path) -> None:
    secrets = tmp_path / "credentials"
    secrets.mkdir()
    (secrets / "token.json").write_text('{"token": "secret"}')
    model_dir = write_checkpoint(tmp_path / "model", TENSORS, config={"hidden_size": 3}, extra_files={"tokenizer.json": b"{}"})
    (model_dir / "linked").symlink_to(secrets)
    (model_dir / "checkpoint-500").mkdir()
    (model_dir / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (model_dir / "run.log").write_text("not the model's")
    result = apply_in_child(model_dir, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    report = structprune.apply_plan(model_dir, plan_dict(), tmp_path / "out2")
    assert report.copied_files == ["config.json", "tokenizer.json"]
    assert report.skipped_files == ["checkpoint-500/", "linked/", "run.log"]
    for out in (tmp_path / "out", tmp_path / "out2"):
        assert entries(out) == [MARKER, "config.json", "model.safetensors", "tokenizer.json"]
    cli = invoke("apply", str(model_dir), str(write_plan(tmp_path / "plan.json", plan_dict())), "-o", str(tmp_path / "out3"))
    assert "not copied  checkpoint-500/, linked/, run.log" in cli.output


def test_files_linked_into_a_cache_are_copied(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot links every file to its blob store, outside the snapshot."""
    model_dir = write_checkpoint(tmp_path / "blobs-src", TENSORS, config={"hidden_size": 3}, extra_files={"tokenizer.json": b'{"t": 1}'})
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (snapshot / name).symlink_to(model_dir / name)
    report = structprune.apply_plan(snapshot, KEEP_ROWS, tmp_path / "out")
    assert report.copied_files == ["config.json", "tokenizer.json"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == b'{"t": 1}'
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


def test_a_plan_taking_a_tensor_from_a_fifo_is_refused(tmp_path: Path) -> None:
    """A plan may name any file as a tensor's source; a FIFO there must not block the engine."""
    model_dir = write_checkpoint(tmp_path / "model", TENSORS, config={"hidden_size": 3})
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    plan = write_plan(tmp_path / "plan.json", plan_dict({"w": {"replace": {"file": str(fifo), "tensor": "w"}}}))
    result = subprocess.run(
        [sys.executable, "-m", "structprune", "apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"), "-q"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and str(fifo) in result.stderr and "not a regular file" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_staging_leftovers_are_told_by_their_lock_not_their_process_id(workspace: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Runs in different PID namespaces (containers sharing a volume) see each other's process IDs as
    dead, or as someone else's: a staging directory is removed only when no process holds its lock."""
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    # A live run elsewhere, named after a process ID that is dead here.
    live = workspace / f".out.structprune-tmp-{dead_pid}-0"
    # A leftover named after a process ID that is alive here (this one).
    leftover = workspace / f".out.structprune-tmp-{os.getpid()}-999"
    for staged in (live, leftover):
        staged.mkdir()
        (staged / "model.safetensors").write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        capfd.readouterr()
        structprune.apply_plan(workspace / "model", KEEP_ROWS, workspace / "out")
        assert (live / "model.safetensors").read_bytes() == b"being written", "a live run's directory was removed"
        assert not leftover.exists()
        message = capfd.readouterr().err
        assert f"removed {leftover}, left behind by an interrupted run" in message and str(live) not in message, message
    finally:
        holder.kill()
        holder.wait()
    # Its holder died (SIGKILL): the lock went with it, and the next run removes the directory.
    structprune.apply_plan(workspace / "model", KEEP_ROWS, workspace / "out", overwrite=True)
    assert not live.exists()
    assert f"removed {live}, left behind by an interrupted run" in capfd.readouterr().err
    assert sorted(p.name for p in workspace.iterdir() if p.name.startswith(".out")) == []
