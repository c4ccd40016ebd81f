#!/usr/bin/env python3
"""Distillation against LM loss in recovery, on the bundled demo model: which objective wins back
more held-out perplexity with the same steps, data and seed.

In one run it:

1. prunes ``demo/model`` (3.1M parameters) by ``--ratio`` of its parameters with ``--importance``
   (``structprune.prune.make_plan`` + ``apply_plan``, heads + MLP, uniform widths, no
   reconstruction) and measures dense and pruned perplexity on ``demo/text/heldout.txt``
   (window 128, the first ``--heldout-chars`` characters);
2. recovers the pruned checkpoint once per ``--runs`` entry with ``structprune.recover.training.recover``
   on ``demo/text/calib.txt`` (its first ``--train-chars`` characters if given): the same ``--steps`` × ``--batch-size`` × ``--seq-len`` examples,
   lr, LoRA rank and seed for every entry, only the objective changes. An entry is ``lm`` (LM
   loss) or ``kd`` with ``:``-separated settings ``a=ALPHA`` (distill weight), ``t=TEMPERATURE``,
   ``k=K`` (top-k cached logits instead of the live teacher), e.g. ``kd:a=0.5:t=2``;
3. prints, per entry, the recovered perplexity, the fraction of the pruning gap closed
   ``(pruned − recovered) / (pruned − dense)`` and the wall time of the ``recover`` call;
   ``--json OUT`` saves everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
HELDOUT = ROOT / "demo" / "text" / "heldout.txt"
WINDOW = 128
DEFAULT_RUNS = "lm,kd,kd:a=0.5,kd:t=2,kd:k=64"


def parse_run(entry: str, teacher: Path, cache_root: Path) -> Dict[str, Any]:
    """RecoverOptions changes for one ``--runs`` entry."""
    kind, *settings = entry.split(":")
    if kind == "lm" and not settings:
        return {}
    if kind != "kd":
        raise SystemExit(f"--runs: {entry!r} is neither lm nor kd[:a=ALPHA][:t=T][:k=K]")
    changes: Dict[str, Any] = {"teacher": teacher}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name == "a":
            changes["distill_weight"] = float(value)
        elif name == "t":
            changes["temperature"] = float(value)
        elif name == "k":
            changes["teacher_topk"] = int(value)
            changes["teacher_logits"] = cache_root / f"k{value}"
        else:
            raise SystemExit(f"--runs: unknown setting {setting!r} in {entry!r} (a=, t=, k=)")
    return changes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--importance", default="l2")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of objectives (default {DEFAULT_RUNS})")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-chars", type=int, default=100_000)
    parser.add_argument("--train-chars", type=int, help="train on this prefix of calib.txt (default: all of it)")
    parser.add_argument("--work-dir", type=Path, help="keep the checkpoints here")
    parser.add_argument("--json", type=Path, help="save the figures as JSON")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from structprune import apply_plan
    from structprune.evaluate.perplexity import perplexity_of_text
    from structprune.prune import PruneOptions, make_plan
    from structprune.recover.training import RecoverOptions, recover

    hf_logging.disable_progress_bar()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="structprune-bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    heldout = work / "heldout.txt"
    heldout.write_text(HELDOUT.read_text()[: args.heldout_chars])
    train = work / "train.txt"
    train.write_text(CALIB.read_text()[: args.train_chars])

    def held_out_perplexity(model_dir: Path) -> float:
        return perplexity_of_text(model_dir, heldout, window=WINDOW).perplexity

    pruned_dir = work / "pruned"
    # Selection alone (no reconstruction), so the comparison is about recovery only.
    plan = make_plan(MODEL, PruneOptions(ratio=args.ratio, importance=args.importance, calib=CALIB, seed=args.seed, reconstruct=False)).plan
    apply_plan(MODEL, plan, pruned_dir, overwrite=True)
    dense, pruned = held_out_perplexity(MODEL), held_out_perplexity(pruned_dir)
    print(f"dense {dense:.2f}, pruned {pruned:.2f} ({args.importance}, {args.ratio:.0%} of parameters), window {WINDOW}, {args.heldout_chars:,} held-out characters", flush=True)

    base = RecoverOptions(data=train, max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    rows: List[Dict[str, Any]] = []
    for entry in args.runs.split(","):
        options = replace(base, **parse_run(entry, MODEL, work / "teacher-logits"))
        started = time.perf_counter()
        result = recover(pruned_dir, work / "recovered", options, overwrite=True)
        seconds = time.perf_counter() - started
        recovered = held_out_perplexity(work / "recovered")
        closed = (pruned - recovered) / (pruned - dense)
        rows.append({"run": entry, "perplexity": recovered, "gap_closed": closed, "seconds": seconds, "losses": result.losses})
        print(f"{entry:<16} perplexity {recovered:8.2f}  gap closed {100 * closed:5.1f}%  {seconds:6.1f} s", flush=True)
    print(f"{args.steps} steps × {args.batch_size} × {args.seq_len} tokens of {result.examples} examples, lr {args.lr:g}, seed {args.seed}, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        figures = {"dense": dense, "pruned": pruned, "args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
