#!/usr/bin/env python3
"""Benchmark of structprune's dependency graph (``structprune.trace``) against Torch-Pruning.

In one run it:

1. builds Llama-2-7B, LLaMA-65B and Llama-3-70B configs in code (``LlamaConfig``, no hub access) and
   times, each in a fresh subprocess whose own peak RSS is taken, with imports done before the
   clock starts and ``--repeat`` calls per process (median reported, first call shown apart):
   - ``structprune.trace(config)``: end to end (meta-device trace, IR, Rust grouping, Python objects);
   - ``structprune.tracing.export.trace_model(config)``: the trace alone, with a per-phase breakdown (config,
     meta-device model builds, layer checks, ``torch.export``, FX -> IR conversion, ``to_json``);
   - ``structprune.tracing.graph.structures_from_ir(ir_json)`` and ``structprune._core.build_structures(ir_json)``
     on the saved IR (a process that never imports torch): the grouping with and without the Python
     side (JSON parse, dataclasses);
   and counts the structures found per kind against what a Llama of that shape must give;
2. on Llama-2-7B's shape, materialises the model for Torch-Pruning (BF16, built on ``meta`` then
   ``to_empty(device="cpu")`` and zero-filled so every weight page is resident as after a real load,
   untimed), then times ``tp.DependencyGraph().build_dependency(model, example_inputs)`` and
   ``list(dg.get_all_groups(...))`` under a timeout, in a fresh subprocess (it needs ~13.5 GB, so it
   waits for enough available memory first);
3. prints a table, the structprune / Torch-Pruning ratios and the targets met; ``--json OUT`` saves
   everything.

See benches/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

MIB = 2**20
GIB = 2**30

# Targets from the issue.
TARGET_E2E_65B_S = 2.0  # LLaMA-65B end to end <= 2 s
TARGET_RUST_GROUPING_S = 0.100  # Rust grouping <= 100 ms
TARGET_SPEEDUP_VS_TP = 10.0  # >= 10x faster than Torch-Pruning end to end (7B shape)
TARGET_MEMORY_VS_TP = 10.0  # >= 10x less peak memory than Torch-Pruning (7B shape)

BUSY_LOAD_PER_CPU = 0.75  # a worker started above this 1-min load per CPU is named in a note
FIRST_CALL_SLOW = 1.5  # a first call this much slower than the median is flagged
TP_SEQ_LEN = 8  # tokens of Torch-Pruning's example input

# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    key: str
    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int
    vocab: int
    rope_theta: float = 10000.0

    def config_kwargs(self) -> Dict[str, Any]:
        return {
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": 4096,
            "architectures": ["LlamaForCausalLM"],
        }

    def expected_kinds(self) -> Dict[str, int]:
        """Structures a Llama of this shape must give: per layer the attention heads (``heads`` for
        MHA; ``kv_groups`` + nested ``query_heads`` for GQA) and the MLP ``channels``; one ``hidden``."""
        attn = {"heads": self.layers} if self.heads == self.kv_heads else {"kv_groups": self.layers, "query_heads": self.layers}
        return {**attn, "channels": self.layers, "hidden": 1}


SHAPES: Dict[str, LlamaShape] = {
    s.key: s
    for s in (
        LlamaShape("llama2-7b", "Llama-2-7B", 4096, 32, 32, 11008, 32, 32000),
        LlamaShape("llama-65b", "LLaMA-65B", 8192, 64, 64, 22016, 80, 32000),
        LlamaShape("llama3-70b", "Llama-3-70B", 8192, 64, 8, 28672, 80, 128256, rope_theta=500000.0),
    )
}
TP_SHAPE = "llama2-7b"
TARGET_65B_SHAPE = "llama-65b"


def llama_config(shape: LlamaShape, **extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**shape.config_kwargs(), **extra)


# --------------------------------------------------------------------------------------------
# Inside the worker subprocess
# --------------------------------------------------------------------------------------------


def proc_status_mib(field_name: str) -> Optional[float]:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    return None


def self_memory() -> Dict[str, Optional[float]]:
    import resource

    return {
        "vm_hwm_mib": proc_status_mib("VmHWM"),
        "vm_rss_mib": proc_status_mib("VmRSS"),
        "ru_maxrss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
    }


class Events:
    """JSON lines the worker appends to its result file, flushed at once (a killed worker leaves
    what it had done)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def emit(self, event: str, **data: Any) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, "t": time.time(), **data, **self_memory()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def timed_calls(fn: Callable[[], Any], repeat: int) -> Tuple[List[float], Any]:
    times: List[float] = []
    result: Any = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def import_torch_side() -> float:
    """Imports everything ``trace`` needs, so the timed calls do not include imports (the Llama
    modeling module and ``torch.export`` included). Returns the import time."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import torch.export  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401

    import structprune  # noqa: F401
    import structprune.tracing.graph  # noqa: F401
    import structprune.tracing.export  # noqa: F401

    return time.perf_counter() - t0


def kind_counts(graph: Any) -> Dict[str, int]:
    """Structures per kind, in ``structprune.tracing.graph.KINDS`` order."""
    from structprune.tracing.graph import KINDS

    counts: Dict[str, int] = {}
    for s in graph.structures:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (KINDS.index(kv[0]) if kv[0] in KINDS else len(KINDS), kv[0])))


def worker_e2e(shape: LlamaShape, repeat: int, events: Events) -> None:
    imports_s = import_torch_side()
    import structprune

    config = llama_config(shape)
    events.emit("ready", imports_s=imports_s)
    times, graph = timed_calls(lambda: structprune.trace(config), repeat)
    events.emit(
        "done",
        times_s=times,
        kinds=kind_counts(graph),
        blocks=graph.blocks.count if graph.blocks else 0,
        n_structures=len(graph.structures),
        n_pinned=len(graph.pinned),
    )


# Functions of structprune.tracing.export whose time is reported as a phase of trace_model.
TRACE_PHASES = ("_load_config", "_model_class", "_instantiate", "_find_layer_stack", "_homogeneous",
                "_truncated_config", "_truncation_ok", "_export", "_to_ir")


def instrument_tracing(log: List[Tuple[str, float]]) -> None:
    """Wraps ``structprune.tracing.export``'s phase functions (looked up as globals by ``trace_model``) so
    that each call appends ``(name, seconds)`` to ``log``."""
    import structprune.tracing.export as tracing

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                log.append((name, time.perf_counter() - t0))

        return timed

    for name in TRACE_PHASES:
        setattr(tracing, name, wrap(name, getattr(tracing, name)))


def phase_breakdown(log: Sequence[Tuple[str, float]], total_s: float, to_json_s: float) -> Dict[str, float]:
    """One trace_model call's log -> named phases (the two ``_instantiate`` calls are the full
    model and the truncated one)."""
    out: Dict[str, float] = {}
    builds = 0
    for name, dt in log:
        if name == "_instantiate":
            label = "build full model (meta)" if builds == 0 else "build truncated model (meta)"
            builds += 1
        elif name in ("_load_config", "_model_class"):
            label = "config + class"
        elif name in ("_find_layer_stack", "_homogeneous", "_truncated_config", "_truncation_ok"):
            label = "layer-stack checks"
        elif name == "_export":
            label = "torch.export"
        else:
            label = "FX -> IR (_to_ir)"
        out[label] = out.get(label, 0.0) + dt
    out["other"] = max(0.0, total_s - sum(out.values()))
    out["IR to_json"] = to_json_s
    return out


def worker_trace(shape: LlamaShape, repeat: int, events: Events, ir_path: Path) -> None:
    imports_s = import_torch_side()
    from structprune.tracing.export import trace_model

    log: List[Tuple[str, float]] = []
    instrument_tracing(log)
    config = llama_config(shape)
    events.emit("ready", imports_s=imports_s)
    times: List[float] = []
    json_times: List[float] = []
    phases: List[Dict[str, float]] = []
    ir_json = ""
    for _ in range(repeat):
        log.clear()
        t0 = time.perf_counter()
        ir = trace_model(config)
        t1 = time.perf_counter()
        ir_json = ir.to_json()
        t2 = time.perf_counter()
        times.append(t1 - t0)
        json_times.append(t2 - t1)
        phases.append(phase_breakdown(log, t1 - t0, t2 - t1))
    ir_path.write_text(ir_json, encoding="utf-8")
    events.emit(
        "done",
        times_s=times,
        to_json_s=json_times,
        phases=phases,
        ir_bytes=len(ir_json),
        ir_nodes=len(ir.nodes),
        traced_layers=(ir.layers or {}).get("traced"),
    )


def worker_grouping(repeat: int, events: Events, ir_path: Path, rust_only: bool) -> None:
    """Grouping on a saved IR, in a process that imports no torch (structprune's package import is
    light by design)."""
    t0 = time.perf_counter()
    import structprune._core as core
    import structprune.tracing.graph as graph_mod

    imports_s = time.perf_counter() - t0
    torch_loaded = "torch" in sys.modules
    ir_json = ir_path.read_text(encoding="utf-8")
    events.emit("ready", imports_s=imports_s, torch_imported=torch_loaded)
    if rust_only:
        times, out = timed_calls(lambda: core.build_structures(ir_json), repeat)
        events.emit("done", times_s=times, output_bytes=len(out), torch_imported=torch_loaded)
    else:
        times, graph = timed_calls(lambda: graph_mod.structures_from_ir(ir_json), repeat)
        events.emit("done", times_s=times, kinds=kind_counts(graph), blocks=graph.blocks.count if graph.blocks else 0,
                    torch_imported=torch_loaded)


def materialise_for_tp(shape: LlamaShape) -> Any:
    """LlamaForCausalLM in BF16 on the CPU without random init: built on ``meta``, ``to_empty``,
    rotary tables rebuilt (``to_empty`` leaves buffers uninitialised), weights zero-filled so every
    page is resident, as after loading a checkpoint."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(shape, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # built on the CPU (outside the meta context)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.eval()


def worker_torch_pruning(shape: LlamaShape, events: Events) -> None:
    t0 = time.perf_counter()
    import torch
    import torch_pruning as tp
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    imports_s = time.perf_counter() - t0
    events.emit("ready", imports_s=imports_s)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = materialise_for_tp(shape)
    materialise_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    example = {"input_ids": torch.randint(0, shape.vocab, (1, TP_SEQ_LEN))}
    events.emit("materialised", imports_s=imports_s, materialise_s=materialise_s, n_params=n_params,
                torch_threads=torch.get_num_threads())

    t0 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    build_s = time.perf_counter() - t0
    events.emit("built", build_s=build_s, graph_nodes=len(dg.module2node))

    t0 = time.perf_counter()
    groups = list(dg.get_all_groups(ignored_layers=[model.lm_head], root_module_types=[torch.nn.Linear]))
    groups_s = time.perf_counter() - t0
    sizes = sorted(len(g) for g in groups)
    events.emit("done", groups_s=groups_s, n_groups=len(groups), group_deps_min=sizes[0] if sizes else 0,
                group_deps_max=sizes[-1] if sizes else 0)


def run_worker(args: argparse.Namespace) -> int:
    events = Events(Path(args.events))
    shape = SHAPES[args.model] if args.model else None
    ir_path = Path(args.ir) if args.ir else None
    try:
        if args.worker == "e2e" and shape:
            worker_e2e(shape, args.repeat, events)
        elif args.worker == "trace" and shape and ir_path:
            worker_trace(shape, args.repeat, events, ir_path)
        elif args.worker in ("grouping", "rust") and ir_path:
            worker_grouping(args.repeat, events, ir_path, rust_only=args.worker == "rust")
        elif args.worker == "torch-pruning" and shape:
            worker_torch_pruning(shape, events)
        else:
            raise SystemExit(f"bad worker invocation: {args.worker}")
    except Exception as err:  # noqa: BLE001 - reported to the parent
        events.emit("error", error=f"{type(err).__name__}: {err}")
        raise
    # Skip the interpreter's teardown: with torch and transformers loaded it raises the peak RSS
    # by ~165 MiB after the work is done, which ru_maxrss would count.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------------------------
# In the benchmark process: launching and measuring workers
# --------------------------------------------------------------------------------------------


@dataclass
class ProcResult:
    """One worker subprocess."""

    task: str
    model: str
    rc: Optional[int]
    status: str  # ok | error | timeout
    wall_s: float
    ru_maxrss_mib: float  # os.wait4; this process's RSS at spawn is a floor (see README)
    user_s: float
    sys_s: float
    load1_start: float
    events: List[Dict[str, Any]] = field(default_factory=list)
    log_tail: str = ""

    def event(self, name: str) -> Dict[str, Any]:
        return next((e for e in self.events if e["event"] == name), {})

    @property
    def vm_hwm_mib(self) -> Optional[float]:
        """The highest VmHWM the worker wrote (its memory image's own high-water mark: ``exec``
        resets it, so unlike ``ru_maxrss`` it has no floor from this process)."""
        hwm = [e["vm_hwm_mib"] for e in self.events if e.get("vm_hwm_mib") is not None]
        return max(hwm) if hwm else None

    @property
    def peak_rss_mib(self) -> float:
        """The worker's peak RSS: ``ru_maxrss`` from ``os.wait4`` (workers end with ``os._exit``)."""
        return self.ru_maxrss_mib


def read_events(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def launch(task: str, model: str, work: Path, extra: Sequence[str], timeout_s: float,
           stall: Optional[Callable[[List[Dict[str, Any]], float], bool]] = None) -> ProcResult:
    """Runs this script as a worker and reaps it with ``os.wait4`` (its rusage). ``timeout_s``
    bounds the whole run; ``stall(events, elapsed)`` may end it earlier (returns True to kill)."""
    tag = f"{task}-{model or 'ir'}-{time.monotonic_ns()}"
    events_path, log_path = work / f"{tag}.jsonl", work / f"{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--events", str(events_path), *extra]
    if model:
        cmd += ["--model", model]
    load1 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    status, wstatus, ru = "ok", 0, None
    while True:
        pid, wstatus, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        elapsed = time.perf_counter() - t0
        if elapsed > timeout_s or (stall is not None and stall(read_events(events_path), elapsed)):
            os.killpg(proc.pid, signal.SIGKILL)
            _, wstatus, ru = os.wait4(proc.pid, 0)
            status = "timeout"
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(wstatus)
    proc.returncode = rc
    if status == "ok" and rc != 0:
        status = "error"
    return ProcResult(
        task=task, model=model, rc=rc, status=status, wall_s=wall, ru_maxrss_mib=ru.ru_maxrss * 1024 / MIB,
        user_s=ru.ru_utime, sys_s=ru.ru_stime, load1_start=load1, events=read_events(events_path),
        log_tail=log_path.read_text(encoding="utf-8", errors="replace")[-3000:] if status != "ok" else "",
    )


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """The timed calls of one worker."""

    label: str
    model: str
    times_s: List[float]
    peak_rss_mib: float
    vm_hwm_mib: Optional[float]
    wall_s: float
    imports_s: Optional[float]
    rss_after_imports_mib: Optional[float]
    load1_start: float
    status: str
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def first_s(self) -> Optional[float]:
        return self.times_s[0] if self.times_s else None

    @property
    def first_slow(self) -> bool:
        m = self.median_s
        return bool(m and self.first_s and self.first_s > FIRST_CALL_SLOW * m)


def to_timing(label: str, res: ProcResult) -> Timing:
    done, ready = res.event("done"), res.event("ready")
    extra = {k: v for k, v in done.items() if k not in ("event", "t", "times_s", "vm_hwm_mib", "vm_rss_mib", "ru_maxrss_self_mib")}
    if res.status != "ok":
        extra["error"] = res.event("error").get("error") or res.log_tail
    return Timing(label, res.model, list(done.get("times_s", [])), res.peak_rss_mib, res.vm_hwm_mib, res.wall_s,
                  ready.get("imports_s"), ready.get("vm_rss_mib"), res.load1_start, res.status, extra)


def check_worker(res: ProcResult) -> None:
    if res.status != "ok":
        err = res.event("error").get("error") or res.log_tail
        print(f"  !! {res.task} {res.model}: {res.status}: {err}", file=sys.stderr)


def measure_structprune(shape: LlamaShape, work: Path, repeat: int, timeout_s: float) -> Dict[str, Timing]:
    """e2e, trace (saving the IR), grouping and Rust-only grouping, each in its own process."""
    ir_path = work / f"ir-{shape.key}.json"
    out: Dict[str, Timing] = {}
    steps = [("e2e", "trace() end to end", shape.key, []),
             ("trace", "trace_model()", shape.key, ["--ir", str(ir_path)]),
             ("grouping", "structures_from_ir()", "", ["--ir", str(ir_path)]),
             ("rust", "_core.build_structures()", "", ["--ir", str(ir_path)])]
    for task, label, model, extra in steps:
        if task in ("grouping", "rust") and not ir_path.exists():
            continue
        print(f"  {shape.name}: {label} ...", file=sys.stderr, flush=True)
        res = launch(task, model, work, [*extra, "--repeat", str(repeat)], timeout_s)
        check_worker(res)
        timing = to_timing(label, res)
        timing.model = shape.key
        out[task] = timing
    return out


def wait_for_memory(min_gib: float, max_wait_s: float) -> Tuple[bool, float, float]:
    """Waits until MemAvailable >= ``min_gib`` (polls every 15 s). Returns (ok, available, waited)."""
    t0 = time.monotonic()
    while True:
        avail = mem_available_gib()
        waited = time.monotonic() - t0
        if avail >= min_gib:
            return True, avail, waited
        if waited >= max_wait_s:
            return False, avail, waited
        print(f"  only {avail:.1f} GiB available (< {min_gib:g}); waiting ...", file=sys.stderr, flush=True)
        time.sleep(min(15.0, max(1.0, max_wait_s - waited)))


@dataclass
class TorchPruningRun:
    status: str  # ok | timeout | error | skipped
    note: str
    version: Optional[str]
    mem_available_gib: float
    mem_wait_s: float
    wall_s: float = 0.0
    peak_rss_mib: float = 0.0
    vm_hwm_mib: Optional[float] = None
    imports_s: Optional[float] = None
    materialise_s: Optional[float] = None
    rss_after_imports_mib: Optional[float] = None
    rss_after_materialise_mib: Optional[float] = None
    build_s: Optional[float] = None
    groups_s: Optional[float] = None
    n_groups: Optional[int] = None
    graph_nodes: Optional[int] = None
    n_params: Optional[int] = None
    load1_start: float = 0.0
    error: str = ""

    @property
    def e2e_s(self) -> Optional[float]:
        """Torch-Pruning's grouping: build_dependency + get_all_groups (the model already in
        memory; loading it is not counted)."""
        return self.build_s + self.groups_s if self.build_s is not None and self.groups_s is not None else None


def dist_version(name: str) -> Optional[str]:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def measure_torch_pruning(shape: LlamaShape, work: Path, args: argparse.Namespace) -> TorchPruningRun:
    version = dist_version("torch-pruning")
    if version is None:
        return TorchPruningRun("skipped", "torch-pruning not installed (pip install -e '.[bench]')", None, mem_available_gib(), 0.0)
    ok, avail, waited = wait_for_memory(args.tp_min_available_gib, args.tp_wait_memory)
    if not ok:
        return TorchPruningRun("skipped", f"only {avail:.1f} GiB available after {waited:.0f} s", version, avail, waited)
    print(f"  {shape.name}: Torch-Pruning (materialises ~13.5 GB) ...", file=sys.stderr, flush=True)

    def stalled(events: List[Dict[str, Any]], elapsed: float) -> bool:
        start = next((e for e in events if e["event"] == "materialised"), None)
        return start is not None and time.time() - start["t"] > args.tp_timeout

    res = launch("torch-pruning", shape.key, work, [], args.tp_timeout + args.tp_setup_timeout, stalled)
    check_worker(res)
    mat, built, done = res.event("materialised"), res.event("built"), res.event("done")
    run = TorchPruningRun(
        status=res.status, note="", version=version, mem_available_gib=avail, mem_wait_s=waited, wall_s=res.wall_s,
        peak_rss_mib=res.peak_rss_mib, vm_hwm_mib=res.vm_hwm_mib, imports_s=mat.get("imports_s"),
        materialise_s=mat.get("materialise_s"), rss_after_imports_mib=res.event("ready").get("vm_rss_mib"),
        rss_after_materialise_mib=mat.get("vm_rss_mib"),
        build_s=built.get("build_s"), groups_s=done.get("groups_s"), n_groups=done.get("n_groups"),
        graph_nodes=built.get("graph_nodes"), n_params=mat.get("n_params"), load1_start=res.load1_start,
    )
    if res.status == "timeout":
        phase = "get_all_groups" if built else ("build_dependency" if mat else "setup")
        run.note = f"timed out in {phase} (limit {args.tp_timeout:g} s after materialising)"
    elif res.status == "error":
        run.error = res.event("error").get("error") or res.log_tail
        run.note = "failed"
    return run


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x < 0.1:
        return f"{x * 1000:.1f} ms"
    return f"{x:.2f} s"


def fmt_mib(x: Optional[float]) -> str:
    if not x:
        return "-"
    return f"{x / 1024:.2f} GiB" if x >= 10 * 1024 else f"{x:.0f} MiB"


def structures_cell(shape: LlamaShape, t: Timing) -> str:
    kinds = t.extra.get("kinds")
    if kinds is None:
        return ""
    want = shape.expected_kinds()
    ok = kinds == want and t.extra.get("blocks") == shape.layers
    text = " ".join(f"{k}={v}" for k, v in kinds.items()) + f" blocks={t.extra.get('blocks')}"
    return text + ("  ok" if ok else f"  MISMATCH (want {want}, blocks={shape.layers})")


def print_table(rows: List[List[str]], header: List[str]) -> None:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def structprune_rows(results: Dict[str, Dict[str, Timing]]) -> List[List[str]]:
    rows = []
    for key, timings in results.items():
        shape = SHAPES[key]
        for t in timings.values():
            first = fmt_s(t.first_s) + (" (slow)" if t.first_slow else "")
            status = "" if t.status == "ok" else t.status.upper() + " "
            rows.append([shape.name, t.label, first, status + fmt_s(t.median_s), fmt_mib(t.peak_rss_mib),
                         fmt_mib(t.rss_after_imports_mib), fmt_s(t.imports_s), fmt_s(t.wall_s), structures_cell(shape, t)])
    return rows


def tp_rows(tp: TorchPruningRun) -> List[List[str]]:
    name = SHAPES[TP_SHAPE].name
    if tp.status == "skipped":
        return [[name, "Torch-Pruning", "-", f"SKIPPED: {tp.note}", "-", "-", "-", "-", ""]]
    groups = f"{tp.n_groups} groups" if tp.n_groups is not None else tp.note
    return [
        [name, "TP materialise (to_empty+zero)", "", fmt_s(tp.materialise_s), fmt_mib(tp.rss_after_materialise_mib), fmt_mib(tp.rss_after_imports_mib), fmt_s(tp.imports_s), "", "peak RSS = RSS after materialising"],
        [name, "TP build_dependency", "", fmt_s(tp.build_s) if tp.build_s is not None else tp.status.upper(), "", "", "", "", f"{tp.graph_nodes or '-'} graph nodes"],
        [name, "TP get_all_groups", "", fmt_s(tp.groups_s) if tp.groups_s is not None else tp.status.upper(), "", "", "", "", groups],
        [name, "TP end to end (build+groups)", "", fmt_s(tp.e2e_s) if tp.e2e_s is not None else tp.status.upper(), fmt_mib(tp.peak_rss_mib), "", "", fmt_s(tp.wall_s), tp.note],
    ]


def phase_rows(results: Dict[str, Dict[str, Timing]]) -> Tuple[List[str], List[List[str]]]:
    """Median per phase of trace_model (+ to_json), per model."""
    labels: List[str] = []
    table: Dict[str, Dict[str, float]] = {}
    for key, timings in results.items():
        t = timings.get("trace")
        if not t or not t.extra.get("phases"):
            continue
        phases: List[Dict[str, float]] = t.extra["phases"]
        for p in phases:
            for lab in p:
                if lab not in labels:
                    labels.append(lab)
        table[key] = {lab: statistics.median(p.get(lab, 0.0) for p in phases) for lab in labels}
    header = ["phase"] + [SHAPES[k].name for k in table]
    rows = [[lab] + [fmt_s(table[k].get(lab)) for k in table] for lab in labels]
    firsts = [["(first call) " + lab] + [fmt_s(results[k]["trace"].extra["phases"][0].get(lab)) for k in table]
              for lab in ("torch.export", "build full model (meta)")]
    return header, rows + firsts


@dataclass
class Verdict:
    name: str
    value: str
    target: str
    met: Optional[bool]


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def verdicts(results: Dict[str, Dict[str, Timing]], tp: TorchPruningRun) -> Tuple[List[Verdict], Dict[str, Any]]:
    out: List[Verdict] = []
    e65 = results.get(TARGET_65B_SHAPE, {}).get("e2e")
    if e65 and e65.median_s is not None:
        out.append(Verdict("LLaMA-65B trace() end to end (median)", fmt_s(e65.median_s), f"<= {TARGET_E2E_65B_S:g} s",
                           e65.median_s <= TARGET_E2E_65B_S))
        out.append(Verdict("LLaMA-65B trace() end to end (first call)", fmt_s(e65.first_s), f"<= {TARGET_E2E_65B_S:g} s",
                           e65.first_s is not None and e65.first_s <= TARGET_E2E_65B_S))
    rust = [(SHAPES[k].name, t["rust"].median_s) for k, t in results.items() if t.get("rust") and t["rust"].median_s is not None]
    if rust:
        worst = max(rust, key=lambda x: x[1])
        out.append(Verdict(f"Rust grouping, slowest model ({worst[0]})", fmt_s(worst[1]), f"<= {TARGET_RUST_GROUPING_S * 1000:g} ms",
                           worst[1] <= TARGET_RUST_GROUPING_S))
    e7 = results.get(TP_SHAPE, {}).get("e2e")
    speed = ratio(tp.e2e_s, e7.median_s if e7 else None)
    mem = ratio(tp.peak_rss_mib if tp.status in ("ok", "timeout") else None, e7.peak_rss_mib if e7 else None)
    if tp.status == "timeout":
        # Torch-Pruning did not finish: the time it ran is a lower bound on its e2e time.
        bound = tp_lower_bound_s(tp)
        speed = ratio(bound, e7.median_s if e7 else None)
        out.append(Verdict("7B: TP e2e / structprune e2e (time)", f">= {speed:.1f}x (TP timed out)" if speed else "TP timed out",
                           f">= {TARGET_SPEEDUP_VS_TP:g}x", True if speed and speed >= TARGET_SPEEDUP_VS_TP else None))
    else:
        out.append(Verdict("7B: TP e2e / structprune e2e (time)", f"{speed:.1f}x" if speed else "-", f">= {TARGET_SPEEDUP_VS_TP:g}x",
                           None if speed is None else speed >= TARGET_SPEEDUP_VS_TP))
        if speed and e7 and e7.first_s:
            first = ratio(tp.e2e_s, e7.first_s)
            out.append(Verdict("  same, structprune's first call", f"{first:.1f}x" if first else "-", "(info)", None))
        with_mat = ratio((tp.e2e_s or 0.0) + (tp.materialise_s or 0.0), e7.median_s if e7 else None)
        if speed and with_mat:
            out.append(Verdict("  same, TP time incl. materialising the model", f"{with_mat:.1f}x", "(info)", None))
    out.append(Verdict("7B: TP peak RSS / structprune peak RSS", f"{mem:.1f}x" if mem else "-", f">= {TARGET_MEMORY_VS_TP:g}x",
                       None if mem is None else mem >= TARGET_MEMORY_VS_TP))
    ratios = {"tp_over_structprune_time": speed, "tp_over_structprune_peak_rss": mem}
    if tp.status == "ok" and e7:
        ratios["tp_over_structprune_time_first_call"] = ratio(tp.e2e_s, e7.first_s)
        ratios["tp_incl_materialise_over_structprune_time"] = ratio((tp.e2e_s or 0.0) + (tp.materialise_s or 0.0), e7.median_s)
    return out, ratios


def tp_lower_bound_s(tp: TorchPruningRun) -> Optional[float]:
    """Lower bound of Torch-Pruning's e2e time when it timed out: the wall time it ran after
    imports and materialising (build_dependency, then get_all_groups until killed)."""
    if tp.materialise_s is None or tp.imports_s is None:
        return None
    return max(0.0, tp.wall_s - tp.materialise_s - tp.imports_s)


def verdict_text(v: Verdict) -> str:
    if v.met is None:
        return "" if v.target == "(info)" else "n/a"
    return "met" if v.met else "NOT MET"


def print_report(results: Dict[str, Dict[str, Timing]], tp: TorchPruningRun, repeat: int) -> Tuple[List[Verdict], Dict[str, Any]]:
    print()
    print(f"structprune dependency graph vs Torch-Pruning (times: in-process perf_counter after imports, "
          f"first call and median of {repeat}; peak RSS: ru_maxrss of the worker process, os.wait4)")
    print()
    header = ["model", "measurement", "first", "median", "peak RSS", "RSS after imports", "imports", "proc wall", "structures"]
    print_table(structprune_rows(results) + tp_rows(tp), header)
    ph_header, ph_rows = phase_rows(results)
    if ph_rows:
        print()
        print("trace_model() breakdown (median per phase):")
        print_table(ph_rows, ph_header)
    v, ratios = verdicts(results, tp)
    print()
    print("Ratios and targets:")
    print_table([[x.name, x.value, x.target, verdict_text(x)] for x in v],
                ["what", "value", "target", "verdict"])
    notes = report_notes(results, tp)
    if notes:
        print()
        for n in notes:
            print(f"note: {n}")
    return v, ratios


def report_notes(results: Dict[str, Dict[str, Timing]], tp: TorchPruningRun) -> List[str]:
    notes = []
    cpus = os.cpu_count() or 1
    busy = BUSY_LOAD_PER_CPU * cpus
    noisy = [f"{SHAPES[k].name} {t.label} (load {t.load1_start:.1f})" for k, ts in results.items() for t in ts.values()
             if t.load1_start > busy]
    if noisy:
        notes.append(f"started with 1-min load > {busy:g} on {cpus} CPUs (times may be noisy): " + "; ".join(noisy))
    odd = [f"{SHAPES[k].name} {t.label} ({fmt_mib(t.peak_rss_mib)} vs {fmt_mib(t.vm_hwm_mib)})" for k, ts in results.items()
           for t in ts.values() if t.vm_hwm_mib and abs(t.peak_rss_mib - t.vm_hwm_mib) > 0.05 * t.vm_hwm_mib]
    if odd:
        notes.append("ru_maxrss and the worker's own VmHWM differ by > 5%: " + "; ".join(odd))
    if tp.status in ("ok", "timeout"):
        notes.append(f"Torch-Pruning {tp.version}: model materialised in BF16 ({tp.n_params or 0:,} params) on meta then "
                     f"to_empty(device='cpu') and zero-filled, untimed (no random init); example input [1, {TP_SEQ_LEN}] "
                     f"tokens; TP e2e = build_dependency + get_all_groups(ignored_layers=[lm_head], root=nn.Linear)")
        if tp.load1_start > busy:
            notes.append(f"Torch-Pruning run started with 1-min load {tp.load1_start:.1f}")
    if tp.status == "error":
        notes.append(f"Torch-Pruning failed: {tp.error[-600:]}")
    return notes


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def environment() -> Dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "mem_total_gib": int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:")).split()[1]) * 1024 / GIB,
        "versions": {n: dist_version(n) for n in ("structprune", "torch", "transformers", "torch-pruning", "numpy")},
        "loadavg_start": os.getloadavg(),
        "bench_rss_mib": proc_status_mib("VmRSS"),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--json", metavar="OUT", type=Path, help="write all figures to this JSON file")
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per worker process")
    p.add_argument("--timeout", type=float, default=600.0, help="limit (s) for each structprune worker process")
    p.add_argument("--skip-torch-pruning", action="store_true", help="do not run the Torch-Pruning comparison")
    p.add_argument("--tp-timeout", type=float, default=600.0, help="limit (s) for build_dependency + get_all_groups")
    p.add_argument("--tp-setup-timeout", type=float, default=600.0, help="limit (s) for Torch-Pruning's imports + materialising")
    p.add_argument("--tp-min-available-gib", type=float, default=17.0, help="MemAvailable needed before the Torch-Pruning run")
    p.add_argument("--tp-wait-memory", type=float, default=900.0, help="how long (s) to wait for that memory")
    p.add_argument("--work-dir", type=Path, help="where IR files and worker logs go (default: a temporary directory)")
    # internal: worker mode
    p.add_argument("--worker", choices=["e2e", "trace", "grouping", "rust", "torch-pruning"], help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(SHAPES), help=argparse.SUPPRESS)
    p.add_argument("--ir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    unknown = [m for m in args.models.split(",") if m not in SHAPES]
    if unknown and not args.worker:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    return args


def run_bench(args: argparse.Namespace, work: Path) -> int:
    env = environment()
    results: Dict[str, Dict[str, Timing]] = {}
    for key in args.models.split(","):
        results[key] = measure_structprune(SHAPES[key], work, args.repeat, args.timeout)
    if args.skip_torch_pruning:
        tp = TorchPruningRun("skipped", "--skip-torch-pruning", dist_version("torch-pruning"), mem_available_gib(), 0.0)
    else:
        tp = measure_torch_pruning(SHAPES[TP_SHAPE], work, args)
    v, ratios = print_report(results, tp, args.repeat)
    if args.json:
        data = {
            "environment": env,
            "repeat": args.repeat,
            "shapes": {k: asdict(SHAPES[k]) for k in results},
            "structprune": {k: {task: {**asdict(t), "median_s": t.median_s, "first_s": t.first_s} for task, t in ts.items()}
                            for k, ts in results.items()},
            "torch_pruning": {**asdict(tp), "e2e_s": tp.e2e_s},
            "ratios": ratios,
            "targets": [asdict(x) for x in v],
            "loadavg_end": os.getloadavg(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    failed = any(t.status != "ok" for ts in results.values() for t in ts.values()) or tp.status == "error"
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return run_bench(args, args.work_dir)
    with tempfile.TemporaryDirectory(prefix="bench-trace-") as tmp:
        return run_bench(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
