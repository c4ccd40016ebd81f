"""Scoring: run the calibration data through the model block by block and turn each parameter's
statistics into per-unit importance for every structure (see ``importance`` for the estimators)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from structprune.graph import Member, StructureGraph
from structprune.importance import ActivationStats, Importance
from structprune.streaming import ActivationStore, ParamStats, StreamedModel, backward_pass, forward_pass

REDUCTIONS = ("sum", "mean", "max", "prod", "first")


@dataclass
class Scores:
    """Per-unit importance (higher = keep) for every structure, and per-block influence."""

    estimator: str
    reduction: str
    units: Dict[int, np.ndarray] = field(default_factory=dict)
    per_group: Dict[int, np.ndarray] = field(default_factory=dict)
    """query_heads structure id → [KV group, slot] scores, for removing different slots per group."""
    block_influence: Optional[np.ndarray] = None
    """1 − mean cos(block input, block output) per block (ShortGPT): low means the block barely acts."""
    loss: Optional[float] = None


class _Folder:
    """Folds per-index scores of parameters onto the units of the structures that contain them."""

    def __init__(self, graph: StructureGraph, importance: Importance) -> None:
        self.graph = graph
        self.importance = importance
        self.members: Dict[str, List[Tuple[int, int, Member]]] = defaultdict(list)
        for s in graph.structures:
            for i, m in enumerate(s.members):
                self.members[m.param].append((s.id, i, m))
        self.member_scores: Dict[int, Dict[int, np.ndarray]] = defaultdict(dict)
        self.group_indices = self._group_indices()
        self.group_scores: Dict[int, Dict[int, np.ndarray]] = defaultdict(dict)

    def _group_indices(self) -> Dict[Tuple[int, int], np.ndarray]:
        """For query_heads members: the indices of each (KV group, slot) pair, as [groups, slots, width]."""
        out = {}
        for s in self.graph.by_kind("query_heads"):
            if s.nested_in is None:
                continue
            outer = self.graph.get(s.nested_in)
            for i, m in enumerate(s.members):
                in_group = [g for g in outer.members if (g.param, g.dim) == (m.param, m.dim)]
                slots = m.index_matrix(s.units)
                groups = np.concatenate([g.index_matrix(outer.units) for g in in_group], axis=1)
                pairs = [[np.intersect1d(slots[r], groups[g]) for r in range(s.units)] for g in range(outer.units)]
                out[(s.id, i)] = np.array(pairs)
        return out

    def add(self, params: Dict[str, ParamStats], activations: Dict[str, ActivationStats]) -> None:
        for name, stats in params.items():
            for sid, i, member in self.members.get(name, ()):
                scores = self.importance.index_scores(stats, member.dim, activations.get(name)).double().cpu().numpy()
                units = self.graph.get(sid).units
                self.member_scores[sid][i] = _finalize(self.importance, scores[member.index_matrix(units)].sum(axis=1))
                if (sid, i) in self.group_indices:
                    self.group_scores[sid][i] = _finalize(self.importance, scores[self.group_indices[(sid, i)]].sum(axis=2))

    def result(self, reduction: str) -> Tuple[Dict[int, np.ndarray], Dict[int, np.ndarray]]:
        units = {sid: _reduce([per[i] for i in sorted(per)], reduction) for sid, per in self.member_scores.items()}
        groups = {sid: _reduce([per[i] for i in sorted(per)], reduction) for sid, per in self.group_scores.items()}
        return units, groups


def _finalize(importance: Importance, sums: np.ndarray) -> np.ndarray:
    return importance.finalize(torch.from_numpy(sums)).numpy()


def _reduce(arrays: List[np.ndarray], reduction: str) -> np.ndarray:
    stacked = np.stack(arrays)
    if reduction == "sum":
        return stacked.sum(axis=0)
    if reduction == "mean":
        return stacked.mean(axis=0)
    if reduction == "max":
        return stacked.max(axis=0)
    if reduction == "prod":
        return stacked.prod(axis=0)
    if reduction == "first":
        return stacked[0]
    raise ValueError(f"unknown reduction '{reduction}'; choose one of {', '.join(REDUCTIONS)}")


class _ActivationRecorder:
    """Per-input-channel sums and sums of squares of every linear layer's input in the loaded block."""

    def __init__(self, model: StreamedModel) -> None:
        self.model = model
        self.stats: Dict[str, ActivationStats] = {}
        self._handles: list = []
        self._index = 0

    def attach(self, index: int) -> None:
        self._index = index
        for name, module in self.model.block.named_modules():
            input_dim = _input_dim(module)
            if input_dim is not None:
                self._handles.append(module.register_forward_hook(self._hook(f"{self.model.prefix}.{index}.{name}.weight", input_dim)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, weight_name: str, input_dim: int) -> Callable:
        def record(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            stats = self.stats.get(weight_name)
            if stats is None:
                zeros = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
                stats = self.stats[weight_name] = ActivationStats(zeros.clone(), zeros.clone(), 0, input_dim)
            stats.total += x.sum(0)
            stats.squares += x.square().sum(0)
            stats.count += x.shape[0]

        return record


def _input_dim(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return 0
    return None


def score(
    model: StreamedModel,
    graph: StructureGraph,
    importance: Importance,
    input_ids: Optional[torch.Tensor],
    *,
    reduction: str = "sum",
    micro_batch: int = 4,
    store: Optional[ActivationStore] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> Scores:
    """Scores every structure of ``graph``. ``input_ids`` may be ``None`` for data-free estimators.
    ``progress(stage, done, total)`` is called after each block."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}'; choose one of {', '.join(REDUCTIONS)}")
    folder = _Folder(graph, importance)
    result = Scores(estimator=importance.name, reduction=reduction)
    needs_data = importance.needs_gradients or importance.needs_activations
    if needs_data and input_ids is None:
        raise ValueError(f"importance '{importance.name}' needs calibration data")
    if input_ids is None:
        _score_weights_only(model, folder, progress)
    else:
        store = store or ActivationStore()
        try:
            result.block_influence, result.loss = _score_with_data(model, folder, importance, input_ids, micro_batch, store, progress)
        finally:
            store.close()
    result.units, result.per_group = folder.result(reduction)
    return result


def _score_weights_only(model: StreamedModel, folder: _Folder, progress: Optional[Callable[[str, int, int], None]]) -> None:
    for index in range(model.num_blocks):
        model.load_block(index)
        folder.add({n: ParamStats(n, p.detach()) for n, p in model.block_parameters(index).items()}, {})
        if progress:
            progress("weights", index + 1, model.num_blocks)
    folder.add({n: ParamStats(n, p.detach()) for n, p in model.outside_parameters().items()}, {})


def _score_with_data(
    model: StreamedModel,
    folder: _Folder,
    importance: Importance,
    input_ids: torch.Tensor,
    micro_batch: int,
    store: ActivationStore,
    progress: Optional[Callable[[str, int, int], None]],
) -> Tuple[np.ndarray, Optional[float]]:
    recorder = _ActivationRecorder(model)
    influence = np.zeros(model.num_blocks)
    fisher = importance.needs_fisher
    batch = 1 if fisher else micro_batch

    def on_block(index: int, inputs: List[torch.Tensor], outputs: List[torch.Tensor]) -> None:
        cos = [torch.nn.functional.cosine_similarity(i.double(), o.double(), dim=-1).mean() for i, o in zip(inputs, outputs)]
        influence[index] = 1.0 - float(torch.stack(cos).mean())
        if importance.needs_activations:
            recorder.detach()
            params = {n: ParamStats(n, p.detach()) for n, p in model.block_parameters(index).items()}
            folder.add(params, recorder.stats)
            recorder.stats = {}
        if progress:
            progress("forward", index + 1, model.num_blocks)

    def on_load(index: int) -> None:
        if importance.needs_activations:
            recorder.detach()
            recorder.attach(index)

    try:
        streamed = forward_pass(model, input_ids, micro_batch=batch, store=store, on_load=on_load, on_block=on_block)
    finally:
        recorder.detach()
    loss = None
    if importance.needs_gradients:
        def on_params(params: Dict[str, ParamStats]) -> None:
            folder.add(params, {})

        def backward_progress(index: int) -> None:
            if progress:
                progress("backward", model.num_blocks - index, model.num_blocks)

        loss = backward_pass(model, streamed, fisher=fisher, on_params=on_params, progress=backward_progress)
    elif importance.needs_activations:
        folder.add({n: ParamStats(n, p.detach()) for n, p in model.outside_parameters().items()}, {})
    return influence, loss
