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
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, cast

import numpy as np
import torch
from torch import nn

from structprune.plan.cuts import Selection, removed_indices
from structprune.score.distributed import SINGLE, Workers
from structprune.errors import PlanError
from structprune.tracing.graph import StructureGraph
from structprune.plan.cut_plan import CutPlan, TensorCut, Values
from structprune.score.scorer import linear_input_dim
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


@dataclass
class LayerReport:
    weight: str
    error_before: float
    error_after: float
    to_block_output: bool = False
    """Fitted to the dense block's output (the ``dense`` target on a layer feeding the residual stream)."""


@dataclass
class Reconstruction:
    """What ``reconstruct`` wrote: for every refitted weight (model name), the file and tensor
    name holding its new kept columns in the stored orientation, and the per-layer errors."""

    files: Dict[str, Tuple[Path, str]]
    layers: List[LayerReport]
    selection: Selection
    """The selection the fits were made for: the one given, or, with OBS re-selection, the units
    each layer chose on its own pruned inputs (same counts)."""

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
    damping: float = DEFAULT_DAMPING,
    target: str = "dense",
    micro_batch: int = 4,
    activation_memory: int = DEFAULT_ACTIVATION_MEMORY,
    workers: Workers = SINGLE,
    progress: Optional[Callable[[str, int, int], None]] = None,
    reselect: bool = False,
) -> Reconstruction:
    """Refits, block by block on the pruned model's own activations, every linear layer that loses
    input channels under ``selection``, and writes the new weights (cut to their kept columns, in
    the stored dtype and orientation) under ``work_dir`` (``block-NNNNN-<hash>.safetensors``, tensors
    named as in the checkpoint). ``stored_names``: model name → checkpoint name; ``stored_dtypes``:
    checkpoint name → stored dtype. ``input_ids`` is this process's share of the calibration batch;
    with several ``workers`` the statistics are summed over processes and only the main one writes.
    ``target`` (``TARGETS``): what the refitted layers reproduce; ``dense`` also runs the dense
    model beside the pruned one, block by block.

    With ``reselect`` (``--importance obs``), each layer first chooses which of its units to remove,
    as many as ``selection`` removes there, by greedy OBS on the Gram matrix of its pruned inputs
    (``obs_removals``), and is then fitted for that choice; ``Reconstruction.selection`` holds the
    choices."""
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
    streams = _Streams(
        pruned=ActivationStore(activation_memory // 2 if target == "dense" else activation_memory),
        dense=ActivationStore(activation_memory // 2) if target == "dense" else None,
    )
    result = Reconstruction(files={}, layers=[], selection=selection)
    context = _BlockContext(graph, selection, damping, workers, reselect, target)
    try:
        batches = list(input_ids.split(micro_batch))
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
                        tensors = _reconstruct_block(model, index, context, streams, result, stored_names, stored_dtypes)
                        if tensors and workers.is_main:
                            path = save_by_content(tensors, work_dir, f"block-{index:05d}")
                            result.files.update({name: (path, stored_names[name]) for name in _model_names(tensors, stored_names)})
                if progress:
                    progress("reconstruct", index + 1, model.num_blocks)
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


@dataclass
class _BlockContext:
    graph: StructureGraph
    selection: Selection
    damping: float
    workers: Workers
    reselect: bool
    target: str

    def consumers(self, model: StreamedModel, index: int) -> List[Consumer]:
        return block_consumers(model, index, removed_indices(self.graph, self.selection))


def _reconstruct_block(
    model: StreamedModel,
    index: int,
    context: _BlockContext,
    streams: _Streams,
    result: Reconstruction,
    stored_names: Mapping[str, str],
    stored_dtypes: Mapping[str, torch.dtype],
) -> Dict[str, torch.Tensor]:
    """Refits the loaded block ``index``'s consumers in the order the block runs them (re-selecting
    their units first when asked), then runs the pruned block to give the next block its inputs.
    Returns the new weights by checkpoint name."""
    order = _execution_order(model, index, streams, context.consumers(model, index))
    tensors: Dict[str, torch.Tensor] = {}
    for planned in order:
        module = model.block.get_submodule(planned.module)
        weight = cast(torch.Tensor, module.weight).detach()
        oriented = weight if planned.input_dim == 1 else weight.T
        statistics = _layer_statistics(model, index, planned.module, oriented, streams, context.target)
        context.workers.sum_(statistics.tensors())
        consumer = planned
        if context.reselect:
            _reselect(context, planned, _unconstrained_fit(oriented, statistics, context.damping), statistics.gram)
            consumer = next(c for c in context.consumers(model, index) if c.module == planned.module)
        energy = None if statistics.energy is None else float(statistics.energy)
        fit = fit_kept_columns(oriented, statistics.gram, consumer.kept, context.damping, cross=statistics.cross, energy=energy)
        result.layers.append(LayerReport(consumer.weight, fit.error_before, fit.error_after, to_block_output=statistics.cross is not None))
        # The pruned layer, run exactly inside the dense block: removed inputs contribute nothing.
        new = torch.zeros_like(oriented)
        new[:, consumer.kept.to(new.device)] = fit.weight.to(new)
        weight.copy_(new if consumer.input_dim == 1 else new.T)
        stored = stored_names.get(consumer.weight)
        if stored is None:
            raise PlanError(f"reconstruction: the checkpoint has no tensor for the weight '{consumer.weight}'")
        kept_columns = fit.weight if consumer.input_dim == 1 else fit.weight.T
        tensors[stored] = kept_columns.to(device="cpu", dtype=stored_dtypes[stored]).contiguous()
    streams.run_pruned(model, index)
    return tensors


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


def _model_names(tensors: Mapping[str, torch.Tensor], stored_names: Mapping[str, str]) -> List[str]:
    by_stored = {stored: model for model, stored in stored_names.items()}
    return [by_stored[name] for name in tensors]


def _reselect(context: _BlockContext, consumer: Consumer, weight: torch.Tensor, gram: torch.Tensor) -> None:
    """Replaces, in ``context.selection``, the units removed from the one structure whose units
    this layer consumes by those greedy OBS removes for the same count. A layer fed by several
    structures with removals (none in the models traced so far) keeps the planned units."""
    graph, selection = context.graph, context.selection
    owners = [
        (s, m) for s in graph.structures for m in s.members
        if (m.param, m.dim) == (consumer.weight, consumer.input_dim) and (selection.units.get(s.id) or s.id in selection.per_group)
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
    else:
        pieces = [torch.from_numpy(member.indices([unit])) for unit in range(structure.units)]
        chosen = obs_removals(weight, gram, pieces, len(selection.units[structure.id]), damping=context.damping)
        selection.units[structure.id] = sorted(chosen)


def _execution_order(model: StreamedModel, index: int, streams: _Streams, consumers: List[Consumer]) -> List[Consumer]:
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
    removed group numbers in the order they were chosen."""
    w = weight.double().clone()
    h = gram.double().clone()
    scale = float(torch.diagonal(h).mean()) if h.numel() else 0.0
    h.diagonal().add_(damping * scale if scale > 0 else 1e-12)
    factor, info = torch.linalg.cholesky_ex(h)
    inverse = torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.pinv(h, hermitian=True)
    if buckets is None and all(len(columns) == 1 for columns in groups):
        return _obs_single_columns(w, inverse, torch.cat(list(groups)) if groups else torch.zeros(0, dtype=torch.long), count)
    taken: Dict[int, int] = {}
    removed: List[int] = []
    for _ in range(count):
        best: Optional[Tuple[float, int]] = None
        for g, columns in enumerate(groups):
            if g in removed or (buckets is not None and per_bucket is not None and taken.get(buckets[g], 0) >= per_bucket):
                continue
            block = inverse[columns][:, columns]
            w_g = w[:, columns]
            cost = float((torch.linalg.solve(block, w_g.T).T * w_g).sum())
            if best is None or cost < best[0]:
                best = (cost, g)
        if best is None:
            raise PlanError(f"cannot remove {count} column groups: only {len(removed)} may go")
        g = best[1]
        columns = groups[g]
        solve = torch.linalg.solve(inverse[columns][:, columns], inverse[columns])  # Hi[I, I]⁻¹ Hi[I, :]
        w -= w[:, columns] @ solve
        inverse -= inverse[:, columns] @ solve
        removed.append(g)
        if buckets is not None:
            taken[buckets[g]] = taken.get(buckets[g], 0) + 1
    return removed


def _obs_single_columns(w: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor, count: int) -> List[int]:
    """``obs_removals`` for groups of one column each (MLP channels), vectorised: the cost of
    removing column j is ‖W[:, j]‖² / Hi[j, j]. Columns go in at most ``OBS_ROUNDS`` rounds of the
    cheapest ones together, each round one joint update (one at a time would be a thousand
    rank-one updates per layer: minutes per layer on a CPU)."""
    if count > len(columns):
        raise PlanError(f"cannot remove {count} column groups: there are {len(columns)}")
    alive = torch.ones(len(columns), dtype=torch.bool)
    removed: List[int] = []
    rounds = min(count, OBS_ROUNDS)
    for round_ in range(rounds):
        take = (count - len(removed)) // (rounds - round_)
        diagonal = torch.diagonal(inverse)[columns].clamp_min(1e-300)
        cost = (w[:, columns] ** 2).sum(0) / diagonal
        cost[~alive] = float("inf")
        chosen = torch.argsort(cost, stable=True)[:take]
        picked = columns[chosen]
        solve = torch.linalg.solve(inverse[picked][:, picked], inverse[picked])
        w -= w[:, picked] @ solve
        inverse -= inverse[:, picked] @ solve
        alive[chosen] = False
        removed.extend(int(g) for g in chosen)
    return removed
