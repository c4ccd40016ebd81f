"""``structprune sweep``: perplexity against the fraction of parameters removed, for several
importance estimators and ratios, with the dense model as reference.

Every (estimator, ratio) is pruned by :func:`structprune.prune.make_plan` and
:func:`structprune.apply.apply_plan` exactly as ``structprune prune`` does (same options, same
seed), written into a scratch directory inside the staging output, loaded with
:func:`structprune.loading.load_model`, measured (parameters and MACs per token by
:mod:`structprune.costs`, perplexity by :mod:`structprune.evaluate`'s protocol) and deleted. The
output directory receives ``sweep.csv``, ``sweep.json``, ``sweep.md`` and, when matplotlib is
installed (``pip install 'structprune[plot]'``), ``sweep.png``; it appears only once complete.
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from structprune import _core
from structprune.apply import apply_plan
from structprune.calibration import load_texts, token_stream
from structprune.costs import count_parameters, macs_per_token
from structprune.errors import PlanError
from structprune.evaluate import DEFAULT_BATCH_SIZE, DEFAULT_WINDOW, perplexity
from structprune.importance import ESTIMATORS
from structprune.loading import load_model, load_tokenizer
from structprune.prune import PruneOptions, make_plan
from structprune.sizes import DEFAULT_SAMPLES
from structprune.termination import cleanup_on_sigterm

DENSE = "dense"
"""The ``importance`` of the unpruned model's row."""


@dataclass(frozen=True)
class SweepOptions:
    ratios: Tuple[float, ...]
    importances: Tuple[str, ...]
    ppl: Path
    calib: Optional[Path] = None
    windows: Tuple[int, ...] = (DEFAULT_WINDOW,)
    text_field: str = "text"
    structures: Tuple[str, ...] = ("heads", "mlp")
    gqa: str = "query-heads"
    multiple: Optional[int] = None
    planning: str = "uniform"
    samples: int = DEFAULT_SAMPLES
    seq_len: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE
    macs_context: int = DEFAULT_WINDOW


@dataclass(frozen=True)
class SweepRow:
    importance: str
    target_ratio: float
    removed_fraction: float
    """Of the dense model's parameters (a tied embedding and head counted once)."""
    parameters: int
    macs_per_token: int
    perplexity: Dict[int, float]
    """Window → perplexity."""
    seconds: float
    """Scoring, planning, writing and evaluating this row."""


def run_sweep(model_dir: Path, output_dir: Path, options: SweepOptions, *, overwrite: bool = False, progress: bool = True) -> List[SweepRow]:
    """Prunes ``model_dir`` at every ratio with every estimator, writes the table and plot to
    ``output_dir`` (atomically) and returns the rows, dense first."""
    _check_options(options)
    with cleanup_on_sigterm(), _staged_directory(output_dir, model_dir, overwrite=overwrite) as staging:
        stream = token_stream(load_texts(options.ppl, text_field=options.text_field), load_tokenizer(model_dir))
        started = time.perf_counter()
        dense = _measure(model_dir, stream, options)
        rows = [SweepRow(DENSE, 0.0, 0.0, dense[0], dense[1], dense[2], time.perf_counter() - started)]
        scratch = staging / "checkpoints"
        runs = list(itertools.product(options.importances, options.ratios))
        for importance, ratio in tqdm(runs, desc="sweep", unit="model", disable=not progress):
            rows.append(_pruned_row(model_dir, scratch / f"{importance}-{ratio:g}", importance, ratio, stream, options, dense[0]))
        scratch.rmdir()
        write_outputs(staging, model_dir, options, rows)
    return rows


def write_outputs(directory: Path, model_dir: Path, options: SweepOptions, rows: Sequence[SweepRow]) -> None:
    """``sweep.csv``, ``sweep.json``, ``sweep.md`` and (with matplotlib) ``sweep.png``."""
    _write_csv(directory / "sweep.csv", rows, options.windows)
    document = {
        "model": str(model_dir),
        "options": {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(options).items()},
        "rows": _rows_json(rows),
    }
    (directory / "sweep.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (directory / "sweep.md").write_text("\n".join(markdown_table(rows, options.windows)) + "\n", encoding="utf-8")
    if plotting_available():
        write_plot(directory / "sweep.png", rows, options.windows[0])


def markdown_table(rows: Sequence[SweepRow], windows: Sequence[int]) -> List[str]:
    header = ["importance", "target", "removed", "parameters", "MACs/token"] + [f"ppl@{w}" for w in windows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row.importance, f"{100 * row.target_ratio:.0f}%", f"{100 * row.removed_fraction:.2f}%", f"{row.parameters:,}", f"{row.macs_per_token:,}"]
        cells += [f"{row.perplexity[w]:.2f}" for w in windows]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(path: Path, rows: Sequence[SweepRow], window: int) -> None:
    """Perplexity at ``window`` against the fraction of parameters removed: one line per
    estimator, the dense model as a dashed line."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display backend

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    dense = next(row for row in rows if row.importance == DENSE)
    axes.axhline(dense.perplexity[window], color="black", linestyle="--", linewidth=1, label=f"dense ({dense.perplexity[window]:.2f})")
    for importance in dict.fromkeys(row.importance for row in rows if row.importance != DENSE):
        points = sorted((row.removed_fraction, row.perplexity[window]) for row in rows if row.importance == importance)
        axes.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=importance)
    axes.set_yscale("log")
    axes.set_xlabel("parameters removed (%)")
    axes.set_ylabel(f"perplexity ({window}-token windows, log scale)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


def _check_options(options: SweepOptions) -> None:
    if not options.ratios or not options.importances or not options.windows:
        raise PlanError("a sweep needs at least one ratio, one importance and one window")
    bad_ratios = [r for r in options.ratios if not 0 < r < 1]
    if bad_ratios:
        raise PlanError(f"--ratios must lie strictly between 0 and 1, got {', '.join(map(str, bad_ratios))}")
    unknown = [name for name in options.importances if name not in ESTIMATORS]
    if unknown:
        raise PlanError(f"unknown importance {', '.join(unknown)}; choose from {', '.join(sorted(ESTIMATORS))}")
    for label, values in (("--ratios", options.ratios), ("--importance", options.importances)):
        if len(set(values)) != len(values):
            raise PlanError(f"{label} lists a value twice: {', '.join(map(str, values))}")


def _pruned_row(model_dir: Path, checkpoint: Path, importance: str, ratio: float, stream: torch.Tensor, options: SweepOptions, dense_parameters: int) -> SweepRow:
    started = time.perf_counter()
    prune_options = PruneOptions(
        ratio=ratio, importance=importance, structures=options.structures, gqa=options.gqa, multiple=options.multiple,
        planning=options.planning, calib=options.calib, text_field=options.text_field, samples=options.samples, seq_len=options.seq_len,
        seed=options.seed, device=options.device, dtype=options.dtype,
    )
    result = make_plan(model_dir, prune_options)
    apply_plan(model_dir, result.plan, checkpoint)
    try:
        parameters, macs, perplexities = _measure(checkpoint, stream, options)
    finally:
        shutil.rmtree(checkpoint)
    return SweepRow(importance, ratio, 1 - parameters / dense_parameters, parameters, macs, perplexities, time.perf_counter() - started)


def _measure(model_dir: Path, stream: torch.Tensor, options: SweepOptions) -> Tuple[int, int, Dict[int, float]]:
    model = load_model(model_dir, dtype=options.dtype, device=options.device)
    try:
        perplexities = {w: perplexity(model, stream, window=w, batch_size=options.batch_size).perplexity for w in options.windows}
        return count_parameters(model), macs_per_token(model, options.macs_context).total, perplexities
    finally:
        del model
        gc.collect()


def _write_csv(path: Path, rows: Sequence[SweepRow], windows: Sequence[int]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["importance", "target_ratio", "removed_fraction", "parameters", "macs_per_token"] + [f"perplexity@{w}" for w in windows] + ["seconds"])
        for row in rows:
            writer.writerow([row.importance, row.target_ratio, f"{row.removed_fraction:.6f}", row.parameters, row.macs_per_token] + [f"{row.perplexity[w]:.6f}" for w in windows] + [f"{row.seconds:.2f}"])


@contextmanager
def _staged_directory(target: Path, model_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """The engine's staging (:class:`structprune._core.Staging`: the output checks every writer
    makes, leftovers of dead runs removed): a hidden sibling of ``target`` to fill, moved onto
    ``target`` if the block succeeds, removed if it fails."""
    staging = _core.Staging(str(target), str(model_dir), overwrite)
    try:
        yield staging.path
    except BaseException:
        staging.discard()
        raise
    staging.commit()


def _rows_json(rows: Sequence[SweepRow]) -> List[Dict[str, Any]]:
    return [{**asdict(row), "perplexity": {str(w): p for w, p in row.perplexity.items()}} for row in rows]


__all__ = ["DENSE", "SweepOptions", "SweepRow", "markdown_table", "plotting_available", "run_sweep", "write_outputs", "write_plot"]
