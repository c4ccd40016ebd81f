"""Streamed Taylor scoring against one plain forward + ``loss.backward()`` of the whole model, on
SmolLM2-135M (``~/.cache/structprune-fixtures/smollm2``), float32, CPU, the same calibration batch,
in one process, interleaved; then where the streamed run's time goes (cProfile, by stage).

- streamed: ``StreamedModel(model_dir)`` + ``structprune.score.scorer.score(model, graph,
  estimator("taylor"), ids, kinds=<prune's default: every kind but hidden>)`` at the default
  micro-batch (4): every block read from the checkpoint for the forward, again for the backward,
  where its forward is recomputed;
- plain: the model loaded whole (``load_model``; loading not timed), one forward of the same
  ``[samples, seq_len]`` batch with ``labels=ids`` and ``loss.backward()`` (LLM-Pruner's way; no
  scores computed).

Random token ids (the time does not depend on them). Target (issue 16): streamed <= 2x plain at
default settings on a quiet machine.

    python benches/bench_scoring.py [--samples 8 --seq-len 128 --rounds 3 --profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from interleaved import time_interleaved

from structprune.io.threads import configure_torch_threads
from structprune.models.loading import load_model
from structprune.score.importance import estimator
from structprune.score.scorer import score
from structprune.score.streaming import StreamedModel
from structprune.tracing.graph import KINDS, trace

SMOLLM2 = Path.home() / ".cache" / "structprune-fixtures" / "smollm2"
# What the streamed run's time is spent in, by the function that does it (cumulative times, so
# the block forwards hold the linear layers of both passes, and stages may overlap).
STAGES = {
    "reading block weights (both passes)": "_read_bytes",
    "block forwards (forward pass + recompute)": "run_block",
    "autograd backward": "_engine_run_backward",
    "Taylor statistics": "on_params",
    "loss (final norm, head, embedding)": "_loss_gradients",
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="Also profile one streamed run (cProfile) and print the top functions.")
    args = parser.parse_args(argv)
    threads = configure_torch_threads(args.threads)
    graph = trace(SMOLLM2)
    ids = torch.randint(graph.model.get("vocab_size") or 49152, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    kinds = [k for k in KINDS if k != "hidden"]
    plain_model = load_model(SMOLLM2, dtype="float32", device="cpu")
    ids = ids % plain_model.config.vocab_size

    def streamed() -> None:
        model = StreamedModel(SMOLLM2, blocks_prefix=graph.blocks.prefix)
        score(model, graph, estimator("taylor"), ids, micro_batch=args.micro_batch, kinds=kinds)

    def plain() -> None:
        plain_model.zero_grad(set_to_none=True)
        plain_model(input_ids=ids, labels=ids).loss.backward()

    runs: Dict[str, Callable[[], None]] = {"streamed": streamed, "plain": plain}
    for run in runs.values():
        run()
    times, load_start, load_end = time_interleaved(runs, args.rounds)
    print(f"SmolLM2-135M float32, {args.samples} x {args.seq_len} tokens, micro-batch {args.micro_batch}, {threads} torch thread(s),"
          f" load average {load_start:.1f} -> {load_end:.1f}")
    for name in runs:
        print(f"{name:9s} median {statistics.median(times[name]):6.2f} s (runs {', '.join(f'{t:.2f}' for t in times[name])})")
    ratios = [s / p for s, p in zip(times["streamed"], times["plain"])]
    print(f"streamed / plain: {statistics.median(ratios):.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)}; target <= 2x on a quiet machine)")
    if args.profile:
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.runcall(streamed)
        total = time.perf_counter() - started
        stats = pstats.Stats(profiler)
        print(f"\nwhere a streamed run's {total:.2f} s go (cumulative, cProfile; overlapping stages):")
        for stage, function in STAGES.items():
            cumulative = sum(entry[3] for key, entry in stats.stats.items() if key[2] == function)  # type: ignore[attr-defined]
            print(f"  {stage:30s} {cumulative:6.2f} s  ({100 * cumulative / total:4.1f}%)")
        stats.sort_stats("cumulative").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
