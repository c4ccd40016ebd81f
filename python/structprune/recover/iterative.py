"""``structprune prune --iterations K``: the ratio removed in K steps, each pruning the model the
step before left (scored again), with a short LoRA recovery between steps.

Why: scores are measured on the model as it is. Removing everything at once ranks the last units by
scores of a model that still had all the others; removing part, recovering briefly and scoring
again lets each step see what the earlier ones removed (LLM-Pruner's iterative schedule, LoRAShear's
progressive pruning with recovery in between).

Schedule: ``ratio`` stays the fraction of the *original* model's parameters removed. After step k
of K the model should hold ``P0 · (1 − ratio · k / K)`` parameters, so step k prunes
``1 − that / P(k−1)`` of the model it is given (``P(k−1)``: that model's parameters, read from its
headers); every step's rounding is absorbed by the next, and the last aims at the overall target
exactly. Kept widths round to the multiple resolved once from the original model, and ``--blocks
N`` is spread over the steps, so the steps add up to one prune's request.

Work directory: ``.OUT.structprune-iterative/`` beside the output (same file system), holding
``step-k/pruned`` and ``step-k/recovered`` (stock checkpoints), with ``--resume`` the scoring
journal of each step in ``step-k/scores``, and ``progress.json``: a fingerprint of the inputs and
every finished step. A checkpoint is written atomically before ``progress.json`` names it, so a
rerun with ``resume`` continues after the last finished step (or half step: a prune whose recovery
did not finish). Only the model the next step needs is kept. The directory is removed once OUT is
written; an earlier run's directory is removed when not resuming, or when its fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from structprune.apply import apply_plan, check_output
from structprune.io.checkpoint import read_checkpoint
from structprune.score.distributed import current
from structprune.errors import DistributedError, OutputError, PlanError, RecoveryError
from structprune.tracing.graph import trace
from structprune.models.loading import load_tokenizer
from structprune.prune import Progress, PruneOptions, PruneResult, default_multiple, make_plan, reconstruction_work_dir
from structprune.io.atomic import write_json_atomically
from structprune.recover.training import RecoverOptions, check_options, load_training_data, recover
from structprune.score.importance import ESTIMATORS
from structprune.score.journal import model_identity

PathLike = Union[str, "os.PathLike[str]"]
Announce = Callable[[str], None]

REPORT_FILE = "iterative-pruning.json"
"""Written into the output: the schedule each step followed (nothing machine-dependent, so two runs
with the same inputs give the same bytes; step times are in :class:`IterativeResult`)."""
_PROGRESS_FILE = "progress.json"
# Bumped whenever progress.json changes meaning, so that an older run's work directory is not misread.
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class IterativeOptions:
    """How ``prune --iterations`` splits the work (the CLI's flags, with the same defaults)."""

    iterations: int = 1
    recover_steps: int = 0
    """LoRA optimizer steps on each intermediate model (none after the last step); 0: the steps
    only score again."""
    recover_data: Optional[Path] = None
    """Training text for those steps; ``None``: the calibration text."""
    distill: bool = True
    """Distil from the input (dense) model rather than train on the LM loss: it recovered far more
    where training sees little data (docs/architecture.md, Recovery), as a few steps between
    prunes do."""
    recover_lr: float = RecoverOptions.lr
    recover_batch_size: int = RecoverOptions.batch_size


@dataclass(frozen=True)
class RecoveryRecord:
    steps: int
    losses: List[float]
    """Mean token loss of every optimizer step."""
    seconds: float


@dataclass(frozen=True)
class StepRecord:
    step: int
    ratio: float
    """Fraction of the model this step was given that it removed (as asked of the planner)."""
    params_before: int
    params_after: int
    seconds: float
    """Scoring, planning and reconstruction, as ``PruneResult.seconds`` (not writing; the recovery
    after it is timed in ``recovery``)."""
    recovery: Optional[RecoveryRecord] = None


@dataclass
class IterativeResult:
    output_dir: Path
    params_before: int
    params_after: int
    steps: List[StepRecord]
    final: PruneResult
    """The last step's result: its plan, widths and apply report."""
    resumed_steps: int
    """Steps an earlier run had finished (pruned, and recovered where asked)."""
    seconds: float

    @property
    def removed_fraction(self) -> float:
        return 1 - self.params_after / self.params_before


def check_request(options: PruneOptions, iterative: IterativeOptions) -> None:
    """Refuses, before any work, what the steps cannot do: every intermediate model is traced again,
    which works for stock checkpoints only, and recovery needs text to train on."""
    if iterative.iterations < 1:
        raise PlanError(f"--iterations must be at least 1, got {iterative.iterations}")
    if iterative.recover_steps < 0:
        raise PlanError(f"--recover-steps must be at least 0, got {iterative.recover_steps}")
    if iterative.recover_steps and iterative.iterations == 1:
        raise PlanError("--recover-steps recovers between the steps of --iterations K: pass K > 1")
    if iterative.recover_data is not None and not iterative.recover_steps:
        raise PlanError("--recover-data is training text for --recover-steps N: pass N > 0")
    if iterative.recover_steps and iterative.recover_data is None and options.calib is None:
        raise PlanError("--recover-steps needs training text: pass --recover-data FILE (or --calib, its default)")
    if iterative.iterations == 1:
        return
    # Tracing reads stock configs only, so an intermediate model in another format cannot be pruned again.
    if options.planning == "global":
        raise PlanError("--iterations K > 1 needs --uniform planning: --global writes per-layer widths, which the next step cannot trace")
    if options.layout not in ("auto", "stock"):
        raise PlanError(f"--iterations K > 1 needs stock intermediate checkpoints: --format {options.layout} cannot be pruned again")
    if options.protect not in (None, (0, 0)):
        raise PlanError("--iterations K > 1 needs stock intermediate checkpoints: --protect leaves layers wider than the others")
    if tuple(options.structures) == ("blocks",):
        # The planner removes at least one block per call, so K steps could remove K blocks where one is asked.
        raise PlanError(
            "--iterations K > 1 with --structures blocks alone: every step removes at least one whole block, which overshoots small "
            "ratios; combine blocks with widths (--structures heads,mlp,blocks --blocks N spreads the N blocks over the steps)"
        )


def prune_iteratively(
    model_dir: PathLike,
    output_dir: PathLike,
    options: PruneOptions,
    iterative: IterativeOptions,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: Optional[Progress] = None,
    progress_bars: bool = False,
    announce: Optional[Announce] = None,
) -> IterativeResult:
    """Removes ``options.ratio`` of the parameters of ``model_dir`` in ``iterative.iterations``
    steps (see the module doc) and writes the result to ``output_dir``, atomically.

    ``resume``: continue an interrupted run from its work directory (and each step's scoring from
    its journal); without it an earlier run's work directory is removed. ``progress``: the per-block
    callback of :func:`structprune.prune.make_plan`; ``progress_bars``: recovery's and writing's
    bars; ``announce``: a line for every step and for work-directory decisions (default: stderr)."""
    started = time.perf_counter()
    model, output = Path(model_dir), Path(output_dir)
    say = announce or _to_stderr
    check_output(model, output, overwrite=overwrite)  # before any step, not after them
    check_request(options, iterative)
    if current().world_size > 1 or int(os.environ.get("WORLD_SIZE") or 1) > 1:
        raise DistributedError("--iterations K > 1 runs in one process: start it without torchrun")
    work = WorkDir(output)
    work.refuse_holding(model)
    recovery = _recovery_options(model, options, iterative)
    original = read_checkpoint(model).parameters
    # Resolved once: the default depends on the MLP width, which the steps shrink.
    steps_options = replace(options, multiple=options.multiple or default_multiple(trace(model)))
    records = work.start(_fingerprint(model, options, iterative), resume=resume, announce=say)
    keeps_adapters = recovery is not None and ESTIMATORS[options.importance].adapts
    resumed = sum(1 for r in records if recovery is None or r.recovery is not None)

    def begin(step: int) -> Tuple[Path, PruneOptions]:
        """The model step ``step`` prunes, and its options (the fraction of that model it removes)."""
        source = model if step == 1 else work.model_after(step - 1, recovered=recovery is not None)
        ratio = _step_ratio(original, source, options.ratio, step, iterative.iterations)
        say(f"step {step}/{iterative.iterations}: pruning {ratio:.1%} of the current model")
        # lora-grad reads the gradients of the adapters the recovery before this step trained.
        adapter = work.adapter(step - 1) if keeps_adapters and step > 1 else options.lora_adapter
        return source, replace(steps_options, ratio=ratio, blocks=_step_blocks(options.blocks, step, iterative.iterations), lora_adapter=adapter)

    try:
        for step in range(1, iterative.iterations):
            if step > len(records):
                source, step_options = begin(step)
                result = _prune_step(source, work.pruned(step), step_options, overwrite=True, journal=work.scores(step) if resume else None, progress=progress)
                records.append(_record(step, step_options.ratio, result))
                work.save(records)
                shutil.rmtree(work.scores(step), ignore_errors=True)  # it only resumes this step's scoring
                work.drop_step(step - 1)
            if recovery is not None and records[step - 1].recovery is None:
                say(f"step {step}/{iterative.iterations}: recovering for {iterative.recover_steps} steps" + (f" (distilled from {model})" if iterative.distill else ""))
                trained = _recover_step(work.pruned(step), work.recovered(step), recovery, progress_bars, keep_adapter=work.adapter(step) if keeps_adapters else None)
                records[step - 1] = replace(records[step - 1], recovery=trained)
                work.save(records)
                shutil.rmtree(work.pruned(step))
        last = iterative.iterations
        source, last_options = begin(last)

        def report(result: PruneResult) -> Dict[str, str]:
            finished = records + [_record(last, last_options.ratio, result)]
            return {REPORT_FILE: json.dumps(_report(model, options, iterative, original, finished), indent=1) + "\n"}

        final = _prune_step(
            source, output, last_options, overwrite=overwrite, journal=work.scores(last) if resume else None, progress=progress,
            apply_progress=progress_bars, files=report,
        )
    except BaseException:
        if records:
            say(f"kept {work.root} ({len(records)} of {iterative.iterations} steps done): rerun with --resume to continue from there")
        raise
    shutil.rmtree(work.root, ignore_errors=True)
    return IterativeResult(
        output_dir=output, params_before=original, params_after=final.params_after, steps=records + [_record(last, last_options.ratio, final)],
        final=final, resumed_steps=resumed, seconds=time.perf_counter() - started,
    )


def step_target(original: int, ratio: float, step: int, iterations: int) -> float:
    """Parameters the model should hold after ``step`` of ``iterations``: the ratio in equal parts
    of the original model."""
    return original * (1 - ratio * step / iterations)


def _step_ratio(original: int, source: Path, ratio: float, step: int, iterations: int) -> float:
    """The fraction of ``source`` that step ``step`` removes to reach its target."""
    before = read_checkpoint(source).parameters
    target = step_target(original, ratio, step, iterations)
    if before <= target:
        raise PlanError(
            f"step {step}: the model already holds {before:,} parameters, no more than this step's target of {target:,.0f} "
            f"(the widths of the steps before rounded past it): use fewer --iterations or a smaller --multiple"
        )
    return 1 - target / before


def _step_blocks(blocks: Optional[int], step: int, iterations: int) -> Optional[int]:
    """This step's share of ``--blocks N``, so that all steps together remove N blocks."""
    if blocks is None:
        return None
    return blocks * step // iterations - blocks * (step - 1) // iterations


def _prune_step(
    source: Path,
    output: Path,
    options: PruneOptions,
    *,
    overwrite: bool,
    journal: Optional[Path],
    progress: Optional[Progress],
    apply_progress: bool = False,
    files: Optional[Callable[[PruneResult], Dict[str, str]]] = None,
) -> PruneResult:
    """One ``structprune.prune.prune`` of ``source``, with ``files`` (made from the result) written
    into the output: the report, which must be inside the atomic output to be trusted."""
    with reconstruction_work_dir(output, options) as reconstruction_dir:
        result = make_plan(source, options, progress=progress, resume=journal or False, reconstruction_dir=reconstruction_dir)
        if files is not None:
            result.plan.files.update(files(result))
        result.report = apply_plan(source, result.plan, output, overwrite=overwrite, progress=apply_progress)
    return result


def _record(step: int, ratio: float, result: PruneResult) -> StepRecord:
    return StepRecord(step=step, ratio=ratio, params_before=result.params_before, params_after=result.params_after, seconds=result.seconds)


def _recovery_options(model: Path, options: PruneOptions, iterative: IterativeOptions) -> Optional[RecoverOptions]:
    """What recovers every intermediate model (``None`` without recovery), checked now, with its
    data, so that a bad option or too little text is not found after the first step's work."""
    if not iterative.recover_steps:
        return None
    data = iterative.recover_data or options.calib
    assert data is not None  # check_request refused recovery without text
    recovery = RecoverOptions(
        data=data, text_field=options.text_field, seq_len=options.seq_len, max_steps=iterative.recover_steps,
        batch_size=iterative.recover_batch_size, lr=iterative.recover_lr, seed=options.seed,
        # accelerate places a single process on its own CUDA device (CUDA_VISIBLE_DEVICES picks it).
        device="cuda" if options.device.startswith("cuda") else "cpu",
        teacher=model if iterative.distill else None,
    )
    check_options(recovery)
    examples = len(load_training_data(data, load_tokenizer(model), seq_len=options.seq_len, text_field=options.text_field))
    if examples < recovery.batch_size:
        raise RecoveryError(
            f"{data}: {examples} training examples of {options.seq_len} tokens, fewer than one recovery batch of {recovery.batch_size} "
            f"(--recover-batch-size)"
        )
    return recovery


def _recover_step(pruned: Path, recovered: Path, options: RecoverOptions, progress_bars: bool, *, keep_adapter: Optional[Path]) -> RecoveryRecord:
    """Recovers ``pruned`` into ``recovered``, leaving a plain checkpoint: the next step would copy
    ``recovery.json`` (about this intermediate model, soon deleted) into its output. The adapter is
    moved to ``keep_adapter`` when given (``lora-grad`` reads its gradients next), else deleted."""
    result = recover(pruned, recovered, options, overwrite=True, progress=progress_bars)
    (recovered / "recovery.json").unlink()
    if keep_adapter is not None:
        shutil.rmtree(keep_adapter, ignore_errors=True)
        (recovered / "adapter").rename(keep_adapter)
    else:
        shutil.rmtree(recovered / "adapter")
    return RecoveryRecord(steps=result.steps, losses=result.losses, seconds=result.seconds)


def _report(model: Path, options: PruneOptions, iterative: IterativeOptions, original: int, steps: List[StepRecord]) -> Dict[str, Any]:
    """iterative-pruning.json: the request and what every step removed and trained."""
    return {
        "model": str(model),
        "ratio": options.ratio,
        "iterations": iterative.iterations,
        "recovery": None if not iterative.recover_steps else {
            "steps": iterative.recover_steps, "data": str(iterative.recover_data or options.calib), "distill": iterative.distill,
            "lr": iterative.recover_lr, "batch_size": iterative.recover_batch_size,
        },
        "params": {"before": original, "target": round(original * (1 - options.ratio)), "after": steps[-1].params_after},
        "steps": [
            {
                "step": s.step, "ratio": s.ratio, "params_before": s.params_before, "params_after": s.params_after,
                "recovery_losses": None if s.recovery is None else s.recovery.losses,
            }
            for s in steps
        ],
    }


def _fingerprint(model: Path, options: PruneOptions, iterative: IterativeOptions) -> str:
    """Identifies the run a work directory belongs to: the input model's files, the options and the
    text files' sizes and times (a changed file must not continue a run made from the old one)."""
    texts = {str(path): _text_identity(Path(path)) for path in (options.calib, iterative.recover_data) if path is not None}
    described = {"model": model_identity(model), "options": asdict(options), "iterative": asdict(iterative), "texts": texts}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _text_identity(path: Path) -> Any:
    """Size and modification time of a text file, or of the files of a saved dataset directory."""
    if path.is_dir():
        return {p.name: _text_identity(p) for p in sorted(path.iterdir()) if p.is_file()}
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class WorkDir:
    """``.OUT.structprune-iterative/`` beside the output (see the module doc)."""

    def __init__(self, output: Path) -> None:
        self.root = output.parent / f".{output.name}.structprune-iterative"
        self._fingerprint = ""

    def pruned(self, step: int) -> Path:
        return self.root / f"step-{step}" / "pruned"

    def recovered(self, step: int) -> Path:
        return self.root / f"step-{step}" / "recovered"

    def scores(self, step: int) -> Path:
        return self.root / f"step-{step}" / "scores"

    def adapter(self, step: int) -> Path:
        """The adapter step ``step``'s recovery trained, kept for ``lora-grad`` in the next step."""
        return self.root / f"step-{step}" / "adapter"

    def model_after(self, step: int, *, recovered: bool) -> Path:
        """The checkpoint step ``step`` ends with, which the next step prunes."""
        return self.recovered(step) if recovered else self.pruned(step)

    def refuse_holding(self, model: Path) -> None:
        """The input must not be in here: starting over removes this directory."""
        root, model = self.root.resolve(), model.resolve()
        if model == root or root in model.parents:
            raise OutputError(f"the model {model} is inside {self.root}, the work directory of this output, which is removed: copy it elsewhere first")

    def start(self, fingerprint: str, *, resume: bool, announce: Announce) -> List[StepRecord]:
        """The steps an earlier run of the same inputs finished (when resuming), else none, the
        directory emptied."""
        self._fingerprint = fingerprint
        if resume:
            records = self._saved(fingerprint)
            if records is not None:
                if records:
                    announce(f"resuming from {self.root}: {len(records)} step(s) pruned")
                return records
            if self.root.exists():
                announce(f"{self.root} holds another run's steps (other model, options or data) or lacks its last model: starting over")
        elif self.root.exists():
            announce(f"removing {self.root}, left by an earlier run (--resume continues such a run)")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.save([])
        return []

    def save(self, records: List[StepRecord]) -> None:
        """Records the finished steps, atomically: a kill leaves the previous record whole."""
        write_json_atomically(
            self.root / _PROGRESS_FILE, {"format": _FORMAT_VERSION, "fingerprint": self._fingerprint, "steps": [asdict(r) for r in records]}
        )

    def drop_step(self, step: int) -> None:
        """Removes what step ``step`` left, once the step after it has its own model."""
        if step >= 1:
            shutil.rmtree(self.root / f"step-{step}", ignore_errors=True)

    def _saved(self, fingerprint: str) -> Optional[List[StepRecord]]:
        """The saved records, when they belong to this run and their last model is on disk."""
        try:
            saved = json.loads((self.root / _PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return None
        if saved.get("format") != _FORMAT_VERSION or saved.get("fingerprint") != fingerprint:
            return None
        records = [_step_record(r) for r in saved["steps"]]
        if records:
            last = records[-1]
            if not (self.model_after(last.step, recovered=last.recovery is not None) / "config.json").is_file():
                return None
        return records


def _step_record(saved: Dict[str, Any]) -> StepRecord:
    recovery = saved.get("recovery")
    return StepRecord(**{**saved, "recovery": None if recovery is None else RecoveryRecord(**recovery)})


__all__ = ["REPORT_FILE", "IterativeOptions", "IterativeResult", "RecoveryRecord", "StepRecord", "check_request", "prune_iteratively", "step_target"]
