#!/usr/bin/env python3
"""Peak memory of structprune's layer-streamed Taylor scoring on a checkpoint far larger than RAM
budget (``StreamedModel`` + ``structprune.score.scorer.score`` with ``estimator("taylor")``).

In one run it:

1. checks free disk, then writes (streaming, ~40 MiB of memory) a synthetic Llama-shaped sharded
   safetensors checkpoint of at least ``--size-gb`` (default 8 GB; hidden 4096, 32 heads / 8 KV
   heads, intermediate 11008, vocab 32000, as many layers as reach the size, shards of
   ``--shard-gb``, BF16 or F32 values ~N(0, ``--std``), norms at 1.0) plus index and config;
2. in a fresh subprocess: ``structprune.trace(dir)`` → ``StreamedModel(dir, dtype=...)`` →
   ``score(model, graph, estimator("taylor"), ids)`` with a random ``[samples, seq_len]`` batch of
   token ids (no tokenizer needed), and measures its peak RSS (``wait4`` ``ru_maxrss`` of the
   child, plus the child's own ``VmHWM`` and a 20 ms RSS sampler split into anonymous and
   file-backed memory and attributed to the scoring stage that was running) and wall time;
3. prints the table (checkpoint size, peak RSS, time, what a full in-memory backward would need:
   parameters + gradients) and whether the peak is within ``--target-gb`` (default 2 GB);
4. deletes the checkpoint unless ``--keep`` (``--reuse`` reuses a matching one in ``--work``).

Sizes are decimal (1 GB = 10**9 bytes); RSS is shown in MiB/GiB. See benches/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

GB = 10**9
MIB = 2**20
GIB = 2**30
GENERATOR_VERSION = 1
MANIFEST = "bench-source.json"
INDEX = "model.safetensors.index.json"
DTYPE_BYTES = {"BF16": 2, "F32": 4}
COMPUTE_BYTES = {"bfloat16": 2, "float32": 4, "float16": 2}


# --------------------------------------------------------------------------------------------
# Synthetic checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    layers: int
    dtype: str = "BF16"
    vocab: int = 32000
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 11008

    def layer_tensors(self, i: int) -> List[Tuple[str, Tuple[int, ...]]]:
        h, q, kv, m = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        p = f"model.layers.{i}."
        return [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
        ]

    def outside_tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        return [
            ("model.embed_tokens.weight", (self.vocab, self.hidden)),
            ("model.norm.weight", (self.hidden,)),
            ("lm_head.weight", (self.vocab, self.hidden)),
        ]

    def tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        out = [self.outside_tensors()[0]]
        for i in range(self.layers):
            out.extend(self.layer_tensors(i))
        out.extend(self.outside_tensors()[1:])
        return out

    @property
    def layer_params(self) -> int:
        return sum(numel(s) for _, s in self.layer_tensors(0))

    @property
    def outside_params(self) -> int:
        return sum(numel(s) for _, s in self.outside_tensors())

    @property
    def params(self) -> int:
        return self.outside_params + self.layers * self.layer_params

    @property
    def nbytes(self) -> int:
        return self.params * DTYPE_BYTES[self.dtype]

    def config(self) -> Dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 4096,
            "mlp_bias": False,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": False,
            "use_cache": False,
            "vocab_size": self.vocab,
            "dtype": {"BF16": "bfloat16", "F32": "float32"}[self.dtype],
        }


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def choose_spec(size_bytes: int, dtype: str, **shape: int) -> Spec:
    """The smallest number of layers whose checkpoint reaches ``size_bytes``."""
    base = Spec(layers=0, dtype=dtype, **shape)
    per_layer = base.layer_params * DTYPE_BYTES[dtype]
    fixed = base.outside_params * DTYPE_BYTES[dtype]
    layers = max(1, -(-(size_bytes - fixed) // per_layer))
    return Spec(layers=int(layers), dtype=dtype, **shape)


def assign_shards(spec: Spec, shard_bytes: int) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in spec.tensors():
        nbytes = numel(shape) * DTYPE_BYTES[spec.dtype]
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def shard_names(n: int) -> List[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def header(entries: Sequence[Tuple[str, Tuple[int, ...]]], dtype: str) -> bytes:
    meta: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = numel(shape) * DTYPE_BYTES[dtype]
        meta[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


PERIOD = 4_194_301  # prime: rows of 4096 / 11008 values all start at different phases


def random_pool(seed: int, std: float, dtype: str) -> Any:
    """``PERIOD`` random values ~N(0, std) in the checkpoint dtype, stored twice so any window of
    up to PERIOD values is one slice. Tensors cycle through it from a per-name phase: the weights
    are random-looking, generation writes at disk speed, and memory stays ~35 MiB."""
    import numpy as np

    values = np.random.default_rng(seed).standard_normal(PERIOD, dtype=np.float32) * np.float32(std)
    pool = (values.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else values
    return np.concatenate([pool, pool])


def write_tensor(f: Any, pool: Any, name: str, shape: Tuple[int, ...], dtype: str) -> None:
    import numpy as np

    count = numel(shape)
    if len(shape) == 1:  # norm weights: 1.0
        one = np.full(count, 1.0, dtype=np.float32)
        f.write(((one.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else one).tobytes())
        return
    pos = zlib.crc32(name.encode()) % PERIOD
    while count:
        k = min(count, PERIOD)
        f.write(memoryview(pool[pos : pos + k]))
        pos = (pos + k) % PERIOD
        count -= k


def manifest(spec: Spec, shard_bytes: int, seed: int, std: float) -> Dict[str, Any]:
    shards = assign_shards(spec, shard_bytes)
    names = shard_names(len(shards))
    files = {n: len(header(e, spec.dtype)) + sum(numel(s) for _, s in e) * DTYPE_BYTES[spec.dtype] for n, e in zip(names, shards)}
    return {"generator_version": GENERATOR_VERSION, "spec": asdict(spec), "shard_bytes": shard_bytes, "seed": seed, "std": std, "files": files}


def matches(src: Path, wanted: Dict[str, Any]) -> bool:
    try:
        if json.loads((src / MANIFEST).read_text()) != wanted:
            return False
    except (OSError, ValueError):
        return False
    return all((src / n).is_file() and (src / n).stat().st_size == size for n, size in wanted["files"].items())


def generate(src: Path, spec: Spec, shard_bytes: int, seed: int, std: float) -> float:
    """Writes the checkpoint; the manifest goes last so a partial one is never reused."""
    started = time.perf_counter()
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    pool = random_pool(seed, std, spec.dtype)
    shards = assign_shards(spec, shard_bytes)
    names = shard_names(len(shards))
    weight_map: Dict[str, str] = {}
    for i, (fname, entries) in enumerate(zip(names, shards)):
        with open(src / fname, "wb", buffering=0) as f:
            f.write(header(entries, spec.dtype))
            for name, shape in entries:
                write_tensor(f, pool, name, shape, spec.dtype)
                weight_map[name] = fname
        print(f"  wrote {fname} ({(src / fname).stat().st_size / GB:.2f} GB) [{i + 1}/{len(names)}]", flush=True)
    if len(names) > 1:
        index = {"metadata": {"total_size": spec.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        (src / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (src / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    (src / MANIFEST).write_text(json.dumps(manifest(spec, shard_bytes, seed, std), indent=2) + "\n")
    return time.perf_counter() - started


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


# --------------------------------------------------------------------------------------------
# Worker (fresh process): trace, stream, score
# --------------------------------------------------------------------------------------------


def _status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def worker(args: argparse.Namespace) -> None:
    import threading

    t_start = time.perf_counter()
    result: Dict[str, Any] = {"stages": {}}
    stage = ["imports"]
    peaks: Dict[str, Dict[str, int]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = _status()
            p = peaks.setdefault(stage[0], {"rss": 0, "anon": 0, "file": 0})
            p["rss"] = max(p["rss"], s.get("VmRSS", 0))
            p["anon"] = max(p["anon"], s.get("RssAnon", 0))
            p["file"] = max(p["file"], s.get("RssFile", 0))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    import torch

    import structprune
    from structprune.score import float32_compute
    from structprune.tracing.graph import KINDS
    from structprune.score.importance import estimator
    from structprune.score.scorer import score
    from structprune.score.streaming import ActivationStore, StreamedModel

    torch.set_num_threads(args.threads or torch.get_num_threads())
    result["imports_s"] = time.perf_counter() - t_start
    result["rss_after_imports"] = _status()["VmRSS"]
    result["torch_threads"] = torch.get_num_threads()
    result["torch"] = torch.__version__
    model_dir = Path(args.model)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    if args.half_matmul == "float32":
        # What a CPU without bfloat16/float16 matrix units runs (structprune.score.float32_compute).
        float32_compute.needs_float32_compute = lambda device, dtype: device.type == "cpu" and dtype in float32_compute.HALF_DTYPES
    result["float32_compute"] = float32_compute.needs_float32_compute(torch.device(args.device), dtype)

    t0 = time.perf_counter()
    stage[0] = "trace"
    graph = structprune.trace(model_dir)
    result["trace_s"] = time.perf_counter() - t0
    result["structures"] = len(graph.structures)

    t0 = time.perf_counter()
    stage[0] = "load (shell + outside blocks)"
    model = StreamedModel(model_dir, device=args.device, dtype=dtype, blocks_prefix=graph.blocks.prefix)
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load"] = _status()["VmRSS"]

    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=generator)

    timeline: List[Tuple[str, int, float, int]] = []

    def progress(name: str, done: int, total: int) -> None:
        timeline.append((name, done, round(time.perf_counter() - t_score, 2), _status()["VmRSS"] // MIB))
        nxt = {"forward": "forward", "backward": "backward"}.get(name, name)
        if name == "forward" and done == total:
            nxt = "backward"
        if name == "backward" and done == total:
            nxt = "outside params + folding"
        stage[0] = nxt

    stage[0] = "forward"
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_score = time.perf_counter()
    from structprune.io.sizes import parse_size

    store = ActivationStore(parse_size(args.activation_memory, allow_zero=True))
    # The kinds make_plan scores for --structures heads,mlp (the default): hidden channels only when pruned.
    kinds = [k for k in KINDS if k != "hidden" or args.score_hidden]
    scores = score(model, graph, estimator("taylor"), ids, micro_batch=args.micro_batch, store=store, progress=progress, kinds=kinds)
    if cuda:
        torch.cuda.synchronize()
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    result["score_s"] = time.perf_counter() - t_score
    stage[0] = "done"
    stop.set()
    sampler.join()
    import numpy as np

    values = np.concatenate([v.ravel() for v in scores.units.values()])
    result["loss"] = scores.loss
    result["scores_finite"] = bool(np.isfinite(values).all()) and scores.loss is not None and bool(np.isfinite(scores.loss))
    result["scored_structures"] = len(scores.units)
    result["units_scored"] = int(values.size)
    result["activations_spilled"] = store.spilled
    final = _status()
    result["vm_hwm"] = final["VmHWM"]
    result["stage_peaks"] = peaks
    result["timeline"] = timeline  # (stage, blocks done, seconds into score(), RSS MiB at that point)
    result["forward_s"] = next((t for n, d, t, _ in timeline if n == "forward" and d == model.num_blocks), None)
    result["total_s"] = time.perf_counter() - t_start
    Path(args.result).write_text(json.dumps(result, indent=2))
    sys.stdout.flush()
    # A normal interpreter exit with torch loaded raises the peak after the work (see bench_trace).
    os._exit(0)


def full_worker(args: argparse.Namespace) -> None:
    """What structprune avoids: the whole model in memory on the device, one forward and backward
    over the same calibration batch (gradients of every parameter, as LLM-Pruner computes them)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    result: Dict[str, Any] = {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    result["load_s"] = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, int(model.config.vocab_size), (args.samples, args.seq_len), generator=generator)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for chunk in ids.split(args.micro_batch):
        chunk = chunk.to(args.device)
        loss = model(chunk, labels=chunk).loss * (len(chunk) / len(ids))
        loss.backward()
    if cuda:
        torch.cuda.synchronize()
        result["peak_gpu"] = torch.cuda.max_memory_allocated()
    result["backward_s"] = time.perf_counter() - t0
    result["vm_hwm"] = _status()["VmHWM"]
    Path(args.result).write_text(json.dumps(result, indent=2))
    sys.stdout.flush()
    os._exit(0)


def run_worker(model_dir: Path, args: argparse.Namespace, result_path: Path, log_path: Path, full: bool = False) -> Tuple[int, float, int, Dict[str, Any]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-full" if full else "--worker", "--model", str(model_dir), "--result", str(result_path),
           "--dtype", args.dtype, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--micro-batch", str(args.micro_batch), "--seed", str(args.seed), "--device", args.device, "--activation-memory", args.activation_memory,
           "--half-matmul", args.half_matmul]
    if args.score_hidden:
        cmd.append("--score-hidden")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    rc = os.waitstatus_to_exitcode(status)
    data = json.loads(result_path.read_text()) if rc == 0 and result_path.exists() else {}
    return rc, wall, usage.ru_maxrss * 1024, data


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt_mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / MIB:,.0f} MiB"


def fmt_gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def meminfo() -> Dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/structprune-prune-memory", help="where the checkpoint is written")
    p.add_argument("--size-gb", type=float, default=8.0, help="minimum checkpoint size, decimal GB (default 8)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="shard size, decimal GB (default 2)")
    p.add_argument("--ckpt-dtype", choices=("BF16", "F32"), default="BF16", help="checkpoint dtype (default BF16)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                   help="compute dtype of the scoring (PruneOptions.dtype; default float32, the package default)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--std", type=float, default=0.02, help="std of the random weights (default 0.02)")
    p.add_argument("--samples", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--micro-batch", type=int, default=4, help="score() micro_batch (default 4, as make_plan)")
    p.add_argument("--half-matmul", choices=["auto", "float32"], default="auto",
                   help="half-precision CPU matrix products: auto (native where the CPU has bfloat16/float16 units, "
                        "else structprune's float32 path) or float32 (always the float32 path, as on AVX2-only CPUs)")
    p.add_argument("--activation-memory", default="4GiB",
                   help="saved block inputs kept in memory, past it on disk (structprune prune --activation-memory; default 4GiB)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the worker (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-gb", type=float, default=2.0, help="peak-RSS target, decimal GB (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    p.add_argument("--reuse", action="store_true", help="reuse a matching checkpoint left in --work by --keep")
    p.add_argument("--force", action="store_true", help="skip the free-disk check")
    p.add_argument("--json", metavar="OUT", help="save the figures as JSON")
    # internal
    p.add_argument("--score-hidden", action="store_true",
                   help="also score hidden channels (needs the gradients of embeddings and head; make_plan does it for --structures ...,hidden)")
    p.add_argument("--device", default="cpu", help="where blocks are computed: cpu or cuda[:N] (default cpu)")
    p.add_argument("--full-backward", action="store_true",
                   help="also run a full in-memory forward+backward of the whole model on --device (needs the memory)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-full", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.worker_full:
        full_worker(args)
        return 0
    head_dim = args.hidden // args.heads
    spec = choose_spec(int(args.size_gb * GB), args.ckpt_dtype, vocab=args.vocab, hidden=args.hidden, heads=args.heads,
                       kv_heads=args.kv_heads, head_dim=head_dim, intermediate=args.intermediate)
    shard_bytes = int(args.shard_gb * GB)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"stream-src-{spec.dtype.lower()}-{spec.layers}L"
    wanted = manifest(spec, shard_bytes, args.seed, args.std)
    reused = args.reuse and matches(src, wanted)

    print(f"checkpoint: Llama-shaped, {spec.layers} layers, hidden {spec.hidden}, {spec.heads}/{spec.kv_heads} heads, "
          f"intermediate {spec.intermediate}, vocab {spec.vocab}, {spec.dtype}, {spec.params:,} params, {fmt_gb(spec.nbytes)}, "
          f"{len(wanted['files'])} shards")
    free = shutil.disk_usage(work).free
    need = 0 if reused else int(spec.nbytes * 1.05) + 1 * GB
    print(f"free disk in {work}: {fmt_gb(free)} (need {fmt_gb(need)})")
    if free < need and not args.force:
        print(f"ERROR: not enough free disk in {work}: {fmt_gb(free)} free, {fmt_gb(need)} needed (--work elsewhere, or --force)")
        return 2

    gen_s = None
    if reused:
        print(f"reusing {src}")
    else:
        print(f"generating {src} ...", flush=True)
        gen_s = generate(src, spec, shard_bytes, args.seed, args.std)
        print(f"  generated in {gen_s:.1f} s")
    ckpt_bytes = dir_bytes(src)
    mem = meminfo()

    try:
        print(f"scoring in a fresh subprocess (taylor, {args.samples}x{args.seq_len} random token ids, compute {args.dtype}, "
              f"micro-batch {args.micro_batch}) ...", flush=True)
        load_start = os.getloadavg()[0]
        rc, wall, ru_maxrss, data = run_worker(src, args, work / "stream-result.json", work / "stream-worker.log")
        full: Dict[str, Any] = {}
        if args.full_backward and rc == 0:
            print(f"full in-memory forward+backward on {args.device} in a fresh subprocess ...", flush=True)
            full_rc, _, full_rss, full = run_worker(src, args, work / "full-result.json", work / "full-worker.log", full=True)
            full = {**full, "rc": full_rc, "peak_rss": full_rss}
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            print(f"removed {src}")
        else:
            print(f"kept {src}")
    if rc != 0:
        print(f"ERROR: the worker failed (exit status {rc}); its output ({work / 'stream-worker.log'}):")
        print((work / "stream-worker.log").read_text()[-6000:])
        return 1

    cbytes = COMPUTE_BYTES[args.dtype]
    block_bytes = spec.layer_params * cbytes
    outside_bytes = spec.outside_params * cbytes
    activations = (spec.layers + 1) * args.samples * args.seq_len * spec.hidden * cbytes
    full_fp32 = spec.params * 4 * 2
    full_bf16 = spec.params * 2 * 2
    target = args.target_gb * GB
    peak = ru_maxrss

    rows = [
        ["what", "value"],
        ["checkpoint", f"{fmt_gb(ckpt_bytes)} on disk ({ckpt_bytes / GIB:.2f} GiB), {spec.dtype}, {spec.layers} layers, "
                       f"{spec.params / 1e9:.2f} B params, {len(wanted['files'])} shards"],
        ["calibration", f"{args.samples} x {args.seq_len} random token ids, micro-batch {args.micro_batch}, compute {args.dtype}, "
                        f"{data.get('torch_threads')} torch threads"],
        ["half-precision matmuls", "float32 path (structprune.score.float32_compute)" if data.get("float32_compute") else "native"],
        ["saved block inputs", f"in memory up to {args.activation_memory}; {data.get('activations_spilled', 0)} went to disk"],
        ["peak RSS (wait4 ru_maxrss)", f"{fmt_mib(peak)} = {peak / GB:.2f} GB"],
        ["peak RSS (worker VmHWM)", fmt_mib(data.get("vm_hwm"))],
        ["RSS after imports", fmt_mib(data.get("rss_after_imports"))],
        ["RSS after StreamedModel()", fmt_mib(data.get("rss_after_load"))],
        ["wall time (process)", f"{wall:.1f} s"],
        ["  imports / trace / load", f"{data['imports_s']:.1f} / {data['trace_s']:.1f} / {data['load_s']:.1f} s"],
        ["  score() (forward + backward)", f"{data['score_s']:.1f} s (forward done at {data['forward_s']:.1f} s)"],
        ["calibration loss", f"{data['loss']:.4f} (ln vocab = {__import__('math').log(spec.vocab):.4f}); scores finite: {data['scores_finite']}"],
        ["structures scored", f"{data['scored_structures']} ({data['units_scored']:,} units)"],
        ["full in-memory backward, fp32", f"{full_fp32 / GB:.1f} GB (params + grads; activations not counted)"],
        ["full in-memory backward, bf16", f"{full_bf16 / GB:.1f} GB (params + grads)"],
        ["peak / checkpoint size", f"{peak / ckpt_bytes:.3f}"],
        [f"target peak <= {args.target_gb:g} GB", "MET" if peak <= target else f"NOT MET ({peak / GB:.2f} GB)"],
    ]
    if "peak_gpu" in data:
        rows.append([f"peak GPU memory, streamed ({args.device})", f"{fmt_mib(data['peak_gpu'])} = {data['peak_gpu'] / GB:.2f} GB"])
    if full.get("rc") == 0:
        rows.append(["full in-memory fwd+bwd: time", f"{full['backward_s']:.1f} s (+ {full['load_s']:.1f} s load) vs streamed score() {data['score_s']:.1f} s"])
        if "peak_gpu" in full:
            rows.append(["full in-memory fwd+bwd: peak GPU", f"{fmt_mib(full['peak_gpu'])} = {full['peak_gpu'] / GB:.2f} GB "
                         f"({full['peak_gpu'] / max(data.get('peak_gpu', 1), 1):.1f}x the streamed peak)"])
        rows.append(["full in-memory fwd+bwd: peak RSS", fmt_mib(full["peak_rss"])])
    elif full:
        rows.append(["full in-memory fwd+bwd", f"failed (exit status {full.get('rc')}, see {work / 'full-worker.log'})"])
    print()
    print(table(rows))
    print()
    stage_rows = [["stage (sampled every 20 ms)", "peak RSS", "anon", "file-backed"]]
    for name, p in data["stage_peaks"].items():
        stage_rows.append([name, fmt_mib(p["rss"]), fmt_mib(p["anon"]), fmt_mib(p["file"])])
    print(table(stage_rows))
    print()
    print(f"model-state terms in the compute dtype ({args.dtype}): outside the blocks (embeddings, head, norm) "
          f"{fmt_mib(outside_bytes)}, one block {fmt_mib(block_bytes)} (its gradients as much again), saved block inputs "
          f"{fmt_mib(activations)} ({spec.layers + 1} x {args.samples}x{args.seq_len}x{spec.hidden})")
    notes = []
    if load_start > (os.cpu_count() or 1) * 0.75:
        notes.append(f"the machine was busy when the worker started (1-min load {load_start:.1f} on {os.cpu_count()} CPUs): times are noisy")
    if data.get("activations_spilled"):
        notes.append(f"{data['activations_spilled']} saved activations spilled to disk")
    for n in notes:
        print(f"note: {n}")

    if args.json:
        out = {
            "spec": asdict(spec),
            "checkpoint_bytes": ckpt_bytes,
            "generated_s": gen_s,
            "reused": reused,
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "model", "result")},
            "peak_rss_bytes": peak,
            "wall_s": wall,
            "worker": data,
            "full_backward": full,
            "full_backward_bytes": {"fp32": full_fp32, "bf16": full_bf16},
            "terms_bytes": {"outside": outside_bytes, "block": block_bytes, "activations": activations},
            "target_met": peak <= target,
            "environment": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                            "mem_total": mem.get("MemTotal"), "mem_available_before": mem.get("MemAvailable"),
                            "load1_at_start": load_start},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
