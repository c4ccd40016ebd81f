#!/usr/bin/env python3
"""LoRA recovery on the team's trained tiny Llama: how much of the perplexity lost to pruning a
short fine-tune wins back, and in how much wall time.

In one run it:

1. reads the fixture ``../shared/fixtures/tiny-llama`` (``../shared/fixtures/README.md``; skips with
   a message when ``../shared`` is absent), its calibration text ``text/calib.txt`` (training data
   for both scoring and recovery) and held-out text ``text/heldout.txt`` (evaluation only), and
   measures the dense held-out perplexity (window 128; reference 40.26);
2. prunes it with ``structprune.prune.prune`` (PruneOptions(ratio, importance "taylor", calib, the
   other options at their defaults: heads and MLP unless ``--structures``/``--blocks`` say otherwise,
   uniform widths, 32 × 128-token samples)) into a temporary directory and measures the pruned
   perplexity;
3. runs ``structprune.recover.training.recover`` on the pruned checkpoint with the defaults of
   ``RecoverOptions`` (what ``structprune recover PRUNED -o OUT --data calib.txt`` does) unless
   flags change them, timing it from the call to the complete output directory (loading,
   tokenizing, training, merging and writing), then loads the written checkpoint with plain
   ``from_pretrained`` and measures its perplexity;
4. prints the figures (recovery's wall and CPU time, and the load average: other work on the machine
   stretches the wall time), the fraction of the pruning gap closed,
   ``(pruned − recovered) / (pruned − dense)``, and whether the issue's target holds (≥ 50% of the
   gap closed within 10 minutes); ``--json OUT`` saves everything. The exit status is 1 when the
   target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
MODEL = FIXTURES / "tiny-llama"
CALIB = FIXTURES / "text" / "calib.txt"
HELDOUT = FIXTURES / "text" / "heldout.txt"
WINDOW = 128
TARGET_GAP_CLOSED = 0.5
TARGET_SECONDS = 600.0


def held_out_perplexity(model_dir: Path) -> float:
    from structprune.evaluate.perplexity import perplexity_of_text

    return perplexity_of_text(model_dir, HELDOUT, window=WINDOW).perplexity


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of all parameters pruned")
    parser.add_argument("--structures", default="heads,mlp", help="as prune --structures")
    parser.add_argument("--blocks", type=int, help="as prune --blocks: whole blocks removed when --structures combines blocks with widths")
    parser.add_argument("--max-steps", type=int, help="recovery steps (default: one epoch of calib.txt)")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--work-dir", type=Path, help="keep the pruned and recovered checkpoints here")
    parser.add_argument("--json", type=Path, help="save the figures as JSON")
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file() or not CALIB.is_file() or not HELDOUT.is_file():
        print(f"skipped: the team fixture is absent ({MODEL}, {CALIB}, {HELDOUT})")
        return 0

    import torch
    from transformers.utils import logging as hf_logging

    from structprune.prune import PruneOptions, prune
    from structprune.recover.training import RecoverOptions, recover

    hf_logging.disable_progress_bar()
    changes = {name: getattr(args, name) for name in ("max_steps", "epochs", "lr", "rank", "alpha", "batch_size", "seq_len") if getattr(args, name) is not None}
    options = replace(RecoverOptions(data=CALIB), **changes)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="structprune-bench-recover-"))
    pruned_dir, recovered_dir = work / "pruned", work / "recovered"

    dense = held_out_perplexity(MODEL)
    print(f"dense       perplexity {dense:.2f} (window {WINDOW}; reference 40.26)", flush=True)
    started = time.perf_counter()
    pruning_options = PruneOptions(ratio=args.ratio, importance="taylor", calib=CALIB, structures=tuple(args.structures.split(",")), blocks=args.blocks)
    pruning = prune(MODEL, pruned_dir, pruning_options, overwrite=True)
    prune_seconds = time.perf_counter() - started
    pruned = held_out_perplexity(pruned_dir)
    depth = f", blocks {pruning.blocks_removed} removed" if pruning.blocks_removed else ""
    print(f"pruned      perplexity {pruned:.2f} ({100 * pruning.removed_fraction:.1f}% of parameters removed, taylor, {args.structures}{depth}, {prune_seconds:.1f} s)", flush=True)

    started, cpu_started = time.perf_counter(), time.process_time()
    result = recover(pruned_dir, recovered_dir, options, overwrite=True, progress=True)
    recover_seconds, recover_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    load = os.getloadavg()[0]
    recovered = held_out_perplexity(recovered_dir)
    closed = (pruned - recovered) / (pruned - dense) if pruned > dense else float("nan")
    met = closed >= TARGET_GAP_CLOSED and recover_seconds <= TARGET_SECONDS
    print(f"recovered   perplexity {recovered:.2f} ({result.steps} steps × {result.global_batch} examples of {options.seq_len} tokens, "
          f"rank {options.rank}, lr {options.lr:g}, {result.trainable_params:,} LoRA parameters)")
    print(f"gap closed  {100 * closed:.1f}% of {pruned - dense:.2f} in {recover_seconds:.1f} s wall, {recover_cpu_seconds:.1f} s CPU "
          f"on {os.cpu_count()} cores, load average {load:.1f} at the end (train loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f})")
    print(f"target      >= {100 * TARGET_GAP_CLOSED:.0f}% within {TARGET_SECONDS:.0f} s: {'met' if met else 'MISSED'}")
    if args.json:
        figures: Dict[str, Any] = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
            "ratio": args.ratio,
            "structures": args.structures,
            "blocks_removed": pruning.blocks_removed,
            "removed_fraction": pruning.removed_fraction,
            "dense_perplexity": dense,
            "pruned_perplexity": pruned,
            "recovered_perplexity": recovered,
            "gap_closed": closed,
            "prune_seconds": prune_seconds,
            "recover_seconds": recover_seconds,
            "recover_cpu_seconds": recover_cpu_seconds,
            "load_average_at_end": load,
            "steps": result.steps,
            "global_batch": result.global_batch,
            "trainable_params": result.trainable_params,
            "losses": result.losses,
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
            "target_met": met,
        }
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
