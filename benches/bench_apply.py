#!/usr/bin/env python3
"""Benchmark of structprune's out-of-core safetensors rewrite engine (`structprune apply`).

In one run it:

1. generates (or reuses) a synthetic, Llama-shaped, sharded BF16 checkpoint of a chosen size;
2. writes a cut plan (docs/plan-format.md) that removes 25% of the KV groups and ~30% of the MLP
   channels of every layer, plus the matching config patch;
3. times, each in a fresh subprocess whose own peak RSS is taken (GNU ``time``, else a tiny
   fork/wait4 launcher), with the source warm in the page cache: ``cp -r``, the floor (the kept
   bytes read and written in the kernel, then fsynced), ``structprune apply``, the naive Python path
   (safetensors ``safe_open`` -> ``get_tensor`` -> ``index_select`` -> ``save_file`` per shard)
   and ``structprune apply`` in other settings, one after the other, round after round
   (``--repeat``), so that every method sees the disk in each of its moods; checks that the naive
   and the engine outputs hold identical tensors;
4. prints a table with the median and the spread of the per-round ratios (a method against ``cp``
   and the floor of the same round) and the targets met, and optionally saves everything as JSON.

Sizes are decimal: 1 GB = 10**9 bytes. See benches/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Sequence

GB = 10**9
MIB = 2**20
BF16_BYTES = 2
GENERATOR_VERSION = 1
MANIFEST_NAME = "bench-source.json"
INDEX_NAME = "model.safetensors.index.json"
CHUNK = 16 * MIB

# Targets from the issues, judged on the median of the per-round ratios.
TARGET_ENGINE_OVER_CP = 0.9  # engine wall <= 0.9 x cp wall
TARGET_ENGINE_OVER_FLOOR = 1.3  # engine wall <= 1.3 x the floor's
TARGET_NAIVE_OVER_ENGINE = 1.2  # engine at least 1.2 x faster than naive
TARGET_ENGINE_RSS_MIB = 300.0  # engine peak RSS <= 300 MiB


# --------------------------------------------------------------------------------------------
# Synthetic model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a Llama-like model (defaults: one layer of Llama-2-7B with 8 KV heads)."""

    layers: int
    vocab: int = 32000
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 11008

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
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

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out.extend(self.layer_tensors(i))
        out.append(("model.norm.weight", (self.hidden,)))
        out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.44.0",
        }


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def spec_bytes(spec: ModelSpec) -> int:
    return sum(numel(s) for _, s in spec.tensors()) * BF16_BYTES


def choose_spec(size_bytes: int) -> ModelSpec:
    """Pick the number of layers (and, below ~0.9 GB, a smaller vocabulary) to reach the size."""
    base = ModelSpec(layers=1)
    layer_bytes = sum(numel(s) for _, s in base.layer_tensors(0)) * BF16_BYTES
    fixed = spec_bytes(base) - layer_bytes  # embeddings, lm_head, final norm
    if size_bytes >= fixed + layer_bytes:
        return ModelSpec(layers=max(1, round((size_bytes - fixed) / layer_bytes)))
    per_vocab_row = 2 * base.hidden * BF16_BYTES
    vocab = max(256, (max(0, size_bytes - layer_bytes) // per_vocab_row) // 64 * 64)
    return ModelSpec(layers=1, vocab=int(vocab))


def assign_shards(tensors: Sequence[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy, in order: a shard is closed when the next tensor would overflow it."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        nbytes = numel(shape) * BF16_BYTES
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# --------------------------------------------------------------------------------------------
# Generation (streaming, constant memory)
# --------------------------------------------------------------------------------------------


def next_prime(n: int) -> int:
    def is_prime(k: int) -> bool:
        if k < 2 or k % 2 == 0:
            return k == 2
        f = 3
        while f * f <= k:
            if k % f == 0:
                return False
            f += 2
        return True

    while not is_prime(n):
        n += 1
    return n


def make_block(seed: int, period: int) -> Any:
    """Random BF16 values ~N(0, 0.02) as uint16, repeated twice so any window of <= period
    elements starting before `period` is one contiguous slice. The period is prime, so no two rows
    of a tensor (row length 4096 or 11008) start at the same phase: every row is distinct, and a
    wrong index selection cannot go unnoticed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vals = (rng.standard_normal(period, dtype=np.float32) * 0.02).view(np.uint32)
    block = (vals >> 16).astype(np.uint16)
    return np.concatenate([block, block])


def safetensors_header(entries: Sequence[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = numel(shape) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_tensor_data(f: Any, block: Any, period: int, name: str, count: int) -> None:
    pos = zlib.crc32(name.encode()) % period
    while count:
        k = min(count, period)
        f.write(memoryview(block[pos : pos + k]))
        pos = (pos + k) % period
        count -= k


def write_shard(path: Path, entries: Sequence[tuple[str, tuple[int, ...]]], block: Any, period: int) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(safetensors_header(entries))
        for name, shape in entries:
            write_tensor_data(f, block, period, name, numel(shape))


def source_manifest(spec: ModelSpec, shard_bytes: int, seed: int) -> dict[str, Any]:
    shards = assign_shards(spec.tensors(), shard_bytes)
    names = shard_names(len(shards))
    files = {n: len(safetensors_header(e)) + sum(numel(s) for _, s in e) * BF16_BYTES for n, e in zip(names, shards)}
    return {
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "shard_bytes": shard_bytes,
        "seed": seed,
        "files": files,
    }


def source_matches(src: Path, manifest: dict[str, Any]) -> bool:
    try:
        found = json.loads((src / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if found != manifest:
        return False
    for name, size in manifest["files"].items():
        p = src / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return (src / INDEX_NAME).is_file() and (src / "config.json").is_file()


def generate_source(src: Path, spec: ModelSpec, shard_bytes: int, seed: int) -> float:
    """Write the checkpoint; returns the seconds it took. The manifest goes last, so a partial
    generation is never reused."""
    t0 = time.perf_counter()
    src.mkdir(parents=True, exist_ok=True)
    period = next_prime(1 << 22)
    block = make_block(seed, period)
    shards = assign_shards(spec.tensors(), shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    for fname, entries in zip(names, shards):
        print(f"  writing {fname} ({len(entries)} tensors)", flush=True)
        write_shard(src / fname, entries, block, period)
        for name, shape in entries:
            weight_map[name] = fname
            total += numel(shape) * BF16_BYTES
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (src / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (src / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    (src / MANIFEST_NAME).write_text(json.dumps(source_manifest(spec, shard_bytes, seed), indent=2) + "\n")
    return time.perf_counter() - t0


def ensure_source(src: Path, spec: ModelSpec, shard_bytes: int, seed: int) -> tuple[bool, float]:
    """Returns (reused, generation seconds)."""
    manifest = source_manifest(spec, shard_bytes, seed)
    if source_matches(src, manifest):
        return True, 0.0
    if src.exists() and any(src.iterdir()):
        if not (src / MANIFEST_NAME).exists():
            sys.exit(f"error: {src} exists, is not empty and is not a benchmark source; pick another --work-dir")
        print(f"source {src} does not match the requested one: regenerating", flush=True)
        shutil.rmtree(src)
    print(f"generating {src}: {spec.layers} layers, vocab {spec.vocab}, {spec_bytes(spec) / GB:.2f} GB", flush=True)
    return False, generate_source(src, spec, shard_bytes, seed)


# --------------------------------------------------------------------------------------------
# Cut plan
# --------------------------------------------------------------------------------------------


def layer_keep_sets(spec: ModelSpec, i: int, kv_drop: float, mlp_drop: float, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed * 1_000_003 + i)
    n_kv_drop = round(spec.kv_heads * kv_drop)
    kv_keep = sorted(rng.sample(range(spec.kv_heads), spec.kv_heads - n_kv_drop))
    q_heads = [g * spec.n_rep + j for g in kv_keep for j in range(spec.n_rep)]
    hd = spec.head_dim
    n_mlp_keep = spec.intermediate - round(spec.intermediate * mlp_drop)
    return {
        "q": [h * hd + d for h in q_heads for d in range(hd)],
        "kv": [g * hd + d for g in kv_keep for d in range(hd)],
        "mlp": sorted(rng.sample(range(spec.intermediate), n_mlp_keep)),
    }


def build_plan(spec: ModelSpec, kv_drop: float, mlp_drop: float, seed: int) -> dict[str, Any]:
    index_sets: dict[str, list[int]] = {}
    tensors: dict[str, Any] = {}
    kept_kv = spec.kv_heads
    kept_mlp = spec.intermediate
    for i in range(spec.layers):
        sets = layer_keep_sets(spec, i, kv_drop, mlp_drop, seed)
        q, kv, mlp = f"layers.{i}.attn_q", f"layers.{i}.attn_kv", f"layers.{i}.mlp"
        index_sets.update({q: sets["q"], kv: sets["kv"], mlp: sets["mlp"]})
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = {"keep": {"0": q}}
        tensors[p + "self_attn.k_proj.weight"] = {"keep": {"0": kv}}
        tensors[p + "self_attn.v_proj.weight"] = {"keep": {"0": kv}}
        tensors[p + "self_attn.o_proj.weight"] = {"keep": {"1": q}}
        tensors[p + "mlp.gate_proj.weight"] = {"keep": {"0": mlp}}
        tensors[p + "mlp.up_proj.weight"] = {"keep": {"0": mlp}}
        tensors[p + "mlp.down_proj.weight"] = {"keep": {"1": mlp}}
        kept_kv = len(sets["kv"]) // spec.head_dim
        kept_mlp = len(sets["mlp"])
    config = {
        "num_key_value_heads": kept_kv,
        "num_attention_heads": kept_kv * spec.n_rep,
        "intermediate_size": kept_mlp,
    }
    return {
        "format": "structprune.cut-plan",
        "version": 1,
        "index_sets": index_sets,
        "tensors": tensors,
        "config": config,
        "metadata": {"method": "bench_apply synthetic", "seed": seed, "kv_drop": kv_drop, "mlp_drop": mlp_drop},
    }


def resolve_keep(plan: dict[str, Any], keep: dict[str, Any]) -> dict[int, list[int]]:
    sets = plan.get("index_sets", {})
    return {int(d): (sets[v] if isinstance(v, str) else list(v)) for d, v in keep.items()}


def expected_output(spec: ModelSpec, plan: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the cut output must hold."""
    out: dict[str, tuple[int, ...]] = {}
    entries = plan.get("tensors", {})
    for name, shape in spec.tensors():
        e = entries.get(name, {})
        if e.get("drop"):
            continue
        s = list(shape)
        for d, idx in resolve_keep(plan, e.get("keep", {})).items():
            s[d] = len(idx)
        out[e.get("rename", name)] = tuple(s)
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON Merge Patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


# --------------------------------------------------------------------------------------------
# Naive Python path (runs as a subprocess: `bench_apply.py _naive SRC PLAN DST`)
# --------------------------------------------------------------------------------------------


def naive_apply(src: Path, plan_path: Path, dst: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    plan = json.loads(plan_path.read_text())
    entries: dict[str, Any] = plan.get("tensors", {})
    index = json.loads((src / INDEX_NAME).read_text())
    shards = list(dict.fromkeys(index["weight_map"].values()))
    dst.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(src / shard), framework="pt") as f:
            meta = f.metadata() or {"format": "pt"}
            for name in f.keys():
                e = entries.get(name, {})
                if e.get("drop"):
                    continue
                t = f.get_tensor(name)
                for d, idx in resolve_keep(plan, e.get("keep", {})).items():
                    t = t.index_select(d, torch.tensor(idx, dtype=torch.long))
                new = e.get("rename", name)
                out[new] = t.contiguous()
                weight_map[new] = shard
                total += t.numel() * t.element_size()
        save_file(out, str(dst / shard), metadata=meta)
        del out
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(merge_patch(config, plan.get("config", {})), indent=2))


def floor_copy(src: Path, dst: Path, nbytes: int) -> None:
    """The least any rewrite does (`bench_apply.py _floor SRC DST NBYTES`): read as many bytes as
    the output holds and write them, durably. The source shards' first bytes, in order, are copied
    file to file in the kernel (`copy_file_range`: one copy, no trip through user space; read and
    write where the file system cannot) in 64 MiB pieces, the write-back of each started at once
    (`sync_file_range`) so that the disk writes while the next is copied; then every file is
    fsynced, and the directory."""
    dst.mkdir(parents=True)
    left = nbytes
    written: list[Path] = []
    for path in sorted(src.glob("*.safetensors")):
        n = min(left, path.stat().st_size)
        if n == 0:
            break
        with open(path, "rb", buffering=0) as fin, open(dst / path.name, "wb", buffering=0) as fout:
            done = 0
            while done < n:
                piece = min(FLOOR_PIECE, n - done)
                kernel_copy(fin.fileno(), fout.fileno(), piece)
                start_writeback(fout.fileno(), done, piece)
                done += piece
        written.append(dst / path.name)
        left -= n
    for path in [*written, dst]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


FLOOR_PIECE = 64 * MIB


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """`sync_file_range(SYNC_FILE_RANGE_WRITE)`: start writing the range back, without waiting."""
    if sys.platform != "linux":
        return
    libc = _libc()
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    libc.sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


def kernel_copy(fin: int, fout: int, n: int) -> None:
    """`n` bytes from the current offset of `fin` to `fout`'s, with `copy_file_range`, else
    read/write."""
    done = 0
    try:
        while done < n:
            k = os.copy_file_range(fin, fout, n - done)
            if k == 0:
                raise OSError(f"source ended after {done} of {n} bytes")
            done += k
        return
    except OSError as exc:
        if done or exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    buf = bytearray(CHUNK)
    while done < n:
        k = os.readv(fin, [memoryview(buf)[: min(CHUNK, n - done)]])
        if k == 0:
            raise OSError(f"source ended after {done} of {n} bytes")
        view = memoryview(buf)[:k]
        while view:
            view = view[os.write(fout, view) :]
        done += k


# --------------------------------------------------------------------------------------------
# Reading outputs (headers and tensor bytes, no torch)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorLoc:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorLoc]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {
        k: TensorLoc(path, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def read_checkpoint(d: Path) -> dict[str, TensorLoc]:
    out: dict[str, TensorLoc] = {}
    for p in sorted(d.glob("*.safetensors")):
        for k, loc in read_header(p).items():
            if k in out:
                raise ValueError(f"{k} appears in {out[k].file.name} and {p.name}")
            out[k] = loc
    return out


def read_bytes(loc: TensorLoc) -> bytes:
    with open(loc.file, "rb") as f:
        f.seek(loc.start)
        return f.read(loc.end - loc.start)


def tensor_digest(loc: TensorLoc) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(loc.file, "rb") as f:
        f.seek(loc.start)
        left = loc.end - loc.start
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise ValueError(f"{loc.file} is truncated")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def sample_names(names: Sequence[str], spec: ModelSpec, n: int, seed: int) -> list[str]:
    """Every tensor of the first and last layer, the embeddings/head/norm, then random others;
    n <= 0 means all."""
    if n <= 0:
        return list(names)
    last = spec.layers - 1
    pinned = [
        x
        for x in names
        if x.startswith(("model.layers.0.", f"model.layers.{last}."))
        or not x.startswith("model.layers.")
    ]
    rest = [x for x in names if x not in set(pinned)]
    extra = random.Random(seed).sample(rest, min(len(rest), max(0, n - len(pinned))))
    return sorted(set(pinned) | set(extra), key=list(names).index)


def expected_from_source(src: Path, plan: dict[str, Any], name: str) -> bytes:
    """Independent reference for one tensor: numpy fancy indexing of the source bytes."""
    import numpy as np

    loc = read_checkpoint(src)[name]
    arr = np.frombuffer(read_bytes(loc), dtype=np.uint16).reshape(loc.shape)
    for d, idx in resolve_keep(plan, plan.get("tensors", {}).get(name, {}).get("keep", {})).items():
        arr = np.take(arr, np.asarray(idx, dtype=np.int64), axis=d)
    return np.ascontiguousarray(arr).tobytes()


@dataclass
class Reference:
    digests: dict[str, str]
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]


def check_output(out: Path, ref: Reference) -> list[str]:
    """Problems found in `out` against the reference (empty list = identical)."""
    problems: list[str] = []
    try:
        got = read_checkpoint(out)
    except (OSError, ValueError) as exc:
        return [f"cannot read output: {exc}"]
    missing = sorted(set(ref.shapes) - set(got))
    extra = sorted(set(got) - set(ref.shapes))
    if missing:
        problems.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors, e.g. {extra[:3]}")
    for name, shape in ref.shapes.items():
        loc = got.get(name)
        if loc is not None and (loc.shape != shape or loc.dtype != "BF16"):
            problems.append(f"{name}: {loc.dtype}{list(loc.shape)}, expected BF16{list(shape)}")
    for name, digest in ref.digests.items():
        loc = got.get(name)
        if loc is not None and loc.shape == ref.shapes[name] and tensor_digest(loc) != digest:
            problems.append(f"{name}: bytes differ")
    try:
        config = json.loads((out / "config.json").read_text())
        if config != ref.config:
            diff = sorted(k for k in set(config) | set(ref.config) if config.get(k) != ref.config.get(k))
            problems.append(f"config.json differs in {diff}")
    except (OSError, ValueError) as exc:
        problems.append(f"config.json: {exc}")
    if len(list(out.glob("*.safetensors"))) > 1:
        try:
            wm = json.loads((out / INDEX_NAME).read_text())["weight_map"]
            if set(wm) != set(got) or any(got[k].file.name != v for k, v in wm.items()):
                problems.append(f"{INDEX_NAME} does not match the shards")
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{INDEX_NAME}: {exc}")
    return problems


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    method: str
    cmd: list[str]
    wall_s: float
    sync_s: float
    peak_rss_kib: int
    user_s: float
    sys_s: float
    bytes_written: int
    returncode: int
    src_resident_before: float | None
    others_cpu_before: float | None  # CPU use of other processes just before the run, fraction of all CPUs
    log: str
    round: int = 0
    problems: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)  # sampled output tensors, compared after all rounds


def dir_bytes(d: Path) -> int:
    if not d.exists():
        return 0
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file())


def warm_read(src: Path) -> tuple[int, float]:
    """Read every source file once so it sits in the page cache; returns (bytes, seconds)."""
    buf = bytearray(CHUNK)
    total = 0
    t0 = time.perf_counter()
    for p in source_files(src):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - t0


_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC = libc
    return _LIBC


def resident_fraction(src: Path) -> float | None:
    """Fraction of the source's pages in the page cache (mincore); None if it cannot be told."""
    if sys.platform != "linux":
        return None
    try:
        libc = _libc()
        page = os.sysconf("SC_PAGE_SIZE")
        resident = pages = 0
        for p in source_files(src):
            size = p.stat().st_size
            if size == 0:
                continue
            n = (size + page - 1) // page
            fd = os.open(p, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                vec = (ctypes.c_ubyte * n)()
                rc = libc.mincore(addr, size, vec)
                libc.munmap(addr, size)
                if rc != 0:
                    return None
                resident += sum(b & 1 for b in bytes(vec))
                pages += n
            finally:
                os.close(fd)
        return resident / pages if pages else None
    except (OSError, AttributeError):
        return None


# Why not os.wait4 on the child directly: on Linux, exec() folds the high-water RSS of the mm it
# replaces into the process's ru_maxrss, and Python's subprocess starts children with vfork(), so
# that mm is this (numpy-laden) benchmark process: every child would report at least our own RSS.
# A tiny intermediate process avoids it: GNU time (~1 MiB), else a bare `python -S` (~8 MiB floor).
_FALLBACK_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump([ru.ru_maxrss, ru.ru_utime, ru.ru_stime], f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def gnu_time() -> str | None:
    exe = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else shutil.which("gtime")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "-f", "%M", "true"], capture_output=True, text=True, timeout=10)
        int(r.stderr.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None
    return exe


def rss_tool() -> str:
    exe = gnu_time()
    return f"{exe} (GNU time)" if exe else "python -S fork/wait4 launcher (~8 MiB floor)"


def run_measured(cmd: list[str], log_path: Path) -> tuple[int, float, int, float, float]:
    """Run `cmd`; returns (exit code, wall s, peak RSS KiB, user s, sys s) of that command alone."""
    stats = log_path.with_suffix(".rusage")
    exe = gnu_time()
    if exe:
        wrapped = [exe, "-o", str(stats), "-f", "%M %U %S", *cmd]
    else:
        wrapped = [sys.executable, "-S", "-c", _FALLBACK_LAUNCHER, str(stats), *cmd]
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        rc = subprocess.call(wrapped, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
    text = stats.read_text() if stats.exists() else ""
    try:
        if exe:
            # GNU time writes "Command exited with non-zero status N" first when the command fails.
            rss, user, sys_ = text.strip().splitlines()[-1].split()
            return rc, wall, int(rss), float(user), float(sys_)
        rss, user, sys_ = json.loads(text)
        return rc, wall, int(rss), float(user), float(sys_)
    except (ValueError, IndexError):
        return rc, wall, -1, float("nan"), float("nan")


def measure(method: str, cmd: list[str], src: Path, out: Path, logs: Path, round_: int = 0) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # no dirty pages from an earlier step are flushed during this one
    warm_read(src)  # every method starts with the source in the page cache
    resident = resident_fraction(src)
    others = cpu_busy(1.0)  # this process sleeps meanwhile: it is everybody else
    log_path = logs / f"{method.replace(' ', '_').replace('/', '_')}-round{round_ + 1}.log"
    print(f"round {round_ + 1}, running {method}: {shlex.join(cmd)}", flush=True)
    rc, wall, rss_kib, user_s, sys_s = run_measured(cmd, log_path)
    t0 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t0
    run = Run(
        method=method,
        cmd=cmd,
        wall_s=wall,
        sync_s=sync_s,
        peak_rss_kib=rss_kib,
        user_s=user_s,
        sys_s=sys_s,
        bytes_written=dir_bytes(out),
        returncode=rc,
        src_resident_before=resident,
        others_cpu_before=others,
        log=str(log_path),
        round=round_,
    )
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        run.problems.append(f"exit code {rc}; log tail:\n{tail}")
    print(f"  {wall:.2f} s, peak RSS {run.peak_rss_kib / 1024:.0f} MiB, exit {rc}", flush=True)
    return run


def best_of(runs: Sequence[Run]) -> Run:
    """Aggregate repeats: median wall/sync/cpu, max peak RSS, problems of all."""
    if len(runs) == 1:
        return runs[0]
    r = Run(**{**asdict(runs[0]), "problems": [], "digests": {}})
    r.wall_s = statistics.median(x.wall_s for x in runs)
    r.sync_s = statistics.median(x.sync_s for x in runs)
    r.user_s = statistics.median(x.user_s for x in runs)
    r.sys_s = statistics.median(x.sys_s for x in runs)
    r.peak_rss_kib = max(x.peak_rss_kib for x in runs)
    r.others_cpu_before = max((x.others_cpu_before for x in runs if x.others_cpu_before is not None), default=None)
    r.returncode = max(x.returncode for x in runs)
    r.problems = [p for x in runs for p in x.problems]
    return r


# --------------------------------------------------------------------------------------------
# Engine discovery
# --------------------------------------------------------------------------------------------


def find_structprune(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    near = Path(sys.executable).parent / "structprune"
    if near.is_file() and os.access(near, os.X_OK):
        return str(near)
    return shutil.which("structprune")


def engine_variants(threads: Sequence[int], budgets: Sequence[str]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = [("engine", [])]
    out += [(f"engine --threads {t}", ["--threads", str(t)]) for t in threads]
    out += [(f"engine --memory-budget {b}", ["--memory-budget", b]) for b in budgets]
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt_bytes(n: int) -> str:
    return f"{n / GB:.3f} GB"


def round_ratios(runs: Sequence[Run], num: str, den: str, with_sync: bool = False) -> list[float]:
    """`num`'s time over `den`'s, round by round (rounds in which both ran and succeeded): two
    methods run minutes apart share the disk's mood far better than two medians do."""
    by_round: dict[int, dict[str, Run]] = {}
    for r in runs:
        if r.returncode == 0:
            by_round.setdefault(r.round, {})[r.method] = r
    out = []
    for methods in by_round.values():
        a, b = methods.get(num), methods.get(den)
        if a is not None and b is not None:
            ta, tb = (a.wall_s + a.sync_s, b.wall_s + b.sync_s) if with_sync else (a.wall_s, b.wall_s)
            if tb > 0:
                out.append(ta / tb)
    return out


def fmt_ratios(v: Sequence[float]) -> str:
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def aggregate(runs: Sequence[Run]) -> list[Run]:
    """One row per method, in the order they first ran."""
    methods = list(dict.fromkeys(r.method for r in runs))
    return [best_of([r for r in runs if r.method == m]) for m in methods]


def render_table(runs: Sequence[Run]) -> str:
    names = {r.method for r in runs}
    header = ["method", "wall s", "+sync s", "user s", "sys s", "peak RSS MiB", "written",
              "x cp", "x cp w+s", "x floor", "naive/x", "check"]
    rows = [header]
    for r in aggregate(runs):
        rows.append(
            [
                r.method,
                f"{r.wall_s:.2f}",
                f"{r.sync_s:.2f}",
                f"{r.user_s:.2f}",
                f"{r.sys_s:.2f}",
                f"{r.peak_rss_kib / 1024:.0f}",
                fmt_bytes(r.bytes_written),
                fmt_ratios(round_ratios(runs, r.method, "cp -r")) if "cp -r" in names else "-",
                fmt_ratios(round_ratios(runs, r.method, "cp -r", with_sync=True)) if "cp -r" in names else "-",
                fmt_ratios(round_ratios(runs, r.method, "floor")) if "floor" in names else "-",
                fmt_ratios(round_ratios(runs, "naive", r.method)) if "naive" in names else "-",
                "-" if r.method in ("cp -r", "floor") else ("ok" if not r.problems else "FAIL"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for k, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate_targets(runs: Sequence[Run]) -> dict[str, Any]:
    """The targets, on the default engine run: speed as the median of the per-round ratios (with
    their spread), peak RSS as the largest of its rounds."""
    targets: dict[str, Any] = {}

    def judge(name: str, ratios: Sequence[float], met: Any) -> None:
        if ratios:
            v = statistics.median(ratios)
            targets[name] = {"value": round(v, 3), "spread": [round(min(ratios), 3), round(max(ratios), 3)],
                             "rounds": len(ratios), "met": bool(met(v))}

    judge(f"engine wall <= {TARGET_ENGINE_OVER_CP}x cp", round_ratios(runs, "engine", "cp -r"),
          lambda v: v <= TARGET_ENGINE_OVER_CP)
    judge(f"engine wall+sync <= {TARGET_ENGINE_OVER_CP}x cp wall+sync", round_ratios(runs, "engine", "cp -r", with_sync=True),
          lambda v: v <= TARGET_ENGINE_OVER_CP)
    judge(f"engine wall <= {TARGET_ENGINE_OVER_FLOOR}x floor", round_ratios(runs, "engine", "floor"),
          lambda v: v <= TARGET_ENGINE_OVER_FLOOR)
    judge(f"engine >= {TARGET_NAIVE_OVER_ENGINE}x faster than naive", round_ratios(runs, "naive", "engine"),
          lambda v: v >= TARGET_NAIVE_OVER_ENGINE)
    engine = [r for r in runs if r.method == "engine"]
    if engine:
        v = max(r.peak_rss_kib for r in engine) / 1024
        targets[f"engine peak RSS <= {TARGET_ENGINE_RSS_MIB:.0f} MiB"] = {"value": round(v, 1), "met": v <= TARGET_ENGINE_RSS_MIB}
        problems = sum(len(r.problems) for r in engine)
        targets["engine output identical to the reference"] = {"value": problems, "met": not problems}
    return targets


def environment() -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            return None

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = None
    try:
        cpu = next(
            (l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")),
            None,
        )
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_bytes": mem,
        "torch": version("torch"),
        "safetensors": version("safetensors"),
        "structprune": version("structprune"),
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=6.0, help="total checkpoint size, GB (default 6)")
    ap.add_argument("--shard-gb", type=float, default=1.2, help="source shard size, GB (default 1.2)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/structprune-bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-drop", type=float, default=0.25, help="fraction of KV groups dropped per layer")
    ap.add_argument("--mlp-drop", type=float, default=0.30, help="fraction of MLP channels dropped per layer")
    ap.add_argument("--methods", default="cp,floor,engine,naive", help="comma list from cp,floor,engine,naive")
    ap.add_argument("--threads", default="1,2,4", help="extra engine runs with --threads N ('' = none)")
    ap.add_argument("--memory-budgets", default="16MiB,256MiB,1GiB", help="extra engine runs with --memory-budget B ('' = none; default budget is 64MiB)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds, each running every method once, in turn (median of per-round ratios, max RSS; default 3)")
    ap.add_argument("--verify-sample", type=int, default=24, help="tensors compared by bytes (0 = all)")
    ap.add_argument("--structprune", help="path of the structprune CLI (default: next to python, then PATH)")
    ap.add_argument("--json", type=Path, help="save all figures to this JSON file")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the last output of each method")
    ap.add_argument("--generate-only", action="store_true", help="generate source and plan, then stop")
    ap.add_argument("--force", action="store_true", help="run even when free disk looks too small")
    ap.add_argument("--max-busy", type=float, default=0.15,
                    help="CPU use of other processes (fraction of all CPUs) still counted as quiet (default 0.15)")
    ap.add_argument("--wait-quiet", type=float, default=0, help="seconds to wait for a quiet machine before measuring")
    return ap.parse_args(argv)


def int_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def check_disk(work: Path, size: int, reused: bool, force: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = (0 if reused else size) + 2 * size  # source + one output + headroom (~3x in all)
    if free < need:
        msg = f"free disk under {work}: {free / GB:.1f} GB, need about {need / GB:.1f} GB"
        if not force:
            sys.exit(f"error: {msg} (--force to run anyway)")
        print(f"warning: {msg}", flush=True)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


def cpu_busy(interval: float) -> float | None:
    """Fraction of all CPUs busy during `interval` seconds (while this process sleeps)."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def wait_quiet(max_busy: float, timeout_s: float, quiet_for_s: float = 20.0) -> float | None:
    """Wait (up to timeout_s) until other processes have used at most max_busy of the CPUs for
    quiet_for_s seconds in a row; returns the last sample."""
    t0 = time.monotonic()
    busy = cpu_busy(2.0)
    if busy is None or busy <= max_busy or timeout_s <= 0:
        return busy
    print(f"other processes use {busy:.0%} of the CPUs: waiting up to {timeout_s:.0f} s for a quiet machine", flush=True)
    quiet_since: float | None = None
    while time.monotonic() - t0 < timeout_s:
        busy = cpu_busy(5.0)
        if busy is None:
            return None
        now = time.monotonic()
        if busy > max_busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now - 5.0
        elif now - quiet_since >= quiet_for_s:
            break
    return busy


def compare_digests(runs: Sequence[Run], numpy_ref: dict[str, str]) -> list[str]:
    """Every checked run's sampled tensors must equal the first naive run's (the first checked run's
    without a naive run) and, for two tensors, numpy indexing of the source: a difference becomes a
    problem of that run. Returns a note saying what was compared."""
    checked = sorted((r for r in runs if r.digests), key=lambda r: r.method != "naive")
    if not checked:
        return []
    first = checked[0]
    reference = {n: (d, f"the {first.method} output of round {first.round + 1}") for n, d in first.digests.items()}
    reference.update({n: (d, "numpy indexing of the source") for n, d in numpy_ref.items()})
    for r in checked:
        for name, digest in r.digests.items():
            want, origin = reference.get(name, (digest, ""))
            if digest != want:
                r.problems.append(f"{name}: bytes differ from {origin}")
                print(f"  PROBLEM: {r.method}, round {r.round + 1}: {name}: bytes differ from {origin}", flush=True)
    return [
        f"{len(first.digests)} sampled tensors of every checked output compared with the {first.method} output "
        f"and {len(numpy_ref)} with numpy indexing of the source"
    ]


def plan_stats(spec: ModelSpec, plan: dict[str, Any]) -> dict[str, Any]:
    before = sum(numel(s) for _, s in spec.tensors())
    after = sum(numel(s) for s in expected_output(spec, plan).values())
    layer_before = sum(numel(s) for n, s in spec.tensors() if n.startswith("model.layers."))
    layer_after = sum(numel(s) for n, s in expected_output(spec, plan).items() if n.startswith("model.layers."))
    return {
        "params_before": before,
        "params_after": after,
        "removed_fraction": 1 - after / before,
        "removed_fraction_in_layers": 1 - layer_after / layer_before,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    methods = set(str_list(args.methods))
    unknown = methods - {"cp", "floor", "naive", "engine"}
    if unknown:
        sys.exit(f"error: unknown methods {sorted(unknown)}")
    size = int(args.size_gb * GB)
    work: Path = args.work_dir
    tag = f"{args.size_gb:g}"
    src = work / f"src-{tag}"
    spec = choose_spec(size)

    work.mkdir(parents=True, exist_ok=True)
    manifest = source_manifest(spec, int(args.shard_gb * GB), args.seed)
    check_disk(work, spec_bytes(spec), source_matches(src, manifest), args.force)
    reused, gen_s = ensure_source(src, spec, int(args.shard_gb * GB), args.seed)
    src_bytes = dir_bytes(src)
    print(
        f"source: {src} ({'reused' if reused else f'generated in {gen_s:.1f} s'}), {fmt_bytes(src_bytes)}, "
        f"{len(manifest['files'])} shards, {spec.layers} layers, vocab {spec.vocab}",
        flush=True,
    )

    plan = build_plan(spec, args.kv_drop, args.mlp_drop, args.seed)
    plan_path = work / f"plan-{tag}.json"
    plan_path.write_text(json.dumps(plan, separators=(",", ":")) + "\n")
    stats = plan_stats(spec, plan)
    print(
        f"plan: {plan_path} ({plan_path.stat().st_size / 1024:.0f} KiB), removes "
        f"{stats['removed_fraction']:.1%} of all parameters ({stats['removed_fraction_in_layers']:.1%} of layer parameters)",
        flush=True,
    )
    if args.generate_only:
        return 0

    wait_quiet(args.max_busy, args.wait_quiet)
    resident_cold = resident_fraction(src)
    warm_bytes, warm_s = warm_read(src)
    resident_warm = resident_fraction(src)
    print(
        f"page cache: source {_pct(resident_cold)} resident before the warm-up read, {_pct(resident_warm)} after "
        f"(warm-up read {warm_bytes / GB:.2f} GB in {warm_s:.2f} s = {warm_bytes / GB / warm_s:.2f} GB/s); "
        "each method re-reads the source first so all of them start warm",
        flush=True,
    )

    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    runs: list[Run] = []
    verify_notes: list[str] = []
    shapes = expected_output(spec, plan)
    config = merge_patch(json.loads((src / "config.json").read_text()), plan["config"])
    sample = sample_names(list(shapes), spec, args.verify_sample, args.seed)
    kept_bytes = sum(numel(s) for s in shapes.values()) * BF16_BYTES

    def structure(o: Path) -> list[str]:
        return check_output(o, Reference(digests={}, config=config, shapes=shapes))

    # (name, command, output, check); the check's digests are compared across runs at the end.
    plan_runs: list[tuple[str, list[str], Path, Any]] = []
    if "cp" in methods:
        plan_runs.append(("cp -r", ["cp", "-r", str(src), str(work / "out-cp")], work / "out-cp", None))
    if "floor" in methods:
        out = work / "out-floor"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_floor", str(src), str(out), str(kept_bytes)]
        plan_runs.append(("floor", cmd, out, None))
    engine_runs: list[tuple[str, list[str], Path, Any]] = []
    if "engine" in methods:
        exe = find_structprune(args.structprune)
        if exe is None:
            print("warning: structprune CLI not found: engine runs skipped", flush=True)
        else:
            out = work / "out-engine"
            for name, extra in engine_variants(int_list(args.threads), str_list(args.memory_budgets)):
                # The shape check (the output's config built on the meta device: torch imported, a few
                # seconds whatever the checkpoint's size) is not the rewrite; the bench's one-layer
                # configs would fail it too (hidden 4096 over 24 heads).
                cmd = [exe, "apply", str(src), str(plan_path), "-o", str(out), "--quiet", "--no-shape-check", *extra]
                engine_runs.append((name, cmd, out, structure))
    plan_runs += engine_runs[:1]
    if "naive" in methods:
        out = work / "out-naive"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_naive", str(src), str(plan_path), str(out)]
        plan_runs.append(("naive", cmd, out, structure))
    plan_runs += engine_runs[1:]

    for round_ in range(max(1, args.repeat)):
        for name, cmd, out, check in plan_runs:
            r = measure(name, cmd, src, out, logs, round_)
            if r.returncode == 0 and check is not None:
                r.problems.extend(check(out))
                got = read_checkpoint(out)
                r.digests = {n: tensor_digest(got[n]) for n in sample if n in got}
            for problem in r.problems:
                print(f"  PROBLEM: {problem}", flush=True)
            runs.append(r)
            if not args.keep_outputs or round_ + 1 < max(1, args.repeat):
                shutil.rmtree(out, ignore_errors=True)
    numpy_ref = {
        name: hashlib.blake2b(expected_from_source(src, plan, name), digest_size=16).hexdigest()
        for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.o_proj.weight")
    }
    verify_notes.extend(compare_digests(runs, numpy_ref))
    if "naive" not in methods:
        verify_notes.append("no naive run: engine outputs checked against each other, numpy for two tensors, shapes and config")

    print()
    print(
        f"structprune apply benchmark: {fmt_bytes(src_bytes)} BF16 source, {len(manifest['files'])} shards, "
        f"{spec.layers} layers; plan removes {stats['removed_fraction']:.1%} of parameters; "
        f"source {_pct(resident_warm)} in page cache (warm); {os.cpu_count()} CPUs; peak RSS by {rss_tool()}"
    )
    print(f"{max(1, args.repeat)} rounds; ratios: median of the per-round ratios (lowest-highest)")
    print(render_table(runs))
    targets = evaluate_targets(runs)
    if targets:
        print()
        for k, v in targets.items():
            spread = f" (rounds: {v['spread'][0]}-{v['spread'][1]})" if "spread" in v else ""
            print(f"  [{'met' if v['met'] else 'NOT MET'}] {k}: {v['value']}{spread}")
    busy = [
        f"{r.method}, round {r.round + 1} ({r.others_cpu_before:.0%})"
        for r in runs
        if (r.others_cpu_before or 0) > args.max_busy
    ]
    if busy:
        verify_notes.append(f"other processes busy on the CPUs just before: {', '.join(busy)}; those timings are noisy")
    for n in verify_notes:
        print(f"  note: {n}")

    if args.json:
        report = {
            "environment": environment(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "source": {
                "path": str(src),
                "bytes": src_bytes,
                "reused": reused,
                "generate_s": gen_s,
                "spec": asdict(spec),
                "shards": manifest["files"],
            },
            "plan": {"path": str(plan_path), "bytes": plan_path.stat().st_size, **stats, "config": plan["config"]},
            "page_cache": {
                "resident_before_warmup": resident_cold,
                "resident_after_warmup": resident_warm,
                "warmup_read_s": warm_s,
            },
            "rss_tool": rss_tool(),
            "runs": [asdict(r) for r in runs],
            "medians": [asdict(r) for r in aggregate(runs)],
            "targets": targets,
            "notes": verify_notes,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures saved to {args.json}")
    failed = any(r.returncode != 0 or r.problems for r in runs)
    return 1 if failed else 0


def _pct(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "_naive":
        naive_apply(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        sys.exit(0)
    if len(sys.argv) == 5 and sys.argv[1] == "_floor":
        floor_copy(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
