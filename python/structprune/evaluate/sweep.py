"""``structprune sweep``: perplexity against the fraction of parameters removed, for several
importance estimators and ratios, with the dense model as reference; for an encoder (BERT family),
mean cosine to the dense embeddings and retrieval top-1 instead of perplexity.

Every (estimator, ratio) is pruned by :func:`structprune.prune.prune`, as ``structprune prune``
does (same options, same seed), written into a scratch directory inside the staging output, loaded with
:func:`structprune.models.loading.load_model`, measured (parameters and MACs per token by
:mod:`structprune.evaluate.costs`, perplexity by :mod:`structprune.evaluate.perplexity`'s protocol, an
encoder's embeddings of ``--ppl``'s paragraph halves by :mod:`structprune.evaluate.embeddings`') and deleted. The
output directory receives ``sweep.csv``, ``sweep.json``, ``sweep.md`` and, when matplotlib is
installed (``pip install 'structprune[plot]'``), ``sweep.png``; it appears only once complete.
With ``sparsify_methods``, unstructured sparsity (:func:`structprune.plan.sparsify.sparsify`) joins
the same table and plot at the same ratios, as the zeroed fraction.
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from structprune import _core
from structprune.score.calibration import load_texts, token_stream
from structprune.evaluate.embeddings import EmbeddingQuality, embedding_quality, pair_embeddings, sentence_pairs
from structprune.io.checkpoint import read_config
from structprune.models.sentence import Pooling, read_pooling
from structprune.evaluate.costs import count_parameters, macs_per_token
from structprune.errors import SettingError
from structprune.evaluate.perplexity import DEFAULT_BATCH_SIZE, DEFAULT_WINDOW, perplexity
from structprune.models.loading import encoder_class, load_model, load_tokenizer
from structprune.plan.sparsify import METHODS as SPARSIFY_METHODS, METHODS_NEEDING_DATA, SparsifyOptions, sparsify
from structprune.prune import PruneOptions, check_options, prune
from structprune.io.termination import cleanup_on_sigterm

DENSE = "dense"
"""The ``importance`` of the unpruned model's row."""


@dataclass(frozen=True)
class SweepOptions:
    ratios: Tuple[float, ...]
    importances: Tuple[str, ...]
    ppl: Path
    pruning: PruneOptions
    """How every run prunes, as ``structprune prune`` would (its ``ratio`` and ``importance`` are
    replaced by each run's); its device and dtype also evaluate."""
    windows: Tuple[int, ...] = (DEFAULT_WINDOW,)
    text_field: str = "text"
    """Field of the held-out text's records."""
    batch_size: int = DEFAULT_BATCH_SIZE
    macs_context: int = DEFAULT_WINDOW
    sparsify_methods: Tuple[str, ...] = ()
    """``structprune sparsify`` methods also run at every ratio, as the fraction of every row's
    weights zeroed (rows ``sparse-METHOD``), for contrast: their checkpoints keep the dense
    parameters and MACs, since zeros on dense kernels save neither, and the table shows that."""

    def run_options(self, importance: str, ratio: float) -> PruneOptions:
        return replace(self.pruning, importance=importance, ratio=ratio)


@dataclass(frozen=True)
class SweepRow:
    importance: str
    target_ratio: float
    removed_fraction: float
    """Of the dense model's parameters (a tied embedding and head counted once); for a
    ``sparse-METHOD`` row, the fraction zeroed."""
    parameters: int
    macs_per_token: int
    perplexity: Dict[int, float]
    """Window → perplexity."""
    seconds: float
    """Scoring, planning, writing and evaluating this row."""
    embedding: Optional[EmbeddingQuality] = None
    """An encoder's mean cosine to the dense embeddings and retrieval top-1, in place of perplexity."""


@dataclass(frozen=True)
class _EncoderReference:
    """What an encoder's rows are measured against: the held-out pairs and the dense embeddings."""

    pairs: List[Tuple[str, str]]
    dense: Tuple[torch.Tensor, torch.Tensor]
    pooling: Pooling


_Reference = Union[torch.Tensor, _EncoderReference]
"""A causal LM's held-out token stream, or an encoder's reference."""


def run_sweep(model_dir: Path, output_dir: Path, options: SweepOptions, *, overwrite: bool = False, progress: bool = True) -> List[SweepRow]:
    """Prunes ``model_dir`` at every ratio with every estimator, writes the table and plot to
    ``output_dir`` (atomically) and returns the rows, dense first."""
    _check_options(options)
    with cleanup_on_sigterm(), _staged_directory(output_dir, model_dir, overwrite=overwrite) as staging:
        started = time.perf_counter()
        stream = _reference(model_dir, options)
        dense = _measure(model_dir, stream, options)
        rows = [SweepRow(DENSE, 0.0, 0.0, dense[0], dense[1], dense[2], time.perf_counter() - started, dense[3])]
        scratch = staging / "checkpoints"
        runs = list(itertools.product(options.importances, options.ratios))
        for importance, ratio in tqdm(runs, desc="sweep", unit="model", disable=not progress):
            rows.append(_pruned_row(model_dir, scratch / f"{importance}-{ratio:g}", importance, ratio, stream, options, dense[0]))
        sparse_runs = list(itertools.product(options.sparsify_methods, options.ratios))
        for method, ratio in tqdm(sparse_runs, desc="sparsify", unit="model", disable=not progress or not sparse_runs):
            rows.append(_sparse_row(model_dir, scratch / f"sparse-{method}-{ratio:g}", method, ratio, stream, options))
        scratch.rmdir()
        write_outputs(staging, model_dir, options, rows)
    return rows


def write_outputs(directory: Path, model_dir: Path, options: SweepOptions, rows: Sequence[SweepRow]) -> None:
    """``sweep.csv``, ``sweep.json``, ``sweep.md`` and (with matplotlib) ``sweep.png``."""
    _write_csv(directory / "sweep.csv", rows, options.windows)
    document = {
        "model": str(model_dir),
        "options": asdict(options),
        "rows": _rows_json(rows),
    }
    (directory / "sweep.json").write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")  # paths as text
    (directory / "sweep.md").write_text("\n".join(markdown_table(rows, options.windows)) + "\n", encoding="utf-8")
    if plotting_available():
        write_plot(directory / "sweep.png", rows, options.windows[0])


def markdown_table(rows: Sequence[SweepRow], windows: Sequence[int]) -> List[str]:
    header = ["importance", "target", "removed", "parameters", "MACs/token"] + _quality_header(rows, windows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row.importance, f"{100 * row.target_ratio:.0f}%", f"{100 * row.removed_fraction:.2f}%", f"{row.parameters:,}", f"{row.macs_per_token:,}"]
        cells += [f"{value:.4f}" for value in _quality(row, windows)] if row.embedding else [f"{row.perplexity[w]:.2f}" for w in windows]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _quality_header(rows: Sequence[SweepRow], windows: Sequence[int]) -> List[str]:
    """The quality columns: an encoder's embedding measures, else perplexity per window."""
    return ["mean cosine", "retrieval top-1"] if rows and rows[0].embedding else [f"ppl@{w}" for w in windows]


def _quality(row: SweepRow, windows: Sequence[int]) -> List[float]:
    if row.embedding is not None:
        return [row.embedding.mean_cosine, row.embedding.retrieval_top1]
    return [row.perplexity[w] for w in windows]


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
    # An encoder's curve is its mean cosine to the dense embeddings (the dense model's is 1).
    measure = (lambda row: row.embedding.mean_cosine) if dense.embedding else (lambda row: row.perplexity[window])
    axes.axhline(measure(dense), color="black", linestyle="--", linewidth=1, label=f"dense ({measure(dense):.2f})")
    for importance in dict.fromkeys(row.importance for row in rows if row.importance != DENSE):
        points = sorted((row.removed_fraction, measure(row)) for row in rows if row.importance == importance)
        axes.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=importance)
    if not dense.embedding:
        axes.set_yscale("log")
    axes.set_xlabel("parameters removed (zeroed for sparse-*) (%)")
    axes.set_ylabel("mean cosine to the dense embeddings" if dense.embedding else f"perplexity ({window}-token windows, log scale)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


def _check_options(options: SweepOptions) -> None:
    """The whole sweep's options before the first run: every (estimator, ratio) as ``prune`` checks it."""
    for option, values in (("--ratios", options.ratios), ("--importance", options.importances), ("--window", options.windows)):
        if not values:
            raise SettingError(f"{option}: a sweep needs at least one value", option=option)
        if len(set(values)) != len(values):
            raise SettingError(f"{option}: lists a value twice: {', '.join(map(str, values))}", option=option)
    bad_ratios = [r for r in options.ratios if not 0 < r < 1]
    if bad_ratios:
        raise SettingError(f"--ratios: must lie strictly between 0 and 1, got {', '.join(map(str, bad_ratios))}", option="--ratios")
    for importance, ratio in itertools.product(options.importances, options.ratios):
        check_options(options.run_options(importance, ratio))
    if len(set(options.sparsify_methods)) != len(options.sparsify_methods):
        raise SettingError(f"--sparsify: lists a value twice: {', '.join(options.sparsify_methods)}", option="--sparsify")
    for method in options.sparsify_methods:
        if method not in SPARSIFY_METHODS:
            raise SettingError(f"--sparsify: unknown method {method!r}; choose from {', '.join(SPARSIFY_METHODS)}", option="--sparsify")
        if method in METHODS_NEEDING_DATA and options.pruning.calib is None:
            raise SettingError(f"--sparsify: {method} needs calibration text: pass --calib FILE", option="--sparsify")
    for method, ratio in itertools.product(options.sparsify_methods, options.ratios):
        _sparsify_options(options, method, ratio).check()


def _sparsify_options(options: SweepOptions, method: str, ratio: float) -> SparsifyOptions:
    """A ``sparse-METHOD`` run's options: the sweep's calibration, device and dtype."""
    pruning = options.pruning
    return SparsifyOptions(
        sparsity=ratio, method=method, calib=pruning.calib, text_field=pruning.text_field, samples=pruning.samples, seq_len=pruning.seq_len,
        seed=pruning.seed, device=pruning.device, dtype=pruning.dtype, micro_batch=pruning.micro_batch,
        activation_memory=pruning.activation_memory, damping=pruning.damping,
    )


def _sparse_row(model_dir: Path, checkpoint: Path, method: str, ratio: float, stream: _Reference, options: SweepOptions) -> SweepRow:
    started = time.perf_counter()
    result = sparsify(model_dir, checkpoint, _sparsify_options(options, method, ratio))
    try:
        parameters, macs, perplexities, embedding = _measure(checkpoint, stream, options)
    finally:
        shutil.rmtree(checkpoint)
    return SweepRow(f"sparse-{method}", ratio, result.zeroed_fraction, parameters, macs, perplexities, time.perf_counter() - started, embedding)


def _pruned_row(model_dir: Path, checkpoint: Path, importance: str, ratio: float, stream: _Reference, options: SweepOptions, dense_parameters: int) -> SweepRow:
    started = time.perf_counter()
    prune(model_dir, checkpoint, options.run_options(importance, ratio))
    try:
        parameters, macs, perplexities, embedding = _measure(checkpoint, stream, options)
    finally:
        shutil.rmtree(checkpoint)
    return SweepRow(importance, ratio, 1 - parameters / dense_parameters, parameters, macs, perplexities, time.perf_counter() - started, embedding)


def _reference(model_dir: Path, options: SweepOptions) -> _Reference:
    """The held-out token stream of a causal LM; an encoder's held-out pairs and their dense embeddings."""
    texts = load_texts(options.ppl, text_field=options.text_field)
    if encoder_class(read_config(model_dir) or {}) is None:
        return token_stream(texts, load_tokenizer(model_dir))
    pairs, pooling = sentence_pairs(texts), read_pooling(model_dir)
    model = load_model(model_dir, dtype=options.pruning.dtype, device=options.pruning.device)
    try:
        return _EncoderReference(pairs, pair_embeddings(model, load_tokenizer(model_dir), pairs, pooling, batch_size=options.batch_size), pooling)
    finally:
        del model
        gc.collect()


def _measure(model_dir: Path, reference: _Reference, options: SweepOptions) -> Tuple[int, int, Dict[int, float], Optional[EmbeddingQuality]]:
    model = load_model(model_dir, dtype=options.pruning.dtype, device=options.pruning.device)
    try:
        costs = count_parameters(model), macs_per_token(model, options.macs_context).total
        if isinstance(reference, _EncoderReference):
            embeddings = pair_embeddings(model, load_tokenizer(model_dir), reference.pairs, reference.pooling, batch_size=options.batch_size)
            return costs[0], costs[1], {}, embedding_quality(embeddings, reference.dense)
        perplexities = {w: perplexity(model, reference, window=w, batch_size=options.batch_size).perplexity for w in options.windows}
        return costs[0], costs[1], perplexities, None
    finally:
        del model
        gc.collect()


def _write_csv(path: Path, rows: Sequence[SweepRow], windows: Sequence[int]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        quality = ["mean_cosine", "retrieval_top1"] if rows and rows[0].embedding else [f"perplexity@{w}" for w in windows]
        writer.writerow(["importance", "target_ratio", "removed_fraction", "parameters", "macs_per_token"] + quality + ["seconds"])
        for row in rows:
            writer.writerow([row.importance, row.target_ratio, f"{row.removed_fraction:.6f}", row.parameters, row.macs_per_token] + [f"{value:.6f}" for value in _quality(row, windows)] + [f"{row.seconds:.2f}"])


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
