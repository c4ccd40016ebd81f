"""Perplexity throughput: `structprune eval --ppl`'s computation against a plain transformers loop
over the same windows, in one process, interleaved.

Both run SmolLM2-135M (``~/.cache/structprune-fixtures/smollm2``, float32, CPU, structprune's
default torch threads) on the first ``--windows`` 128-token windows of
``../shared/fixtures/text/heldout.txt`` tokenised as one stream:

- structprune: ``structprune.evaluate.perplexity.perplexity`` at its default batch size (8
  windows per forward; one loss per window, from the logits);
- plain: ``model(input_ids=batch, labels=batch).loss`` under ``torch.no_grad`` over the same
  batches of 8 windows (what a user would write).

One untimed run of each, then ``--rounds`` rounds in alternating order; tokens/s from the median.
Target (issue 16): structprune >= 0.9x plain.

    python benches/bench_ppl_throughput.py [--windows 32 --rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from interleaved import time_interleaved

from structprune.evaluate.perplexity import DEFAULT_BATCH_SIZE, perplexity
from structprune.io.threads import configure_torch_threads
from structprune.models.loading import load_model, load_tokenizer
from structprune.score.calibration import load_texts, token_stream

SMOLLM2 = Path.home() / ".cache" / "structprune-fixtures" / "smollm2"
HELDOUT = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "text" / "heldout.txt"
WINDOW = 128


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = configure_torch_threads(args.threads)
    model = load_model(SMOLLM2, dtype="float32", device="cpu").eval()
    stream = token_stream(load_texts(HELDOUT), load_tokenizer(SMOLLM2))[: args.windows * WINDOW]
    batches = stream.reshape(-1, WINDOW).split(DEFAULT_BATCH_SIZE)

    def structprune_run() -> float:
        return perplexity(model, stream, window=WINDOW).mean_loss

    def plain_run() -> float:
        with torch.no_grad():
            losses = [model(input_ids=batch, labels=batch).loss.item() for batch in batches]
        return statistics.fmean(losses)

    runs: Dict[str, Callable[[], float]] = {"structprune": structprune_run, "plain": plain_run}
    losses = {name: run() for name, run in runs.items()}
    times, load_start, load_end = time_interleaved(runs, args.rounds)
    tokens = args.windows * WINDOW
    print(f"SmolLM2-135M float32, {args.windows} windows of {WINDOW} tokens, batches of {DEFAULT_BATCH_SIZE}, {threads} torch thread(s),"
          f" load average {load_start:.1f} -> {load_end:.1f}")
    for name in runs:
        median = statistics.median(times[name])
        print(f"{name:12s} {tokens / median:8.0f} tokens/s (median {median:.2f} s; runs {', '.join(f'{t:.2f}' for t in times[name])}); mean loss {losses[name]:.4f}")
    ratios = [p / s for s, p in zip(times["structprune"], times["plain"])]
    print(f"structprune / plain throughput: {statistics.median(ratios):.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
