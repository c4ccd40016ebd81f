"""The ``structprune`` command."""

from __future__ import annotations

import json
import re
import sys
import time
from functools import wraps
from math import prod
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import click

from structprune.apply import DEFAULT_MAX_SHARD_SIZE, DEFAULT_MEMORY_BUDGET, apply_plan, plan_output
from structprune.checkpoint import Checkpoint, read_checkpoint
from structprune.errors import StructpruneError
from structprune.sizes import format_size, parse_size

F = TypeVar("F", bound=Callable[..., Any])
# A numeric path component marks a tensor of a repeated block (model.layers.3.…, h.0.…).
_BLOCK_TENSOR = re.compile(r"\.\d+\.")
# " at node 117 (name)" in a note: where in the graph, which is noise once notes are grouped.
_NODE_REFERENCE = re.compile(r" at node \d+(?: \([^)]*\))?")


class SizeParam(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        try:
            return parse_size(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def reports_errors(command: F) -> F:
    """Turns structprune's errors into one ``error:`` line and exit status 1, Ctrl-C into 130."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StructpruneError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="structprune")
def main() -> None:
    """Structured pruning of LLM checkpoints into smaller standard checkpoints."""


def describe(checkpoint: Checkpoint) -> Dict[str, Any]:
    config = checkpoint.config or {}
    block_params = sum(t.numel for t in checkpoint.tensors.values() if _BLOCK_TENSOR.search(t.name))
    shape_keys = (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
    )
    return {
        "path": str(checkpoint.path),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "config": {key: config[key] for key in shape_keys if key in config},
        "parameters": checkpoint.parameters,
        "block_parameters": block_params,
        "tensors": len(checkpoint.tensors),
        "shards": checkpoint.shards,
        "bytes_by_dtype": checkpoint.bytes_by_dtype(),
        "total_bytes": checkpoint.total_bytes,
    }


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@reports_errors
def info(model: Path, as_json: bool) -> None:
    """Describe the checkpoint MODEL (a directory) from its headers alone: architecture,
    parameters, shards, dtypes and bytes."""
    summary = describe(read_checkpoint(model))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    params, blocks = summary["parameters"], summary["block_parameters"]
    rows = [
        ("model", summary["path"]),
        ("architecture", f"{', '.join(summary['architectures'] or ['?'])} ({summary['model_type'] or '?'})"),
        ("shape", ", ".join(f"{k}={v}" for k, v in summary["config"].items()) or "(no config.json)"),
        ("parameters", f"{params:,} ({blocks:,} in repeated blocks, {params - blocks:,} outside)"),
        ("tensors", f"{summary['tensors']} in {len(summary['shards'])} shard(s): {', '.join(summary['shards'])}"),
        ("dtypes", ", ".join(f"{d} {format_size(b)}" for d, b in summary["bytes_by_dtype"].items())),
        ("bytes", f"{summary['total_bytes']:,} ({format_size(summary['total_bytes'])})"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("plan", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output checkpoint directory.")
@click.option("--max-shard-size", type=SizeParam(), default=DEFAULT_MAX_SHARD_SIZE, show_default=True, help="Largest output shard (a larger tensor gets a shard of its own).")
@click.option("--memory-budget", type=SizeParam(), default=DEFAULT_MEMORY_BUDGET, show_default=True, help="Buffer memory the engine may use, whatever the checkpoint's size.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Copy threads [default: min(4, cores)].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Validate the plan and print the result's size; write nothing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@reports_errors
def apply(
    model: Path,
    plan: Path,
    output: Path,
    max_shard_size: int,
    memory_budget: int,
    threads: Optional[int],
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Write the checkpoint MODEL cut by the plan PLAN (JSON, docs/plan-format.md) to OUTPUT.

    The input is never modified; the output appears only when complete."""
    source = read_checkpoint(model)
    planned = plan_output(model, plan, max_shard_size=max_shard_size)
    before, after = source.parameters, sum(prod(t.shape) for t in planned.tensors)
    if dry_run:
        click.echo(f"parameters  {before:,} -> {after:,} ({_removed(before, after)})")
        click.echo(f"bytes       {source.total_bytes:,} -> {planned.total_size:,}")
        click.echo(f"shards      {', '.join(planned.shards)}")
        click.echo("dry run: nothing written")
        return
    started = time.perf_counter()
    report = apply_plan(
        model,
        plan,
        output,
        max_shard_size=max_shard_size,
        memory_budget=memory_budget,
        threads=threads,
        overwrite=overwrite,
        progress=not quiet,
    )
    if quiet:
        return
    elapsed = time.perf_counter() - started
    click.echo(f"wrote {report.output_dir} in {elapsed:.1f} s")
    click.echo(f"parameters  {before:,} -> {after:,} ({_removed(before, after)})")
    click.echo(f"bytes       {source.total_bytes:,} -> {report.total_size:,} in {len(report.shards)} shard(s)")
    if report.copied_files:
        click.echo(f"copied      {', '.join(report.copied_files)}")
    if report.skipped_files:
        click.echo(f"not copied  {', '.join(report.skipped_files)} (other weight formats would be stale)")


def _removed(before: int, after: int) -> str:
    return f"{100 * (before - after) / before:.2f}% removed" if before else "empty checkpoint"


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--traced-layers", type=click.IntRange(min=1), default=2, show_default=True, help="Blocks traced; the rest are copies of the last traced one.")
@click.option("--json", "as_json", is_flag=True, help="Print every structure with its members as JSON.")
@reports_errors
def inspect(model: Path, traced_layers: int, as_json: bool) -> None:
    """Show the prunable structures of MODEL (a directory with config.json; no weights are read):
    heads and KV groups, MLP channels, hidden channels and blocks per layer, what each unit costs,
    whether a stock config can hold the cut, and what is pinned and why."""
    from dataclasses import asdict

    from structprune.checkpoint import read_config
    from structprune.cuts import stock_config_check
    from structprune.graph import layer_ranges, summarize, trace

    import torch  # noqa: F401 - loaded before the clock starts: the timing is the trace's own
    import transformers  # noqa: F401

    started = time.perf_counter()
    graph = trace(model, traced_layers=traced_layers)
    elapsed = time.perf_counter() - started
    config = read_config(model if model.is_dir() else model.parent) or {}
    kinds = sorted({s.kind for s in graph.structures}) + (["blocks"] if graph.blocks else [])
    stock = {kind: stock_config_check(graph, config, kind) for kind in kinds}
    if as_json:
        click.echo(json.dumps({
            "model": graph.model,
            "total_params": graph.total_params,
            "structures": [asdict(s) for s in graph.structures],
            "blocks": asdict(graph.blocks) if graph.blocks else None,
            "pinned": [asdict(p) for p in graph.pinned],
            "stock_config": {kind: reason is None for kind, reason in stock.items()},
            "stock_config_reasons": {kind: reason for kind, reason in stock.items() if reason},
        }, indent=1))
        return
    click.echo(f"model       {model} ({graph.model.get('architecture', '?')}), traced in {elapsed:.2f} s")
    click.echo(f"parameters  {graph.total_params:,}")
    header = ("structure", "layers", "units", "params/unit", "total params", "stock config")
    rows = [header]
    for row in summarize(graph):
        units = f"{row.units}/group" if row.kind == "query_heads" else f"{row.units}"
        rows.append((row.kind, layer_ranges(row.layers), units, f"{row.unit_params:,}", f"{row.total_params:,}", "yes" if stock[row.kind] is None else "no"))
    if graph.blocks:
        b = graph.blocks
        rows.append(("blocks", b.prefix, str(b.count), f"{b.unit_params:,}", f"{b.count * b.unit_params:,}", "yes" if stock["blocks"] is None else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))))
    refused = {kind: reason for kind, reason in stock.items() if reason}
    if refused:
        click.echo("\nnot expressible as a stock checkpoint:")
        for kind, reason in refused.items():
            click.echo(f"  {kind}: {reason}")
    by_reason: Dict[str, List[str]] = {}
    for p in graph.pinned:
        by_reason.setdefault(p.reason, []).append(f"{p.param}[dim {p.dim}]")
    if by_reason:
        click.echo("\npinned (never cut):")
        for reason, where in sorted(by_reason.items()):
            shown = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
            click.echo(f"  {reason}: {shown}")
    notes: Dict[Tuple[str, str], int] = {}
    for s in graph.structures:
        for note in s.notes:
            key = (s.kind, _NODE_REFERENCE.sub("", note))
            notes[key] = notes.get(key, 0) + 1
    if notes:
        click.echo("\nnotes:")
        for (kind, note), count in sorted(notes.items()):
            click.echo(f"  {kind}: {note}" + (f" ({count} places)" if count > 1 else ""))


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output checkpoint directory (not needed with --dry-run).")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), required=True, help="Fraction of all parameters to remove.")
@click.option("--importance", default="taylor", show_default=True, help="Estimator: taylor (Σ|w·g|), taylor-vector (|Σw·g|), taylor2 (second order), l1, l2, random, wanda-sp, flap.")
@click.option("--structures", default="heads,mlp", show_default=True, help="Comma list of heads, mlp, hidden, blocks.")
@click.option("--gqa", type=click.Choice(["query-heads", "kv-groups"]), default="query-heads", show_default=True, help="With grouped-query attention, remove query heads inside every KV group, or whole KV groups.")
@click.option("--multiple", type=click.IntRange(min=1), default=8, show_default=True, help="Kept MLP and hidden widths are multiples of this (64 suits large models).")
@click.option("--reduction", type=click.Choice(["sum", "mean", "max", "prod", "first"]), default="sum", show_default=True, help="How a unit's scores in different weights combine.")
@click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration text: .txt (documents split by <|endoftext|> lines), .jsonl, or a saved datasets directory.")
@click.option("--text-field", default="text", show_default=True, help="Field of .jsonl records (or dataset columns) holding the text.")
@click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True, help="Calibration windows.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration sampling (and random scores).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]; one block at a time is loaded there.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Compute dtype for scoring.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=4, show_default=True, help="Samples per forward/backward call (taylor2 uses 1).")
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the plan JSON here.")
@click.option("--eval", "eval_text", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Held-out text: print perplexity (128-token windows) before and after.")
@click.option("--dry-run", is_flag=True, help="Score and plan, print the resulting sizes; write no checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@reports_errors
def prune(model: Path, output: Optional[Path], ratio: float, importance: str, structures: str, gqa: str, multiple: int, reduction: str, calib: Optional[Path], text_field: str, samples: int, seq_len: int, seed: int, device: str, dtype: str, micro_batch: int, plan_out: Optional[Path], eval_text: Optional[Path], dry_run: bool, overwrite: bool) -> None:
    """Prune MODEL: trace it, score every structure on calibration text block by block (one
    decoder block in memory at a time), remove the least important units so that RATIO of all
    parameters goes, and write a stock checkpoint to OUTPUT (every layer the same width)."""
    from tqdm.auto import tqdm

    from structprune.prune import PruneOptions, make_plan

    if output is None and not dry_run:
        raise click.UsageError("give -o/--output, or --dry-run")
    options = PruneOptions(
        ratio=ratio, importance=importance, structures=tuple(s.strip() for s in structures.split(",") if s.strip()), gqa=gqa,
        multiple=multiple, reduction=reduction, calib=calib, text_field=text_field, samples=samples, seq_len=seq_len,
        seed=seed, device=device, dtype=dtype, micro_batch=micro_batch,
    )
    bars: Dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=f"{stage} blocks", unit="block", leave=False))
        bar.update(done - bar.n)

    try:
        result = make_plan(model, options, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    if plan_out is not None:
        result.plan.save(plan_out)
    click.echo(f"parameters  {result.params_before:,} -> {result.params_after:,} ({100 * result.removed_fraction:.2f}% removed, target {100 * ratio:.1f}%)")
    for kind, widths in sorted(result.widths.items()):
        click.echo(f"  {kind:<12} per layer: {_widths(widths)}")
    if result.blocks_removed:
        click.echo(f"  blocks removed: {', '.join(map(str, result.blocks_removed))}")
    click.echo(f"scoring     {result.seconds:.1f} s, peak RSS {format_size(result.peak_rss_bytes)}" + (f", peak GPU {format_size(result.peak_gpu_bytes)}" if result.peak_gpu_bytes else ""))
    if dry_run:
        click.echo("dry run: no checkpoint written" + (f"; plan in {plan_out}" if plan_out else ""))
        return
    assert output is not None
    report = apply_plan(model, result.plan, output, overwrite=overwrite, progress=True)
    click.echo(f"wrote {report.output_dir} ({len(report.shards)} shard(s), {format_size(report.total_size)})")
    if eval_text is not None:
        from transformers.utils import logging as hf_logging

        from structprune.evaluate import perplexity_of_text

        hf_logging.disable_progress_bar()  # two loads of small models: their bars only add noise

        before = perplexity_of_text(model, eval_text, window=128)
        after = perplexity_of_text(output, eval_text, window=128)
        click.echo(f"perplexity  {before.perplexity:.2f} -> {after.perplexity:.2f} on {eval_text} ({after.windows} windows of 128 tokens)")


def _widths(widths: List[int]) -> str:
    return f"{widths[0]} (all layers)" if len(set(widths)) == 1 else ", ".join(map(str, widths))
