"""Applying a cut plan: the Python face of the Rust shard engine."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from structprune import _core
from structprune.io.checkpoint import TensorInfo
from structprune.errors import PlanError, SettingError
from structprune.plan.cut_plan import CutPlan, PlanLike
from structprune.models.sentence import module_folders
from structprune.models.shape_check import PLAN_WITHOUT_FILE, ShapeCheck, check_output_shapes, skipped
from structprune.io.sizes import parse_size
from structprune.io.termination import cleanup_on_sigterm

DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_MEMORY_BUDGET = "64MiB"
# The engine is bound by disk and page-cache copies; past four threads it only adds contention.
DEFAULT_THREADS = min(4, os.cpu_count() or 1)

ProgressCallback = Callable[[int, int], None]
_PathLike = Union[str, "PathLike[str]"]


@dataclass(frozen=True)
class ApplyReport:
    output_dir: Path
    tensors: int
    bytes_written: int
    total_size: int
    shards: List[str]
    copied_files: List[str]
    skipped_files: List[str]
    shape_check: ShapeCheck = skipped("not asked")
    """Whether the output's tensor shapes were checked against its config before writing."""


@dataclass(frozen=True)
class PlannedOutput:
    """What applying a plan would write (``structprune apply --dry-run``)."""

    tensors: List[TensorInfo]
    shards: List[str]
    total_size: int


def plan_output(model_dir: _PathLike, plan: PlanLike, *, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> PlannedOutput:
    """Validates ``plan`` against the checkpoint and describes the output, writing nothing. Errors
    in a plan given as a file name that file."""
    resolved, name = resolve_plan(plan)
    with naming_plan(name):
        raw = _core.plan_layout(str(model_dir), resolved.to_json(), parse_size(max_shard_size, what="max_shard_size"))
    tensors = [TensorInfo(n, d, tuple(s), f, b) for n, d, s, f, b in raw["tensors"]]
    return PlannedOutput(tensors=tensors, shards=list(raw["shards"]), total_size=raw["total_size"])


def check_output(model_dir: Optional[_PathLike], output_dir: _PathLike, *, overwrite: bool) -> Path:
    """The checks every writer (apply, prune, recover, sweep) makes before any work, so that hours
    of scoring or training do not end in a refusal: ``output_dir`` must not be, contain or lie
    inside ``model_dir`` however either is spelled (``..``, directories still to be made, symbolic
    links, bind mounts); an existing ``output_dir`` is refused without ``overwrite``, and with it
    unless it is an earlier structprune output (it holds ``.structprune-output``) or an empty
    directory. Returns the resolved output path. Raises :class:`~structprune.errors.OutputError`
    (:class:`~structprune.errors.OutputExistsError` for an existing output without ``overwrite``).
    """
    return _core.check_output(None if model_dir is None else str(model_dir), str(output_dir), overwrite)


def apply_plan(
    model_dir: _PathLike,
    plan: PlanLike,
    output_dir: _PathLike,
    *,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    memory_budget: Union[int, str] = DEFAULT_MEMORY_BUDGET,
    threads: Optional[int] = None,
    overwrite: bool = False,
    progress: Union[bool, ProgressCallback] = False,
    check_shapes: bool = True,
) -> ApplyReport:
    """Writes the checkpoint ``model_dir`` cut by ``plan`` to ``output_dir``.

    Memory stays within ``memory_budget`` whatever the checkpoint's size. The output appears only
    when complete (an error, Ctrl-C or SIGTERM leaves nothing; see :func:`check_output` for what
    may be replaced); the input is never modified; the same input and plan give byte-identical
    output. Only the checkpoint's own files are copied besides the weights (``skipped_files``
    lists what was left out), and a sentence-transformers checkpoint's module folders
    (``1_Pooling``…), inside the same commit. ``progress`` is ``True`` for a progress bar on stderr or a
    callable receiving ``(done_bytes, total_bytes)``.

    ``check_shapes``: before anything is written, build the model the output's config describes on
    the meta device and refuse (:class:`~structprune.errors.PlanError` naming the plan file and the
    first tensor that disagrees) unless every tensor has the shape it needs, so that the output
    loads (``structprune.models.shape_check``; skipped, with the reason in ``shape_check``, for an
    architecture transformers does not know). Imports torch and transformers when it runs.
    """
    thread_count = DEFAULT_THREADS if threads is None else threads
    if isinstance(thread_count, bool) or not isinstance(thread_count, int) or not 1 <= thread_count <= _core.MAX_THREADS:
        raise SettingError(f"threads (--threads): {thread_count!r} is not between 1 and {_core.MAX_THREADS}")
    resolved, name = resolve_plan(plan)
    shape_check = skipped("not asked (check_shapes=False, --no-shape-check)")
    if check_shapes:
        shape_check = check_plan_shapes(model_dir, resolved, name, max_shard_size=max_shard_size)
    arguments = (
        str(model_dir),
        resolved.to_json(),
        str(output_dir),
        parse_size(max_shard_size, what="max_shard_size"),
        parse_size(memory_budget, maximum=_core.MAX_MEMORY_BUDGET, what="memory_budget (--memory-budget)"),
        thread_count,
        overwrite,
    )
    # The engine copies the checkpoint's top-level files; a sentence-transformers checkpoint also
    # keeps its pooling (and other modules') settings in folders, committed with the weights.
    folders = module_folders(model_dir)
    with cleanup_on_sigterm(), naming_plan(name), _progress_reporter(progress) as report_progress:
        raw = _core.apply_plan(*arguments, progress=report_progress, folders=folders)
    return ApplyReport(
        output_dir=Path(raw["output_dir"]),
        tensors=raw["tensors"],
        bytes_written=raw["bytes_written"],
        total_size=raw["total_size"],
        shards=list(raw["shards"]),
        copied_files=list(raw["copied_files"]),
        skipped_files=list(raw["skipped_files"]),
        shape_check=shape_check,
    )


def write_checkpoint(
    output_dir: _PathLike,
    tensors: Sequence[Tuple[str, str, Sequence[int]]],
    read_tensor: Callable[[int], bytes],
    source_dir: _PathLike,
    *,
    includes: Sequence[Tuple[_PathLike, str]] = (),
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: Union[bool, ProgressCallback] = False,
) -> Path:
    """Writes tensors the caller holds as a checkpoint in the engine's layout and staging (what
    ``recover`` writes its merged weights with): ``tensors`` are ``(name, safetensors dtype,
    shape)`` in output order, ``read_tensor(i)`` gives tensor ``i``'s raw little-endian bytes, and
    ``source_dir``'s other files (config, tokenizer…) and ``includes`` (``(path, name inside the
    output)``) are copied beside them. The output appears only when complete; returns its path."""
    with cleanup_on_sigterm(), _progress_reporter(progress) as report_progress:
        raw = _core.write_checkpoint(
            str(output_dir), [(name, dtype, list(shape)) for name, dtype, shape in tensors], read_tensor, str(source_dir),
            [(str(path), name) for path, name in includes], None, parse_size(max_shard_size, what="max_shard_size"), overwrite,
            progress=report_progress,
        )
    return Path(raw["output_dir"])


def check_plan_shapes(model_dir: _PathLike, plan: PlanLike, plan_name: Optional[str] = None, *, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> ShapeCheck:
    """The shape check of :func:`apply_plan`, alone (``structprune apply --dry-run`` runs it):
    writes nothing."""
    resolved, name = resolve_plan(plan)
    name = plan_name or name
    with naming_plan(name):
        planned = plan_output(model_dir, resolved, max_shard_size=max_shard_size)
    return check_output_shapes(Path(model_dir), resolved.config, planned.tensors, plan_name=name)


def resolve_plan(plan: PlanLike) -> Tuple[CutPlan, str]:
    """The plan, read once, and how errors name it: its file, or "the plan"."""
    if isinstance(plan, CutPlan):
        return plan, PLAN_WITHOUT_FILE
    if isinstance(plan, Mapping):
        return CutPlan.from_dict(plan), PLAN_WITHOUT_FILE
    return CutPlan.load(plan), str(plan)


@contextmanager
def naming_plan(name: str) -> Iterator[None]:
    """The engine checks a plan against the checkpoint from its JSON text and names the tensor at
    fault; a plan read from a file is named too, so the user knows which file to fix."""
    try:
        yield
    except PlanError as err:
        if name == PLAN_WITHOUT_FILE or str(err).startswith(f"{name}:"):
            raise
        located = PlanError(f"{name}: {err}")
        located.path, located.tensor, located.field = name, err.tensor, err.field
        raise located from None


@contextmanager
def _progress_reporter(progress: Union[bool, ProgressCallback]) -> Iterator[Optional[ProgressCallback]]:
    """The engine's ``progress`` argument: the caller's callable, none, or (``True``) a byte bar on
    stderr, closed when the write ends."""
    if progress is not True:
        yield progress or None
        return
    from tqdm.auto import tqdm

    bars: List[tqdm] = []
    started = time.time()

    def update(done: int, total: int) -> None:
        # Created on the first report, so a run that fails validation prints no empty bar; its
        # clock starts with the copy, and the rate is the average since then (smoothing 0): a bar
        # created when the first report already counts megabytes showed rates of GB/s.
        if not bars:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", dynamic_ncols=True, smoothing=0)
            bar.start_t = bar.last_print_t = started
            bars.append(bar)
        bar = bars[0]
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()

