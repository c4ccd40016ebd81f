"""``structprune eval``: one model's quality and cost, optionally side by side with its original.

A model is loaded once (:func:`structprune.models.loading.load_model`) and measured in this order:
counts (:mod:`structprune.evaluate.costs`: parameters, weight bytes, MACs per token), held-out perplexity at
each window (:mod:`structprune.evaluate.perplexity`'s protocol), zero-shot tasks (:mod:`structprune.evaluate.zeroshot`,
when asked for), then speed and memory (:mod:`structprune.evaluate.costs`' timing protocol). With a
comparison the two models are measured one after the other, never both in memory, and every shared
figure gets a ratio ``model / original``.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from structprune.score.calibration import load_texts, token_stream
from structprune.evaluate.costs import (
    MacsCount,
    Throughput,
    TimingProtocol,
    count_parameters,
    macs_per_token,
    measure_throughput,
    weight_bytes,
)
from structprune.evaluate.perplexity import DEFAULT_BATCH_SIZE, DEFAULT_WINDOW, PerplexityResult, perplexity
from structprune.models.loading import load_model, load_tokenizer
from structprune.io.sizes import format_size


@dataclass(frozen=True)
class EvalOptions:
    ppl: Optional[Path] = None
    """Held-out text for perplexity (anything :func:`structprune.score.calibration.load_texts` reads)."""
    windows: Tuple[int, ...] = (DEFAULT_WINDOW,)
    text_field: str = "text"
    tasks: Tuple[str, ...] = ()
    task_path: Optional[Path] = None
    limit: Optional[int] = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE
    """Perplexity windows (and lm-eval requests) per forward; does not change any figure."""
    timing: TimingProtocol = field(default_factory=TimingProtocol)
    """Also gives the context of the MACs count (``timing.context``)."""
    measure_speed: bool = True


@dataclass
class ModelEvaluation:
    model: str
    device: str
    dtype: str
    parameters: int
    weight_bytes: int
    macs: MacsCount
    perplexity: List[PerplexityResult]
    throughput: List[Throughput]
    tasks: Dict[str, Dict[str, float]]

    def metrics(self) -> Dict[str, float]:
        """Every figure under a flat name (``perplexity@128``, ``decode_tokens_per_s@b16``, …)."""
        figures: Dict[str, float] = {
            "parameters": self.parameters,
            "weight_bytes": self.weight_bytes,
            "macs_per_token": self.macs.total,
        }
        for result in self.perplexity:
            figures[f"perplexity@{result.window}"] = result.perplexity
        for speed in self.throughput:
            for name in ("prefill_tokens_per_s", "prefill_seconds", "decode_tokens_per_s", "decode_seconds_per_token", "peak_memory_bytes"):
                value = getattr(speed, name)
                if value is not None:
                    figures[f"{name}@b{speed.batch}"] = value
        for task, task_metrics in self.tasks.items():
            for name, value in task_metrics.items():
                figures[f"{task}/{name}"] = value
        return figures

    def to_json(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "parameters": self.parameters,
            "weight_bytes": self.weight_bytes,
            "macs_per_token": {**asdict(self.macs), "total": self.macs.total},
            "perplexity": [asdict(result) for result in self.perplexity],
            "throughput": [asdict(speed) for speed in self.throughput],
            "tasks": self.tasks,
            "metrics": self.metrics(),
        }


def evaluate_model(
    model_dir: Path, options: EvalOptions, *, progress: bool = False, announce_timing: Optional[Callable[[float], None]] = None
) -> ModelEvaluation:
    """Loads the model in ``model_dir`` and measures everything ``options`` asks for;
    ``announce_timing`` gets the seconds the speed measurement should take, after its first run."""
    model = load_model(model_dir, dtype=options.dtype, device=options.device)
    try:
        needs_tokenizer = options.ppl is not None or bool(options.tasks)
        tokenizer = load_tokenizer(model_dir) if needs_tokenizer else None
        perplexities = []
        if options.ppl is not None:
            assert tokenizer is not None
            stream = token_stream(load_texts(options.ppl, text_field=options.text_field), tokenizer)
            perplexities = [
                perplexity(model, stream, window=window, batch_size=options.batch_size, progress=progress)
                for window in options.windows
            ]
        tasks: Dict[str, Dict[str, float]] = {}
        if options.tasks:
            from structprune.evaluate.zeroshot import run_tasks

            assert tokenizer is not None
            tasks = run_tasks(model, tokenizer, options.tasks, batch_size=options.batch_size, task_path=options.task_path, limit=options.limit)
        throughput = measure_throughput(model, options.timing, progress=progress, announce=announce_timing) if options.measure_speed else []
        return ModelEvaluation(
            model=str(model_dir),
            device=str(next(model.parameters()).device),
            dtype=options.dtype,
            parameters=count_parameters(model),
            weight_bytes=weight_bytes(model),
            macs=macs_per_token(model, options.timing.context),
            perplexity=perplexities,
            throughput=throughput,
            tasks=tasks,
        )
    finally:
        del model
        gc.collect()  # the next model (a comparison) is measured without this one in memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ratios(model: ModelEvaluation, original: ModelEvaluation) -> Dict[str, float]:
    """``model / original`` for every figure both have (and the original's is not zero)."""
    mine, theirs = model.metrics(), original.metrics()
    return {name: mine[name] / theirs[name] for name in mine if name in theirs and theirs[name] != 0}


def protocol_json(options: EvalOptions) -> Dict[str, Any]:
    return {
        "perplexity": {
            "text": str(options.ppl) if options.ppl is not None else None,
            "windows": list(options.windows),
            "method": "one token stream, non-overlapping windows, mean window loss, exp (structprune.evaluate.perplexity)",
        },
        "macs_context": options.timing.context,
        "timing": {**asdict(options.timing), "batch_sizes": list(options.timing.batch_sizes)} if options.measure_speed else None,
        "torch_threads": torch.get_num_threads(),
        "tasks": {"names": list(options.tasks), "num_fewshot": 0, "limit": options.limit} if options.tasks else None,
    }


def report_json(model: ModelEvaluation, options: EvalOptions, original: Optional[ModelEvaluation] = None) -> Dict[str, Any]:
    report: Dict[str, Any] = {"protocol": protocol_json(options), "model": model.to_json()}
    if original is not None:
        report["original"] = original.to_json()
        report["ratios"] = ratios(model, original)
    return report


def report_table(model: ModelEvaluation, original: Optional[ModelEvaluation] = None) -> List[str]:
    """Text lines: one figure per row; with an original, its column and the ratio."""
    mine = model.metrics()
    header = ["", model.model]
    rows = [[name, _format(name, value)] for name, value in mine.items()]
    if original is not None:
        theirs, quotients = original.metrics(), ratios(model, original)
        header += [original.model, "ratio"]
        rows = [
            [name, _format(name, value), _format(name, theirs[name]) if name in theirs else "-", f"{quotients[name]:.3f}" if name in quotients else "-"]
            for name, value in mine.items()
        ]
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in table]


def protocol_lines(options: EvalOptions, model: ModelEvaluation) -> List[str]:
    lines = [f"device {model.device}, {model.dtype}, {torch.get_num_threads()} torch thread(s); MACs per token at {options.timing.context} keys"]
    if options.ppl is not None:
        lines.append(f"perplexity: {options.ppl}, non-overlapping windows of {', '.join(map(str, options.windows))} tokens")
    if options.measure_speed:
        t = options.timing
        lines.append(
            f"timing: prefill = one forward of B x {t.context} tokens; decode = per-token step after a {t.context}-token prompt "
            f"({t.decode_tokens} steps per run); median of {t.repeats} runs after {t.warmup} warmup"
        )
    return lines


def _format(name: str, value: float) -> str:
    if "bytes" in name:
        return format_size(int(value))
    if "seconds" in name:
        return f"{value * 1000:.2f} ms"
    if name in ("parameters", "macs_per_token"):
        return f"{int(value):,}"
    if "tokens_per_s" in name:
        return f"{value:,.0f}"
    return f"{value:.4g}"


__all__ = [
    "EvalOptions",
    "ModelEvaluation",
    "evaluate_model",
    "protocol_json",
    "protocol_lines",
    "ratios",
    "report_json",
    "report_table",
]
