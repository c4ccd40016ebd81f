#!/usr/bin/env python3
"""Uniform against global planning: held-out perplexity of the fixture ``tiny-llama`` after removing
20% and 50% of all parameters, from the same scores, for every planning variant.

The model is scored once per estimator (``structprune.prune.make_plan``, 32 windows of 128 tokens of
``text/calib.txt``, seed 0); each variant then plans from those scores (``plan_uniform`` or
``plan_global`` with a normalisation and protected blocks), is written with ``apply_plan`` in the
format ``auto`` chooses (stock, or DeciLM for per-layer widths) and evaluated with
``structprune.evaluate.perplexity.perplexity_of_text`` (window 128; dense reference 40.26). Prints one table;
``--json OUT`` saves it. Needs ``../shared/fixtures`` (exits with a message when absent).

    python benches/bench_planning.py [--estimators taylor,l2] [--ratios 0.2,0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from math import prod
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"

# (label, planning, normalize, protect): protect None means the planner's default for that planning.
VARIANTS = (
    ("uniform", "uniform", "none", None),
    ("global", "global", "none", None),
    ("global, no protection", "global", "none", (0, 0)),
    ("global, mean-normalised", "global", "mean", None),
    ("global, L2-normalised", "global", "l2", None),
)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "tiny-llama")
    parser.add_argument("--calib", type=Path, default=FIXTURES / "text" / "calib.txt")
    parser.add_argument("--heldout", type=Path, default=FIXTURES / "text" / "heldout.txt")
    parser.add_argument("--estimators", default="taylor,l2")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser.parse_args(argv)


def run_variant(model: Path, heldout: Path, scored: Any, options: Any, label: str, work: Path) -> Dict[str, Any]:
    from structprune.apply import apply_plan, plan_output
    from structprune.plan.cuts import checkpoint_cut_plan
    from structprune.evaluate.perplexity import perplexity_of_text
    from structprune.tracing.graph import trace
    from structprune.prune import plan_selection

    graph = trace(model)
    selection, _ = plan_selection(model, graph, scored.scores, options)
    plan = checkpoint_cut_plan(model, graph, selection, layout="auto")
    out = work / label.replace(" ", "_").replace(",", "")
    apply_plan(model, plan, out, overwrite=True)
    after = sum(prod(t.shape) for t in plan_output(model, plan).tensors)
    return {
        "variant": label,
        "format": plan.metadata.get("format"),
        "removed": 1 - after / scored.params_before,
        "perplexity": perplexity_of_text(out, heldout, window=128).perplexity,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not args.model.is_dir():
        print(f"skipped: fixture {args.model} not found (needs ../shared/fixtures beside the project)")
        return 0
    from transformers.utils import logging as hf_logging

    from structprune.evaluate.perplexity import perplexity_of_text
    from structprune.prune import PruneOptions, make_plan

    hf_logging.disable_progress_bar()
    dense = perplexity_of_text(args.model, args.heldout, window=128).perplexity
    print(f"dense perplexity {dense:.2f} (window 128)")
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-planning-") as tmp:
        for estimator in args.estimators.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                base = PruneOptions(ratio=ratio, importance=estimator, calib=args.calib)
                started = time.perf_counter()
                scored = make_plan(args.model, base)
                print(f"{estimator} @ {ratio:.0%}: scored in {time.perf_counter() - started:.1f} s", flush=True)
                for label, planning, normalize, protect in VARIANTS:
                    options = replace(base, planning=planning, normalize=normalize, protect=protect)
                    row = run_variant(args.model, args.heldout, scored, options, label, Path(tmp))
                    row.update(estimator=estimator, target=ratio)
                    rows.append(row)
                    print(f"  {label:<26} {row['format']:<7} removed {row['removed']:.2%}  ppl {row['perplexity']:.2f}", flush=True)
    print()
    print("| estimator | target | planning | format | removed (all params) | perplexity |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['estimator']} | {row['target']:.0%} | {row['variant']} | {row['format']} | {row['removed']:.2%} | {row['perplexity']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"dense": dense, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
