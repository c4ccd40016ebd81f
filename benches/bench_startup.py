"""Start-up as a user feels it: whole `structprune` processes, from exec to exit.

Times, interleaved and repeated in one run, each a fresh process with its own empty
$XDG_CACHE_HOME for the first-time case:

- ``structprune --version`` (the floor: Python, numpy, click, the Rust core);
- ``structprune inspect CONFIG`` the first time (trace, stock-config checks; imports torch and
  transformers) and again (read from the trace cache, no torch);
- the first time's floor: a bare ``python -c`` that only imports what tracing a Llama needs (torch,
  transformers' Llama modeling module, ``torch.export``), none of structprune;

on the LLaMA-65B config (built here, no hub access). Targets (issue 16): a config seen before
<= 2 s, the first time <= 5 s, on a quiet machine; the load average is printed with the figures.

    python benches/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

LLAMA_65B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "num_attention_heads": 64,
    "num_key_value_heads": 64, "intermediate_size": 22016, "num_hidden_layers": 80, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "torch_dtype": "float16", "tie_word_embeddings": False,
}
IMPORT_FLOOR = "import torch, torch.export, transformers.models.llama.modeling_llama"
TARGET_CACHED_S = 2.0
TARGET_FIRST_S = 5.0


def structprune_command() -> List[str]:
    beside = Path(sys.executable).with_name("structprune")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "structprune"]


def timed_process(args: List[str], cache_home: Path) -> float:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_home))
    started = time.perf_counter()
    subprocess.run(structprune_command() + args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def timed_import_floor() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORT_FLOOR], check=True)
    return time.perf_counter() - started


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="structprune-startup-"))
    try:
        model = work / "llama-65b"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(LLAMA_65B))
        times: Dict[str, List[float]] = {"--version": [], "inspect, first time": [], "inspect, cached": [], "imports alone": []}
        load_start = os.getloadavg()
        for repeat in range(args.repeats):
            cache_home = work / f"cache-{repeat}"
            times["--version"].append(timed_process(["--version"], cache_home))
            times["inspect, first time"].append(timed_process(["inspect", str(model)], cache_home))
            times["inspect, cached"].append(timed_process(["inspect", str(model)], cache_home))
            times["imports alone"].append(timed_import_floor())
        load_end = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end ({os.cpu_count()} cores)")
    for name, values in times.items():
        print(f"{name:22s} median {medians[name]:6.2f} s   runs {', '.join(f'{v:.2f}' for v in values)}")
    print(f"first time / cached    {medians['inspect, first time'] / medians['inspect, cached']:.1f}x")
    print(f"first time - imports   {medians['inspect, first time'] - medians['imports alone']:.2f} s (structprune's own share of the first time)")
    print(f"cached <= {TARGET_CACHED_S:g} s: {'yes' if medians['inspect, cached'] <= TARGET_CACHED_S else 'no'};"
          f" first time <= {TARGET_FIRST_S:g} s: {'yes' if medians['inspect, first time'] <= TARGET_FIRST_S else 'no'}"
          + ("" if max(load_start[0], load_end[0]) < 1.5 else " (loaded machine: not the quiet-machine figure)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
