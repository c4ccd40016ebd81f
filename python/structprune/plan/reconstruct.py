"""Reconstruction after removal: the kept input columns of every linear layer that loses inputs are
refitted so that the layer's output on calibration data changes least.

For a linear layer ``y = W x`` whose input channels ``R`` are removed (o_proj loses the channels of
removed heads, down_proj those of removed MLP channels), with ``X`` its calibration inputs and
``K`` the kept channels, the kept weights become

    W_K' = W X X_Kᵀ (X_K X_Kᵀ + λI)⁻¹ = W G[:, K] (G[K, K] + λI)⁻¹,    G = X Xᵀ,

the least-squares fit of the dense output ``W X`` from the kept inputs alone: the optimal brain
surgeon update for whole columns (SlimGPT, ZipLM; the ``layer`` target). FLAP's bias compensation
is the special case where only a constant stands in for the removed inputs.
``λ = damping · mean(diag G[K, K])`` keeps the solve well conditioned when kept inputs are nearly
collinear (SparseGPT's choice of a relative damping, default 1%).

The ``dense`` target (the default) fits, for a layer whose output is added unchanged to its
block's output (down_proj of a pre-norm block: probed, not assumed), another output ``Y`` from the
same pruned inputs, ``W_K' = Y X_Kᵀ (G[K, K] + λI)⁻¹``: the layer's own output plus whatever the
pruned block's output still misses of the dense block's output. The dense model runs beside the
pruned one, block by block on its own hidden states (the loaded block, before its refit), so the
layer also cancels the drift in the residual stream that the blocks before left. In a post-norm
block (BERT's ``output.dense``: the block's output is ``LayerNorm(residual + dense(h))``, also
probed) the same is done before the norm: ``Y`` is the layer's output plus what the norm's input
misses of a preimage of the dense block's output (``_norm_preimage``). Only sums are
kept: ``G``, ``Y Xᵀ`` and ``‖Y‖²``. Other layers keep the ``layer`` target (see ``TARGETS``).

The blocks are reconstructed one after another on the inputs that the already pruned and
reconstructed blocks produce (sequentially, as SparseGPT does), so block ``l`` sees the error of
blocks ``0 … l−1`` (and, with the dense target, corrects it) instead of compounding it, and only
one block is in memory at a time (the streaming engine's shell). Inside a block the layers are taken in the order the block runs them:
o_proj's fit changes the MLP's inputs, so down_proj's Gram matrix is measured after it. The
pruned model is run exactly by zeroing removed input columns in the loaded dense block (a removed
head's or channel's contribution is then nothing, which is what removing it does); removed blocks
pass their input through. A fit that would not lower the layer's calibration error (possible only
through the damping) is discarded for the plain cut.

Routed experts (transformers' stacked ``experts.down_proj`` ``[E, H, I]``, ``[E, I, H]`` when
transposed) are no nn.Linear: an experts module whose down projection loses expert channels is a
consumer of its own (``ExpertConsumer``), and each kept expert ``e`` is fitted as above, on its
own kept channels (the same in every expert, or each its own: ``Selection.per_expert``) and its own
Gram matrix ``G_e = Σ g² z zᵀ`` over the (token, slot) pairs routed to it, ``z`` its down_proj
input recomputed from its gate/up slice (``score/expert_inputs.py``), ``g`` the pair's gate weight.
The MoE layer's output is ``Σ_e g_e W_e z_e``, so ``G_e`` is expert e's block of the Hessian of
the layer's output error; fitting each expert on its block drops only the cross terms between the
k experts of one token (the joint fit would need an ``(E·I)²`` matrix). Experts take the ``layer``
target: their outputs reach the block through the router's weighted sum, and what the pruned
block still misses of the dense one has no share per expert. The Gram matrices cost
``E·I²·8`` bytes per layer (Mixtral-8x7B, E = 8, I = 14336: 13 GB; Qwen3-30B-A3B, 128 × 768:
0.6 GB), one layer at a time. Removed whole experts need no refit: the pruned model routes
around them, computed inside the dense block by setting their router logits to −inf
(``_RemovedExperts``), which is what removing them does. The refitted slices are written to the
checkpoint's per-expert tensors (Mixtral's ``experts.N.w2.weight``) where it stores experts
apart, else to its stacked tensor.

The new weights are written block by block into safetensors files in a work directory; the plan
takes those tensors from there (``replace`` with ``file`` + ``tensor``, see docs/plan-format.md),
so the output is still a stock checkpoint and memory stays one block's worth.
"""

from __future__ import annotations

import copy
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union, cast

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from structprune.plan.cuts import Selection, expert_removals, removed_indices
from structprune.plan.refit import BlockRefit, RefitSettings, kept_values, refit_block, trainable
from structprune.score.distributed import SINGLE, Workers
from structprune.errors import PlanError
from structprune.tracing.graph import StructureGraph
from structprune.plan.cut_plan import CutPlan, TensorCut, Values
from structprune.score.expert_inputs import INTERFACE, expert_input_dim, weighted_down_grams
from structprune.score.routing import EXPERTS_ARGUMENTS, argument
from structprune.score.scorer import linear_input_dim
from structprune.tracing.export import ExpertPiece
from structprune.io.sizes import DEFAULT_ACTIVATION_MEMORY, DEFAULT_DAMPING, RECONSTRUCTION_TARGETS
from structprune.score.streaming import ActivationStore, StreamedModel

OBS_ROUNDS = 32
"""Rounds in which OBS selection removes single columns (MLP channels), the cheapest of each round together."""

HIDDEN_REFUSAL = (
    "reconstruction refits the layers that consume removed heads and MLP channels; removed hidden "
    "channels also pass through normalisations, which a refit of the next layer cannot undo: leave "
    "'hidden' out of the structures"
)


@dataclass(frozen=True)
class Fit:
    """The outcome of refitting one layer."""

    weight: torch.Tensor
    """The new kept columns, ``[out, |K|]`` in the layer's ``[out, in]`` orientation, float64."""
    error_before: float
    """‖W X − W_K X_K‖² over the calibration inputs: the plain cut's output error."""
    error_after: float
    """The same for the fitted columns (equal to ``error_before`` when the fit was discarded)."""


def fit_kept_columns(
    weight: torch.Tensor,
    gram: torch.Tensor,
    kept: torch.Tensor,
    damping: float = DEFAULT_DAMPING,
    *,
    cross: Optional[torch.Tensor] = None,
    energy: Optional[float] = None,
) -> Fit:
    """The kept columns ``V`` that best reproduce a target output ``Y`` from the kept inputs
    ``X_K``: ``V = Y X_Kᵀ (G[K, K] + λI)⁻¹`` with ``λ = damping · mean(diag G[K, K])`` (float64).
    ``weight`` is the layer's ``[out, in]`` weight, ``gram`` its inputs' ``G = X Xᵀ``, ``kept`` the
    kept input indices. The target is ``W X`` (the layer's own dense output on these inputs) unless
    ``cross = Y Xᵀ`` and ``energy = ‖Y‖²`` give another one (the dense model's output: see
    ``TARGETS``). Falls back to the plain cut ``W[:, K]`` when the fit does not lower the output
    error ``‖Y − V X_K‖²``."""
    if (cross is None) != (energy is None):
        raise ValueError("cross and energy describe one target: give both or neither")
    w = weight.double()
    g = gram.double()
    kept = kept.to(device=w.device, dtype=torch.long)
    g_kk = g[kept][:, kept]
    target = w @ g[:, kept] if cross is None else cross.double()[:, kept]  # Y X_Kᵀ: [out, |K|]
    fitted = _damped_solve(target, g_kk, damping)
    plain = w[:, kept]
    total = float(torch.einsum("oi,ij,oj->", w, g, w)) if energy is None else float(energy)

    def error(columns: torch.Tensor) -> float:
        # ‖Y − V X_K‖² = ‖Y‖² − 2 tr(V X_K Yᵀ) + tr(V G[K, K] Vᵀ)
        return total - 2 * float((columns * target).sum()) + float(torch.einsum("oi,ij,oj->", columns, g_kk, columns))

    before, after = error(plain), error(fitted)
    if not after < before:
        return Fit(plain, before, before)
    return Fit(fitted, before, after)


def _damped_solve(target: torch.Tensor, gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``target (gram + λI)⁻¹`` with ``λ = damping · mean(diag gram)``: by Cholesky, or by least
    squares where the damped matrix is still not positive definite."""
    damped = gram.clone()
    scale = float(torch.diagonal(gram).mean()) if gram.numel() else 0.0
    damped.diagonal().add_(damping * scale if scale > 0 else 1e-12)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return torch.linalg.lstsq(damped, target.T).solution.T
    return torch.cholesky_solve(target.T, factor).T


@dataclass(frozen=True)
class Consumer:
    """A linear layer of a kept block whose input channels the selection removes."""

    module: str
    """Module path inside the block (``self_attn.o_proj``)."""
    weight: str
    """Model name of its weight in the full model."""
    input_dim: int
    """The weight dimension that indexes inputs (1 for nn.Linear, 0 for GPT-2's Conv1D)."""
    kept: torch.Tensor
    removed: torch.Tensor


def block_consumers(model: StreamedModel, index: int, removed: Mapping[str, Mapping[int, set]]) -> List[Consumer]:
    """The loaded block's linear layers that lose input channels, in module order."""
    out = []
    for path, module in model.block.named_modules():
        input_dim = linear_input_dim(module)
        if input_dim is None:
            continue
        name = f"{model.prefix}.{index}.{path}.weight"
        gone = removed.get(name, {}).get(input_dim)
        if not gone:
            continue
        width = module.weight.shape[input_dim]
        gone_t = torch.tensor(sorted(gone), dtype=torch.long)
        keep = torch.ones(width, dtype=torch.bool)
        keep[gone_t] = False
        out.append(Consumer(path, name, input_dim, torch.nonzero(keep).flatten(), gone_t))
    return out


@dataclass(frozen=True)
class ExpertConsumer:
    """The stacked down projection of a routed-experts module whose input channels (expert
    channels) the selection removes: every kept expert's slice is refitted on its own."""

    module: str
    """Path of the experts module inside the block (``mlp.experts``)."""
    weight: str
    """Model name of the stacked down projection (``model.layers.0.mlp.experts.down_proj``)."""
    input_dim: int
    """The stacked weight's dimension indexing an expert's inputs (2; 1 when ``is_transposed``)."""
    experts: torch.Tensor
    """The experts the selection keeps (a removed one needs no refit: its router logit is −inf)."""
    kept: torch.Tensor
    """``[len(experts), |K|]``: each kept expert's kept input channels, the same in every expert
    or each its own where the selection chooses them per expert (``Selection.per_expert``); the
    same count in each (a stock config has one expert width)."""


AnyConsumer = Union[Consumer, ExpertConsumer]
_C = TypeVar("_C", Consumer, ExpertConsumer)


def expert_consumers(
    model: StreamedModel, index: int, removed: Mapping[str, Mapping[int, set]], by_expert: Mapping[str, Mapping[int, List[set]]]
) -> List[ExpertConsumer]:
    """The loaded block's experts modules whose stacked down projection loses input channels:
    ``removed`` those of every expert (``cuts.removed_indices``), ``by_expert`` each expert's own
    (``cuts.expert_removals``, where experts keep channels of their own)."""
    out = []
    for path, module in model.block.named_modules():
        if not path or not all(hasattr(module, attribute) for attribute in INTERFACE):
            continue
        name = f"{model.prefix}.{index}.{path}.down_proj"
        input_dim = expert_input_dim(module)
        gone = removed.get(name, {})
        own = by_expert.get(name, {}).get(input_dim)
        if not gone.get(input_dim) and not own:
            continue
        stacked = cast(torch.Tensor, module.down_proj)
        experts = [e for e in range(stacked.shape[0]) if e not in gone.get(0, ())]
        kept = [[c for c in range(stacked.shape[input_dim]) if c not in gone.get(input_dim, ()) and not (own and c in own[e])] for e in experts]
        out.append(ExpertConsumer(path, name, input_dim, torch.tensor(experts, dtype=torch.long), torch.tensor(kept, dtype=torch.long)))
    return out


class _RemovedExperts(TorchFunctionMode):
    """While open, the router logits of removed experts are −inf: the pruned model's routing,
    computed inside the loaded dense block (pruning an expert removes its router row and the
    softmax renormalises over the others, which is exactly a −inf logit: docs/architecture.md,
    checked in tests/test_moe.py). The routers of transformers' MoE layers compute their logits as
    ``F.linear(hidden, self.weight)``, which this mode sees by the weight's identity."""

    def __init__(self, routers: Mapping[int, Tuple[torch.Tensor, List[int]]]) -> None:
        super().__init__()
        self.routers = routers
        """``id(router weight)`` → (the weight, the experts removed from it)."""

    def __torch_function__(self, func: Callable[..., torch.Tensor], types: object, args: tuple = (), kwargs: Optional[dict] = None) -> torch.Tensor:
        out = func(*args, **(kwargs or {}))
        router = self.routers.get(id(args[1])) if func is nn.functional.linear and len(args) > 1 else None
        if router is not None and router[0] is args[1]:
            out = out.clone()
            out[..., router[1]] = float("-inf")
        return out


def removed_experts(model: StreamedModel, index: int, graph: StructureGraph, selection: Selection) -> _RemovedExperts:
    """The mode masking out of the loaded block ``index``'s routers the experts ``selection``
    removes there (a router weight is the 2-D member of an experts structure)."""
    prefix = f"{model.prefix}.{index}."
    routers: Dict[int, Tuple[torch.Tensor, List[int]]] = {}
    for structure in graph.by_kind("experts"):
        units = selection.units.get(structure.id)
        if structure.layer != index or not units:
            continue
        for member in structure.members:
            if len(graph.params[member.param]) == 2 and member.dim == 0 and member.param.startswith(prefix):
                weight = model.block.get_parameter(member.param[len(prefix):])
                routers[id(weight)] = (weight, sorted(int(i) for i in member.indices(units)))
    return _RemovedExperts(routers)


@dataclass
class LayerReport:
    weight: str
    """Model name of the refitted weight; ``NAME[e]`` for expert e's slice of stacked experts."""
    error_before: float
    error_after: float
    to_block_output: bool = False
    """Fitted to the dense block's output (the ``dense`` target on a layer feeding the residual stream)."""


@dataclass
class Reconstruction:
    """What ``reconstruct`` wrote: for every refitted checkpoint tensor (by its name: a per-expert
    tensor of stacked experts is one of several per model weight), the file and tensor name
    holding its new kept columns in the stored orientation, and the per-layer errors."""

    files: Dict[str, Tuple[Path, str]]
    layers: List[LayerReport]
    selection: Selection
    """The selection the fits were made for: the one given, or, with OBS re-selection, the units
    each layer chose on its own pruned inputs (same counts)."""
    refits: List[BlockRefit] = field(default_factory=list)
    """With ``--refit-steps``: each kept block's output error before and after its joint refit."""

    @property
    def error_ratio(self) -> float:
        """Summed output error after the fits over the plain cuts' (both on the pruned inputs)."""
        before = sum(r.error_before for r in self.layers)
        return sum(r.error_after for r in self.layers) / before if before else 1.0


TARGETS = RECONSTRUCTION_TARGETS
"""What a refitted layer is fitted to reproduce from the pruned model's inputs. ``layer``: its own
dense weights applied to the pruned inputs, ``W X`` (SlimGPT's and ZipLM's target). ``dense`` (the
default): the same, except for a layer whose output is added unchanged to its block's output
(down_proj of a pre-norm block, both projections of a parallel block: found by a probe,
``_adds_to_block_output``), which is fitted to its own output plus what the pruned block's output
still misses of the dense block's, so that it also takes up the drift that the pruned blocks
before left in the residual stream; and a layer whose output is added to the input of a post-norm
block's final LayerNorm (``_final_norm``), fitted likewise before the norm. (Fitting the other
layers to their outputs in the dense model as well was measured and lost: docs/benchmarks.md.)"""


@dataclass
class _Statistics:
    """What a layer's fit needs of the calibration data: ``gram = X Xᵀ`` of its inputs in the
    pruned model and, for a target other than ``W X``, ``cross = Y Xᵀ`` and ``energy = ‖Y‖²``."""

    gram: torch.Tensor
    cross: Optional[torch.Tensor] = None
    energy: Optional[torch.Tensor] = None

    def add(self, other: "_Statistics") -> None:
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.add_(theirs)

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in (self.gram, self.cross, self.energy) if t is not None]


@contextmanager
def _captured_inputs(module: Optional[nn.Module]) -> Iterator[List[torch.Tensor]]:
    """The first positional input of every call of ``module`` while the context is open (none
    without a module)."""
    seen: List[torch.Tensor] = []
    if module is None:
        yield seen
        return
    handle = module.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


def _rows(x: torch.Tensor) -> torch.Tensor:
    # float64: the kept inputs of a layer are often nearly collinear (condition numbers of 10⁵
    # and more), where a float32 sum alone moves the fitted weights by percents.
    return x.reshape(-1, x.shape[-1]).double()


def reconstruct(
    model: StreamedModel,
    graph: StructureGraph,
    selection: Selection,
    input_ids: torch.Tensor,
    work_dir: Path,
    *,
    stored_names: Mapping[str, str],
    stored_dtypes: Mapping[str, torch.dtype],
    expert_pieces: Optional[Mapping[str, ExpertPiece]] = None,
    damping: float = DEFAULT_DAMPING,
    target: str = "dense",
    micro_batch: int = 4,
    activation_memory: int = DEFAULT_ACTIVATION_MEMORY,
    workers: Workers = SINGLE,
    progress: Optional[Callable[[str, int, int], None]] = None,
    reselect: bool = False,
    refit: Optional[RefitSettings] = None,
) -> Reconstruction:
    """Refits, block by block on the pruned model's own activations, every linear layer and every
    stacked experts' down projection that loses input channels under ``selection``, and writes the
    new weights (cut to their kept columns, in the stored dtype and orientation) under ``work_dir``
    (``block-NNNNN-<hash>.safetensors``, tensors named as in the checkpoint). ``stored_names``:
    model name → checkpoint name; ``stored_dtypes``: checkpoint name → stored dtype;
    ``expert_pieces``: the per-expert checkpoint tensors that transformers stacks on load
    (``tracing.export.checkpoint_layout``), which take their expert's refitted slice.
    ``input_ids`` is this process's share of the calibration batch; with several ``workers`` the
    statistics are summed over processes and only the main one writes.
    ``target`` (``TARGETS``): what the refitted layers reproduce; ``dense`` also runs the dense
    model beside the pruned one, block by block.

    With ``reselect`` (``--importance obs``), each layer first chooses which of its units to remove,
    as many as ``selection`` removes there, by greedy OBS on the Gram matrix of its pruned inputs
    (``obs_removals``), and is then fitted for that choice; ``Reconstruction.selection`` holds the
    choices.

    With ``refit`` (``--refit-steps N``), every kept block is then refitted as a whole
    (``structprune.plan.refit``): all its stored weights, by Adam, towards the dense block's output;
    ``Reconstruction.refits`` holds the block errors and the refitted weights are written too."""
    if any(selection.units.get(s.id) for s in graph.by_kind("hidden")):
        raise PlanError(HIDDEN_REFUSAL)
    if damping < 0:
        raise PlanError(f"reconstruction damping must be at least 0, got {damping}")
    if target not in TARGETS:
        raise PlanError(f"reconstruction target must be one of {', '.join(TARGETS)}, got {target!r}")
    selection = copy.deepcopy(selection)
    dropped = set(selection.blocks)
    work_dir.mkdir(parents=True, exist_ok=True)
    # The dense stream costs as much memory as the pruned one: the budget is shared between them.
    dense_stream = target == "dense" or (refit is not None and refit.steps > 0)  # the refit's targets
    streams = _Streams(
        pruned=ActivationStore(activation_memory // 2 if dense_stream else activation_memory),
        dense=ActivationStore(activation_memory // 2) if dense_stream else None,
    )
    result = Reconstruction(files={}, layers=[], selection=selection)
    context = _BlockContext(graph, selection, damping, workers, reselect, target, _Stored(stored_names, stored_dtypes, expert_pieces or {}))
    try:
        batches = list(input_ids.split(micro_batch))
        if refit is not None and refit.steps > 0:
            context.refit = refit
            context.micro_batch = micro_batch
            # An encoder's padding (the calibration passages' pad tokens) does not count in the refit's loss.
            context.token_masks = [_token_mask(model, batch) for batch in batches]
        with torch.no_grad():
            for m, batch in enumerate(batches):
                hidden, args, kwargs = model.embed(batch)
                streams.put(0, m, hidden)
                streams.block_args.append((args, kwargs))
            model.unload_outside()
            for index in range(model.num_blocks):
                if index in dropped and streams.dense is None:
                    streams.pass_through(index)
                else:
                    model.load_block(index)
                    streams.run_dense(model, index)
                    if index in dropped:
                        streams.pass_through(index)
                    else:
                        with removed_experts(model, index, graph, selection):
                            tensors = _reconstruct_block(model, index, context, streams, result)
                        if tensors and workers.is_main:
                            path = save_by_content(tensors, work_dir, f"block-{index:05d}")
                            result.files.update({name: (path, name) for name in tensors})
                if progress:
                    progress("reconstruct" if context.refit is None else "refit", index + 1, model.num_blocks)
    finally:
        streams.close()
    return result


@dataclass
class _Streams:
    """The saved inputs of the current block in the pruned model and, for the ``dense`` target,
    in the dense model."""

    pruned: ActivationStore
    dense: Optional[ActivationStore]
    block_args: List[tuple] = field(default_factory=list)

    @property
    def micro_batches(self) -> int:
        return len(self.block_args)

    def put(self, index: int, m: int, hidden: torch.Tensor) -> None:
        self.pruned.put((index, m), hidden)
        if self.dense is not None:
            self.dense.put((index, m), hidden)

    def pass_through(self, index: int) -> None:
        """A removed block: the pruned model's hidden states go on unchanged."""
        for m in range(self.micro_batches):
            self.pruned.put((index + 1, m), self.pruned.get((index, m), torch.device("cpu")))
            self.pruned.release((index, m))

    def run_dense(self, model: StreamedModel, index: int) -> None:
        """Saves the dense block's outputs on the dense inputs (the dense model's inputs of the next
        block, and the targets of a residual layer's fit): called while the loaded block is dense."""
        if self.dense is None:
            return
        for m, (args, kwargs) in enumerate(self.block_args):
            self.dense.put((index + 1, m), model.run_block(self.dense.get((index, m), model.device), args, kwargs))
            self.dense.release((index, m))

    def run_pruned(self, model: StreamedModel, index: int) -> None:
        """Runs the refitted block: its outputs are the next block's inputs."""
        for m, (args, kwargs) in enumerate(self.block_args):
            self.pruned.put((index + 1, m), model.run_block(self.pruned.get((index, m), model.device), args, kwargs))
            self.pruned.release((index, m))

    def close(self) -> None:
        self.pruned.close()
        if self.dense is not None:
            self.dense.close()


@dataclass(frozen=True)
class _Stored:
    """How the checkpoint stores the model's weights: ``names`` (model name → checkpoint name),
    ``dtypes`` (checkpoint name → dtype) and ``pieces`` (per-expert checkpoint tensors stacked on load)."""

    names: Mapping[str, str]
    dtypes: Mapping[str, torch.dtype]
    pieces: Mapping[str, ExpertPiece]

    def name(self, weight: str) -> str:
        stored = self.names.get(weight)
        if stored is None:
            raise PlanError(f"reconstruction: the checkpoint has no tensor for the weight '{weight}'")
        return stored

    def expert_names(self, weight: str, experts: Sequence[int]) -> Optional[List[str]]:
        """The per-expert checkpoint tensors of ``experts`` of the stacked ``weight`` (whole
        experts: a down projection's pieces), ``None`` when the checkpoint stores it stacked."""
        by_expert = {p.expert: name for name, p in self.pieces.items() if p.param == weight and p.segments == 1}
        if not by_expert:
            return None
        missing = [e for e in experts if e not in by_expert]
        if missing:
            raise PlanError(f"reconstruction: the checkpoint has no tensor for expert {missing[0]} of '{weight}'")
        return [by_expert[e] for e in experts]


@dataclass
class _BlockContext:
    graph: StructureGraph
    selection: Selection
    damping: float
    workers: Workers
    reselect: bool
    target: str
    stored: _Stored
    refit: Optional[RefitSettings] = None
    token_masks: Optional[List[Optional[torch.Tensor]]] = None
    micro_batch: int = 4

    def consumers(self, model: StreamedModel, index: int) -> List[AnyConsumer]:
        removed = removed_indices(self.graph, self.selection)
        by_expert = expert_removals(self.graph, self.selection)
        return [*block_consumers(model, index, removed), *expert_consumers(model, index, removed, by_expert)]


def _reconstruct_block(model: StreamedModel, index: int, context: _BlockContext, streams: _Streams, result: Reconstruction) -> Dict[str, torch.Tensor]:
    """Refits the loaded block ``index``'s consumers in the order the block runs them (re-selecting
    their units first when asked), then runs the pruned block to give the next block its inputs.
    Returns the new weights by checkpoint name."""
    order = _execution_order(model, index, streams, context.consumers(model, index))
    tensors: Dict[str, torch.Tensor] = {}
    for planned in order:
        if isinstance(planned, ExpertConsumer):
            tensors.update(_refit_experts(model, index, planned, context, streams, result))
        else:
            tensors.update(_refit_linear(model, index, planned, context, streams, result))
    if context.refit is not None:
        tensors.update(_refit_whole_block(model, index, context, streams, result))
    streams.run_pruned(model, index)
    return tensors


def _token_mask(model: StreamedModel, batch: torch.Tensor) -> Optional[torch.Tensor]:
    """The tokens of an encoder's calibration passages (not their padding); ``None`` for a causal LM."""
    if not model.encoder:
        return None
    from structprune.score.calibration import attention_mask

    return attention_mask(batch, model.config.pad_token_id)


def _refit_whole_block(model: StreamedModel, index: int, context: _BlockContext, streams: _Streams, result: Reconstruction) -> Dict[str, torch.Tensor]:
    """The joint refit of the loaded block (``structprune.plan.refit``) after its least-squares
    fits, towards the dense block's outputs on the dense inputs; returns every stored weight of
    the block, cut to its kept slices, by checkpoint name."""
    assert context.refit is not None and streams.dense is not None and context.token_masks is not None
    dense, masks, settings = streams.dense, context.token_masks, context.refit
    parameters = trainable(model.block, f"{model.prefix}.{index}.", context.stored.names)
    removed = removed_indices(context.graph, context.selection)

    def run(m: int) -> torch.Tensor:
        args, kwargs = streams.block_args[m]
        return model.run_block(streams.pruned.get((index, m), model.device), args, kwargs)

    def mask(m: int) -> Optional[torch.Tensor]:
        token_mask = masks[m]
        return None if token_mask is None else token_mask.to(model.device)

    outcome = refit_block(
        run, lambda m: dense.get((index + 1, m), model.device), mask, streams.micro_batches, context.micro_batch, parameters, removed, settings, index,
        workers=context.workers,
    )
    result.refits.append(outcome)
    tensors = {}
    for name, parameter in parameters.items():
        stored = context.stored.name(name)
        tensors[stored] = kept_values(parameter, removed.get(name, {})).to(device="cpu", dtype=context.stored.dtypes[stored]).contiguous()
    return tensors


def _refit_linear(model: StreamedModel, index: int, planned: Consumer, context: _BlockContext, streams: _Streams, result: Reconstruction) -> Dict[str, torch.Tensor]:
    """Refits one linear layer of the loaded block (re-selecting its units first when asked) and
    writes the fit into the block; returns its new stored tensor by checkpoint name."""
    module = model.block.get_submodule(planned.module)
    weight = cast(torch.Tensor, module.weight).detach()
    oriented = weight if planned.input_dim == 1 else weight.T
    statistics = _layer_statistics(model, index, planned.module, oriented, streams, context.target)
    context.workers.sum_(statistics.tensors())
    consumer = planned
    if context.reselect:
        _reselect(context, planned, _unconstrained_fit(oriented, statistics, context.damping), statistics.gram)
        consumer = _current(context, model, index, planned)
    energy = None if statistics.energy is None else float(statistics.energy)
    fit = fit_kept_columns(oriented, statistics.gram, consumer.kept, context.damping, cross=statistics.cross, energy=energy)
    result.layers.append(LayerReport(consumer.weight, fit.error_before, fit.error_after, to_block_output=statistics.cross is not None))
    # The pruned layer, run exactly inside the dense block: removed inputs contribute nothing.
    new = torch.zeros_like(oriented)
    new[:, consumer.kept.to(new.device)] = fit.weight.to(new)
    weight.copy_(new if consumer.input_dim == 1 else new.T)
    stored = context.stored.name(consumer.weight)
    kept_columns = fit.weight if consumer.input_dim == 1 else fit.weight.T
    return {stored: kept_columns.to(device="cpu", dtype=context.stored.dtypes[stored]).contiguous()}


def _current(context: _BlockContext, model: StreamedModel, index: int, planned: _C) -> _C:
    """``planned`` as the (re-selected) selection now has it."""
    return cast(_C, next(c for c in context.consumers(model, index) if c.module == planned.module and type(c) is type(planned)))


def _refit_experts(
    model: StreamedModel, index: int, planned: ExpertConsumer, context: _BlockContext, streams: _Streams, result: Reconstruction
) -> Dict[str, torch.Tensor]:
    """Refits each kept expert's slice of a stacked down projection on its kept input channels
    from its own Gram matrix (``_expert_grams``; OBS re-selection first when asked, the same
    channels in every expert), with the ``layer`` target: the experts' outputs reach the block
    through the router's weighted sum, so the dense target's "what the block still misses" has no
    share per expert. Writes the fits into the block; returns the new stored tensors."""
    module = model.block.get_submodule(planned.module)
    stacked = cast(torch.Tensor, module.down_proj).detach()
    oriented = stacked if planned.input_dim == 2 else stacked.transpose(1, 2)  # [E, out, in], a view
    grams = _expert_grams(model, index, planned, streams)
    context.workers.sum_([grams])
    experts = planned.experts.to(stacked.device)
    consumer = planned
    if context.reselect:
        _reselect(context, planned, oriented[experts], grams)
        consumer = _current(context, model, index, planned)
    fits = [fit_kept_columns(oriented[e], gram, kept, context.damping) for e, gram, kept in zip(experts.tolist(), grams, consumer.kept)]
    new = torch.zeros_like(oriented[experts])
    for slot, (fit, kept) in enumerate(zip(fits, consumer.kept)):
        result.layers.append(LayerReport(f"{consumer.weight}[{int(experts[slot])}]", fit.error_before, fit.error_after))
        new[slot][:, kept.to(new.device)] = fit.weight.to(new)
    oriented[experts] = new  # removed channels contribute nothing; removed experts are masked out of the router
    return _expert_tensors(consumer, [fit.weight for fit in fits], context.stored)


def _expert_grams(model: StreamedModel, index: int, consumer: ExpertConsumer, streams: _Streams) -> torch.Tensor:
    """``[kept experts, I, I]``: each kept expert's ``G_e = Σ g² z zᵀ`` over the calibration
    (token, slot) pairs routed to it in the pruned model (``weighted_down_grams``): the expert's
    block of the Hessian of the MoE layer's output error ``‖Σ_e g_e ΔW_e z_e‖²``. Fitting each
    expert on its own block drops only the cross terms between the k experts of one token, where
    an unweighted Gram matrix would weigh a token that the router gives 5% as much as one it
    gives 95%. Float64, ``E·I²·8`` bytes per layer (Mixtral-8x7B: 13 GB; Qwen3-30B-A3B: 0.6 GB),
    held while this layer is fitted."""
    module = model.block.get_submodule(consumer.module)
    experts = consumer.experts.tolist()
    total: List[torch.Tensor] = []

    def record(module: nn.Module, args: Tuple[object, ...], kwargs: Dict[str, object]) -> None:
        hidden, chosen, weights = (argument(args, kwargs, i, name) for i, name in enumerate(EXPERTS_ARGUMENTS))
        grams = weighted_down_grams(module, hidden, chosen, weights, experts)
        if total:
            total[0].add_(grams)
        else:
            total.append(grams)

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for m, (args, kwargs) in enumerate(streams.block_args):
            model.run_block(streams.pruned.get((index, m), model.device), args, kwargs)
    finally:
        handle.remove()
    if not total:
        raise PlanError(f"reconstruction: the experts '{consumer.module}' of block {index} never ran on the calibration data")
    return total[0]


def _expert_tensors(consumer: ExpertConsumer, fits: Sequence[torch.Tensor], stored: _Stored) -> Dict[str, torch.Tensor]:
    """The kept experts' fitted columns (``[out, |K|]`` each) as checkpoint tensors: one per
    expert where the checkpoint holds per-expert tensors (Mixtral's ``experts.N.w2.weight``, Qwen's
    ``experts.N.down_proj.weight``: the expert's slice of the stacked weight, same orientation),
    else the stacked tensor of the kept experts."""
    oriented = [fit if consumer.input_dim == 2 else fit.T for fit in fits]
    names = stored.expert_names(consumer.weight, consumer.experts.tolist())
    if names is not None:
        return {name: weight.to(device="cpu", dtype=stored.dtypes[name]).contiguous() for name, weight in zip(names, oriented)}
    name = stored.name(consumer.weight)
    return {name: torch.stack(oriented).to(device="cpu", dtype=stored.dtypes[name]).contiguous()}


def _layer_statistics(model: StreamedModel, index: int, path: str, weight: torch.Tensor, streams: _Streams, target: str) -> _Statistics:
    """The statistics of layer ``path`` of the loaded block (``weight``: its current ``[out, in]``
    weight) over every calibration micro-batch, for ``target``."""
    module = model.block.get_submodule(path)
    residual = target == "dense" and _adds_to_block_output(model, index, module, streams)
    norm = _final_norm(model, index, module, streams) if target == "dense" and not residual else None
    w = weight.double()
    total: Optional[_Statistics] = None
    for m, (args, kwargs) in enumerate(streams.block_args):
        with _captured_inputs(module) as seen, _captured_inputs(norm) as summed:
            output = model.run_block(streams.pruned.get((index, m), model.device), args, kwargs)
        if not seen:
            raise PlanError(f"reconstruction: the layer '{path}' of block {index} never ran on the calibration data")
        x = _rows(seen[0])
        part = _Statistics(gram=x.T @ x)
        if residual:  # this layer's output plus what the whole block still misses
            assert streams.dense is not None
            y = x @ w.T + _rows(streams.dense.get((index + 1, m), model.device) - output)
            part.cross, part.energy = y.T @ x, (y * y).sum()
        elif norm is not None:  # the same before a post-norm block's final norm (see _norm_preimage)
            assert streams.dense is not None
            z = _rows(summed[0])
            y = x @ w.T + _norm_preimage(norm, z, _rows(streams.dense.get((index + 1, m), model.device))) - z
            part.cross, part.energy = y.T @ x, (y * y).sum()
        if total is None:
            total = part
        else:
            total.add(part)
    if total is None:
        raise PlanError("reconstruction needs at least one calibration sample")
    return total


def _adds_to_block_output(model: StreamedModel, index: int, module: nn.Module, streams: _Streams) -> bool:
    """Whether the block's output is its residual input plus ``module``'s output unchanged (a
    pre-norm block's last projection; not one followed by a norm or by more layers): probed by
    adding a random shift to the module's output on the first micro-batch and checking that the
    block's output moves by exactly that shift."""
    args, kwargs = streams.block_args[0]
    hidden = streams.pruned.get((index, 0), model.device)
    base = model.run_block(hidden, args, kwargs)
    shifts: List[torch.Tensor] = []
    handle = module.register_forward_hook(_random_shift(index, shifts))
    try:
        moved = model.run_block(hidden, args, kwargs)
    finally:
        handle.remove()
    if len(shifts) != 1 or shifts[0].numel() != base.numel():
        return False
    added = shifts[0].reshape(base.shape)  # OPT runs its MLP on [tokens, hidden], not [batch, seq, hidden]
    return _moved_by(base, moved, added)


def _random_shift(seed: int, shifts: List[torch.Tensor]) -> Callable[[nn.Module, object, torch.Tensor], torch.Tensor]:
    """A forward hook adding a random shift, of the output's own scale, to a module's output; each
    shift is appended to ``shifts``."""
    generator = torch.Generator().manual_seed(seed)

    def shift(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        scale = float(output.detach().float().abs().mean()) or 1.0
        shifts.append((torch.randn(output.shape, generator=generator) * scale).to(output))
        return output + shifts[-1]

    return shift


def _moved_by(base: torch.Tensor, moved: torch.Tensor, added: torch.Tensor) -> bool:
    """Whether ``moved`` is ``base + added`` up to rounding."""
    rounding = 8 * torch.finfo(base.dtype).eps * float(base.abs().max())
    return float((moved - base - added).abs().max()) <= 1e-3 * float(added.abs().max()) + rounding


def _final_norm(model: StreamedModel, index: int, module: nn.Module, streams: _Streams) -> Optional[nn.LayerNorm]:
    """The LayerNorm that ends a post-norm block, when ``module``'s output is added unchanged to
    the sum it normalises (BERT's ``output.dense``: the block's output is
    ``LayerNorm(residual + dense(h))``); ``None`` otherwise. Probed as ``_adds_to_block_output``
    is: with a random shift added to the module's output on the first micro-batch, the norm's input
    must move by exactly that shift and its output must be the block's output."""
    norms = [m for m in model.block.modules() if isinstance(m, nn.LayerNorm)]
    if not norms:
        return None
    args, kwargs = streams.block_args[0]
    hidden = streams.pruned.get((index, 0), model.device)
    shifts: List[torch.Tensor] = []
    with _norm_calls(norms) as base_calls:
        model.run_block(hidden, args, kwargs)
    handle = module.register_forward_hook(_random_shift(index, shifts))
    try:
        with _norm_calls(norms) as moved_calls:
            moved = model.run_block(hidden, args, kwargs)
    finally:
        handle.remove()
    if len(shifts) != 1:
        return None
    for norm in norms:
        before, after = base_calls[norm], moved_calls[norm]
        if len(before) != 1 or len(after) != 1 or after[0][1].shape != moved.shape or not torch.equal(after[0][1], moved):
            continue
        if after[0][0].numel() == shifts[0].numel() and _moved_by(before[0][0], after[0][0], shifts[0].reshape(after[0][0].shape)):
            return norm
    return None


@contextmanager
def _norm_calls(norms: Sequence[nn.LayerNorm]) -> Iterator[Dict[nn.Module, List[Tuple[torch.Tensor, torch.Tensor]]]]:
    """The (input, output) of every call of each of ``norms`` while the context is open."""
    calls: Dict[nn.Module, List[Tuple[torch.Tensor, torch.Tensor]]] = {norm: [] for norm in norms}
    handles = [norm.register_forward_hook(lambda module, inputs, output: calls[module].append((inputs[0].detach(), output.detach()))) for norm in norms]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _norm_preimage(norm: nn.LayerNorm, summed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rows that ``norm`` maps to ``target`` (the dense block's output), at the mean and scale of
    ``summed`` (the pruned model's input to the norm, ``[rows, width]``, float64): the dense
    target of a post-norm block's last layer is then its own output plus ``preimage − summed``, the
    pre-norm analogue of the drift the dense target takes up. A norm is indifferent to each row's
    mean and scale, so the pruned rows' own are kept, and the fit corrects only their direction.
    A channel with a zero norm weight has no preimage and keeps its pruned value."""
    weight = (norm.weight if norm.weight is not None else torch.ones_like(summed[0])).to(summed)
    bias = (norm.bias if norm.bias is not None else torch.zeros_like(summed[0])).to(summed)
    mean = summed.mean(dim=-1, keepdim=True)
    scale = torch.sqrt(summed.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)
    normalised = torch.where(weight != 0, (target - bias) / torch.where(weight != 0, weight, 1.0), (summed - mean) / scale)
    return mean + scale * normalised


def _unconstrained_fit(weight: torch.Tensor, statistics: _Statistics, damping: float) -> torch.Tensor:
    """The weights OBS selection starts from: the layer's own for the ``layer`` target; for another
    target, its least-squares fit from all inputs, ``Y Xᵀ (G + λI)⁻¹`` (the target's error then
    splits into the fit's own residual, which no choice changes, plus OBS's quadratic form)."""
    if statistics.cross is None:
        return weight
    return _damped_solve(statistics.cross, statistics.gram, damping)


def save_by_content(tensors: Dict[str, torch.Tensor], directory: Path, stem: str) -> Path:
    """Writes ``tensors`` as ``STEM-<first 16 hex digits of the file's SHA-256>.safetensors``: the
    name follows from the bytes, so the same refit gives the same plan text, and plans sharing a
    directory never overwrite each other's weights."""
    from safetensors.torch import save_file

    staged = directory / f".{stem}.tmp-{os.getpid()}"
    save_file(tensors, str(staged))
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:16]
    path = directory / f"{stem}-{digest}.safetensors"
    os.replace(staged, path)
    return path


def _reselect(context: _BlockContext, consumer: AnyConsumer, weight: torch.Tensor, gram: torch.Tensor) -> None:
    """Replaces, in ``context.selection``, the units removed from the one structure whose units
    this layer consumes by those greedy OBS removes for the same count. A layer fed by several
    structures with removals (none in the models traced so far) keeps the planned units. Stacked
    experts (``weight`` ``[kept experts, out, in]``, ``gram`` one per expert) remove a channel
    position from every expert at once, by the sum of their costs, or, where the selection lets
    each expert keep its own channels (``Selection.per_expert``), each expert by its own costs: the
    experts' errors add up, so each choosing its own least minimises the sum as well."""
    graph, selection = context.graph, context.selection
    owners = [
        (s, m) for s in graph.structures for m in s.members
        if (m.param, m.dim) == (consumer.weight, consumer.input_dim)
        and (selection.units.get(s.id) or s.id in selection.per_group or s.id in selection.per_expert)
    ]
    if len(owners) != 1:
        return
    structure, member = owners[0]
    if structure.id in selection.per_group:
        outer = graph.structures[structure.nested_in]  # type: ignore[index]
        in_group = [m for m in outer.members if (m.param, m.dim) == (member.param, member.dim)]
        slots = structure.units
        pieces, buckets = [], []
        for group in range(outer.units):
            group_columns = np.concatenate([m.indices([group]) for m in in_group])
            for slot in range(slots):
                pieces.append(torch.from_numpy(np.intersect1d(member.indices([slot]), group_columns)))
                buckets.append(group)
        per_group = len(selection.per_group[structure.id][0])
        chosen = obs_removals(weight, gram, pieces, per_group * outer.units, damping=context.damping, buckets=buckets, per_bucket=per_group)
        selection.per_group[structure.id] = [sorted(p % slots for p in chosen if p // slots == group) for group in range(outer.units)]
    elif structure.id in selection.per_expert:
        assert isinstance(consumer, ExpertConsumer)
        pieces = [torch.from_numpy(member.indices([unit])) for unit in range(structure.units)]
        per_expert = selection.per_expert[structure.id]
        for slot, expert in enumerate(consumer.experts.tolist()):
            per_expert[expert] = sorted(obs_removals(weight[slot], gram[slot], pieces, len(per_expert[expert]), damping=context.damping))
    else:
        pieces = [torch.from_numpy(member.indices([unit])) for unit in range(structure.units)]
        chosen = obs_removals(weight, gram, pieces, len(selection.units[structure.id]), damping=context.damping)
        selection.units[structure.id] = sorted(chosen)


def _execution_order(model: StreamedModel, index: int, streams: _Streams, consumers: List[AnyConsumer]) -> List[AnyConsumer]:
    """``consumers`` in the order the block calls them (seen on the first micro-batch)."""
    if len(consumers) < 2:
        return consumers
    seen: List[str] = []

    def hook(path: str) -> Callable[..., None]:
        def record(*_: object) -> None:
            if path not in seen:
                seen.append(path)

        return record

    handles = [model.block.get_submodule(c.module).register_forward_hook(hook(c.module)) for c in consumers]
    try:
        args, kwargs = streams.block_args[0]
        model.run_block(streams.pruned.get((index, 0), model.device), args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    by_path = {c.module: c for c in consumers}
    return [by_path[p] for p in seen] + [c for c in consumers if c.module not in seen]


def apply_to_plan(plan: CutPlan, reconstruction: Reconstruction) -> None:
    """Points every refitted tensor of ``plan`` at its new contents (``replace`` from the file)."""
    for path, tensor in reconstruction.files.values():
        cut = plan.tensors.setdefault(tensor, TensorCut())
        if cut.drop:
            raise PlanError(f"reconstruction refitted '{tensor}', which the plan drops")
        cut.replace = Values.from_file(path.resolve(), tensor)
    plan.metadata["reconstruction"] = {
        "layers": len(reconstruction.layers),
        "fitted_to_block_output": sum(r.to_block_output for r in reconstruction.layers),
        "output_error_ratio": round(reconstruction.error_ratio, 6),
    }
    if reconstruction.refits:
        before = sum(r.error_before for r in reconstruction.refits)
        after = sum(r.error_after for r in reconstruction.refits)
        plan.metadata["reconstruction"]["refit"] = {
            "blocks": len(reconstruction.refits),
            "steps": max(r.steps for r in reconstruction.refits),
            "block_error_ratio": round(after / before, 6) if before else 1.0,
        }


def stored_dtype_map(model_dir: Path) -> Dict[str, torch.dtype]:
    """Checkpoint tensor name → its stored dtype, as torch dtypes."""
    from structprune.io.checkpoint import read_checkpoint
    from structprune.io.dtypes import SAFETENSORS_DTYPES

    return {name: SAFETENSORS_DTYPES.get(info.dtype, torch.float32) for name, info in read_checkpoint(model_dir).tensors.items()}


def obs_removals(
    weight: torch.Tensor,
    gram: torch.Tensor,
    groups: Sequence[torch.Tensor],
    count: int,
    *,
    damping: float = DEFAULT_DAMPING,
    buckets: Optional[Sequence[int]] = None,
    per_bucket: Optional[int] = None,
) -> List[int]:
    """Which ``count`` of the column ``groups`` (a head's channels, one MLP channel…) of a layer
    ``y = W x`` to remove so that the output error after the optimal update of the rest stays least,
    chosen greedily as the optimal brain surgeon does (SlimGPT's structured OBS): with
    ``H = G + λI`` and its inverse ``Hi``, removing group ``I`` costs ``tr(W_I Hi[I, I]⁻¹ W_Iᵀ)``
    given the updates so far; the cheapest goes, then ``W -= W_I Hi[I, I]⁻¹ Hi[I, :]`` and
    ``Hi -= Hi[:, I] Hi[I, I]⁻¹ Hi[I, :]``. ``buckets[g]`` with ``per_bucket``: at most that many
    removals per bucket (GQA: the same number of query heads from every KV group). Returns the
    removed group numbers in the order they were chosen.

    With a leading dimension (``weight`` ``[E, out, in]``, ``gram`` ``[E, in, in]``: the experts of
    an MoE layer, each with its own inputs) a group is the same columns of every one of them: its
    cost is the sum of their costs and every one is updated (each its own ``W`` and ``Hi``)."""
    w = weight.double().clone()
    h = gram.double().clone()
    if w.dim() == 2:
        w, h = w[None], h[None]  # one layer: a batch of one
    inverse = _damped_inverse(h, damping)
    if buckets is None and all(len(columns) == 1 for columns in groups):
        return _obs_single_columns(w, inverse, torch.cat(list(groups)) if groups else torch.zeros(0, dtype=torch.long), count)
    taken: Dict[int, int] = {}
    removed: List[int] = []
    for _ in range(count):
        best: Optional[Tuple[float, int]] = None
        for g, columns in enumerate(groups):
            if g in removed or (buckets is not None and per_bucket is not None and taken.get(buckets[g], 0) >= per_bucket):
                continue
            w_g = w[:, :, columns]
            cost = float((torch.linalg.solve(inverse[:, columns][:, :, columns], w_g.transpose(1, 2)).transpose(1, 2) * w_g).sum())
            if best is None or cost < best[0]:
                best = (cost, g)
        if best is None:
            raise PlanError(f"cannot remove {count} column groups: only {len(removed)} may go")
        g = best[1]
        _remove_columns(w, inverse, groups[g])
        removed.append(g)
        if buckets is not None:
            taken[buckets[g]] = taken.get(buckets[g], 0) + 1
    return removed


def _damped_inverse(h: torch.Tensor, damping: float) -> torch.Tensor:
    """``(H + λI)⁻¹`` for each ``[in, in]`` matrix of ``h`` (``[E, in, in]``), ``λ = damping ·
    mean(diag H)`` of each (a matrix without inputs, an expert no token chose: 1e-12); by
    Cholesky, or the pseudo-inverse where the damped matrix is still not positive definite."""
    scale = torch.diagonal(h, dim1=1, dim2=2).mean(1) if h.shape[-1] else torch.zeros(h.shape[0], dtype=h.dtype)
    h.diagonal(dim1=1, dim2=2).add_(torch.where(scale > 0, damping * scale, torch.full_like(scale, 1e-12))[:, None])
    factor, info = torch.linalg.cholesky_ex(h)
    inverse = torch.cholesky_inverse(factor)
    for failed in torch.nonzero(info).flatten().tolist():
        inverse[failed] = torch.linalg.pinv(h[failed], hermitian=True)
    return inverse


def _remove_columns(w: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor) -> None:
    """The OBS update of every ``W`` and ``Hi`` (``[E, …]``) for removing ``columns``:
    ``W -= W_I Hi[I, I]⁻¹ Hi[I, :]``, ``Hi -= Hi[:, I] Hi[I, I]⁻¹ Hi[I, :]``."""
    solve = torch.linalg.solve(inverse[:, columns][:, :, columns], inverse[:, columns])  # Hi[I, I]⁻¹ Hi[I, :]
    w -= w[:, :, columns] @ solve
    inverse -= inverse[:, :, columns] @ solve


def _obs_single_columns(w: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor, count: int) -> List[int]:
    """``obs_removals`` for groups of one column each (MLP channels), vectorised: the cost of
    removing column j is Σ_e ‖W_e[:, j]‖² / Hi_e[j, j] (``w``, ``inverse``: ``[E, …]``). Columns go
    in at most ``OBS_ROUNDS`` rounds of the cheapest ones together, each round one joint update
    (one at a time would be a thousand rank-one updates per layer: minutes per layer on a CPU)."""
    if count > len(columns):
        raise PlanError(f"cannot remove {count} column groups: there are {len(columns)}")
    alive = torch.ones(len(columns), dtype=torch.bool)
    removed: List[int] = []
    rounds = min(count, OBS_ROUNDS)
    for round_ in range(rounds):
        take = (count - len(removed)) // (rounds - round_)
        diagonal = torch.diagonal(inverse, dim1=1, dim2=2)[:, columns].clamp_min(1e-300)
        cost = ((w[:, :, columns] ** 2).sum(1) / diagonal).sum(0)
        cost[~alive] = float("inf")
        chosen = torch.argsort(cost, stable=True)[:take]
        _remove_columns(w, inverse, columns[chosen])
        alive[chosen] = False
        removed.extend(int(g) for g in chosen)
    return removed
