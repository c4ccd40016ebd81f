"""What a model costs to run: parameters, multiply-accumulates per token, speed and memory, each
by one stated protocol so that a pruned model and its original are measured alike.

Counted (exact, no timing):

- **Parameters**: the sum of ``numel`` over ``model.parameters()`` (a tied embedding and head
  count once); **weight bytes**: the same parameters' bytes in the loaded dtype.
- **MACs per token at context L**: ``Σ in_features × out_features`` over every ``nn.Linear``
  (and transformers' ``Conv1D``, GPT-2's linear layer) — the head included, embedding lookups,
  norms, activations, biases and softmax not counted — plus, per attention layer,
  ``2 × query_width × L``: the scores ``q·kᵀ`` and the weighted sum of values, each
  ``heads × head_dim`` MACs per key, for a token that attends to ``L`` keys (the last token of an
  ``L``-token context, or a decode step at that context). With grouped-query attention the keys
  and values are shared but every query head still does its own products, so the query width is
  what counts. The query width is ``q_proj.out_features`` of each attention module that has one,
  else ``num_attention_heads × head_dim`` from the config for every layer. Sliding-window
  attention and mixture-of-experts routing are not modelled (every expert's layers are counted).

Measured (:class:`TimingProtocol`), for each batch size B, on random token ids (seeded; the cost of
a dense model does not depend on the ids), under ``torch.inference_mode``:

- **Prefill**: one forward over ``B × L`` tokens without a KV cache. ``warmup`` untimed runs, then
  ``repeats`` timed runs; the figure is the median run time (``prefill_seconds``: the latency of a
  batch of B prompts of L tokens, time to first token at B = 1) and ``B × L`` divided by it
  (``prefill_tokens_per_s``).
- **Decode**: a prefill of ``B × L`` tokens with a KV cache (untimed), then ``decode_tokens``
  greedy steps of one new token per sequence, each step timed; a run's figure is its mean step
  time, warmup runs are discarded, and ``decode_seconds_per_token`` is the median over the timed
  runs (``decode_tokens_per_s`` = B divided by it).
- On CUDA, every timed interval starts and ends with ``torch.cuda.synchronize``, so kernels
  queued by one interval are not counted in the next.
- **Peak memory** per batch size, over its prefill and decode runs: the weight bytes plus how far
  memory in use rose above its level before the runs (so other models or tensors in the process
  do not count). On CUDA, "in use" is ``torch.cuda.memory_allocated`` (the rise is
  ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus the level before; KV cache and
  activations, not the CUDA context or the allocator's cache). On CPU (Linux) it is the process's
  resident set: ``VmHWM`` reset through ``/proc/self/clear_refs`` after returning freed heap memory
  to the system with ``malloc_trim`` and paging the weights in. The CPU figure depends on the
  allocator (freed memory it keeps is reused without showing) and is approximate; ``None`` where
  it cannot be read.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from structprune.errors import EvaluationError
from structprune.io.threads import usable_cpus  # noqa: F401 - the eval command reads the CPU count here

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
# Writing "5" to clear_refs resets the peak resident set (VmHWM) to the current one (Linux ≥ 4.0).
_RESET_PEAK_RSS = "5"


@dataclass(frozen=True)
class TimingProtocol:
    """How speed and memory are measured (see the module doc)."""

    context: int = 128
    """L: prompt tokens per sequence of the prefill, and the context the decode steps start from."""
    batch_sizes: Sequence[int] = (1, 16)
    decode_tokens: int = 16
    """Timed one-token steps per decode run."""
    warmup: int = 2
    repeats: int = 5
    seed: int = 0


@dataclass(frozen=True)
class MacsCount:
    """Multiply-accumulates to compute one token (module doc: the formula)."""

    linear: int
    attention: int
    context: int

    @property
    def total(self) -> int:
        return self.linear + self.attention


@dataclass(frozen=True)
class Throughput:
    """Speed and memory at one batch size (module doc: the protocol)."""

    batch: int
    context: int
    prefill_seconds: float
    prefill_tokens_per_s: float
    decode_seconds_per_token: float
    decode_tokens_per_s: float
    peak_memory_bytes: Optional[int]


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, a tied (shared) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters in their current dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def macs_per_token(model: nn.Module, context: int) -> MacsCount:
    """MACs per token at ``context`` keys, by the formula in the module doc."""
    if context < 1:
        raise EvaluationError(f"the MACs context must be at least 1 token, got {context}")
    linear = sum(_linear_macs(module) for module in model.modules())
    attention = sum(2 * width * context for width in attention_query_widths(model))
    return MacsCount(linear=linear, attention=attention, context=context)


def attention_query_widths(model: nn.Module) -> List[int]:
    """``heads × head_dim`` of every attention layer (module doc: where it is read from)."""
    projections = [getattr(module, "q_proj", None) for module in model.modules()]
    widths = [projection.out_features for projection in projections if isinstance(projection, nn.Linear)]
    if widths:
        return widths
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not heads or not layers:
        raise EvaluationError(
            f"{type(model).__name__}: cannot count attention MACs: no q_proj layers and no "
            "num_attention_heads/num_hidden_layers in the config"
        )
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size") // heads
    return [heads * head_dim] * layers


def measure_throughput(
    model: nn.Module, protocol: TimingProtocol, *, progress: bool = False, announce: Optional[Callable[[float], None]] = None
) -> List[Throughput]:
    """Prefill and decode speed and peak memory at each batch size of ``protocol``. ``announce``
    is called once, after the first run, with the seconds the whole measurement should take
    (:func:`timing_estimate`)."""
    _check_protocol(model, protocol)
    generator = torch.Generator().manual_seed(protocol.seed)
    results: List[Throughput] = []
    was_training = model.training
    model.eval()
    runs = protocol.warmup + protocol.repeats
    try:
        for batch in tqdm(protocol.batch_sizes, desc="timing", unit="batch size", disable=not progress):
            prompt = random_prompt(model, batch, protocol.context, generator)
            with _peak_memory(model, prompt.device) as peak:
                prefills, decodes = [], []
                for run in range(runs):
                    started = time.perf_counter()
                    prefills.append(prefill_seconds(model, prompt))
                    decodes.append(decode_seconds_per_token(model, prompt, protocol.decode_tokens))
                    if announce is not None and not results and run == 0:
                        announce(timing_estimate(protocol, time.perf_counter() - started))
                prefill = statistics.median(prefills[protocol.warmup :])
                decode = statistics.median(decodes[protocol.warmup :])
            results.append(
                Throughput(
                    batch=batch,
                    context=protocol.context,
                    prefill_seconds=prefill,
                    prefill_tokens_per_s=batch * protocol.context / prefill,
                    decode_seconds_per_token=decode,
                    decode_tokens_per_s=batch / decode,
                    peak_memory_bytes=peak.get("bytes"),
                )
            )
    finally:
        model.train(was_training)
    return results


def timing_estimate(protocol: TimingProtocol, first_run_seconds: float) -> float:
    """Seconds all of ``protocol``'s runs should take, from the first run at its first batch size:
    every run costs as much, scaled by its batch size over the first (linear in the batch, as the
    prefill's matrix products are on a CPU; decode grows more slowly, so this errs long)."""
    first = protocol.batch_sizes[0]
    runs = protocol.warmup + protocol.repeats
    return first_run_seconds * runs * sum(batch / first for batch in protocol.batch_sizes)


def random_prompt(model: nn.Module, batch: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, context]`` token ids drawn uniformly from the model's vocabulary, on its device."""
    device = next(model.parameters()).device
    return torch.randint(_vocab_size(model), (batch, context), generator=generator).to(device)


@torch.inference_mode()
def prefill_seconds(model: nn.Module, prompt: torch.Tensor) -> float:
    """Wall time of one forward over ``prompt`` without a KV cache (one prefill run)."""
    _synchronize(prompt.device)
    started = time.perf_counter()
    model(input_ids=prompt, use_cache=False)
    _synchronize(prompt.device)
    return time.perf_counter() - started


@torch.inference_mode()
def decode_seconds_per_token(model: nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Mean time of ``steps`` greedy one-token steps after an untimed prefill of ``prompt`` with a
    KV cache (one decode run)."""
    output = model(input_ids=prompt, use_cache=True)
    argument = _cache_argument(model)
    total = 0.0
    for _ in range(steps):
        next_ids = output.logits[:, -1:].argmax(dim=-1)
        past = output[argument]
        _synchronize(prompt.device)
        started = time.perf_counter()
        output = model(input_ids=next_ids, use_cache=True, **{argument: past})
        _synchronize(prompt.device)
        total += time.perf_counter() - started
    return total / steps


@dataclass(frozen=True)
class MachineLoad:
    """The 1-minute load average before and after timing, and the CPUs this process may use."""

    before: float
    after: float
    cpus: int

    def warning(self, comparing: bool) -> Optional[str]:
        """Why the timings may not mean much, or ``None``. Other work on the machine is the load
        before timing started (this process was loading, one thread); while timing, torch's own
        threads add up to one per CPU, so only load past 1.5 per CPU afterwards is someone
        else's. A busy machine made a pruned model look 7 times slower than its original in one
        run (issue 20)."""
        if self.before < max(1.0, self.cpus / 2) and self.after < 1.5 * self.cpus:
            return None
        what = "speed ratios" if comparing else "speed figures"
        return (
            f"warning: the machine was busy while timing (load average {self.before:.1f} before, {self.after:.1f} after, "
            f"{self.cpus} CPU(s)): {what} are unreliable; time on a quiet machine, or pass --no-timing"
        )


def load_average() -> float:
    """The 1-minute load average (0 where the system does not report one)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _cache_argument(model: nn.Module) -> str:
    """The name of the KV cache, in the forward's arguments and its output: ``cache`` from
    transformers 5.25 on, ``past_key_values`` before (the old name now warns, once per decode run)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _linear_macs(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.get_parameter("weight").numel())  # transformers' Conv1D: weight is [in, out]
    return 0


def _vocab_size(model: nn.Module) -> int:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is None or not hasattr(embeddings, "num_embeddings"):
        raise EvaluationError(f"{type(model).__name__}: no input embedding to draw token ids for timing")
    return int(embeddings.num_embeddings)


def _check_protocol(model: nn.Module, protocol: TimingProtocol) -> None:
    if protocol.context < 1 or protocol.decode_tokens < 1 or protocol.repeats < 1 or protocol.warmup < 0:
        raise EvaluationError(f"timing protocol needs context, decode_tokens and repeats ≥ 1 and warmup ≥ 0, got {protocol}")
    if not protocol.batch_sizes or min(protocol.batch_sizes) < 1:
        raise EvaluationError(f"timing batch sizes must be positive, got {list(protocol.batch_sizes)}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = protocol.context + protocol.decode_tokens
    if limit is not None and longest > limit:
        raise EvaluationError(
            f"timing context {protocol.context} + {protocol.decode_tokens} decode tokens = {longest} exceeds the "
            f"model's max_position_embeddings ({limit}): lower --context"
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _peak_memory(model: nn.Module, device: torch.device) -> Iterator[Dict[str, Optional[int]]]:
    """Yields a dict whose ``bytes`` is set, on exit, to the peak memory of the block (module doc)."""
    result: Dict[str, Optional[int]] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)  # this model's weights and whatever else is there
        yield result
        result["bytes"] = weight_bytes(model) + torch.cuda.max_memory_allocated(device) - baseline
        return
    rss_baseline = _reset_peak_rss(model)
    yield result
    peak = _status_bytes("VmHWM")
    result["bytes"] = None if rss_baseline is None or peak is None else weight_bytes(model) + max(0, peak - rss_baseline)


def _reset_peak_rss(model: nn.Module) -> Optional[int]:
    """Resident set after paging the weights in and trimming the heap, with the peak reset to it."""
    gc.collect()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.sum()  # pages in weights that are still mapped from the checkpoint file
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        _PROC_CLEAR_REFS.write_text(_RESET_PEAK_RSS)
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> Optional[int]:
    try:
        lines = _PROC_STATUS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


__all__ = [
    "MacsCount",
    "Throughput",
    "TimingProtocol",
    "attention_query_widths",
    "count_parameters",
    "decode_seconds_per_token",
    "macs_per_token",
    "measure_throughput",
    "timing_estimate",
    "prefill_seconds",
    "random_prompt",
    "weight_bytes",
]
