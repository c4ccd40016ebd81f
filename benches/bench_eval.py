#!/usr/bin/env python3
"""Does pruning make the model faster? Dense vs 20%-pruned (Taylor) team fixture: held-out
perplexity, parameters, MACs per token, prefill and decode latency and throughput at batch 1 and
16, peak memory.

In one run it:

1. prunes ``../shared/fixtures/tiny-llama`` by ``--ratio`` (0.2) of its parameters with
   ``structprune.prune.prune`` (Taylor importance on ``text/calib.txt``, 32x128 windows, seed 0,
   heads+MLP or ``--structures``, ``--blocks`` whole blocks when blocks are among them, widths rounded
   to ``--multiple``, as ``structprune prune`` does) into a temporary
   directory (skips with a message when ``../shared`` is absent);
2. loads both with ``structprune.models.loading.load_model`` (float32, CPU unless ``--device``) and
   measures the held-out perplexity at window 128 (``structprune.evaluate.perplexity``; dense reference 40.26),
   parameters and MACs per token at 128 keys (``structprune.evaluate.costs``);
3. times both, per batch size (1 and 16), with ``structprune.evaluate.costs.prefill_seconds`` (one forward
   of B x 128 tokens, no cache) and ``decode_seconds_per_token`` (mean of 16 greedy one-token steps
   after an untimed 128-token prefill with a KV cache): ``--warmup`` runs of each model, then
   ``--pairs`` runs of each *interleaved run by run* (dense, pruned, pruned, dense, ...), so load
   from other processes falls on both models alike; the speedup is the median over pairs of
   dense time / pruned time, with its quartiles;
4. measures peak memory per batch size once per model (``structprune.evaluate.costs.measure_throughput``);
5. prints the table, the speedups and the issue's target (pruned >= 1.2x dense at batch 1 and 16);
   ``--json OUT`` saves every run.

See benches/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
DENSE_REFERENCE = 40.26  # ../shared/fixtures/README.md, window 128
TARGET_SPEEDUP = 1.2


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=FIXTURES / "tiny-llama")
    parser.add_argument("--calib", type=Path, default=FIXTURES / "text" / "calib.txt")
    parser.add_argument("--heldout", type=Path, default=FIXTURES / "text" / "heldout.txt")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--importance", default="taylor")
    parser.add_argument("--multiple", type=int, default=8, help="kept widths rounded to this (as prune --multiple)")
    parser.add_argument("--structures", default="heads,mlp", help="as prune --structures")
    parser.add_argument("--blocks", type=int, help="as prune --blocks: whole blocks removed when --structures combines blocks with widths")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=21, help="interleaved timed runs of each model per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="save figures, every run and the environment here")
    return parser.parse_args(argv)


def paired_timings(models: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Per batch size and kind (prefill, decode): interleaved runs of both models, their medians
    and the median (and quartiles) of the per-pair ratio dense time / pruned time."""
    import torch

    from structprune.evaluate.costs import decode_seconds_per_token, prefill_seconds, random_prompt

    generator = torch.Generator().manual_seed(0)
    timings: Dict[str, Dict[str, Any]] = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompt = random_prompt(models["dense"], batch, args.context, generator)
        measures: Dict[str, Callable[[Any], float]] = {
            "prefill": lambda model: prefill_seconds(model, prompt),
            "decode": lambda model: decode_seconds_per_token(model, prompt, args.decode_tokens),
        }
        for kind, measure in measures.items():
            timings[f"{kind}@b{batch}"] = interleaved(models, measure, args)
            entry = timings[f"{kind}@b{batch}"]
            low, _, high = entry["speedup_quartiles"]
            print(f"  {kind:7s} b{batch:<3d} dense {1000 * entry['median_seconds']['dense']:8.2f} ms, pruned "
                  f"{1000 * entry['median_seconds']['pruned']:8.2f} ms, speedup {entry['speedup']:.2f}x "
                  f"(quartiles {low:.2f}-{high:.2f})", flush=True)
    return timings


def interleaved(models: Dict[str, Any], measure: Callable[[Any], float], args: argparse.Namespace) -> Dict[str, Any]:
    for model in models.values():
        for _ in range(args.warmup):
            measure(model)
    runs: Dict[str, List[float]] = {name: [] for name in models}
    names = list(models)
    for index in range(args.pairs):
        for name in names if index % 2 == 0 else names[::-1]:
            runs[name].append(measure(models[name]))
    ratios = [dense / pruned for dense, pruned in zip(runs["dense"], runs["pruned"])]
    return {
        "runs": runs,
        "median_seconds": {name: statistics.median(values) for name, values in runs.items()},
        "speedup": statistics.median(ratios),
        "speedup_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = [str(p) for p in (args.model, args.calib, args.heldout) if not p.exists()]
    if missing:
        print(f"SKIPPED: the team fixtures are not here ({', '.join(missing)} missing); they live in ../shared beside the "
              "repository (see ../shared/fixtures/README.md)")
        return 0
    import torch
    from transformers.utils import logging as hf_logging

    from structprune.score.calibration import load_texts, token_stream
    from structprune.evaluate.costs import TimingProtocol, count_parameters, macs_per_token, measure_throughput
    from structprune.evaluate.perplexity import perplexity
    from structprune.models.loading import load_model, load_tokenizer
    from structprune.prune import PruneOptions, prune

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="structprune-bench-eval-") as work:
        pruned_dir = Path(work) / "pruned"
        started = time.perf_counter()
        options = PruneOptions(ratio=args.ratio, importance=args.importance, calib=args.calib, multiple=args.multiple,
                               structures=tuple(args.structures.split(",")), blocks=args.blocks, device=args.device, dtype=args.dtype)
        result = prune(args.model, pruned_dir, options)
        prune_seconds = time.perf_counter() - started
        print(f"pruned {args.model} by {100 * result.removed_fraction:.2f}% ({args.importance}, multiple {args.multiple}) "
              f"in {prune_seconds:.1f} s; blocks removed: {result.blocks_removed or 'none'}; widths: "
              + "; ".join(f"{k} {sorted(set(v))}" for k, v in sorted(result.widths.items())))
        models = {name: load_model(path, dtype=args.dtype, device=args.device) for name, path in (("dense", args.model), ("pruned", pruned_dir))}
    stream = token_stream(load_texts(args.heldout), load_tokenizer(args.model))
    figures: Dict[str, Dict[str, float]] = {}
    for name, model in models.items():
        figures[name] = {
            "parameters": count_parameters(model),
            "macs_per_token": macs_per_token(model, args.context).total,
            "perplexity@128": perplexity(model, stream, window=128, batch_size=32).perplexity,
        }
    reference = f" (fixture reference {DENSE_REFERENCE})" if args.model == FIXTURES / "tiny-llama" else ""
    print(f"dense perplexity {figures['dense']['perplexity@128']:.2f}{reference}; torch threads {torch.get_num_threads()}; "
          f"{args.pairs} interleaved runs per model after {args.warmup} warmup", flush=True)
    timings = paired_timings(models, args)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    memory_protocol = TimingProtocol(context=args.context, batch_sizes=batch_sizes, decode_tokens=args.decode_tokens, warmup=1, repeats=1)
    for name, model in models.items():
        for speed in measure_throughput(model, memory_protocol):
            if speed.peak_memory_bytes is not None:
                figures[name][f"peak_memory_bytes@b{speed.batch}"] = speed.peak_memory_bytes
    for key, entry in timings.items():
        kind, batch = key.split("@b")
        per_second = int(batch) * (args.context if kind == "prefill" else 1)
        for name, seconds in entry["median_seconds"].items():
            figures[name][f"{kind}_seconds@b{batch}"] = seconds
            figures[name][f"{kind}_tokens_per_s@b{batch}"] = per_second / seconds
    load_end = os.getloadavg()

    dense, pruned = figures["dense"], figures["pruned"]
    print(f"\n{'':28s} {'dense':>14s} {'pruned':>14s} {'pruned/dense':>13s}")
    for key in dense:
        print(f"{key:28s} {dense[key]:>14,.4g} {pruned[key]:>14,.4g} {pruned[key] / dense[key]:>13.3f}")
    for key, entry in timings.items():
        verdict = "met" if entry["speedup"] >= TARGET_SPEEDUP else "NOT met"
        print(f"speedup {key:12s} {entry['speedup']:.2f}x (median of per-pair ratios; target >= {TARGET_SPEEDUP}x: {verdict})")
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} on {os.cpu_count()} CPUs "
          "(other processes share this machine; runs of the two models are interleaved)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "pruned": {"removed_fraction": result.removed_fraction, "widths": result.widths, "blocks_removed": result.blocks_removed, "prune_seconds": prune_seconds},
            "figures": figures,
            "timings": timings,
            "memory_protocol": asdict(memory_protocol),
            "environment": {"python": sys.version, "platform": platform.platform(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_start": load_start, "load_end": load_end},
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
