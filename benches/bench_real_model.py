#!/usr/bin/env python3
"""Quality of pruning on a real pretrained model: SmolLM2-135M-Instruct (built by
``../shared/fixtures/make-smollm2.sh``), pruned at 20% and 50% of all parameters by every requested
configuration, next to Torch-Pruning's Taylor pipeline and the "drop blocks by Block Influence"
baseline, with the wall time and peak RSS of every run.

Protocol (printed with the table):

* calibration: ``../shared/fixtures/text/calib.txt``, ``--samples`` windows of ``--seq-len``
  tokens drawn with ``--seed`` (structprune's ``calibration_batch``; the same batch for
  Torch-Pruning's gradients);
* evaluation: ``text/heldout.txt`` as one token stream, the first ``--tokens`` tokens (default:
  all), non-overlapping 128-token windows, mean window loss, exp (``structprune.evaluate.perplexity``);
  the dense model is measured in the same run;
* every structprune configuration runs in a subprocess of its own (``prune.prune``: trace, score,
  plan, reconstruct when asked, apply into a temporary directory, then ``load_pruned`` and the
  perplexity); "prune s" and "prune peak RSS" are measured in that process before the evaluation
  starts (what ``structprune prune`` costs), wall time and the process's peak RSS (evaluation
  included: loading the model in float32) come from ``os.wait4``;
* scores are cached per estimator in ``WORK/scores`` (structprune's resume directories), so the
  second ratio and the options that only change planning or reconstruction score nothing: their
  "prune" time is planning + reconstruction + writing;
* Torch-Pruning (``--torch-pruning``; needs ``pip install 'structprune[bench]'``): the pipeline of
  ``bench_prune_quality.py`` (GroupTaylorImportance, one ratio for heads and MLP channels, local
  ranking, the ratio searched to the target), in a subprocess as well.

A configuration is written ``ESTIMATOR[+option...]``: ``+rec`` reconstruction, ``+global``
global planning (its default protection), ``+bias`` FLAP's bias compensation, ``+kv`` whole KV
groups instead of query heads, ``+dense``/``+layer`` the reconstruction target, ``+s128`` 128 calibration samples, ``+d0.1`` damping 0.1,
``+it2r16`` iterative pruning in 2 steps with 16 distillation steps (batch 8) between them,
``blocks`` the Block-Influence baseline (whole blocks only). For contrast, ``sparse-METHOD``
(magnitude, wanda, sparsegpt) zeroes RATIO of every row's weights with ``structprune sparsify`` and
``sparse-METHOD+2:4`` applies the 2:4 pattern whatever the ratio; their "removed" column is the
zeroed fraction (nothing is removed: the checkpoint keeps its size and dense-kernel speed). Usage:

    PY=.venv/bin/python bash ../shared/fixtures/make-smollm2.sh
    .venv/bin/python benches/bench_real_model.py --configs taylor,taylor+rec,blocks --ratios 0.2,0.5 \\
        --torch-pruning --json /tmp/real.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
DEFAULT_MODEL = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "structprune-fixtures" / "smollm2"
WINDOW = 128


def parse_config(name: str) -> Dict[str, Any]:
    """``taylor+rec+global`` → PruneOptions fields (besides ratio and calibration)."""
    parts = name.split("+")
    if parts[0] == "blocks":
        return {"importance": "taylor", "structures": ("blocks",), "reconstruct": False}
    options: Dict[str, Any] = {"importance": parts[0], "reconstruct": False}
    for part in parts[1:]:
        if part == "rec":
            options["reconstruct"] = True
        elif part in ("dense", "layer"):
            options["reconstruction_target"] = part
        elif part == "global":
            options["planning"] = "global"
        elif part == "bias":
            options["bias_compensation"] = True
        elif part == "kv":
            options["gqa"] = "kv-groups"
        elif part.startswith("it") and "r" in part:  # it2r16: 2 iterations, 16 recovery steps between them
            iterations, steps = part[2:].split("r")
            options["iterative"] = {"iterations": int(iterations), "recover_steps": int(steps), "recover_batch_size": 8}
        elif part.startswith("s") and part[1:].isdigit():
            options["samples"] = int(part[1:])
        elif part.startswith("d"):
            options["damping"] = float(part[1:])
        elif part.startswith("p") and "," in part:
            first, last = part[1:].split(",")
            options["protect"] = (int(first), int(last))
        else:
            raise SystemExit(f"unknown option '+{part}' in configuration '{name}'")
    return options


def heldout_stream(model: Path, heldout: Path, tokens: Optional[int]) -> Any:
    from structprune.score.calibration import load_texts, token_stream
    from structprune.models.loading import load_tokenizer

    stream = token_stream(load_texts(heldout), load_tokenizer(model))
    return stream[:tokens] if tokens else stream


def measure(model: Any, stream: Any) -> Dict[str, float]:
    from structprune.evaluate.perplexity import perplexity

    started = time.perf_counter()
    result = perplexity(model, stream, window=WINDOW)
    return {"ppl": result.perplexity, "windows": result.windows, "eval_s": time.perf_counter() - started}


def block_fraction(model_dir: Path, params_after: int, params_before: int) -> float:
    """The removed fraction of the parameters inside the blocks (embeddings and head are never cut)."""
    from structprune.io.checkpoint import read_checkpoint

    outside = sum(math.prod(t.shape) for n, t in read_checkpoint(model_dir).tensors.items() if ".layers." not in n)
    return (params_before - params_after) / (params_before - outside)


def run_sparse(args: argparse.Namespace) -> Dict[str, Any]:
    """A ``sparse-METHOD[+N:M]`` configuration, in this (child) process: sparsify, load, evaluate."""
    from structprune.models.loading import load_pruned
    from structprune.plan.sparsify import SparsifyOptions, sparsify

    method, _, pattern = args.one[len("sparse-"):].partition("+")
    options = SparsifyOptions(
        sparsity=None if pattern else args.ratio, pattern=pattern or None, method=method, calib=args.calib, samples=args.samples,
        seq_len=args.seq_len, seed=args.seed,
    )
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        out = Path(scratch) / "sparse"
        started = time.perf_counter()
        result = sparsify(args.model, out, options)
        row = {
            "config": args.one, "ratio": args.ratio, "removed_all": result.zeroed_fraction,
            "removed_blocks": result.zeroed / result.sparsified_parameters, "prune_s": time.perf_counter() - started,
            "prune_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "widths": {}, "blocks_removed": [],
        }
        row.update(measure(load_pruned(out), heldout_stream(args.model, args.heldout, args.tokens)))
    return row


def run_one(args: argparse.Namespace) -> Dict[str, Any]:
    """One configuration, in this (child) process: prune, load, evaluate; a JSON row."""
    import torch

    from structprune.io.checkpoint import read_checkpoint
    from structprune.recover.iterative import IterativeOptions, prune_iteratively
    from structprune.models.loading import load_pruned
    from structprune.prune import PruneOptions, prune

    torch.manual_seed(0)
    options = parse_config(args.one)
    iterative = options.pop("iterative", None)
    options.setdefault("samples", args.samples)
    prune_options = PruneOptions(ratio=args.ratio, calib=args.calib, seq_len=args.seq_len, seed=args.seed, **options)
    key = f"{options['importance']}-{options['samples']}-{'blocks' if options.get('structures') == ('blocks',) else 'widths'}"
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        out = Path(scratch) / "pruned"
        started = time.perf_counter()
        if iterative:
            result = prune_iteratively(args.model, out, prune_options, IterativeOptions(**iterative)).final
            result.params_before = read_checkpoint(args.model).parameters
        else:
            result = prune(args.model, out, prune_options, resume=Path(args.work) / "scores" / key)
        prune_s = time.perf_counter() - started
        prune_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the evaluation loads the model
        row = {
            "config": args.one, "ratio": args.ratio, "removed_all": result.removed_fraction,
            "removed_blocks": block_fraction(args.model, result.params_after, result.params_before), "prune_s": prune_s,
            "prune_rss_MiB": prune_rss,
            "widths": {kind: sorted(set(w)) for kind, w in result.widths.items()}, "blocks_removed": result.blocks_removed,
            "reconstruction": result.plan.metadata.get("reconstruction"),
        }
        row.update(measure(load_pruned(out), heldout_stream(args.model, args.heldout, args.tokens)))
    return row


def run_torch_pruning(args: argparse.Namespace) -> Dict[str, Any]:
    """Torch-Pruning's Taylor pipeline at ``args.ratio``, in this (child) process."""
    sys.path.insert(0, str(ROOT / "benches"))
    import bench_prune_quality as quality

    namespace = quality.parse_args([
        "--model", str(args.model), "--calib", str(args.calib), "--heldout", str(args.heldout), "--samples", str(args.samples),
        "--seq-len", str(args.seq_len), "--seed", str(args.seed),
    ])
    ctx = quality.Context(namespace)
    ctx.stream = heldout_stream(args.model, args.heldout, args.tokens)
    started = time.perf_counter()
    row = quality.run_torch_pruning(ctx, quality.TorchPruning(ctx), args.ratio, {})
    if row.status != "ok":
        return {"config": "torch-pruning", "ratio": args.ratio, "error": row.error}
    return {
        "config": "torch-pruning", "ratio": args.ratio, "removed_all": row.removed_all, "removed_blocks": row.removed_blocks,
        "prune_s": time.perf_counter() - started - (row.eval_s or 0), "ppl": row.perplexity, "eval_s": row.eval_s,
        "widths": {"heads": row.heads, "mlp": row.mlp}, "note": row.note,
    }


def child(args: argparse.Namespace, extra: Sequence[str]) -> Dict[str, Any]:
    """Runs one measurement in a fresh process; adds its wall time and peak RSS (``wait4``)."""
    command = [sys.executable, __file__, *extra, "--model", str(args.model), "--calib", str(args.calib), "--heldout", str(args.heldout),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--work", str(args.work)]
    if args.tokens:
        command += ["--tokens", str(args.tokens)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if status != 0 or not lines:
        return {"config": " ".join(extra), "error": f"exit status {status}"}
    row = json.loads(lines[-1])
    row.update({"wall_s": wall, "peak_rss_MiB": usage.ru_maxrss / 1024})
    return row


def render(rows: Sequence[Dict[str, Any]], dense: float) -> str:
    lines = [
        "| config | ratio | removed (all / blocks) | ppl | × dense | prune s | prune peak RSS MiB | eval s | wall s | process peak RSS MiB | widths |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r.get('ratio', '')} | error: {r['error']} | | | | | | | | |")
            continue
        widths = ", ".join(f"{k} {v}" for k, v in r.get("widths", {}).items())
        if r.get("blocks_removed"):
            widths += f"; {len(r['blocks_removed'])} blocks"
        lines.append(
            f"| {r['config']} | {r['ratio']} | {100 * r['removed_all']:.1f}% / {100 * r['removed_blocks']:.1f}% | {r['ppl']:.2f} | "
            f"{r['ppl'] / dense:.2f} | {r['prune_s']:.0f} | {r.get('prune_rss_MiB', 0):.0f} | {r.get('eval_s', 0):.0f} | {r.get('wall_s', 0):.0f} | {r.get('peak_rss_MiB', 0):.0f} | {widths} |"
        )
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--calib", type=Path, default=FIXTURES / "text" / "calib.txt")
    p.add_argument("--heldout", type=Path, default=FIXTURES / "text" / "heldout.txt")
    p.add_argument("--configs", default="taylor,taylor+rec,taylor+rec+global,l2+rec,wanda-sp+rec,flap+bias,blocks")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (the project default)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=0, help="evaluate on the first N held-out tokens (default: all)")
    p.add_argument("--torch-pruning", action="store_true", help="also run Torch-Pruning's Taylor pipeline")
    p.add_argument("--work", default="", help="scratch and score cache (default: a temporary directory)")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--tp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.one or args.tp or args.dense:
        if args.dense:
            from structprune.models.loading import load_pruned

            row = {"config": "dense", **measure(load_pruned(args.model), heldout_stream(args.model, args.heldout, args.tokens))}
        else:
            row = (run_sparse(args) if args.one.startswith("sparse-") else run_one(args)) if args.one else run_torch_pruning(args)
        print(json.dumps(row), flush=True)
        return 0
    if not (args.model / "config.json").is_file():
        print(f"skipped: no model at {args.model}; build it with PY=.venv/bin/python bash {FIXTURES / 'make-smollm2.sh'}")
        return 0
    if not args.calib.is_file() or not args.heldout.is_file():
        print(f"skipped: no calibration/held-out text under {FIXTURES / 'text'} (../shared is absent)")
        return 0
    owned = None
    if not args.work:
        owned = tempfile.TemporaryDirectory(prefix="structprune-real-")
        args.work = owned.name
    Path(args.work).mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    dense = child(args, ["--dense"])
    print(json.dumps(dense), flush=True)
    rows: List[Dict[str, Any]] = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        if args.torch_pruning:
            rows.append(child(args, ["--tp", "--ratio", str(ratio)]))
            print(json.dumps(rows[-1]), flush=True)
        for config in [c for c in args.configs.split(",") if c]:
            rows.append(child(args, ["--one", config, "--ratio", str(ratio)]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"\n{args.model}, dense perplexity {dense['ppl']:.2f} ({dense['windows']} windows of {WINDOW} tokens); "
          f"calibration {args.samples}×{args.seq_len} tokens, seed {args.seed}\n")
    print(render(rows, dense["ppl"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"dense": dense, "rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    if owned is not None:
        owned.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
