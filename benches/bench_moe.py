#!/usr/bin/env python3
"""Removing routed experts from a tiny mixture-of-experts model: which saliency keeps the right ones.

The model is a tiny Mixtral (vocabulary and tokenizer of ``demo/model``, hidden 64, 2 layers,
8 experts of width 128, top-2 routing, 4 query heads over 2 KV heads) trained here briefly
(``--steps`` AdamW steps on ``demo/text/calib.txt``, windows of 64 tokens, the router's
load-balancing loss on) and saved to ``--work``; a random model would have nothing worth keeping.
Then, for 25% and 50% of the experts (2 and 4 of 8 in every layer), it runs

    structprune prune MODEL --structures experts --experts N --expert-saliency S --no-reconstruct \
        --calib demo/text/calib.txt --samples 32 --seq-len 64 --importance taylor

for S = reap (gate weight × expert output norm over the tokens routed to it), frequency (drop the
least frequently routed experts: the baseline), importance (Taylor Σ|w·g| on the experts' weights,
from the streamed backward), and random (``--importance random`` on the weights), each in its own
process (``--threads``, default 1), and prints a table: held-out perplexity
(``demo/text/heldout.txt``, windows of 128 tokens), the run's wall time and the process's peak
RSS. ``--expert-channels`` prints a second table: the channels inside the experts cut instead
(``--structures expert-channels --ratio R`` for R = 0.2 and 0.4 of all parameters, the same width
left in every expert) by every estimator that scores them without reconstruction, then by
``obs`` (OBS selection of the channels while each expert is refitted) and by Taylor with
``--reconstruct`` (each kept expert's down projection refitted on its routed inputs). See
benches/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
CALIB = DEMO / "text" / "calib.txt"
HELDOUT = DEMO / "text" / "heldout.txt"
EXPERTS = 8
SALIENCIES: Tuple[Tuple[str, str, str], ...] = (
    ("reap", "reap", "taylor"),
    ("frequency", "frequency", "taylor"),
    ("taylor", "importance", "taylor"),
    ("random", "importance", "random"),
)
"""(label, --expert-saliency, --importance)."""
CHANNEL_ESTIMATORS: Tuple[Tuple[str, str, bool], ...] = (
    *((name, name, False) for name in ("taylor", "wanda-sp", "flap", "entropy", "head-gate", "bonsai", "lora-grad", "random")),
    ("obs", "obs", True),
    ("taylor+rec", "taylor", True),
)
"""(label, --importance, --reconstruct)."""
CHANNEL_RATIOS = (0.2, 0.4)


@dataclass
class Row:
    saliency: str
    removed: int
    perplexity: float
    seconds: float
    peak_rss_mib: float


def train_tiny_mixtral(out: Path, *, steps: int, seed: int = 0) -> float:
    """A tiny Mixtral trained ``steps`` steps on the calibration text; returns the seconds taken."""
    from structprune.models.loading import load_tokenizer
    from structprune.score.calibration import calibration_batch, load_texts

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(DEMO / "model")
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=256,
        output_router_logits=True, router_aux_loss_coef=0.02, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    windows = calibration_batch(load_texts(CALIB), tokenizer, samples=steps * 8, seq_len=64, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    started = time.perf_counter()
    model.train()
    for batch in windows.split(8):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    model.eval()
    model.config.output_router_logits = False
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "model" / name, out / name)
    return seconds


def perplexity(model_dir: Path) -> float:
    from structprune.evaluate.perplexity import perplexity_of_text

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return perplexity_of_text(model, HELDOUT, window=128, tokenizer=None).perplexity


def prune_in_child(model: Path, out: Path, cut: Sequence[str], *, reconstruct: bool = False) -> Tuple[float, float]:
    """Runs ``structprune prune`` with the options ``cut`` in a child process: (wall seconds, the
    child's peak RSS in MiB)."""
    command = [
        sys.executable, "-m", "structprune", "prune", str(model), "-o", str(out), "--overwrite", *cut,
        "--reconstruct" if reconstruct else "--no-reconstruct", "--calib", str(CALIB), "--samples", "32", "--seq-len", "64", "--threads", str(torch.get_num_threads()),
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stderr = child.stderr.read().decode() if child.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return seconds, usage.ru_maxrss / 1024


def trained_model(work: Path, steps: int) -> Path:
    model = work / "tiny-mixtral"
    if not (model / "config.json").exists():
        seconds = train_tiny_mixtral(model, steps=steps)
        print(f"trained {model} for {steps} steps in {seconds:.0f} s", file=sys.stderr)
    return model


def run(work: Path, model: Path, fractions: Sequence[float]) -> List[Row]:
    rows = [Row("dense", 0, perplexity(model), 0.0, 0.0)]
    for fraction in fractions:
        removed = round(EXPERTS * fraction)
        for label, saliency, importance in SALIENCIES:
            out = work / f"pruned-{label}-{removed}"
            cut = ["--ratio", "0.9", "--structures", "experts", "--experts", str(removed), "--expert-saliency", saliency, "--importance", importance]
            seconds, rss = prune_in_child(model, out, cut)
            rows.append(Row(label, removed, perplexity(out), seconds, rss))
            print(f"{label} -{removed}: done", file=sys.stderr)
    return rows


def run_expert_channels(work: Path, model: Path) -> List[Tuple[str, float, int, float, float, float]]:
    """Per estimator and ratio: (estimator, ratio, expert width left, perplexity, seconds, peak RSS MiB)."""
    rows = []
    for ratio in CHANNEL_RATIOS:
        for label, importance, reconstruct in CHANNEL_ESTIMATORS:
            out = work / f"channels-{label}-{ratio}"
            cut = ["--ratio", str(ratio), "--structures", "expert-channels", "--importance", importance]
            seconds, rss = prune_in_child(model, out, cut, reconstruct=reconstruct)
            width = int(transformers.AutoConfig.from_pretrained(out).intermediate_size)
            rows.append((label, ratio, width, perplexity(out), seconds, rss))
            print(f"expert channels {label} {ratio}: done", file=sys.stderr)
    return rows


CHOICE_ESTIMATORS = ("taylor", "wanda-sp", "lora-grad", "l2")
"""The weight estimators compared choosing each expert's own channels against one choice for all."""


def per_expert_against_shared(work: Path, model: Path) -> List[Tuple[str, float, float, float]]:
    """Per estimator and ratio: (estimator, ratio, perplexity with each expert's own lowest
    channels removed (what ``prune`` does here), with the same channels removed in every expert).
    One scoring per estimator; the two plans differ only in the choice (``Scores.per_expert``)."""
    from structprune import apply_plan, trace
    from structprune.models.loading import load_tokenizer
    from structprune.plan.cuts import checkpoint_cut_plan
    from structprune.plan.selection import Target, plan_uniform
    from structprune.score.calibration import calibration_batch, load_texts
    from structprune.score.importance import estimator
    from structprune.score.scorer import score
    from structprune.score.streaming import StreamedModel

    graph = trace(model)
    batch = calibration_batch(load_texts(CALIB), load_tokenizer(model), samples=32, seq_len=64, seed=0)
    config = transformers.AutoConfig.from_pretrained(model)
    rows = []
    for name in CHOICE_ESTIMATORS:
        scores = score(StreamedModel(model, blocks_prefix="model.layers"), graph, estimator(name), batch, kinds=["expert_channels"])
        for ratio in CHANNEL_RATIOS:
            perplexities = []
            for choice in (scores, replace(scores, per_expert={})):
                selection = plan_uniform(graph, choice, Target(ratio=ratio, structures=("expert-channels",)), config.num_attention_heads, config.hidden_size)
                out = work / f"choice-{name}-{ratio}-{'own' if choice is scores else 'shared'}"
                shutil.rmtree(out, ignore_errors=True)
                apply_plan(model, checkpoint_cut_plan(model, graph, selection), out)
                perplexities.append(perplexity(out))
            rows.append((name, ratio, *perplexities))
            print(f"expert-channel choice {name} {ratio}: done", file=sys.stderr)
    return rows


def print_table(rows: Sequence[Row]) -> None:
    print(f"{'saliency':<10} {'experts removed':>16} {'perplexity':>11} {'time (s)':>9} {'peak RSS (MiB)':>15}")
    for r in rows:
        removed = f"{r.removed}/{EXPERTS} ({100 * r.removed / EXPERTS:.0f}%)" if r.removed else "-"
        timing = f"{r.seconds:9.1f} {r.peak_rss_mib:15.0f}" if r.removed else f"{'-':>9} {'-':>15}"
        print(f"{r.saliency:<10} {removed:>16} {r.perplexity:11.2f} {timing}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/structprune-bench-moe"), help="Where the trained model and the outputs go (the model is reused).")
    parser.add_argument("--steps", type=int, default=300, help="Training steps of the tiny model (batches of 8 windows of 64 tokens).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads, here and in the pruning runs (one is fastest on a busy machine).")
    parser.add_argument("--expert-channels", action="store_true", help="Also cut the channels inside the experts, by every estimator that scores them.")
    parser.add_argument("--channel-choice", action="store_true", help="Also compare each expert keeping its own channels with one choice of channels for all experts.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    model = trained_model(args.work, args.steps)
    print_table(run(args.work, model, (0.25, 0.5)))
    if args.expert_channels:
        print(f"\n{'estimator':<10} {'ratio':>6} {'expert width':>13} {'perplexity':>11} {'time (s)':>9} {'peak RSS (MiB)':>15}")
        for importance, ratio, width, ppl, seconds, rss in run_expert_channels(args.work, model):
            print(f"{importance:<10} {ratio:6.2f} {width:>6}/128 {ppl:11.2f} {seconds:9.1f} {rss:15.0f}")
    if args.channel_choice:
        print(f"\n{'estimator':<10} {'ratio':>6} {'own per expert':>15} {'shared':>9}")
        for name, ratio, own, shared in per_expert_against_shared(args.work, model):
            print(f"{name:<10} {ratio:6.2f} {own:15.2f} {shared:9.2f}")


if __name__ == "__main__":
    main()
