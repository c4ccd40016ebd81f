"""How a mixture-of-experts model routes calibration tokens, and the saliency of each routed expert.

One streamed forward pass over the calibration windows (one block in memory, as scoring) with a
hook on every MoE layer's experts module: the module is called with the tokens' top-k expert
indices and gate weights (transformers' ``experts(hidden, top_k_index, top_k_weights)``), so the
hook sees the routing exactly as the model uses it, and runs the module once more per expert on the
tokens routed to it (top-1 routing to that expert, gate 1) to get the expert's own output f_e(x).

Per expert e of a layer, over the (token, slot) pairs routed to it:

- ``frequency``: how many pairs chose e (the "drop the least used experts" baseline);
- ``reap``: the mean over those pairs of g_e(x)·‖f_e(x)‖, the gate weight times the norm of the
  expert's output (REAP, Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot
  MoE Compression"): an expert rarely chosen, or chosen with a small weight, or whose output is
  small, contributes little to the layer's output. An expert never chosen scores 0.

``share`` (for ``structprune inspect``) is each expert's fraction of its layer's routed pairs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from structprune.errors import StreamingError
from structprune.score.distributed import SINGLE, Workers
from structprune.score.streaming import ActivationStore, StreamedModel, forward_pass
from structprune.tracing.graph import Structure, StructureGraph

SALIENCIES = ("reap", "frequency")
"""Routing-based scores of whole experts; any other estimator scores them through their weights."""


@dataclass
class RoutingStats:
    """One MoE layer's routing over the calibration tokens."""

    chosen: np.ndarray
    """Per expert: (token, slot) pairs routed to it."""
    weighted_norms: np.ndarray
    """Per expert: Σ over those pairs of gate weight × ‖expert output‖."""

    @property
    def share(self) -> np.ndarray:
        return self.chosen / max(float(self.chosen.sum()), 1.0)

    def saliency(self, kind: str) -> np.ndarray:
        if kind == "frequency":
            return self.chosen.astype(np.float64)
        if kind == "reap":
            return np.divide(self.weighted_norms, self.chosen, out=np.zeros_like(self.weighted_norms), where=self.chosen > 0)
        raise ValueError(f"unknown expert saliency '{kind}'; choose one of {', '.join(SALIENCIES)}")


def experts_module_path(prefix: str, structure: Structure) -> str:
    """The experts module inside a block (``mlp.experts``): the owner of the stacked weights among
    the structure's members (the router's row is the other member)."""
    stacked = [m.param for m in structure.members if m.param.rsplit(".", 1)[-1] != "weight"]
    if not stacked:
        raise StreamingError(f"experts structure {structure.id} has no stacked expert weight among its members")
    inside = stacked[0][len(prefix) + 1 :].split(".", 1)[1]
    return inside.rsplit(".", 1)[0]


# transformers' experts modules: forward(hidden_states, top_k_index, top_k_weights).
EXPERTS_ARGUMENTS = ("hidden_states", "top_k_index", "top_k_weights")


def argument(args: Tuple[Any, ...], kwargs: Dict[str, Any], position: int, name: str) -> torch.Tensor:
    value = args[position] if position < len(args) else kwargs.get(name)
    if not isinstance(value, torch.Tensor):
        raise StreamingError(f"the experts module was called without '{name}' (expected forward({', '.join(EXPERTS_ARGUMENTS)}))")
    return value


class _Recorder:
    """Forward pre-hook on one layer's experts module: routing counts and REAP sums."""

    def __init__(self, experts: int) -> None:
        self.chosen = torch.zeros(experts, dtype=torch.float64)
        self.weighted_norms = torch.zeros(experts, dtype=torch.float64)
        self._inside = False

    def hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if self._inside:  # the per-expert calls below go through the module again
            return
        hidden, index, weights = (argument(args, kwargs, i, name) for i, name in enumerate(EXPERTS_ARGUMENTS))
        self._inside = True
        try:
            self._record(module, hidden, index, weights)
        finally:
            self._inside = False

    def _record(self, module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for expert in torch.unique(index).tolist():
            tokens, slots = torch.nonzero(index == expert, as_tuple=True)
            own = torch.full((len(tokens), 1), expert, dtype=index.dtype, device=index.device)
            out = module(hidden[tokens], own, torch.ones((len(tokens), 1), dtype=weights.dtype, device=weights.device))
            norms = out.double().norm(dim=-1)
            self.chosen[expert] += len(tokens)
            self.weighted_norms[expert] += float((weights[tokens, slots].double() * norms).sum())


def routing_stats(
    model: StreamedModel,
    graph: StructureGraph,
    input_ids: torch.Tensor,
    *,
    micro_batch: int = 4,
    activation_memory: int,
    workers: Workers = SINGLE,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> Dict[int, RoutingStats]:
    """Routing statistics of every MoE layer (by block index) over ``input_ids`` (this process's
    share under torchrun: ``workers`` sums the counts and sums over processes)."""
    layers = {s.layer: s for s in graph.by_kind("experts") if s.layer is not None}
    recorders: Dict[int, _Recorder] = {}
    handles: List[Any] = []

    def on_load(index: int) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        structure = layers.get(index)
        if structure is not None:
            recorders[index] = _Recorder(structure.units)
            module = model.block.get_submodule(experts_module_path(model.prefix, structure))
            handles.append(module.register_forward_pre_hook(recorders[index].hook, with_kwargs=True))

    def on_block(index: int, _inputs: List[torch.Tensor], _outputs: List[torch.Tensor]) -> None:
        if progress:
            progress("routing", index + 1, model.num_blocks)

    store = ActivationStore(activation_memory)
    try:
        with _eager_experts(model):
            forward_pass(model, input_ids, micro_batch=micro_batch, store=store, on_load=on_load, on_block=on_block, keep_inputs=False)
    finally:
        for handle in handles:
            handle.remove()
        store.close()
    stats = {}
    for index, recorder in sorted(recorders.items()):
        workers.sum_([recorder.chosen, recorder.weighted_norms])
        stats[index] = RoutingStats(recorder.chosen.numpy(), recorder.weighted_norms.numpy())
    return stats


@contextmanager
def _eager_experts(model: StreamedModel) -> Iterator[None]:
    """The experts run in transformers' eager loop (each expert's products on the tokens routed to
    it): transformers' grouped GEMM on CPU wants rows of a multiple of 16 bytes, which a pruned
    expert width need not have, and ``batched_mm`` gathers a copy of an expert's weights for every
    (token, slot) pair, hundreds of GB per micro-batch for a real model's experts. Same arithmetic."""
    shell: Any = model.shell
    before = getattr(shell.config, "_experts_implementation", None)
    can_set = getattr(type(shell), "_can_set_experts_implementation", None)
    if can_set is None or not can_set():
        yield
        return
    shell.set_experts_implementation("eager")
    try:
        yield
    finally:
        if before is not None:
            shell.set_experts_implementation(before)


def expert_saliency(graph: StructureGraph, stats: Dict[int, RoutingStats], kind: str) -> Dict[int, np.ndarray]:
    """Unit scores of every experts structure (by id) from the routing statistics."""
    scores = {}
    for structure in graph.by_kind("experts"):
        if structure.layer not in stats:
            raise StreamingError(f"no routing was recorded for the experts of layer {structure.layer}")
        scores[structure.id] = stats[structure.layer].saliency(kind)
    return scores


def calibration_routing(
    model_dir: Path, graph: StructureGraph, calib: Path, *, samples: int, seq_len: int, seed: int = 0, text_field: str = "text"
) -> Dict[int, RoutingStats]:
    """Routing statistics of ``model_dir`` on ``samples`` windows of ``calib`` (``structprune
    inspect --calib``), on the CPU in float32, one block in memory."""
    from structprune.io.sizes import DEFAULT_ACTIVATION_MEMORY
    from structprune.models.loading import load_tokenizer
    from structprune.score.calibration import calibration_batch, load_texts

    if graph.blocks is None:
        raise StreamingError(f"{model_dir}: no repeated blocks, so the routing cannot be measured block by block")
    batch = calibration_batch(load_texts(calib, text_field=text_field), load_tokenizer(model_dir), samples=samples, seq_len=seq_len, seed=seed)
    model = StreamedModel(model_dir, device="cpu", dtype=torch.float32, blocks_prefix=graph.blocks.prefix)
    return routing_stats(model, graph, batch, activation_memory=DEFAULT_ACTIVATION_MEMORY)
