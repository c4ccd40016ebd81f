"""Resumable scoring: the scoring state is saved after every block, so that a run that was
interrupted (Ctrl-C, a kill, a lost machine) continues from the last finished block.

A resume directory holds the state of one scoring run::

    manifest.json        what the state was computed from: the model's files, the calibration batch,
                         the options that change scores, the number of processes
    rank-R/state-S.pt    process R's state after step S (the last two are kept)
    rank-R/activations/  process R's saved block inputs (BLOCK-MICROBATCH.pt)
    rank-R/lock          held while a process uses the directory

A *step* is one block of one pass, numbered in the order they run (``scoring`` says what a state
holds). Every file is written to a temporary sibling, flushed and renamed, so a state never refers to
data that is not whole on disk. With several processes, each saves its own state and waits for the
others after every step, so no process is more than one step ahead of another; a resumed run starts
from the latest step every process has. Once scoring finishes, the activations and older states are
removed and the final scores stay: a rerun with the same inputs (a different ``--ratio``, say) reads
them instead of scoring again.

State from a different run is never mixed in: a manifest that differs from this run's is refused,
naming what differs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, Type

import torch

from structprune.io.checkpoint import read_checkpoint
from structprune.score.distributed import SINGLE, Workers
from structprune.errors import ResumeError
from structprune.io.atomic import TEMPORARY_GLOB, write_json_atomically
from structprune.score.streaming import save_torch_atomically

# Bumped whenever what a state file holds changes, so that old state is refused rather than misread.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


def run_key(
    model_dir: Path,
    *,
    calibration_sha256: str,
    importance: str,
    seed: int,
    micro_batch: int,
    dtype: str,
    device: str,
    processes: int,
    kinds: Sequence[str],
    input_means: bool = False,
) -> Dict[str, Any]:
    """Everything the saved scoring state depends on: the structure ``kinds`` scored (hidden
    channels only when asked for) among them, and whether layer input means are recorded (bias
    compensation). The other planning options (ratio, protection, …) are not part of it: they only
    read the finished scores."""
    # Stated only when recorded, so that the directories of runs without means keep their names.
    means = {"input_means": True} if input_means else {}
    return {
        "format": FORMAT_VERSION,
        "model": model_identity(model_dir),
        "calibration_sha256": calibration_sha256,
        "importance": importance,
        "seed": seed,
        "micro_batch": micro_batch,
        "dtype": dtype,
        "device": torch.device(device).type,
        "processes": processes,
        "kinds": sorted(kinds),
        **means,
    }


def model_identity(model_dir: Path) -> Dict[str, Any]:
    """The checkpoint's location, config and weight files (size and modification time: hashing
    every byte of a large checkpoint would cost as much as reading it)."""
    model_dir = Path(model_dir).resolve()
    files = {}
    for shard in read_checkpoint(model_dir).shards:
        status = (model_dir / shard).stat()
        files[shard] = [status.st_size, status.st_mtime_ns]
    config = model_dir / "config.json"
    return {
        "path": str(model_dir),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "files": files,
    }


def default_directory(key: Dict[str, Any]) -> Path:
    """``$XDG_CACHE_HOME/structprune/resume/<hash of the key>`` (``~/.cache`` without XDG_CACHE_HOME):
    one directory per distinct scoring run, so runs never share state."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / "structprune" / "resume" / digest


class Journal:
    """This process's view of a resume directory (see the module docstring). Use it as a context
    manager: it holds a lock on the directory while open."""

    def __init__(self, directory: Path, key: Dict[str, Any], workers: Workers = SINGLE) -> None:
        self.directory = Path(directory)
        self.workers = workers
        self._rank_dir = self.directory / f"rank-{workers.rank}"
        self._refuse_inside_model(key)
        self._agree_on_manifest(key)
        try:
            self._rank_dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self._rank_dir / "lock", "w")
        except OSError as err:
            raise ResumeError(f"{self._rank_dir}: cannot be used as a resume directory ({err})") from err
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ResumeError(f"{self.directory}: another structprune process is using this resume directory") from None
        self._remove_interrupted_saves()

    def _remove_interrupted_saves(self) -> None:
        """Deletes the temporaries of saves a killed run never finished (``write_atomically`` removes its
        own on an exception, not on SIGKILL): with the lock held, no live process is writing them."""
        for folder in (self._rank_dir, self.activations):
            for leftover in folder.glob(TEMPORARY_GLOB) if folder.is_dir() else ():
                leftover.unlink(missing_ok=True)

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException], trace: Optional[TracebackType]) -> None:
        self.close()

    def close(self) -> None:
        if not self._lock.closed:
            self._lock.close()

    @property
    def activations(self) -> Path:
        """Where this process's block inputs are saved."""
        return self._rank_dir / "activations"

    def resume(self) -> Optional[Dict[str, Any]]:
        """The state of the latest step every process finished, or ``None`` to start afresh."""
        steps = self._steps()
        agreed = self.workers.minimum(steps[-1] if steps else 0)
        if agreed == 0:
            return None
        path = self._state_file(agreed)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a missing or unreadable file: the state cannot be used at all
            raise ResumeError(f"{path}: cannot read the saved scoring state ({err}); delete {self.directory} to start over") from err
        if state.get("step") != agreed:
            raise ResumeError(f"{path}: holds step {state.get('step')}, not {agreed}; delete {self.directory} to start over")
        return state

    def record(self, step: int, state: Dict[str, Any]) -> None:
        """Saves the state after ``step``; of the others only the one before it is kept."""
        save_torch_atomically({**state, "step": step}, self._state_file(step))
        earlier = [old for old in self._steps() if old < step]
        kept = {step, earlier[-1]} if earlier else {step}
        for old in self._steps():
            if old not in kept:
                self._state_file(old).unlink(missing_ok=True)
        self.workers.barrier()

    def finish(self, step: int, state: Dict[str, Any]) -> None:
        """Saves the final state, then removes what only an unfinished run needs."""
        self.record(step, state)
        shutil.rmtree(self.activations, ignore_errors=True)
        for old in self._steps():
            if old != step:
                self._state_file(old).unlink(missing_ok=True)

    def _steps(self) -> List[int]:
        return sorted(int(path.stem.split("-", 1)[1]) for path in self._rank_dir.glob("state-*.pt"))

    def _state_file(self, step: int) -> Path:
        return self._rank_dir / f"state-{step}.pt"

    def _refuse_inside_model(self, key: Dict[str, Any]) -> None:
        model = Path(key["model"]["path"])
        here = self.directory.resolve()
        if here == model or model in here.parents:
            raise ResumeError(f"resume directory {self.directory} is inside the model directory {model}, which is never modified")

    def _agree_on_manifest(self, key: Dict[str, Any]) -> None:
        """Process 0 checks (or writes) the manifest; the others learn whether it refused."""
        refusal: Optional[ResumeError] = None
        if self.workers.is_main:
            try:
                self._check_manifest(key)
            except ResumeError as err:
                refusal = err
        if self.workers.minimum(0 if refusal else 1) == 0:
            raise refusal or ResumeError(f"{self.directory}: process 0 refused this resume directory (see its error)")

    def _check_manifest(self, key: Dict[str, Any]) -> None:
        manifest = self.directory / MANIFEST
        if self.directory.exists() and not self.directory.is_dir():
            raise ResumeError(f"resume directory {self.directory} is a file")
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text())
            except (OSError, ValueError) as err:
                raise ResumeError(f"{manifest}: unreadable ({err}); delete {self.directory} to start over") from err
            if saved != key:
                raise ResumeError(f"{self.directory} holds scoring state of another run ({_differences(saved, key)}); delete it or choose another resume directory")
            return
        if self.directory.is_dir() and any(self.directory.iterdir()):
            raise ResumeError(f"{self.directory} is not empty and has no {MANIFEST}, so it is not a resume directory; choose a new or empty one")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomically(manifest, key, sort_keys=True)
        except OSError as err:
            raise ResumeError(f"{self.directory}: cannot be used as a resume directory ({err})") from err


def _differences(saved: Dict[str, Any], wanted: Dict[str, Any]) -> str:
    notes = []
    for name in sorted(set(saved) | set(wanted)):
        if saved.get(name) == wanted.get(name):
            continue
        if name == "model":
            notes.append("model: a different checkpoint, or its files changed")
        elif name == "calibration_sha256":
            notes.append("calibration: a different batch (text, samples, seq-len, seed or tokenizer)")
        else:
            notes.append(f"{name}: {saved.get(name)!r} there, {wanted.get(name)!r} here")
    return "; ".join(notes)
