"""How many torch threads, and how they wait: the effect on a SmolLM2-135M-shaped model (random
weights) of ``torch.set_num_threads`` and of OpenMP's wait policy, on this machine as loaded as it
is now (the load average is printed; run it on a busy and on a quiet machine).

Each setting runs in a fresh process (the OpenMP wait policy is read once, when torch loads):
threads 1, 2, ... up to the usable CPUs, each with ``OMP_WAIT_POLICY`` unset (libgomp spins a
while before sleeping) and ``PASSIVE`` (sleeps at once), plus structprune's default
(``structprune.io.threads.default_torch_threads``). Rounds are interleaved, the setting order
rotated round by round; each process times a batch-1 prefill of 64 tokens, a batch-1 decode step
after it, and a forward + backward of 1 x 128 tokens (a scoring step), median of ``--steps``.

    python benches/bench_threads.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

WORKER = r"""
import json, os, statistics, sys, time
sys.path.insert(0, {benches!r})
import torch
from structprune.io.threads import configure_torch_threads
from structprune.evaluate.costs import _cache_argument
threads = configure_torch_threads(None if {threads!r} == "default" else int({threads!r}))
from bench_decode import SMOLLM2_135M, build
from transformers import LlamaConfig
model = build(LlamaConfig(**SMOLLM2_135M, max_position_embeddings=4096, attn_implementation="sdpa"), torch.float32)
ids = torch.randint(49152, (1, 128), generator=torch.Generator().manual_seed(0))
def timed(run):
    run()
    times = []
    for _ in range({steps}):
        started = time.perf_counter(); run(); times.append(time.perf_counter() - started)
    return statistics.median(times)
with torch.inference_mode():
    prefill = timed(lambda: model(input_ids=ids[:, :64], use_cache=False))
    argument = _cache_argument(model)
    past = model(input_ids=ids[:, :64], use_cache=True)[argument]
    def step():
        model(input_ids=ids[:, 64:65], use_cache=True, **{{argument: past}})
        past.crop(-1)  # back to the 64-token prompt: every step decodes at the same context
    decode = timed(step)
def train_step():
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
backward = timed(train_step)
print(json.dumps({{"threads": threads, "prefill": prefill, "decode": decode, "forward_backward": backward}}))
"""


def run_setting(threads: str, policy: Optional[str], steps: int) -> Dict[str, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    code = WORKER.format(benches=str(Path(__file__).resolve().parent), threads=threads, steps=steps)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    settings: List[Tuple[str, Optional[str]]] = [(str(n), policy) for n in range(1, cpus + 1) for policy in (None, "PASSIVE")]
    settings.append(("default", None))
    results: Dict[Tuple[str, Optional[str]], List[Dict[str, float]]] = {s: [] for s in settings}
    loads = [os.getloadavg()[0]]
    for round_index in range(args.rounds):
        shift = round_index % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            results[setting].append(run_setting(*setting, args.steps))
        loads.append(os.getloadavg()[0])
    print(f"{cpus} usable CPUs; load average {', '.join(f'{load:.1f}' for load in loads)} (start, after each round)")
    print(f"{'threads':>9s} {'wait policy':12s} {'prefill 1x64':>13s} {'decode step':>12s} {'fwd+bwd 1x128':>14s}   (medians over rounds, ms; min-max)")
    for (threads, policy), runs in results.items():
        cells = []
        for key in ("prefill", "decode", "forward_backward"):
            values = [run[key] * 1e3 for run in runs]
            cells.append(f"{statistics.median(values):7.0f} ({min(values):.0f}-{max(values):.0f})")
        label = threads if threads != "default" else f"default={runs[0]['threads']:.0f}"
        print(f"{label:>9s} {policy or 'unset':12s} " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
