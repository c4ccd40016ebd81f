"""The ``structprune`` command."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from functools import wraps
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, TypeVar

import click

from structprune._core import MAX_MEMORY_BUDGET, MAX_THREADS
from structprune.apply import DEFAULT_MAX_SHARD_SIZE, DEFAULT_MEMORY_BUDGET, apply_plan, check_output, check_plan_shapes, plan_output
from structprune.errors import SettingError, StructpruneError
from structprune.io.checkpoint import Checkpoint, read_checkpoint
from structprune.io.sizes import DEFAULT_ACTIVATION_MEMORY, DEFAULT_DAMPING, DEFAULT_REFIT_LR, DEFAULT_SAMPLES, RECONSTRUCTION_TARGETS, format_size, parse_size
from structprune.io.termination import Terminated, cleanup_on_sigterm
from structprune.models.formats import FORMATS
from structprune.plan.selection import NORMALIZATIONS

if TYPE_CHECKING:  # the CLI imports torch only in the commands that need it
    from structprune.tracing.graph import StructureGraph
    from structprune.recover.iterative import IterativeOptions
    from structprune.prune import PruneOptions, PruneResult

F = TypeVar("F", bound=Callable[..., Any])
# A numeric path component marks a tensor of a repeated block (model.layers.3.…, h.0.…).
_BLOCK_TENSOR = re.compile(r"\.\d+\.")
# " at node 117 (name)" in a note: where in the graph, which is noise once notes are grouped.
_NODE_REFERENCE = re.compile(r" at node \d+(?: \([^)]*\))?")


class SizeParam(click.ParamType):
    name = "size"

    def __init__(self, allow_zero: bool = False, maximum: Optional[int] = None) -> None:
        self.allow_zero = allow_zero
        self.maximum = maximum

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        try:
            if self.maximum is None:
                return parse_size(value, allow_zero=self.allow_zero)
            return parse_size(value, allow_zero=self.allow_zero, maximum=self.maximum)
        except ValueError as err:
            self.fail(str(err), param, ctx)


def reports_errors(command: F) -> F:
    """Turns structprune's errors into one ``error:`` line and exit status 1 (2 for a bad option,
    as click does for its own usage errors), Ctrl-C into 130; SIGTERM unwinds like Ctrl-C (staged
    output removed) and then terminates the process."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with cleanup_on_sigterm():
            try:
                return command(*args, **kwargs)
            except SettingError as err:
                click.echo(f"error: {err}", err=True)
                sys.exit(2)
            except StructpruneError as err:
                click.echo(f"error: {err}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                click.echo("interrupted: no output was written", err=True)
                sys.exit(130)
            except Terminated:
                click.echo("terminated: no output was written", err=True)
                raise

    return wrapper  # type: ignore[return-value]


def sets_torch_threads(command: F) -> F:
    """Adds ``--threads`` to a command that runs a model, and sets torch's threads before it runs:
    by default OMP_NUM_THREADS or the usable CPUs, a count that does not change with the machine's
    load, since it changes the output's bytes (structprune.io.threads)."""

    @wraps(command)
    def wrapper(*args: Any, threads: Optional[int], **kwargs: Any) -> Any:
        from structprune.io.threads import configure_torch_threads

        configure_torch_threads(threads)
        return command(*args, **kwargs)

    option = click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [default: OMP_NUM_THREADS if set, else the usable CPUs]. Outputs are byte-identical for the same count; on a machine other work keeps busy, fewer run much faster (torch's threads wait for busy CPUs).")
    return option(wrapper)  # type: ignore[return-value]


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
@click.option("--memory-budget", type=SizeParam(maximum=MAX_MEMORY_BUDGET), default=DEFAULT_MEMORY_BUDGET, show_default=True, help="Buffer memory the engine may use, whatever the checkpoint's size (at most 1 TiB).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="Copy threads [default: min(4, cores)].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Validate the plan and print the result's size; write nothing.")
@click.option("--no-shape-check", is_flag=True, help="Write the output even if its tensor shapes disagree with its config.json (by default checked before writing, on the meta device, for architectures transformers knows; the check imports torch).")
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
    no_shape_check: bool,
    quiet: bool,
) -> None:
    """Write the checkpoint MODEL cut by the plan PLAN (JSON, docs/plan-format.md) to OUTPUT.

    The input is never modified; the output appears only when complete. Before anything is
    written, the output's tensor shapes are checked against the model its config.json builds, so
    that the output loads (--no-shape-check to skip)."""
    source = read_checkpoint(model)
    planned = plan_output(model, plan, max_shard_size=max_shard_size)
    before, after = source.parameters, sum(prod(t.shape) for t in planned.tensors)
    if dry_run:
        click.echo(f"parameters  {before:,} -> {after:,} ({_removed(before, after)})")
        click.echo(f"bytes       {source.total_bytes:,} -> {planned.total_size:,}")
        click.echo(f"shards      {', '.join(planned.shards)}")
        if not no_shape_check:
            click.echo(f"shapes      {check_plan_shapes(model, plan, max_shard_size=max_shard_size).note}")
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
        check_shapes=not no_shape_check,
    )
    if quiet:
        return
    elapsed = time.perf_counter() - started
    click.echo(f"wrote {report.output_dir} in {elapsed:.1f} s")
    click.echo(f"parameters  {before:,} -> {after:,} ({_removed(before, after)})")
    click.echo(f"bytes       {source.total_bytes:,} -> {report.total_size:,} in {len(report.shards)} shard(s)")
    click.echo(f"shapes      {report.shape_check.note}")
    if report.copied_files:
        click.echo(f"copied      {', '.join(report.copied_files)}")
    if report.skipped_files:
        click.echo(f"not copied  {', '.join(report.skipped_files)} (only the checkpoint's own files are copied: configs, tokenizer, code, model card; no other weight formats, which would be stale, and no directories)")


def _removed(before: int, after: int) -> str:
    return f"{100 * (before - after) / before:.2f}% removed" if before else "empty checkpoint"


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--traced-layers", type=click.IntRange(min=1), default=2, show_default=True, help="Blocks traced; the rest are copies of the last traced one.")
@click.option("--json", "as_json", is_flag=True, help="Print every structure with its members as JSON.")
@click.option("--no-cache", is_flag=True, help="Trace again, neither reading nor writing the trace cache ($XDG_CACHE_HOME/structprune/traces, ~/.cache without XDG_CACHE_HOME; safe to delete). A cached config is shown without importing torch.")
@click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Mixture-of-experts models: also show each layer's share of routed tokens per expert on this calibration text (reads the weights, one block at a time).")
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True, help="With --calib: calibration windows.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="With --calib: tokens per window.")
@reports_errors
def inspect(model: Path, traced_layers: int, as_json: bool, no_cache: bool, calib: Optional[Path], samples: int, seq_len: int) -> None:
    """Show the prunable structures of MODEL (a directory with config.json; no weights are read):
    heads and KV groups, MLP channels, hidden channels, routed experts and blocks per layer, what
    each unit costs, whether a stock config can hold the cut, and what is pinned and why. With
    --calib, a mixture-of-experts model's routing share per expert on that text."""
    from dataclasses import asdict

    from structprune.io.checkpoint import read_config
    from structprune.tracing.graph import layer_ranges, read_cached_trace, summarize, trace

    started = time.perf_counter()
    graph = None if no_cache else read_cached_trace(model, traced_layers=traced_layers)
    obtained = "read from the trace cache"
    if graph is None:
        import torch  # noqa: F401 - loaded before the clock starts: the timing is the trace's own
        import transformers  # noqa: F401

        started = time.perf_counter()
        graph = trace(model, traced_layers=traced_layers, cache=not no_cache)
        obtained = "traced"
    elapsed = time.perf_counter() - started
    config = read_config(model if model.is_dir() else model.parent) or {}
    stock = _stock_config_reasons(graph, config, model, traced_layers=traced_layers, cache=not no_cache)
    routing = _routing_shares(model, graph, calib, samples=samples, seq_len=seq_len) if calib is not None else None
    if as_json:
        click.echo(json.dumps({
            "model": graph.model,
            "total_params": graph.total_params,
            "structures": [asdict(s) for s in graph.structures],
            "blocks": asdict(graph.blocks) if graph.blocks else None,
            "pinned": [asdict(p) for p in graph.pinned],
            "stock_config": {kind: reason is None for kind, reason in stock.items()},
            "stock_config_reasons": {kind: reason for kind, reason in stock.items() if reason},
            **({"routing_share": {str(layer): share for layer, share in routing.items()}} if routing is not None else {}),
        }, indent=1))
        return
    click.echo(f"model       {model} ({graph.model.get('architecture', '?')}), {obtained} in {elapsed:.2f} s")
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
    if routing is not None:
        _print_routing(routing, samples=samples, seq_len=seq_len)


def _routing_shares(model: Path, graph: "StructureGraph", calib: Path, *, samples: int, seq_len: int) -> Dict[int, List[float]]:
    """Each MoE layer's share of routed (token, slot) pairs per expert on the calibration text."""
    if not graph.by_kind("experts"):
        raise click.UsageError("--calib shows the routing of a mixture-of-experts model; this model has no routed experts")
    from structprune.score.routing import calibration_routing

    stats = calibration_routing(model, graph, calib, samples=samples, seq_len=seq_len)
    return {layer: [round(float(x), 6) for x in s.share] for layer, s in stats.items()}


def _print_routing(routing: Dict[int, List[float]], *, samples: int, seq_len: int) -> None:
    click.echo(f"\nrouting share per expert ({samples} windows of {seq_len} tokens; experts 0, 1, …):")
    for layer, shares in sorted(routing.items()):
        cells = " ".join(f"{100 * s:5.1f}%" for s in shares)
        unused = sum(1 for s in shares if s == 0)
        click.echo(f"  layer {layer:>3}  {cells}" + (f"  ({unused} never chosen)" if unused else ""))


def _stock_config_reasons(graph: "StructureGraph", config: Dict[str, Any], model: Path, *, traced_layers: int, cache: bool) -> Dict[str, Optional[str]]:
    """Why removing one unit of each kind cannot be written as a stock checkpoint (``None`` where it
    can). The check builds the edited model on the meta device (torch and transformers, seconds),
    so its answers are cached beside the trace, under the same key."""
    from structprune.tracing import cache as trace_cache

    kinds = sorted({s.kind for s in graph.structures}) + (["blocks"] if graph.blocks else [])
    key = trace_cache.key_for(model, traced_layers=traced_layers, purpose="stock-config") if cache else None
    cached = trace_cache.read_entry(key) if key is not None else None
    if isinstance(cached, dict) and sorted(cached) == sorted(kinds):
        return cached
    from structprune.plan.cuts import stock_config_check

    reasons = {kind: stock_config_check(graph, config, kind) for kind in kinds}
    if key is not None:
        trace_cache.write_entry(key, reasons)
    return reasons


PRUNING_OPTIONS = (
    click.option("--structures", default="heads,mlp", show_default=True, help="Comma list of heads, mlp, hidden, blocks, experts (whole routed experts of MoE layers, with their router rows), expert-channels (intermediate channels inside every expert)."),
    click.option("--experts", "expert_count", type=click.IntRange(min=0), default=None, help="With experts among --structures: remove exactly this many routed experts in every MoE layer, the rest of the ratio from the other structures."),
    click.option("--expert-saliency", type=click.Choice(["reap", "frequency", "importance"]), default="reap", show_default=True, help="How whole experts are scored: reap (mean over the tokens routed to an expert of gate weight × norm of its output), frequency (how often it is chosen), importance (the --importance estimator on its weights, e.g. taylor)."),
    click.option("--blocks", "block_count", type=click.IntRange(min=0), default=None, help="With blocks and width structures together: remove this many whole blocks (lowest block influence), the rest of the ratio from widths. Depth speeds up every token step; width usually costs less quality."),
    click.option("--gqa", type=click.Choice(["query-heads", "kv-groups"]), default="query-heads", show_default=True, help="With grouped-query attention, remove query heads inside every KV group, or whole KV groups."),
    click.option("--multiple", type=click.IntRange(min=1), default=None, help="Kept MLP and hidden widths are multiples of this [default: 64 for MLPs of 2048+ channels, else 8]."),
    click.option("--reduction", type=click.Choice(["sum", "mean", "max", "prod", "first"]), default="sum", show_default=True, help="How a unit's scores in different weights combine."),
    click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration text: .txt (documents split by <|endoftext|> lines), .jsonl, or a saved datasets directory."),
    click.option("--text-field", default="text", show_default=True, help="Field of .jsonl records (or dataset columns) holding the text."),
    click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True, help="Calibration windows of --seq-len tokens (reconstruction overfits much fewer than 16,384 tokens in all)."),
    click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per calibration window."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration sampling (and random scores)."),
    click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]; one block at a time is loaded there."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Compute dtype for scoring."),
    click.option("--micro-batch", type=click.IntRange(min=1), default=4, show_default=True, help="Samples per forward/backward call (taylor2 uses 1)."),
    click.option("--activation-memory", type=SizeParam(allow_zero=True), default=format_size(DEFAULT_ACTIVATION_MEMORY), show_default=True, help="Memory for the saved block inputs while scoring (one per block and micro-batch); past it they go to a temporary file. 0 keeps none in memory."),
    click.option("--uniform/--global", "uniform", default=True, show_default=True, help="Uniform: the same widths in every layer (a stock checkpoint). Global: per-layer widths, steps taken across all layers by score per parameter (a DeciLM or layers checkpoint, see --format)."),
    click.option("--protect", "protect", metavar="FIRST,LAST", help="Leave the first FIRST and last LAST blocks unpruned [default: 0,0 with --uniform; LLM-Pruner's 4 and 2 of 32 scaled to depth with --global]."),
    click.option("--normalize", type=click.Choice(NORMALIZATIONS), default="none", show_default=True, help="With --global: divide each structure's scores by their mean/max/sum/L2 norm before ranking across layers."),
    click.option("--bias-compensation", is_flag=True, help="FLAP's bias compensation: the input channels o_proj/down_proj lose are replaced by their calibration means, folded into the layers' biases (turning on attention_bias/mlp_bias with zero q/k/v/gate/up biases where the model has none; refused where the stock config cannot hold the bias, with hidden, and with the DeciLM format)."),
    click.option("--reconstruct/--no-reconstruct", default=None, help="[default: on, except with hidden, --bias-compensation or blocks alone] Refit the kept input columns of every layer that loses inputs (o_proj, down_proj…) by least squares on the pruned model's own calibration activations, block by block (SlimGPT/ZipLM's column update). The output stays a stock checkpoint."),
    click.option("--damping", type=click.FloatRange(min=0), default=DEFAULT_DAMPING, show_default=True, help="With --reconstruct: λ relative to the mean diagonal of the kept inputs' Gram matrix."),
    click.option("--reconstruct-target", type=click.Choice(RECONSTRUCTION_TARGETS), default="dense", show_default=True, help="With --reconstruct: what the refitted layers reproduce from the pruned model's inputs. layer: their own dense weights' outputs (SlimGPT/ZipLM); dense: the same, except that a layer whose output joins the residual stream (down_proj; BERT's output.dense, before its block's final norm) is fitted to the dense block's output, taking up the drift the blocks before it left."),
    click.option("--refit-steps", type=click.IntRange(min=0), default=0, show_default=True, help="With --reconstruct: after each block's least-squares fits, fit all its kept weights together (projections, norms, biases) by this many Adam steps so that the pruned block's output matches the dense block's on the calibration windows (block-wise distillation, one block at a time; 0: none)."),
    click.option("--refit-lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_REFIT_LR, show_default=True, help="With --refit-steps: Adam's peak learning rate (5% warm-up, cosine decay)."),
    click.option("--lora-adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="With --importance lora-grad: read the gradients of this peft adapter, trained on MODEL (recover writes it to OUTPUT/adapter, with its merged weights as the MODEL to prune), instead of fresh random probes."),
    click.option("--format", "layout", type=click.Choice(FORMATS), default="auto", show_default=True, help="Checkpoint format: stock config; DeciLM/Nemotron-NAS (Llama, per-layer MLP widths and KV heads; vLLM loads it); layers (any model, structprune.load_pruned). auto: stock when uniform, else decilm when it fits, else layers."),
)
"""The options that say how a model is pruned, shared by ``prune`` and ``sweep`` so that a sweep
prunes exactly as ``prune`` does (they become a :class:`~structprune.prune.PruneOptions`)."""


def pruning_options(command: F) -> F:
    for option in reversed(PRUNING_OPTIONS):
        command = option(command)
    return command


def _prune_options(ratio: float, importance: str, pruning: Dict[str, Any]) -> "PruneOptions":
    """The :class:`PruneOptions` of the shared pruning options as click parsed them."""
    from structprune.prune import PruneOptions

    return PruneOptions(
        ratio=ratio, importance=importance, structures=_comma_separated(pruning["structures"], "--structures"), gqa=pruning["gqa"],
        multiple=pruning["multiple"], reduction=pruning["reduction"], calib=pruning["calib"], text_field=pruning["text_field"],
        samples=pruning["samples"], seq_len=pruning["seq_len"], seed=pruning["seed"], device=pruning["device"], dtype=pruning["dtype"],
        micro_batch=pruning["micro_batch"], activation_memory=pruning["activation_memory"],
        planning="uniform" if pruning["uniform"] else "global", protect=_protection(pruning["protect"]), normalize=pruning["normalize"],
        layout=pruning["layout"], blocks=pruning["block_count"], experts=pruning["expert_count"], expert_saliency=pruning["expert_saliency"],
        bias_compensation=pruning["bias_compensation"],
        reconstruct=pruning["reconstruct"], damping=pruning["damping"], reconstruction_target=pruning["reconstruct_target"],
        refit_steps=pruning["refit_steps"], refit_lr=pruning["refit_lr"], lora_adapter=pruning["lora_adapter"],
    )


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output checkpoint directory (not needed with --dry-run).")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True), required=True, help="Fraction of all parameters to remove.")
@click.option("--importance", default="obs", show_default=True, help="Estimator: obs (OBS: widths from ‖W[:, j]‖²·Σx_j², units chosen by greedy optimal brain surgeon on each layer's pruned inputs while reconstructing; forward passes only), taylor (Σ|w·g|), taylor-vector (|Σw·g|), taylor2 (second order), l1, l2, random, wanda-sp, flap, entropy (Gaussian entropy ½log(2πe·Var) of each unit's channels where they are consumed), head-gate (mean |∂L/∂ξ| of a gate ξ on each head's or channel's output, per sample), bonsai (forward only: calibration losses of 64 sub-models with random units masked, regressed on the masks), lora-grad (LoRAPrune: Σ|W⊙(G_B·A + B·G_A − G_B·G_A)| from the gradients of LoRA adapters on the blocks' linears, no weight gradient formed; with --iterations and --recover-steps, the adapters recovery trained).")
@pruning_options
@click.option("--plan-out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the plan JSON here.")
@click.option("--eval", "eval_text", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Held-out text: print perplexity (128-token windows) before and after.")
@click.option("--dry-run", is_flag=True, help="Score and plan, print the resulting sizes; write no checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@click.option("--resume", is_flag=True, help="Save the scoring state after every block and continue an interrupted run, in $XDG_CACHE_HOME/structprune/resume/<hash of model, calibration and scoring options> (~/.cache without XDG_CACHE_HOME).")
@click.option("--resume-dir", type=click.Path(file_okay=False, path_type=Path), help="As --resume, in this directory (refused if it holds another run's state).")
@click.option("--iterations", type=click.IntRange(min=1), default=1, show_default=True, help="Remove RATIO in this many steps, each scoring the model the step before left (LLM-Pruner's and LoRAShear's iterative pruning); intermediate checkpoints in .OUTPUT.structprune-iterative/ beside OUTPUT, removed at the end, continued by --resume.")
@click.option("--recover-steps", type=click.IntRange(min=0), default=0, show_default=True, help="With --iterations: LoRA optimizer steps on every intermediate model (not after the last step); 0: the steps only score again.")
@click.option("--recover-data", type=click.Path(exists=True, path_type=Path), help="With --recover-steps: training text [default: --calib].")
@click.option("--distill/--no-distill", default=True, show_default=True, help="With --recover-steps: learn MODEL's next-token distributions (distillation), or the LM loss.")
@click.option("--recover-lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True, help="With --recover-steps: peak learning rate.")
@click.option("--recover-batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="With --recover-steps: --seq-len examples per optimizer step.")
@sets_torch_threads
@reports_errors
def prune(model: Path, output: Optional[Path], ratio: float, importance: str, plan_out: Optional[Path], eval_text: Optional[Path], dry_run: bool, overwrite: bool, resume: bool, resume_dir: Optional[Path], iterations: int, recover_steps: int, recover_data: Optional[Path], distill: bool, recover_lr: float, recover_batch_size: int, **pruning: Any) -> None:
    """Prune MODEL: trace it, score every structure on calibration text block by block (one
    decoder block in memory at a time), remove the least important units so that RATIO of all
    parameters goes, and write the result to OUTPUT: a stock checkpoint with --uniform (every
    layer the same width), per-layer widths with --global (see --format).

    \b
    Several processes can score together, each on its share of the calibration samples:
      torchrun --nproc-per-node 4 -m structprune prune MODEL --device cuda ...
    uses cuda:0..3 (on CPU, omit --device). Only the first process prints and writes.
    """
    if iterations > 1:
        _refuse_with_iterations(plan_out=plan_out, dry_run=dry_run, resume_dir=resume_dir)
    if output is None and not dry_run:
        raise click.UsageError("give -o/--output, or --dry-run")
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only the first process prints
    if main_process:
        _say("loading torch and transformers…")  # seconds of imports, then tracing: say so before
    from structprune.recover.iterative import IterativeOptions, check_request
    from structprune.prune import check_options, prune as run_prune

    options = _prune_options(ratio, importance, pruning)
    check_options(options)
    iterative = IterativeOptions(
        iterations=iterations, recover_steps=recover_steps, recover_data=recover_data, distill=distill, recover_lr=recover_lr,
        recover_batch_size=recover_batch_size,
    )
    check_request(options, iterative)  # the recovery flags are refused without --iterations, not ignored
    target = None if dry_run else output
    if target is not None:
        check_output(model, target, overwrite=overwrite)
    bars: Dict[str, Any] = {}
    progress = _stage_progress(bars)
    if iterations > 1:
        assert target is not None
        _prune_iteratively(model, target, options, iterative, bars=bars, progress=progress, overwrite=overwrite, resume=resume, eval_text=eval_text)
        return
    if main_process:
        _say(f"tracing {model}…")
    try:
        result = run_prune(model, target, options, overwrite=overwrite, progress=progress, apply_progress=True, resume=resume_dir or resume, plan_out=plan_out)
    finally:
        for bar in bars.values():
            bar.close()
    if main_process:
        _print_prune_summary(model, target, result, ratio=ratio, plan_out=plan_out, eval_text=eval_text)


STAGES = {
    "weights": "scoring: reading the weights, block by block",
    "forward": "scoring: forward pass over the calibration windows, block by block",
    "backward": "scoring: backward pass, block by block",
    "reconstruct": "reconstructing: refitting the kept weights on the pruned model's activations, block by block",
    "refit": "reconstructing: least-squares fits, then the joint refit of every block's weights (Adam steps), block by block",
    "perturb": "scoring: sub-models with random units masked, forward only, block by block",
    "sparsify": "sparsifying: masks (and SparseGPT's updates) of every linear layer, block by block",
}
"""What each stage of ``make_plan``'s progress reports is doing, said once when it starts."""


def _announce_timing(model: Optional[Path]) -> Callable[[float], None]:
    """Tells how long ``eval``'s speed section will take, once its first run has been timed."""

    def announce(seconds: float) -> None:
        minutes, rest = divmod(round(seconds), 60)
        duration = f"{minutes} min {rest} s" if minutes else f"{rest} s"
        _say(f"timing {model}: about {duration} (--no-timing skips it; --repeats and --batch-sizes shorten it)")

    return announce


def _say(message: str) -> None:
    click.echo(message, err=True)


def _stage_progress(bars: Dict[str, Any]) -> Callable[[str, int, int], None]:
    """``make_plan``'s progress: a line on stderr when a stage starts, and one block bar at a time
    (the stage before is closed first), drawn only where tqdm decides stderr is a terminal: bars
    left open together redraw each other with cursor-up escapes, which a log file keeps."""
    from tqdm.auto import tqdm

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            _say(f"{STAGES.get(stage, stage)}…")
            bars[stage] = tqdm(total=total, desc=f"{stage} blocks", unit="block", leave=False, disable=None)
        bar = bars[stage]
        bar.update(done - bar.n)

    return progress


def _refuse_with_iterations(*, plan_out: Optional[Path], dry_run: bool, resume_dir: Optional[Path]) -> None:
    reasons = {
        "--plan-out": "the last step's plan cuts an intermediate model, not MODEL, so it cannot be applied to MODEL",
        "--dry-run": "every step after the first prunes the model the step before wrote",
        "--resume-dir": "the steps keep their scoring state in their work directory: use --resume",
    }
    for flag, given in (("--plan-out", plan_out is not None), ("--dry-run", dry_run), ("--resume-dir", resume_dir is not None)):
        if given:
            raise click.UsageError(f"{flag} does not go with --iterations K > 1: {reasons[flag]}")


def _prune_iteratively(
    model: Path, output: Path, options: "PruneOptions", iterative: "IterativeOptions", *, bars: Dict[str, Any],
    progress: Callable[[str, int, int], None], overwrite: bool, resume: bool, eval_text: Optional[Path],
) -> None:
    from structprune.recover.iterative import prune_iteratively

    def announce(message: str) -> None:
        for bar in bars.values():  # the next step counts its blocks on new bars
            bar.close()
        bars.clear()
        click.echo(message, err=True)

    try:
        result = prune_iteratively(model, output, options, iterative, overwrite=overwrite, resume=resume, progress=progress, progress_bars=True, announce=announce)
    finally:
        for bar in bars.values():
            bar.close()
    for step in result.steps:
        recovered = f", then {step.recovery.steps} recovery steps in {step.recovery.seconds:.1f} s" if step.recovery else ""
        click.echo(f"step {step.step}/{iterative.iterations}   {step.params_before:,} -> {step.params_after:,} ({100 * step.ratio:.2f}% of the step's model asked) in {step.seconds:.1f} s{recovered}")
    if result.resumed_steps:
        click.echo(f"resumed     after step {result.resumed_steps}")
    click.echo(f"parameters  {result.params_before:,} -> {result.params_after:,} ({100 * result.removed_fraction:.2f}% removed, target {100 * options.ratio:.1f}%)")
    for line in width_lines({}, result.final.widths):  # the last step's input is no original
        click.echo(line)
    assert result.final.report is not None
    click.echo(f"wrote {output} in {result.seconds:.1f} s ({len(result.final.report.shards)} shard(s), {format_size(result.final.report.total_size)})")
    if eval_text is not None:
        _print_perplexity(model, output, eval_text)


def _print_prune_summary(model: Path, output: Optional[Path], result: "PruneResult", *, ratio: float, plan_out: Optional[Path], eval_text: Optional[Path]) -> None:
    click.echo(f"parameters  {result.params_before:,} -> {result.params_after:,} ({100 * result.removed_fraction:.2f}% removed, target {100 * ratio:.1f}%)")
    for line in width_lines(result.original_widths, result.widths):
        click.echo(line)
    if result.blocks_removed:
        click.echo(f"  blocks removed: {', '.join(map(str, result.blocks_removed))}")
    click.echo(f"scoring     {result.seconds:.1f} s, peak RSS {format_size(result.peak_rss_bytes)}" + (f", peak GPU {format_size(result.peak_gpu_bytes)}" if result.peak_gpu_bytes else ""))
    if output is None:
        click.echo("dry run: no checkpoint written" + (f"; plan in {plan_out}" if plan_out else ""))
        return
    assert result.report is not None
    click.echo(f"wrote {result.report.output_dir} ({len(result.report.shards)} shard(s), {format_size(result.report.total_size)})")
    if result.plan.metadata.get("format") == "decilm":
        click.echo(
            "note: a DeciLM (Nemotron-NAS) checkpoint, as vLLM reads it: transformers loads the model with trust_remote_code=True "
            "and asks about remote code even for its tokenizer: AutoTokenizer.from_pretrained(OUT, trust_remote_code=False)"
        )
    if eval_text is not None:
        _print_perplexity(model, output, eval_text)


def _print_perplexity(model: Path, output: Path, eval_text: Path) -> None:
    from transformers.utils import logging as hf_logging

    from structprune.evaluate.perplexity import perplexity_of_text

    hf_logging.disable_progress_bar()  # two loads of small models: their bars only add noise

    _say(f"perplexity of {model} on {eval_text}…")
    before = perplexity_of_text(model, eval_text, window=128, progress=True)
    _say(f"perplexity of {output} on {eval_text}…")
    after = perplexity_of_text(output, eval_text, window=128, progress=True)
    click.echo(f"perplexity  {before.perplexity:.2f} -> {after.perplexity:.2f} on {eval_text} ({after.windows} windows of 128 tokens)")


def _protection(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(f"expected FIRST,LAST (two non-negative integers), got {text!r}", param_hint="--protect")
    return int(parts[0]), int(parts[1])


def width_lines(original: Dict[str, List[int]], new: Dict[str, List[int]]) -> List[str]:
    """The summary's widths, named as --structures names them (``mlp``, ``heads``), original →
    new per layer. Under GQA the graph counts query heads per KV group; the line gives heads per
    layer and the groups they form, so 3 per group is not read as 3 per layer."""
    lines = []
    if "channels" in new:
        lines.append(f"  {'mlp':<6} {_change(original.get('channels'), new['channels'])} channels per layer")
    if "query_heads" in new and "kv_groups" in new:
        heads = [groups * per_group for groups, per_group in zip(new["kv_groups"], new["query_heads"])]
        before = None
        if "query_heads" in original and "kv_groups" in original:
            before = [groups * per_group for groups, per_group in zip(original["kv_groups"], original["query_heads"])]
        lines.append(
            f"  {'heads':<6} {_change(before, heads)} query heads per layer "
            f"(KV groups {_change(original.get('kv_groups'), new['kv_groups'])}, query heads per group {_change(original.get('query_heads'), new['query_heads'])})"
        )
    for kind in sorted(set(new) - {"channels", "query_heads", "kv_groups"}):
        lines.append(f"  {kind:<6} {_change(original.get(kind), new[kind])} per layer")
    return lines


def _change(before: Optional[List[int]], after: List[int]) -> str:
    """``512 -> 328`` where every layer is alike, else the values layer by layer."""
    new = f"{after[0]}" if len(set(after)) == 1 else ", ".join(map(str, after))
    if not before or before == after or set(before) == set(after) == {after[0]}:  # unchanged (removed blocks aside)
        return new
    return (f"{before[0]}" if len(set(before)) == 1 else ", ".join(map(str, before))) + f" -> {new}"


def _comma_separated(text: str, option: str, kind: Callable[[str], Any] = str) -> Tuple[Any, ...]:
    """``"a, b"`` → ``(kind("a"), kind("b"))``; a bad item is a usage error naming ``option``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return tuple(kind(item) for item in items)
    except ValueError as err:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s ({err})", param_hint=option) from err


@main.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--ppl", type=click.Path(exists=True, path_type=Path), help="Held-out text for perplexity (.txt, .jsonl or a saved datasets directory).")
@click.option("--window", "windows", type=click.IntRange(min=2), multiple=True, help="Perplexity window in tokens; repeat for several [default: 128].")
@click.option("--text-field", default="text", show_default=True, help="Field of .jsonl records (or dataset columns) holding the text.")
@click.option("--tasks", default="", help="Comma list of lm-evaluation-harness tasks, zero-shot (needs `pip install lm-eval` and the task data locally).")
@click.option("--task-path", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Directory of extra lm-eval task definitions (YAML), e.g. tasks on local data files.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N documents of each task (a quick look, not the task's figure).")
@click.option("--compare", "original", type=click.Path(exists=True, file_okay=False, path_type=Path), help="The original model: measure it too and print ratios MODEL / ORIGINAL.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Dtype the model is loaded and run in.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Perplexity windows (and lm-eval requests) per forward; figures do not depend on it.")
@click.option("--context", type=click.IntRange(min=1), default=128, show_default=True, help="Prompt tokens of the timed prefill and decode, and the context of the MACs count.")
@click.option("--batch-sizes", default="1,16", show_default=True, help="Comma list of batch sizes to time.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=16, show_default=True, help="Timed one-token decode steps per run.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed runs before the timed ones.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs; the median is reported.")
@click.option("--no-timing", is_flag=True, help="Skip speed and memory measurements.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the timing token ids and of lm-eval.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@sets_torch_threads
@reports_errors
def eval_command(model: Path, ppl: Optional[Path], windows: Tuple[int, ...], text_field: str, tasks: str, task_path: Optional[Path], limit: Optional[int], original: Optional[Path], device: str, dtype: str, batch_size: int, context: int, batch_sizes: str, decode_tokens: int, warmup: int, repeats: int, no_timing: bool, seed: int, as_json: bool) -> None:
    """Measure MODEL: parameters, MACs per token, held-out perplexity, zero-shot tasks, prefill and
    decode speed and peak memory at each batch size; with --compare, the original too and the
    ratios. Protocols: structprune.evaluate.costs and structprune.evaluate.perplexity (docs/architecture.md)."""
    from transformers.utils import logging as hf_logging

    from structprune.evaluate import costs
    from structprune.evaluate.report import EvalOptions, evaluate_model, protocol_lines, report_json, report_table
    from structprune.evaluate.costs import TimingProtocol

    hf_logging.disable_progress_bar()  # loading bars of each model would bury the figures
    options = EvalOptions(
        ppl=ppl, windows=windows or (128,), text_field=text_field, tasks=_comma_separated(tasks, "--tasks"), task_path=task_path,
        limit=limit, device=device, dtype=dtype, batch_size=batch_size, measure_speed=not no_timing,
        timing=TimingProtocol(context=context, batch_sizes=_comma_separated(batch_sizes, "--batch-sizes", int), decode_tokens=decode_tokens, warmup=warmup, repeats=repeats, seed=seed),
    )
    before = costs.load_average()
    measured = evaluate_model(model, options, progress=not as_json, announce_timing=_announce_timing(model))
    reference = evaluate_model(original, options, progress=not as_json, announce_timing=_announce_timing(original)) if original is not None else None
    load = costs.MachineLoad(before=before, after=costs.load_average(), cpus=costs.usable_cpus())
    busy = load.warning(comparing=reference is not None) if options.measure_speed else None
    if as_json:
        document = report_json(measured, options, reference)
        document["machine_load"] = {"before": load.before, "after": load.after, "cpus": load.cpus, "warning": busy}
        click.echo(json.dumps(document, indent=2))
    else:
        for line in protocol_lines(options, measured) + [""] + report_table(measured, reference):
            click.echo(line)
    if busy:
        _say(busy)  # after the table, where it is read


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output directory: sweep.csv, sweep.json, sweep.md, sweep.png.")
@click.option("--ratios", default="0.1,0.2,0.3,0.5", show_default=True, help="Comma list of fractions of all parameters to remove.")
@click.option("--importance", "importances", default="taylor,l2,random", show_default=True, help="Comma list of estimators (as for prune).")
@click.option("--ppl", type=click.Path(exists=True, path_type=Path), required=True, help="Held-out text for perplexity.")
@click.option("--window", "windows", type=click.IntRange(min=2), multiple=True, help="Perplexity window in tokens; repeat for several (the plot uses the first) [default: 128].")
@click.option("--sparsify", "sparsify_methods", default="", help="Comma list of sparsify methods (magnitude, wanda, sparsegpt) also run at every ratio, zeroing that fraction of every row: rows sparse-METHOD, with the dense size and MACs (zeros save nothing on dense kernels), for contrast.")
@pruning_options
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the sweep is complete).")
@sets_torch_threads
@reports_errors
def sweep(model: Path, output: Path, ratios: str, importances: str, ppl: Path, windows: Tuple[int, ...], sparsify_methods: str, overwrite: bool, **pruning: Any) -> None:
    """Prune MODEL at every ratio with every estimator and plot held-out perplexity against the
    fraction of parameters removed (dense as reference). Pruned checkpoints are deleted once
    measured; OUTPUT appears only when the sweep is complete."""
    from transformers.utils import logging as hf_logging

    from structprune.evaluate.sweep import SweepOptions, markdown_table, plotting_available, run_sweep

    hf_logging.disable_progress_bar()
    options = SweepOptions(
        ratios=_comma_separated(ratios, "--ratios", float), importances=_comma_separated(importances, "--importance"), ppl=ppl,
        pruning=_prune_options(0.5, "obs", pruning), windows=windows or (128,), text_field=pruning["text_field"],
        sparsify_methods=_comma_separated(sparsify_methods, "--sparsify"),
    )  # each run replaces the ratio and the estimator
    if not plotting_available():
        click.echo("note: matplotlib is not installed, so no sweep.png (pip install 'structprune[plot]')", err=True)
    rows = run_sweep(model, output, options, overwrite=overwrite)
    for line in markdown_table(rows, options.windows):
        click.echo(line)
    click.echo(f"wrote {output}")


@main.command()
@click.argument("pruned", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output checkpoint directory (merged weights; the adapter in OUTPUT/adapter).")
@click.option("--data", type=click.Path(exists=True, path_type=Path), required=True, help="Training text: .txt (documents split by <|endoftext|> lines), .jsonl (text records, or Alpaca instruction/input/output records: loss on the response only), or a saved datasets directory.")
@click.option("--eval-data", type=click.Path(exists=True, path_type=Path), help="Held-out text: perplexity before, every --eval-every steps, and after.")
@click.option("--text-field", default="text", show_default=True, help="Field of .jsonl records (or dataset columns) holding plain text.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per training example.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=1.5, show_default=True, help="Passes over the training examples.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Examples per micro-batch per process.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True, help="Peak learning rate.")
@click.option("--scheduler", type=click.Choice(["cosine", "linear", "constant", "constant_with_warmup"]), default="cosine", show_default=True, help="Learning-rate schedule (transformers' get_scheduler).")
@click.option("--warmup-steps", type=click.IntRange(min=0), help="Warm-up steps (overrides --warmup-ratio).")
@click.option("--warmup-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.05, show_default=True, help="Warm-up as a fraction of the steps.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True, help="AdamW weight decay of the adapter weights.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Clip gradients to this norm (0: no clipping).")
@click.option("--rank", "lora_rank", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=32.0, show_default=True, help="LoRA alpha (the update is scaled by alpha / rank).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="LoRA dropout.")
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma list of module names to adapt; all-linear is every linear layer but the LM head.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass (less memory, ~30% more time).")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default="no", show_default=True, help="Autocast precision (CUDA only).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Dtype of the frozen base during training (the output keeps the input's dtypes).")
@click.option("--load-in", type=click.Choice(["4bit", "8bit"]), help="Quantize the frozen base with bitsandbytes (QLoRA): CUDA, or the CPU with bitsandbytes >= 0.48 (its CPU kernels).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="cpu, or cuda (each process of a launcher takes its own GPU).")
@click.option("--teacher", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Distil from this dense checkpoint (same tokenizer): the loss becomes the KL between the teacher's and the student's next-token distributions.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="With --teacher: softmax temperature T of both distributions (the KL is scaled by T²).")
@click.option("--distill-weight", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="With --teacher: alpha of alpha·KL + (1 − alpha)·LM loss (1: distillation only).")
@click.option("--teacher-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="With --teacher: dtype the teacher runs in, never more precise than the student [default: the student's compute dtype].")
@click.option("--teacher-logits", type=click.Path(file_okay=False, path_type=Path), help="With --teacher: compute the teacher's top-k logits of every example once into this directory (reused by later runs), free the teacher, then train from them.")
@click.option("--teacher-topk", type=click.IntRange(min=1), default=64, show_default=True, help="With --teacher-logits: logits kept per token (the KL is over this support).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the LoRA initialisation, example order and dropout.")
@click.option("--eval-every", type=click.IntRange(min=1), help="Evaluate --eval-data every N steps.")
@click.option("--eval-window", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per perplexity window.")
@click.option("--save-every", type=click.IntRange(min=1), help="Save a resumable state every N steps in .OUTPUT.structprune-recover/ beside OUTPUT.")
@click.option("--resume", is_flag=True, help="Continue from the latest state saved by --save-every (starts over when there is none).")
@click.option("--max-shard-size", type=SizeParam(), default=DEFAULT_MAX_SHARD_SIZE, show_default=True, help="Largest output shard.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary.")
@sets_torch_threads
@reports_errors
def recover(pruned: Path, output: Path, data: Path, eval_data: Optional[Path], text_field: str, seq_len: int, epochs: float, max_steps: Optional[int], batch_size: int, grad_accum: int, lr: float, scheduler: str, warmup_steps: Optional[int], warmup_ratio: float, weight_decay: float, max_grad_norm: float, lora_rank: int, alpha: float, dropout: float, target_modules: str, gradient_checkpointing: bool, mixed_precision: str, dtype: str, load_in: Optional[str], device: str, teacher: Optional[Path], temperature: float, distill_weight: float, teacher_dtype: Optional[str], teacher_logits: Optional[Path], teacher_topk: int, seed: int, eval_every: Optional[int], eval_window: int, save_every: Optional[int], resume: bool, max_shard_size: int, overwrite: bool, quiet: bool) -> None:
    """Recover a pruned checkpoint PRUNED with a short LoRA fine-tune on --data, and write the
    merged weights as a stock checkpoint (same config, names and dtypes) to OUTPUT. With
    --teacher DENSE the adapter learns the dense model's next-token distributions (distillation).

    \b
    Several processes train together (DDP, the same global batch as one process):
      torchrun --nproc-per-node 4 -m structprune recover PRUNED --device cuda ...
      accelerate launch --config_file FSDP.yaml -m structprune recover PRUNED --device cuda ...
    Only the first process prints and writes.
    """
    from transformers.utils import logging as hf_logging

    from structprune.recover.training import RecoverOptions, recover as run_recovery

    hf_logging.disable_progress_bar()  # transformers' weight-loading bars (base, teacher, merge) would bury recovery's own
    options = RecoverOptions(
        data=data, eval_data=eval_data, text_field=text_field, seq_len=seq_len, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, scheduler=scheduler, warmup_steps=warmup_steps,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm, rank=lora_rank, alpha=alpha,
        dropout=dropout, target_modules=_comma_separated(target_modules, "--target-modules"),
        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision, dtype=dtype, load_in=load_in,
        device=device, teacher=teacher, teacher_logits=teacher_logits, teacher_topk=teacher_topk, teacher_dtype=teacher_dtype,
        temperature=temperature, distill_weight=distill_weight, seed=seed, eval_every=eval_every, eval_window=eval_window,
        save_every=save_every, max_shard_size=max_shard_size,
    )
    result = run_recovery(pruned, output, options, overwrite=overwrite, resume=resume, progress=not quiet)
    if quiet or not result.main_process:
        return
    if result.resumed_from is not None:
        click.echo(f"resumed     from step {result.resumed_from}")
    click.echo(f"wrote {output} in {result.seconds:.1f} s (adapter in {output / 'adapter'})")
    click.echo(f"training    {result.steps} steps of {result.global_batch} examples ({result.examples} examples, {result.trainable_params:,} LoRA parameters)")
    if teacher is not None:
        source = f"top-{teacher_topk} logits in {teacher_logits}" if teacher_logits is not None else "live"
        click.echo(f"distilled   from {teacher} ({source}), temperature {temperature:g}, weight {distill_weight:g} (1 - weight on the LM loss)")
    click.echo(f"loss        {result.losses[0]:.4f} -> {result.losses[-1]:.4f} (first and last step)")
    if result.evals:
        first, last = result.evals[0], result.evals[-1]
        click.echo(f"perplexity  {first.perplexity:.2f} (step {first.step}) -> {last.perplexity:.2f} (step {last.step}) on {eval_data}, {eval_window}-token windows")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output checkpoint directory.")
@click.option("--sparsity", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Fraction of the weights of every output row of every block linear layer to zero (unstructured).")
@click.option("--pattern", metavar="N:M", help="Semi-structured instead: at most N non-zeros in every M consecutive inputs (2:4 runs on sparse tensor cores).")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), default="wanda", show_default=True, help="magnitude: |W|; wanda: |W|·‖X‖ (calibration inputs); sparsegpt: optimal brain surgeon, the kept weights updated column block by column block.")
@click.option("--calib", type=click.Path(exists=True, path_type=Path), help="Calibration text (wanda, sparsegpt): .txt, .jsonl, or a saved datasets directory.")
@click.option("--text-field", default="text", show_default=True, help="Field of .jsonl records (or dataset columns) holding the text.")
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True, help="Calibration windows of --seq-len tokens.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for calibration sampling.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]; one block at a time is loaded there.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Compute dtype of the block forwards (the masks and updates are computed from the stored weights in float64).")
@click.option("--micro-batch", type=click.IntRange(min=1), default=4, show_default=True, help="Samples per block forward call.")
@click.option("--damping", type=click.FloatRange(min=0), default=DEFAULT_DAMPING, show_default=True, help="With sparsegpt: λ relative to the mean diagonal of the inputs' Gram matrix.")
@click.option("--block-size", type=click.IntRange(min=1), default=128, show_default=True, help="With sparsegpt: columns updated together (a multiple of M with --pattern).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@sets_torch_threads
@reports_errors
def sparsify(model: Path, output: Path, sparsity: Optional[float], pattern: Optional[str], method: str, calib: Optional[Path], text_field: str, samples: int, seq_len: int, seed: int, device: str, dtype: str, micro_batch: int, damping: float, block_size: int, overwrite: bool) -> None:
    """Zero individual weights of MODEL's block linear layers (unstructured --sparsity, or N:M
    --pattern) and write a stock checkpoint with zeros to OUTPUT: same config and shapes, so
    nothing gets smaller or, on dense kernels, faster; for contrast with prune's structured
    removal. OUTPUT/sparsity.json records the pattern and method."""
    from structprune.plan.sparsify import SparsifyOptions, sparsify as run_sparsify

    options = SparsifyOptions(
        sparsity=sparsity, pattern=pattern, method=method, calib=calib, text_field=text_field, samples=samples, seq_len=seq_len,
        seed=seed, device=device, dtype=dtype, micro_batch=micro_batch, damping=damping, block_size=block_size,
    )
    options.check()  # before the imports and the trace
    bars: Dict[str, Any] = {}
    try:
        result = run_sparsify(model, output, options, overwrite=overwrite, progress=_stage_progress(bars), apply_progress=True)
    finally:
        for bar in bars.values():
            bar.close()
    target = f"{options.pattern} pattern" if options.pattern else f"{100 * (options.sparsity or 0):.0f}% per row"
    click.echo(f"zeroed      {result.zeroed:,} of {result.sparsified_parameters:,} block linear weights ({target}, {method}): {100 * result.zeroed_fraction:.2f}% of all {result.total_parameters:,} parameters")
    click.echo(f"sparsified  in {result.seconds:.1f} s, peak RSS {format_size(result.peak_rss_bytes)}")
    assert result.report is not None
    click.echo(f"wrote {result.report.output_dir} ({len(result.report.shards)} shard(s), {format_size(result.report.total_size)}); config unchanged, pattern in {output / 'sparsity.json'}")
