"""Does a width-pruned model run faster where the matmuls dominate? Dense vs 20%-of-all-parameters
width-pruned shapes of SmolLM2-135M and of a Llama-3.2-1B-shaped model, prefill and decode, batch 1
and 16, float32 and bfloat16, on the CPU; and does rounding the kept MLP width to a multiple of
64/128 run faster than the exact width?

Speed depends on shapes, not values, so every model is built from its config with random weights
(N(0, 0.02), seeded; no checkpoint is read or written). The pruned shapes are those a uniform
heads+MLP plan gives: a quarter of the query heads of every KV group (rounded to whole heads; none
where the hidden size would not stay a multiple of the head count, as a stock config needs), then
the MLP channels that bring the removal to 20% of all parameters (embeddings included, uncut),
kept width rounded to the nearest multiple of M for each ``--multiples`` M, as the planner does (1:
the exact width; the planner's default is 64 for MLPs of 2048+ channels, else 8); multiples that
give the same width are one variant.

Timing (``structprune.evaluate.costs``' protocol): prefill is one forward of B x ``--context``
tokens without a cache; decode the mean of ``--decode-tokens`` greedy one-token steps after an
untimed prefill with a KV cache. One warmup run of every variant, then ``--pairs`` rounds; in
each round every variant runs once, in an order rotated round by round, so load from other
processes falls on all alike. A speedup is the median over rounds of dense time / variant time.
The MACs ratio (dense / variant, ``macs_per_token`` at the context) is printed beside it: the
issue's targets are decode >= 1.2x and batch-16 prefill within 10% of the MACs ratio.

    python benches/bench_decode.py                                  # both models, both dtypes
    python benches/bench_decode.py --models smollm2 --dtypes float32 --pairs 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from structprune.evaluate.costs import decode_seconds_per_token, macs_per_token, prefill_seconds
from structprune.io.threads import configure_torch_threads

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
MODELS = {"smollm2": SMOLLM2_135M, "llama-1b": LLAMA_3_2_1B}
# A prefill of 16 x 128 tokens of the 1B model is ~5 TFLOP, minutes per run on two cores: the
# batch-16 prefill uses a shorter context there (still 16 x 16 = 256 rows per matmul).
DEFAULT_CONTEXT = {"smollm2": 64, "llama-1b": 16}
REMOVED = 0.20
QUERY_HEADS_REMOVED = 0.25


@dataclass(frozen=True)
class Variant:
    name: str
    config: LlamaConfig


def parameter_count(shape: Dict[str, int]) -> int:
    hidden, inter, heads, kv, head_dim = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    layer = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    embeddings = shape["vocab_size"] * hidden * (1 if shape["tie_word_embeddings"] else 2)
    return shape["num_hidden_layers"] * layer + embeddings + hidden


def pruned_shape(dense: Dict[str, int], multiple: int) -> Dict[str, int]:
    """Query heads cut by a quarter per KV group, then the MLP width that removes 20% of all parameters, rounded to ``multiple``."""
    per_group = dense["num_attention_heads"] // dense["num_key_value_heads"]
    heads = dense["num_key_value_heads"] * max(1, round(per_group * (1 - QUERY_HEADS_REMOVED)))
    if dense["hidden_size"] % heads:  # a stock config needs it (Llama-3.2-1B: 2048 / 24): the planner cuts MLP channels only
        heads = dense["num_attention_heads"]
    shape = dict(dense, num_attention_heads=heads)
    target = (1 - REMOVED) * parameter_count(dense)
    per_channel = 3 * dense["hidden_size"] * dense["num_hidden_layers"]
    width = dense["intermediate_size"] - math.ceil((parameter_count(shape) - target) / per_channel)
    return dict(shape, intermediate_size=max(multiple, round(width / multiple) * multiple))


def build(config: LlamaConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model with random weights, without transformers' (slow) initialisation."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        for module in model.modules():  # the rotary frequencies: buffers computed at construction, emptied above
            if type(module).__name__.endswith("RotaryEmbedding"):
                for name, buffer in type(module)(module.config).named_buffers():
                    getattr(module, name).copy_(buffer)
    model.tie_weights()  # to_empty gave the head storage of its own
    return model.eval()


def interleaved(runs: Dict[str, Callable[[], float]], pairs: int) -> Dict[str, List[float]]:
    """One untimed run of each, then ``pairs`` rounds of each in a rotated order."""
    names = list(runs)
    for name in names:
        runs[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(pairs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(runs[name]())
    return times


def bench_model(model_name: str, dtype_name: str, multiples: Sequence[int], pairs: int, context: int, decode_tokens: int, batches: Sequence[int]) -> List[Dict[str, object]]:
    dense_shape = MODELS[model_name]
    base = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, attn_implementation="sdpa")
    variants = [Variant("dense", LlamaConfig(**dense_shape, **base))]
    multiples_by_width: Dict[int, List[int]] = {}
    for multiple in multiples:
        multiples_by_width.setdefault(pruned_shape(dense_shape, multiple)["intermediate_size"], []).append(multiple)
    for same_width in multiples_by_width.values():
        shape = pruned_shape(dense_shape, same_width[0])
        variants.append(Variant("pruned x" + "/".join(map(str, same_width)), LlamaConfig(**shape, **base)))
    dtype = getattr(torch, dtype_name)
    models = {v.name: build(v.config, dtype) for v in variants}
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    macs = {name: macs_per_token(m, context).total for name, m in models.items()}
    for v in variants:
        print(f"  {model_name} {v.name:12s} heads {v.config.num_attention_heads:3d} mlp {v.config.intermediate_size:5d}"
              f" params {counts[v.name] / 1e6:8.1f} M ({100 * (1 - counts[v.name] / counts['dense']):4.1f}% removed)"
              f" MACs/token {macs[v.name] / 1e6:8.1f} M", flush=True)
    rows: List[Dict[str, object]] = []
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        prompt = torch.randint(dense_shape["vocab_size"], (batch, context), generator=generator)
        for phase in ("prefill", "decode"):
            def run(model: LlamaForCausalLM) -> Callable[[], float]:
                if phase == "prefill":
                    return lambda: prefill_seconds(model, prompt)
                return lambda: decode_seconds_per_token(model, prompt, decode_tokens)
            load_before = os.getloadavg()[0]
            times = interleaved({name: run(m) for name, m in models.items()}, pairs)
            load_after = os.getloadavg()[0]
            for name in models:
                if name == "dense":
                    continue
                speedups = [d / t for d, t in zip(times["dense"], times[name])]
                row = {
                    "model": model_name, "dtype": dtype_name, "batch": batch, "context": context, "phase": phase, "variant": name,
                    "dense_s": statistics.median(times["dense"]), "variant_s": statistics.median(times[name]),
                    "speedup": statistics.median(speedups), "speedup_min": min(speedups), "speedup_max": max(speedups),
                    "macs_ratio": macs["dense"] / macs[name], "load": [load_before, load_after], "threads": torch.get_num_threads(),
                }
                rows.append(row)
                print(f"  {model_name} {dtype_name:8s} B={batch:2d} {phase:7s} {name:12s} dense {row['dense_s'] * 1e3:9.1f} ms"
                      f"  pruned {row['variant_s'] * 1e3:9.1f} ms  speedup {row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"
                      f"  MACs ratio {row['macs_ratio']:.2f}x  load {load_before:.1f}->{load_after:.1f}", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama-1b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--multiples", default="1,8,64,128", help="Kept-MLP-width multiples to compare (1: exact).")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--context", type=int, default=None, help="Prompt tokens [default: 64 for smollm2, 16 for llama-1b].")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: structprune's, io/threads.py].")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    configure_torch_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}", flush=True)
    rows: List[Dict[str, object]] = []
    started = time.perf_counter()
    for model_name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            context = args.context or DEFAULT_CONTEXT[model_name]
            rows += bench_model(model_name, dtype_name, [int(m) for m in args.multiples.split(",")], args.pairs, context,
                                args.decode_tokens, [int(b) for b in args.batches.split(",")])
    print(f"done in {time.perf_counter() - started:.0f} s, load average {os.getloadavg()}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
