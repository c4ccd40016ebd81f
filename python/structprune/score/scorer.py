"""Scoring: run the calibration data through the model block by block and turn each parameter's
statistics into per-unit importance for every structure (see ``importance`` for the estimators)."""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Callable, Collection, Dict, FrozenSet, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
from torch import nn

from structprune.errors import SettingError
from structprune.score.distributed import SINGLE, Workers
from structprune.score.expert_inputs import (
    ExpertInputRecorder, attach_expert_recorders, check_experts_module, consumes_expert_channels, expert_gate_derivatives, experts_modules,
    has_experts_interface,
)
from structprune.score.routing import EXPERTS_ARGUMENTS, argument
from structprune.tracing.graph import Member, StructureGraph
from structprune.score.importance import ActivationStats, Bonsai, Importance, LoraGrad
from structprune.score.journal import Journal
from structprune.score.lora_probes import LoraProbes
from structprune.io.sizes import DEFAULT_ACTIVATION_MEMORY
from structprune.score.streaming import ActivationStore, BackwardState, ParamStats, StreamedModel, StreamedPass, backward_pass, forward_pass, holds

REDUCTIONS = ("sum", "mean", "max", "prod", "first")

WeightDim = Tuple[str, int]
"""A parameter name and one of its dimensions."""


@dataclass(frozen=True)
class InputMean:
    """The mean over all calibration tokens of each input channel of one linear layer: what bias
    compensation puts in place of the channels pruning removes."""

    input_dim: int
    """The weight dimension that indexes input channels (1 for nn.Linear, 0 for GPT-2's Conv1D)."""
    mean: np.ndarray


@dataclass
class Scores:
    """Per-unit importance (higher = keep) for every structure, and per-block influence."""

    estimator: str
    reduction: str
    units: Dict[int, np.ndarray] = field(default_factory=dict)
    per_group: Dict[int, np.ndarray] = field(default_factory=dict)
    """query_heads structure id → [KV group, slot] scores, for removing different slots per group."""
    per_expert: Dict[int, np.ndarray] = field(default_factory=dict)
    """expert_channels structure id → [expert, channel] scores, for removing different channels
    in each expert (where the checkpoint stores each expert's tensors apart: ``_Folder``)."""
    block_influence: Optional[np.ndarray] = None
    """1 − mean cos(block input, block output) per block (ShortGPT): low means the block barely acts."""
    loss: Optional[float] = None
    input_means: Dict[str, InputMean] = field(default_factory=dict)
    """Weight name → the mean of its inputs, for the linear layers that consume a structure's
    units (o_proj, down_proj…); recorded when ``score`` is asked to (``record_means``)."""


class _Folder:
    """Folds per-index scores of parameters onto the units of the structures that contain them."""

    def __init__(
        self, graph: StructureGraph, importance: Importance, kinds: Optional[Collection[str]] = None, stored_per_expert: Collection[str] = (),
    ) -> None:
        self.graph = graph
        self.importance = importance
        self.members: Dict[str, List[Tuple[int, int, Member]]] = defaultdict(list)
        for s in graph.structures:
            if kinds is not None and s.kind not in kinds:
                continue
            for i, m in enumerate(s.members):
                self.members[m.param].append((s.id, i, m))
        self.member_scores: Dict[int, Dict[int, np.ndarray]] = defaultdict(dict)
        self.group_indices = self._group_indices()
        self.group_scores: Dict[int, Dict[int, np.ndarray]] = defaultdict(dict)
        self.per_expert = self._per_expert_structures(stored_per_expert)
        self.expert_scores: Dict[int, Dict[int, np.ndarray]] = defaultdict(dict)

    def _per_expert_structures(self, stored_per_expert: Collection[str]) -> Set[int]:
        """The expert-channel structures whose channels each expert may lose on its own: every
        member a stacked weight whose experts the checkpoint stores as separate tensors (each can
        then keep its own channels; a stacked tensor on disk keeps one index list for all). Not for
        the estimators that score a channel of all experts at once (a gate on it, a mask of it)."""
        if self.importance.gates or self.importance.perturbs:
            return set()
        scored = self.member_sids()
        return {
            s.id for s in self.graph.by_kind("expert_channels")
            if s.id in scored and all(m.param in stored_per_expert and m.dim != 0 for m in s.members)
        }

    def member_sids(self) -> Set[int]:
        """The structures being scored."""
        return {sid for members in self.members.values() for sid, _, _ in members}

    def wants(self, names: Iterable[str]) -> bool:
        """Whether any of these parameters belongs to a structure being scored."""
        return any(name in self.members for name in names)

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
                if sid in self.per_expert:
                    self.expert_scores[sid][i] = self._per_expert_scores(stats, member, activations.get(name), units)

    def _per_expert_scores(self, stats: ParamStats, member: Member, activation: Optional[ActivationStats], units: int) -> np.ndarray:
        """``[experts, units]``: the unit scores of each expert's slice of a stacked weight, scored
        as a weight of its own (its gradient, adapter and routed-input statistics sliced alike)."""
        rows = []
        for expert in range(stats.weight.shape[0]):
            sliced = _expert_slice(stats, expert)
            scores = self.importance.index_scores(sliced, member.dim - 1, _expert_activation(activation, expert)).double().cpu().numpy()
            rows.append(_finalize(self.importance, scores[member.index_matrix(units)].sum(axis=1)))
        return np.stack(rows)

    def add_per_sample(self, name: str, dim: int, samples: List[torch.Tensor], workers: Workers) -> None:
        """Folds the index scores of one parameter dimension sample by sample (a gate estimator's):
        each sample's unit sums are finalized, then summed over the samples of every process."""
        stacked = torch.stack(samples).double().numpy()  # [samples, indices]
        for sid, i, member in self.members.get(name, ()):
            if member.dim != dim:
                continue
            units = _finalize(self.importance, stacked[:, member.index_matrix(self.graph.get(sid).units)].sum(axis=2)).sum(axis=0)
            totals = [torch.from_numpy(units)]
            if (sid, i) in self.group_indices:
                totals.append(torch.from_numpy(_finalize(self.importance, stacked[:, self.group_indices[(sid, i)]].sum(axis=3)).sum(axis=0)))
            workers.sum_(totals)
            self.member_scores[sid][i] = totals[0].numpy()
            if len(totals) > 1:
                self.group_scores[sid][i] = totals[1].numpy()

    def state(self) -> Dict[str, Any]:
        """The member scores so far, as tensors (what a resume directory can hold)."""
        return {"units": _as_tensors(self.member_scores), "groups": _as_tensors(self.group_scores), "experts": _as_tensors(self.expert_scores)}

    def restore(self, state: Dict[str, Any]) -> None:
        self.member_scores = defaultdict(dict, _as_arrays(state["units"]))
        self.group_scores = defaultdict(dict, _as_arrays(state["groups"]))
        self.expert_scores = defaultdict(dict, _as_arrays(state["experts"]))

    def result(self, reduction: str) -> Tuple[Dict[int, np.ndarray], Dict[int, np.ndarray], Dict[int, np.ndarray]]:
        """Unit scores, per-KV-group query-head scores and per-expert channel scores by structure.
        A structure gets per-expert scores only where every member was scored expert by expert
        (a gate's or a mask's scores are of the channel in all experts at once)."""
        units = {sid: _reduce([per[i] for i in sorted(per)], reduction) for sid, per in self.member_scores.items()}
        groups = {sid: _reduce([per[i] for i in sorted(per)], reduction) for sid, per in self.group_scores.items()}
        experts = {
            sid: _reduce([per[i] for i in sorted(per)], reduction) for sid, per in self.expert_scores.items()
            if set(per) == set(self.member_scores.get(sid, {}))
        }
        return units, groups, experts


def _expert_slice(stats: ParamStats, expert: int) -> ParamStats:
    adapter = stats.adapter
    if adapter is not None:
        adapter = replace(adapter, a=adapter.a[expert], b=adapter.b[expert], grad_a=adapter.grad_a[expert], grad_b=adapter.grad_b[expert])
    return ParamStats(
        stats.name, stats.weight[expert], None if stats.grad is None else stats.grad[expert], None if stats.fisher is None else stats.fisher[expert], adapter,
    )


def _expert_activation(activation: Optional[ActivationStats], expert: int) -> Optional[ActivationStats]:
    """One expert's routed-input statistics, for its slice of the stacked weight (the input
    dimension one lower without the expert dimension)."""
    if activation is None:
        return None
    count = activation.count[expert] if isinstance(activation.count, torch.Tensor) else activation.count
    return ActivationStats(activation.total[expert], activation.squares[expert], count, activation.input_dim - 1)


def _as_tensors(scores: Dict[int, Dict[int, np.ndarray]]) -> Dict[int, Dict[int, torch.Tensor]]:
    return {sid: {i: torch.from_numpy(values) for i, values in per.items()} for sid, per in scores.items()}


def _as_arrays(scores: Dict[int, Dict[int, torch.Tensor]]) -> Dict[int, Dict[int, np.ndarray]]:
    return {sid: {i: values.numpy() for i, values in per.items()} for sid, per in scores.items()}


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
    """Per-input-channel sums and sums of squares of the inputs of the loaded block's linear layers:
    all of them, or only the ``(weight name, input dim)`` pairs in ``only``. When all are recorded,
    so are the inputs of the stacked expert weights of the experts modules in ``experts`` (block
    index → module paths inside the block), per expert (``expert_inputs``)."""

    def __init__(self, model: StreamedModel, only: Optional[FrozenSet[WeightDim]] = None, experts: Optional[Dict[int, List[str]]] = None) -> None:
        self.model = model
        self.only = only
        self.experts = experts or {}
        self.stats: Dict[str, ActivationStats] = {}
        self._handles: list = []
        self._expert_recorders: List[ExpertInputRecorder] = []
        self._index = 0

    def attach(self, index: int) -> None:
        self._index = index
        for name, module in self.model.block.named_modules():
            input_dim = linear_input_dim(module)
            weight_name = f"{self.model.prefix}.{index}.{name}.weight"
            if input_dim is not None and (self.only is None or (weight_name, input_dim) in self.only):
                self._handles.append(module.register_forward_hook(self._hook(weight_name, input_dim)))
        if self.only is None:
            self._expert_recorders, handles = attach_expert_recorders(self.model.block, self.experts.get(index, []), f"{self.model.prefix}.{index}")
            self._handles.extend(handles)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for recorder in self._expert_recorders:
            self.stats.update(recorder.stats)
        self._expert_recorders = []

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


@dataclass(frozen=True)
class Consumers:
    """The weights inside a block whose inputs hold the units of the scored structures: the one
    place where a gate (``head-gate``) or a mask (``bonsai``) acts on a unit."""

    layers: Dict[str, int]
    """Linear layer's module path (``self_attn.o_proj``, ``mlp.down_proj``) → its weight's input dim."""
    experts: Dict[str, int]
    """Stacked down projection of routed experts (``mlp.experts.down_proj``, consuming expert
    channels in every expert) → its input dim (``expert_inputs``)."""

    def paths(self) -> List[str]:
        return sorted({**self.layers, **self.experts})

    def input_dim(self, path: str) -> int:
        return self.experts[path] if path in self.experts else self.layers[path]

    def weight_name(self, prefix: str, index: int, path: str) -> str:
        return f"{prefix}.{index}.{path}" if path in self.experts else f"{prefix}.{index}.{path}.weight"

    def weight(self, block: nn.Module, path: str) -> torch.Tensor:
        weight = block.get_parameter(path) if path in self.experts else block.get_submodule(path).weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def held_by(self, block: nn.Module) -> "Consumers":
        """The consumers ``block`` holds: where blocks differ in structure (DeepSeek's dense MLP
        block before mixture-of-experts ones), each is in some blocks only."""
        return Consumers(
            {path: dim for path, dim in self.layers.items() if holds(block, path)},
            {path: dim for path, dim in self.experts.items() if holds(block, path.rpartition(".")[0])},
        )


def consuming_layers(model: StreamedModel, folder: "_Folder", importance: Importance) -> Consumers:
    """The linear layers and stacked expert down projections whose inputs hold the units of the
    scored structures. Refuses structures whose units reach no such weight or several."""
    layers: Dict[str, int] = {}
    experts: Dict[str, int] = {}
    consumers: Dict[int, int] = defaultdict(int)
    for name, members in folder.members.items():
        path = _block_module_path(model.prefix, name)
        stacked = _block_parameter_path(model.prefix, name)
        block = model.block_of(_index_in(model.prefix, name)) if stacked is not None else None
        module = block.get_submodule(path) if block is not None and path is not None else None
        for sid, _, member in members:
            if path is not None and module is not None and linear_input_dim(module) == member.dim:
                layers[path] = member.dim
                consumers[sid] += 1
            elif block is not None and stacked is not None and consumes_expert_channels(block, stacked, member.dim):
                experts[stacked] = member.dim
                consumers[sid] += 1
    # Hidden channels feed every q/k/v/gate/up (and the head), not one layer.
    refused = sorted({folder.graph.get(sid).kind for sid in folder.member_sids() if consumers[sid] != 1})
    if refused:
        raise SettingError(
            f"importance (--importance) {importance.name}: acts on a unit at the input of the one layer that consumes it, and "
            f"{', '.join(refused)} units have none or several: leave them out of the structures (--structures)", option="--importance",
        )
    return Consumers(layers, experts)


class _GateRecorder:
    """For a gate estimator: in the backward pass, the input ``x`` of every layer that consumes
    scored units and the loss gradient reaching it, turned into one sample's index scores as they
    arrive (micro-batches hold one sample), then folded once the block is done. Expert channels
    are gated at every expert's down_proj input, from the gradient at the experts' output
    (``expert_inputs.expert_gate_derivatives``)."""

    def __init__(self, model: StreamedModel, folder: "_Folder", importance: Importance) -> None:
        self.model = model
        self.folder = folder
        self.importance = importance
        self.consumers = consuming_layers(model, folder, importance)
        for block in model.representatives:  # refused before the forward pass, not after it
            for path in self.consumers.held_by(block).experts:
                check_experts_module(_experts_module(block, path), path, gated=True)
        self.pending: Dict[str, List[torch.Tensor]] = defaultdict(list)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks the consumers in every module that runs blocks (``StreamedModel.representatives``:
        blocks of different structures run in different modules), for the whole pass."""
        handles: List[torch.utils.hooks.RemovableHandle] = []
        for block in self.model.representatives:
            consumers = self.consumers.held_by(block)
            handles.extend(block.get_submodule(path).register_forward_hook(self._hook(path)) for path in sorted(consumers.layers))
            for path in sorted(consumers.experts):
                handles.append(_experts_module(block, path).register_forward_hook(self._experts_hook(path), with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _experts_hook(self, path: str) -> Callable[..., None]:
        def on_forward(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: torch.Tensor) -> None:
            if output.requires_grad:  # the backward pass's recomputation
                hidden, index, weights = (argument(args, kwargs, i, name).detach() for i, name in enumerate(EXPERTS_ARGUMENTS))
                output.register_hook(lambda grad: self.pending[path].append(expert_gate_derivatives(module, hidden, index, weights, grad.detach()).cpu()))

        return on_forward

    def _hook(self, path: str) -> Callable[..., None]:
        def on_forward(_module: nn.Module, inputs: Tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0]
            if x.requires_grad:  # the backward pass's recomputation, not the forward pass
                # The hook holds a detached view, not x itself: x → its hook → x would be a
                # reference cycle keeping every micro-batch's activations until the collector ran.
                values = x.detach()
                x.register_hook(lambda grad: self._record(path, values, grad))

        return on_forward

    def _record(self, path: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        width = x.shape[-1]
        stats = ParamStats(path, x.reshape(-1, width), grad.detach().reshape(-1, width))
        self.pending[path].append(self.importance.index_scores(stats, 1, None).double().cpu())

    def fold(self, index: int, workers: Workers) -> None:
        for path in sorted(self.pending):
            name = self.consumers.weight_name(self.model.prefix, index, path)
            self.folder.add_per_sample(name, self.consumers.input_dim(path), self.pending[path], workers)
        self.pending.clear()


def lora_probes(model: StreamedModel, folder: "_Folder", importance: LoraGrad) -> LoraProbes:
    """Adapters on the block's linear layers and stacked expert weights that hold units of the
    scored structures. Refuses structures with members outside the blocks (hidden channels: the
    embeddings and head carry no adapter), GPT-2's Conv1D layers (stored transposed; no adapter
    here) and experts modules the adapters cannot be recomputed through (``check_experts_module``)."""
    if folder.wants(model.outside_names()):
        raise SettingError(
            f"importance (--importance) {importance.name}: reads LoRA adapters on the blocks' linear layers, and hidden units also live in the "
            f"embeddings and head: leave them out of the structures (--structures)", option="--importance",
        )
    linears: Set[str] = set()
    experts: Set[str] = set()
    for name in folder.members:
        path = _block_parameter_path(model.prefix, name)
        if path is None:
            continue
        owner_path, _, leaf = path.rpartition(".")
        owner = model.block_of(_index_in(model.prefix, name)).get_submodule(owner_path)
        if has_experts_interface(owner):
            check_experts_module(owner, owner_path, gated=True)
            experts.add(owner_path)
            continue
        input_dim = linear_input_dim(owner) if leaf == "weight" else None
        if input_dim == 0:
            raise SettingError(f"importance (--importance) {importance.name}: {name} is a Conv1D layer, which takes no adapter here", option="--importance")
        if input_dim == 1:
            linears.add(owner_path)
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    return LoraProbes(
        lambda: model.block, lambda: model.representatives, model.prefix, sorted(linears), experts=sorted(experts), rank=importance.rank,
        seed=importance.seed, dtype=dtype, device=model.device, adapter_dir=importance.adapter,
    )


class _MaskedScoring:
    """A perturbative estimator's scoring (``Bonsai``): the dense model and ``importance.masks``
    sub-models, each dropping a random ``importance.drop`` of the units, run block by block side by
    side (each block read once; their activations share the store), each sub-model's calibration
    loss is measured, and the losses are regressed on the drops. The units dropped together are
    the finest ones of each consuming layer (``_atoms``); the dense stream gives Block Influence.

    With a ``journal``, block k is step k + 1 and the regression step B + 1: the state after a
    step holds the drops drawn so far and Block Influence, and every stream's input to the next
    block is in the journal's activations (the inputs of blocks already run are deleted), so an
    interrupted run continues at the next block; the final state holds the folded scores."""

    def __init__(
        self,
        model: StreamedModel,
        folder: "_Folder",
        importance: Bonsai,
        *,
        micro_batch: int,
        store: ActivationStore,
        workers: Workers,
        progress: Optional[Callable[[str, int, int], None]],
        journal: Optional[Journal] = None,
    ) -> None:
        self.model = model
        self.folder = folder
        self.importance = importance
        self.masks = importance.masks
        self.drop = importance.drop
        self.ridge = importance.ridge
        self.seed = importance.seed
        self.consumers = consuming_layers(model, folder, importance)
        self.micro_batch = micro_batch
        self.store = store
        self.workers = workers
        self.progress = progress
        self.journal = journal
        self.end_step = model.num_blocks + 1
        self.influence = np.zeros(model.num_blocks)
        """Sums of the dense stream's per-token cosines, per block (1 − their mean once finished)."""
        self.atoms: List[Tuple[str, int, np.ndarray]] = []
        """Per consuming layer (weight name, input dim, atom of every input column; −1: in no unit)."""
        self.drops: List[torch.Tensor] = []
        """Per consuming layer, ``[masks, atoms]``: whether each sub-model drops each atom."""

    def run(self, input_ids: torch.Tensor) -> np.ndarray:
        """Scores every structure (into the folder); returns Block Influence."""
        model = self.model
        batches = list(input_ids.split(self.micro_batch))
        streams = self.masks + 1  # stream 0 is the dense model
        saved = self.journal.resume() if self.journal is not None else None
        start = self._restore(saved) if saved is not None else 0
        if start == self.end_step:
            return self.influence
        block_args = []
        with torch.no_grad():
            for m, batch in enumerate(batches):
                hidden, args, kwargs = model.embed(batch)
                if start == 0:
                    self.store.put((0, m), hidden)
                block_args.append((args, kwargs))
            model.unload_outside()
            for index in range(start, model.num_blocks):
                model.load_block(index)
                columns = self._draw(index)
                for stream in range(streams):
                    with self._masked(columns, stream):
                        for m, (args, kwargs) in enumerate(block_args):
                            source = (index, m if index == 0 else stream * len(batches) + m)
                            hidden = self.store.get(source, model.device)
                            out = model.run_block(hidden, args, kwargs)
                            self.store.put((index + 1, stream * len(batches) + m), out)
                            if stream == 0:
                                self.influence[index] += self._cosine_sum(hidden, out)
                if self.journal is not None:
                    self.journal.record(index + 1, self._state())
                for stream in range(streams if index > 0 else 1):
                    for m in range(len(batches)):
                        self.store.discard((index, stream * len(batches) + m))
                if self.progress:
                    self.progress("perturb", index + 1, model.num_blocks)
            model.unload_block()  # the loss pass needs the head, not the last block
            losses = self._losses(batches, streams)
        tokens = self.workers.sum_values([sum(b.numel() for b in batches)])[0]
        self.influence = 1.0 - np.asarray(self.workers.sum_values(self.influence.tolist())) / tokens
        if self.drops:  # no units to score (blocks alone): Block Influence only
            self._fold(self._regress(losses[1:]))
        if self.journal is not None:
            self.journal.finish(self.end_step, {**self._state(), "folder": self.folder.state()})
        return self.influence

    def _state(self) -> Dict[str, Any]:
        return {
            "influence": torch.from_numpy(self.influence.copy()),
            "atoms": [(name, dim, torch.from_numpy(labels)) for name, dim, labels in self.atoms],
            "drops": list(self.drops),
            "block_returns_tuple": self.model.block_returns_tuple,
        }

    def _restore(self, saved: Dict[str, Any]) -> int:
        """The drops and Block Influence of the blocks run before; the folded scores once finished."""
        self.influence = saved["influence"].numpy().copy()
        self.atoms = [(name, int(dim), labels.numpy()) for name, dim, labels in saved["atoms"]]
        self.drops = list(saved["drops"])
        self.model.block_returns_tuple = bool(saved["block_returns_tuple"])
        if "folder" in saved:
            self.folder.restore(saved["folder"])
        return int(saved["step"])

    def _draw(self, index: int) -> Dict[str, torch.Tensor]:
        """The atoms of block ``index``'s consuming layers and which of them each sub-model drops
        (seeded by the seed and the block, so every process draws the same); returns each layer's
        ``[streams, width]`` input-column multipliers (stream 0, the dense model: all ones)."""
        columns = {}
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:bonsai:{index}".encode()))
        for path in self.consumers.held_by(self.model.block).paths():
            dim = self.consumers.input_dim(path)
            name = self.consumers.weight_name(self.model.prefix, index, path)
            width = int(self.consumers.weight(self.model.block, path).shape[dim])
            labels = _atoms(self.folder, name, dim, width)
            atoms = int(labels.max()) + 1
            drops = torch.rand(self.masks, atoms, generator=generator, dtype=torch.float64) < self.drop
            self.atoms.append((name, dim, labels))
            self.drops.append(drops)
            multipliers = torch.ones(self.masks + 1, width, dtype=torch.float64)
            covered = torch.from_numpy(labels >= 0)
            multipliers[1:, covered] = (~drops[:, torch.from_numpy(labels[labels >= 0])]).double()
            columns[path] = multipliers
        return columns

    @contextmanager
    def _masked(self, columns: Dict[str, torch.Tensor], stream: int) -> Iterator[None]:
        """Stream ``stream``'s dropped units zeroed at the inputs of their consuming layers; for
        stacked experts, whose down projection is no module to hook, as zeroed weight columns
        (the same product), restored afterwards."""
        handles = []
        with ExitStack() as restore:
            if stream > 0:
                for path, multipliers in columns.items():
                    if path in self.consumers.experts:
                        weight = self.consumers.weight(self.model.block, path)
                        restore.enter_context(_columns_zeroed(weight, self.consumers.input_dim(path), multipliers[stream] == 0))
                        continue
                    scale = multipliers[stream].to(self.model.device, self.model.dtype)
                    handles.append(self.model.block.get_submodule(path).register_forward_pre_hook(lambda _module, inputs, scale=scale: (inputs[0] * scale, *inputs[1:])))
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    def _cosine_sum(self, inputs: torch.Tensor, outputs: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(inputs.double(), outputs.double(), dim=-1).sum())

    def _losses(self, batches: List[torch.Tensor], streams: int) -> np.ndarray:
        """Every stream's calibration loss: the mean over samples (of all processes) of each
        sample's mean token loss, as the backward pass measures it."""
        total = self.workers.sum_values([sum(b.shape[0] for b in batches)])[0]
        losses = np.zeros(streams)
        for stream in range(streams):
            for m, batch in enumerate(batches):
                last = self.store.get((self.model.num_blocks, stream * len(batches) + m), self.model.device)
                losses[stream] += float(self.model.loss(last, batch)) * batch.shape[0] / total
        return np.asarray(self.workers.sum_values(losses.tolist()))

    def _regress(self, losses: np.ndarray) -> torch.Tensor:
        """Ridge regression of the sub-models' losses on their drops, in its dual form (a system of
        one row per sub-model, fewer than units): the coefficient of every atom, in layer order."""
        drops = torch.cat(self.drops, dim=1).double()
        centred = drops - drops.mean(0, keepdim=True)
        target = torch.from_numpy(losses - losses.mean())
        gram = centred @ centred.T
        damping = self.ridge * float(torch.diagonal(gram).mean()) or self.ridge
        weights = torch.linalg.solve(gram + damping * torch.eye(gram.shape[0], dtype=torch.float64), target)
        return centred.T @ weights

    def _fold(self, coefficients: torch.Tensor) -> None:
        """Each consuming layer's input column gets its atom's coefficient over the atom's width."""
        start = 0
        for (name, dim, labels), drops in zip(self.atoms, self.drops):
            atoms = drops.shape[1]
            mine = coefficients[start : start + atoms]
            start += atoms
            covered = labels >= 0
            widths = np.bincount(labels[covered], minlength=atoms)
            effects = torch.zeros(len(labels), dtype=torch.float64)
            effects[torch.from_numpy(covered)] = (mine / torch.from_numpy(widths))[torch.from_numpy(labels[covered])]
            self.folder.add({name: ParamStats(name, effects)}, {})


@contextmanager
def _columns_zeroed(weight: torch.Tensor, dim: int, dropped: torch.Tensor) -> Iterator[None]:
    """``weight``'s indices ``dropped`` (a mask) along ``dim`` zeroed, then put back as they were."""
    indices = torch.nonzero(dropped).reshape(-1).to(weight.device)
    with torch.no_grad():
        kept = weight.index_select(dim, indices)
        weight.index_fill_(dim, indices, 0)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.index_copy_(dim, indices, kept)


def _atoms(folder: "_Folder", name: str, dim: int, width: int) -> np.ndarray:
    """The finest units along input ``dim`` of weight ``name``: columns that every scored
    structure puts in the same unit (a query head inside its KV group, an MLP channel) share an
    atom, numbered 0, 1, … by their units; columns in no unit get −1."""
    signatures = []
    for sid, i, member in folder.members.get(name, ()):
        if member.dim != dim:
            continue
        label = np.full(width, -1, dtype=np.int64)
        matrix = member.index_matrix(folder.graph.get(sid).units)
        label[matrix] = np.arange(matrix.shape[0])[:, None]
        signatures.append(label)
    stacked = np.stack(signatures, axis=1)
    inside = (stacked >= 0).any(axis=1)
    atoms = np.full(width, -1, dtype=np.int64)
    _, numbered = np.unique(stacked[inside], axis=0, return_inverse=True)
    atoms[inside] = numbered.reshape(-1)
    return atoms


def _block_parameter_path(prefix: str, name: str) -> Optional[str]:
    """``model.layers.3.mlp.experts.down_proj`` → ``mlp.experts.down_proj``; ``None`` outside the blocks."""
    if not name.startswith(f"{prefix}."):
        return None
    index, _, path = name[len(prefix) + 1 :].partition(".")
    return path if index.isdigit() and path else None


def _block_module_path(prefix: str, name: str) -> Optional[str]:
    """``model.layers.3.self_attn.o_proj.weight`` → ``self_attn.o_proj``; ``None`` outside the
    blocks or for a parameter that is no module's ``weight``."""
    path = _block_parameter_path(prefix, name)
    return path[: -len(".weight")] if path is not None and path.endswith(".weight") else None


def _index_in(prefix: str, name: str) -> int:
    """``model.layers.3.mlp.down_proj.weight`` → 3 (a name inside the blocks)."""
    return int(name[len(prefix) + 1 :].partition(".")[0])


def _experts_module(block: nn.Module, down_projection: str) -> nn.Module:
    """The experts module whose stacked down projection is ``down_projection`` (inside ``block``)."""
    return block.get_submodule(down_projection.rpartition(".")[0])


def _block_index(prefix: str, params: Dict[str, ParamStats]) -> int:
    first = next(iter(params))
    return int(first[len(prefix) + 1 :].split(".", 1)[0])


def linear_input_dim(module: nn.Module) -> Optional[int]:
    """The weight dimension that indexes a linear layer's inputs; ``None`` for other modules."""
    if isinstance(module, nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return 0
    return None


def kinds_on_one_scale(graph: StructureGraph, scores: Scores) -> Scores:
    """``scores`` with each kind's units (heads, KV groups, MLP channels…) rescaled so that every
    kind's mean score per parameter (over its structures) is the mean of those means: for
    estimators whose kinds are not on one scale (``Importance.kinds_share_a_scale``), the
    uniform planner's split of the budget between kinds then follows each kind's ranking, not the
    estimator's units. Within a kind, order and ratios are unchanged."""
    per_parameter: Dict[str, List[float]] = defaultdict(list)
    for structure in graph.structures:
        units = scores.units.get(structure.id)
        if units is not None and units.size and structure.unit_params > 0:
            per_parameter[structure.kind].append(float(np.mean(units)) / structure.unit_params)
    means = {kind: float(np.mean(values)) for kind, values in per_parameter.items() if np.mean(values) > 0}
    if len(means) < 2:
        return scores
    target = float(np.mean(list(means.values())))
    factor = {structure.id: target / means[structure.kind] for structure in graph.structures if structure.kind in means}
    return replace(
        scores,
        units={sid: units * factor.get(sid, 1.0) for sid, units in scores.units.items()},
        per_group={sid: units * factor.get(sid, 1.0) for sid, units in scores.per_group.items()},
        per_expert={sid: units * factor.get(sid, 1.0) for sid, units in scores.per_expert.items()},
    )


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
    workers: Workers = SINGLE,
    journal: Optional[Journal] = None,
    kinds: Optional[Collection[str]] = None,
    record_means: bool = False,
    activation_memory: int = DEFAULT_ACTIVATION_MEMORY,
) -> Scores:
    """Scores every structure of ``graph`` (only those of ``kinds`` when given: leaving out
    ``hidden`` spares the backward pass through the embeddings and head, the largest tensors).
    ``input_ids`` may be ``None`` for data-free estimators. ``progress(stage, done, total)`` is
    called after each block. ``record_means``: also keep the mean input of every linear layer that
    consumes units of a structure other than hidden (``Scores.input_means``, for bias compensation).
    Saved block inputs stay in memory up to ``activation_memory`` bytes and go to disk past it.

    Under torchrun, ``input_ids`` is this process's share of the calibration batch and ``workers``
    sums the statistics over processes, so every process gets the scores of the whole batch. With
    a ``journal`` the run saves its state after every block and continues a saved one; its saved
    activations then live in the journal's directory, so no ``store`` is passed. Data-free scoring
    reads the weights once and is not journalled."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}'; choose one of {', '.join(REDUCTIONS)}")
    if store is not None and journal is not None:
        raise ValueError("a journalled scoring run saves activations in its resume directory: pass no store")
    folder = _Folder(graph, importance, kinds, model.stored_per_expert)
    result = Scores(estimator=importance.name, reduction=reduction)
    needs_data = importance.needs_gradients or importance.needs_activations or importance.perturbs
    if needs_data and input_ids is None:
        raise ValueError(f"importance '{importance.name}' needs calibration data")
    if record_means and input_ids is None:
        raise ValueError("recording the mean inputs of layers needs calibration data")
    if input_ids is None:
        _score_weights_only(model, folder, progress)
    elif importance.perturbs:
        assert isinstance(importance, Bonsai)  # the one perturbative estimator
        store = store or ActivationStore(activation_memory, directory=journal.activations if journal else None)
        masked = _MaskedScoring(model, folder, importance, micro_batch=micro_batch, store=store, workers=workers, progress=progress, journal=journal)
        try:
            result.block_influence = masked.run(input_ids)
        finally:
            store.close()
    else:
        store = store or ActivationStore(activation_memory, directory=journal.activations if journal else None)
        means_of = consuming_inputs(graph) if record_means else frozenset()
        run = _DataScoring(
            model, folder, importance, micro_batch=micro_batch, store=store, workers=workers, journal=journal, progress=progress,
            means_of=means_of,
        )
        try:
            result.block_influence, result.loss = run.run(input_ids)
        finally:
            store.close()
        result.input_means = run.input_means
    result.units, result.per_group, result.per_expert = folder.result(reduction)
    return result


def consuming_inputs(graph: StructureGraph) -> FrozenSet[WeightDim]:
    """Every ``(parameter, dim)`` along which a structure other than hidden has units: for a linear
    layer's weight along its input dimension, the layer consumes those units (o_proj consumes heads,
    down_proj MLP channels). Hidden channels are left out: they also pass through normalisations."""
    return frozenset((m.param, m.dim) for s in graph.structures if s.kind != "hidden" for m in s.members)


def _score_weights_only(model: StreamedModel, folder: _Folder, progress: Optional[Callable[[str, int, int], None]]) -> None:
    for index in range(model.num_blocks):
        model.load_block(index)
        folder.add({n: ParamStats(n, p.detach()) for n, p in model.block_parameters(index).items()}, {})
        if progress:
            progress("weights", index + 1, model.num_blocks)
    if folder.wants(model.outside_names()):
        folder.add({n: ParamStats(n, p.detach()) for n, p in model.outside_parameters().items()}, {})


class _DataScoring:
    """Scoring on calibration data: the forward pass measures Block Influence and activation
    statistics, the backward pass gradients. Statistics are summed over processes once per block
    and the state is journalled after every block.

    Steps, as the journal counts them (B blocks): forward block k is step k + 1, backward block k
    step 2B − k, and the end (parameters outside the blocks, the loss) step 2B + 1. The state after
    a step holds the folded member scores, Block Influence so far and, in the backward pass, the
    gradient flowing into the block below and the loss of this process's samples.

    Estimators without gradients are folded in the forward pass, with the activation statistics
    when they use them; ``means_of`` lists the layer inputs whose means are kept."""

    def __init__(
        self,
        model: StreamedModel,
        folder: _Folder,
        importance: Importance,
        *,
        micro_batch: int,
        store: ActivationStore,
        workers: Workers,
        journal: Optional[Journal],
        progress: Optional[Callable[[str, int, int], None]],
        means_of: FrozenSet[WeightDim] = frozenset(),
    ) -> None:
        self.model = model
        self.folder = folder
        self.importance = importance
        # Per-sample statistics (squared gradients, gates' |·|) need micro-batches of one sample.
        self.micro_batch = 1 if importance.needs_fisher or importance.gates else micro_batch
        self.store = store
        self.workers = workers
        self.journal = journal
        self.progress = progress
        self.blocks = model.num_blocks
        self.end_step = 2 * self.blocks + 1
        self.influence = np.zeros(self.blocks)
        self.means_of = means_of
        self.input_means: Dict[str, InputMean] = {}
        self.records = importance.needs_activations or bool(means_of)
        # Estimators that use activations need every linear's; means alone need only the consumers'.
        experts = experts_modules(folder.graph, model.prefix, folder.member_sids()) if importance.needs_activations else None
        self.recorder = _ActivationRecorder(model, None if importance.needs_activations else means_of, experts)
        self.gates = _GateRecorder(model, folder, importance) if importance.gates else None
        self.probes = lora_probes(model, folder, importance) if isinstance(importance, LoraGrad) else None

    def run(self, input_ids: torch.Tensor) -> Tuple[np.ndarray, Optional[float]]:
        """Block Influence per block and the calibration loss (``None`` without gradients)."""
        saved = self.journal.resume() if self.journal is not None else None
        step = self._restore(saved) if saved is not None else 0
        if step == self.end_step:
            assert saved is not None
            return self.influence, saved["loss"]
        streamed = self._forward(input_ids, start=min(step, self.blocks))
        loss = None
        if self.importance.needs_gradients and self.folder.members:
            resumed = None
            if saved is not None and step > self.blocks:
                resumed = BackwardState(2 * self.blocks - step, saved["grads"], saved["loss"])
            loss = self._backward(streamed, resumed, samples=int(self.workers.sum_values([input_ids.shape[0]])[0]))
        elif self.folder.wants(self.model.outside_names()):
            # The parameters outside the blocks get their weight-only (for activation estimators: zero) scores.
            self.folder.add({n: ParamStats(n, p.detach()) for n, p in self.model.outside_parameters().items()}, {})
        if self.journal is not None:
            self.journal.finish(self.end_step, self._state(loss=loss))
        return self.influence, loss

    def _forward(self, input_ids: torch.Tensor, start: int) -> StreamedPass:
        def on_load(index: int) -> None:
            if self.records:
                self.recorder.detach()
                self.recorder.attach(index)

        def on_block(index: int, inputs: List[torch.Tensor], outputs: List[torch.Tensor]) -> None:
            self._measure_influence(index, inputs, outputs)
            activations = self._block_activations() if self.records else {}
            if not self.importance.needs_gradients:
                params = {n: ParamStats(n, p.detach()) for n, p in self.model.block_parameters(index).items()}
                self.folder.add(params, activations if self.importance.needs_activations else {})
            if self.journal is not None:
                self.journal.record(index + 1, self._state())
            if self.progress:
                self.progress("forward", index + 1, self.blocks)

        try:
            return forward_pass(
                self.model, input_ids, micro_batch=self.micro_batch, store=self.store, start=start, on_load=on_load, on_block=on_block,
                keep_inputs=self.importance.needs_gradients,
            )
        finally:
            self.recorder.detach()

    def _backward(self, streamed: StreamedPass, resumed: Optional[BackwardState], samples: int) -> float:
        gates, probes = self.gates, self.probes

        def on_params(params: Dict[str, ParamStats]) -> None:
            if gates is not None:  # the units' scores come from the gates, not from the weights' gradients
                gates.fold(_block_index(self.model.prefix, params), self.workers)
                return
            if probes is not None:  # the gradients are the adapters', not the weights'
                adapters = probes.grads()
                self.workers.sum_([t for a in adapters.values() for t in (a.grad_a, a.grad_b)])
                params = {n: ParamStats(n, p.weight, adapter=adapters.get(n)) for n, p in params.items()}
            self._sum_gradients(params)
            self.folder.add(params, {})

        def on_state(state: BackwardState) -> None:
            if self.journal is not None:
                self.journal.record(2 * self.blocks - state.lowest_done, self._state(loss=state.loss, grads=state.grads))

        def backward_progress(index: int) -> None:
            if self.progress:
                self.progress("backward", self.blocks - index, self.blocks)

        outside = gates is None and self.folder.wants(self.model.outside_names())
        with gates.recording() if gates is not None else probes.attached() if probes is not None else nullcontext():
            local = backward_pass(
                self.model, streamed, fisher=self.importance.needs_fisher, on_params=on_params, samples=samples,
                start=resumed, on_state=on_state, progress=backward_progress, outside=outside,
                weight_grads=probes is None, on_load=probes.load if probes is not None else None,
            )
        return self.workers.sum_values([local])[0]

    def _measure_influence(self, index: int, inputs: List[torch.Tensor], outputs: List[torch.Tensor]) -> None:
        """1 − the mean cosine over every token of every sample (on all processes)."""
        cosines = [torch.nn.functional.cosine_similarity(i.double(), o.double(), dim=-1) for i, o in zip(inputs, outputs)]
        total, count = self.workers.sum_values([sum(float(c.sum()) for c in cosines), sum(c.numel() for c in cosines)])
        self.influence[index] = 1.0 - total / count

    def _block_activations(self) -> Dict[str, ActivationStats]:
        """The loaded block's activation statistics over all processes; the means asked for are kept."""
        self.recorder.detach()
        stats, self.recorder.stats = self.recorder.stats, {}
        self._sum_activation_stats(stats)
        for name, entry in stats.items():
            if (name, entry.input_dim) in self.means_of:
                self.input_means[name] = InputMean(entry.input_dim, entry.mean.cpu().numpy())
        return stats

    def _sum_activation_stats(self, stats: Dict[str, ActivationStats]) -> None:
        names = sorted(stats)
        # Stacked experts count tokens per expert (a tensor, summed in place); linear layers an int.
        counts = torch.tensor([stats[n].count for n in names if not isinstance(stats[n].count, torch.Tensor)], dtype=torch.float64)
        expert_counts = [c for c in (stats[n].count for n in names) if isinstance(c, torch.Tensor)]
        self.workers.sum_([t for n in names for t in (stats[n].total, stats[n].squares)] + expert_counts + [counts])
        linear = iter(counts.tolist())
        for name in names:
            if not isinstance(stats[name].count, torch.Tensor):
                stats[name].count = int(next(linear))

    def _sum_gradients(self, params: Dict[str, ParamStats]) -> None:
        self.workers.sum_([t for p in params.values() for t in (p.grad, p.fisher) if t is not None])

    def _state(self, *, loss: Optional[float] = None, grads: Optional[List[torch.Tensor]] = None) -> Dict[str, Any]:
        return {
            "folder": self.folder.state(),
            "influence": torch.from_numpy(self.influence.copy()),
            "block_returns_tuple": self.model.block_returns_tuple,
            "loss": loss,
            "grads": None if grads is None else [g.detach().cpu() for g in grads],
            "input_means": {name: (m.input_dim, torch.from_numpy(m.mean)) for name, m in self.input_means.items()},
        }

    def _restore(self, saved: Dict[str, Any]) -> int:
        self.folder.restore(saved["folder"])
        self.influence = saved["influence"].numpy().copy()
        self.model.block_returns_tuple = bool(saved["block_returns_tuple"])
        self.input_means = {name: InputMean(int(dim), mean.numpy()) for name, (dim, mean) in saved.get("input_means", {}).items()}
        return int(saved["step"])
