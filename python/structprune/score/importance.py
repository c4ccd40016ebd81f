"""Importance estimators: how much each unit of a structure matters.

An estimator turns one parameter's statistics into a score per index along one of its dimensions
(``index_scores``); the scorer sums those over each unit's indices, per member, applies the
estimator's ``finalize`` (|·| for vector-wise Taylor, √ for L2), and reduces across the members of a
structure (sum, mean, max, prod or first). Adding an estimator is one small subclass registered in
``ESTIMATORS``.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, Optional, Type, Union

import torch

from structprune.errors import SettingError
from structprune.score.streaming import ParamStats


@dataclass
class ActivationStats:
    """Per-input-channel statistics of the input of one linear layer over the calibration set; for
    a mixture-of-experts layer's stacked expert weights, of each expert's input over the tokens
    routed to it (``total`` and ``squares`` ``[experts, channels]``, ``count`` ``[experts]``)."""

    total: torch.Tensor
    squares: torch.Tensor
    count: Union[int, torch.Tensor]
    input_dim: int
    """The weight dimension that indexes input channels (1 for nn.Linear, 0 for GPT-2's Conv1D,
    2 for stacked experts ``[E, out, in]``, 1 for transposed ones ``[E, in, out]``)."""

    @property
    def per_expert(self) -> bool:
        return self.total.dim() == 2

    @property
    def norm(self) -> torch.Tensor:
        return self.squares.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self._counts()

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / self._counts() - self.mean.square()).clamp_min(0)

    def _counts(self) -> torch.Tensor:
        """Tokens seen, at least 1 (an expert no token chose has zero statistics), as a column."""
        return torch.as_tensor(self.count, dtype=self.total.dtype, device=self.total.device).clamp_min(1).unsqueeze(-1)

    def along_weight(self, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per-channel ``values`` (shaped as ``total``) reshaped to broadcast against ``weight``:
        along its input dimension, and along its expert dimension (0) for stacked experts."""
        shape = [1] * weight.dim()
        shape[self.input_dim] = -1
        if self.per_expert:
            shape[0] = values.shape[0]
        return values.reshape(shape).to(weight)

    def reads(self, weight: torch.Tensor) -> bool:
        """Whether these are the statistics of ``weight``'s inputs (a linear layer's 2-D weight, or
        stacked experts' 3-D one)."""
        return weight.dim() == self.total.dim() + 1


class Importance(ABC):
    """One way of scoring units. Subclasses say what they need and score one parameter dimension."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False
    needs_fisher: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False
    reselects: ClassVar[bool] = False
    """Whether the reconstruction pass chooses each layer's units itself (the scores then set only
    how many each layer loses); such an estimator needs reconstruction."""
    perturbs: ClassVar[bool] = False
    """Whether units are scored forward-only by masking random subsets of them (``Bonsai``): the
    scorer runs the masked sub-models, regresses their calibration losses on the masks and hands
    ``index_scores`` each consuming layer's per-input-column loss effects as ``weight``."""
    gates: ClassVar[bool] = False
    """Whether units are scored through gates on their outputs, sample by sample: the scorer then
    hands ``index_scores`` one sample's input ``x`` (as ``weight``, ``[tokens, channels]``) and loss
    gradient ``∂L/∂x`` (as ``grad``) at each layer that consumes units (o_proj for heads, down_proj
    for MLP channels), along ``dim`` 1, and sums each sample's finalized unit scores."""
    kinds_share_a_scale: ClassVar[bool] = True
    """Whether a unit's score means the same for every kind of structure (a loss change, as
    Taylor's), so the planner may weigh a head against MLP channels by score per parameter. When
    not (a gate's derivative for heads and for channels, a low-rank sketch of the gradient), the
    planner first puts every kind's scores on one scale (``scorer.kinds_on_one_scale``)."""
    adapts: ClassVar[bool] = False
    """Whether gradients come from LoRA adapters on the block's linear layers rather than from the
    weights (``LoraGrad``): the scorer hands ``index_scores`` each linear weight with its adapter
    and the adapter's gradients (``ParamStats.adapter``); no weight gradient is ever formed."""

    @abstractmethod
    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        """A score per index along ``dim`` of the parameter; signed when ``finalize`` takes |·|."""

    def finalize(self, unit_scores: torch.Tensor) -> torch.Tensor:
        """Applied to a member's per-unit sums before members are combined."""
        return unit_scores


def _sum_except(values: torch.Tensor, dim: int) -> torch.Tensor:
    other = [d for d in range(values.dim()) if d != dim]
    return values.sum(dim=other) if other else values


class TaylorElementFirst(Importance):
    """Σ |w·g| over the unit's weights (LLM-Pruner's element-wise first order)."""

    name = "taylor"
    needs_gradients = True

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        return _sum_except((stats.weight * _grad(stats)).abs(), dim)


class TaylorVector(Importance):
    """|Σ w·g| over the unit's weights of each parameter (vector-wise)."""

    name = "taylor-vector"
    needs_gradients = True

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        return _sum_except(stats.weight * _grad(stats), dim)

    def finalize(self, unit_scores: torch.Tensor) -> torch.Tensor:
        return unit_scores.abs()


class TaylorElementSecond(Importance):
    """Σ |w·g − ½·w²·F| with F the mean squared per-sample gradient (Fisher ≈ Hessian diagonal)."""

    name = "taylor2"
    needs_gradients = True
    needs_fisher = True

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        if stats.fisher is None:
            raise ValueError(f"{stats.name}: second-order Taylor needs per-sample squared gradients")
        w = stats.weight
        return _sum_except((w * _grad(stats) - 0.5 * w.square() * stats.fisher).abs(), dim)


class MagnitudeL1(Importance):
    name = "l1"

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        return _sum_except(stats.weight.abs(), dim)


class MagnitudeL2(Importance):
    name = "l2"

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        return _sum_except(stats.weight.square(), dim)

    def finalize(self, unit_scores: torch.Tensor) -> torch.Tensor:
        return unit_scores.sqrt()


class RandomImportance(Importance):
    """Uniform random scores, reproducible from the seed and the parameter's name (a baseline)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{stats.name}:{dim}".encode()))
        return torch.rand(stats.weight.shape[dim], generator=generator, dtype=torch.float64).to(stats.weight.device)


class WandaStructured(Importance):
    """Wanda-sp: |W_ij|·‖X_j‖ summed over the unit (X: the layer's inputs over the calibration set;
    for stacked experts, expert e's weights with the inputs of the tokens routed to e); parameters
    that are not a linear layer's or stacked experts' weight score zero."""

    name = "wanda-sp"
    needs_activations = True

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        if activation is None or not activation.reads(stats.weight):
            return torch.zeros(stats.weight.shape[dim], device=stats.weight.device, dtype=torch.float64)
        return _sum_except(stats.weight.abs() * activation.along_weight(activation.norm, stats.weight), dim)


class ConsumerScore(Importance):
    """An estimator that scores a unit only where a linear layer consumes it as input channels (its
    other members score zero): ``consumer_scores`` gets that layer's weight and the statistics of
    its inputs."""

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        if activation is None or not activation.reads(stats.weight) or dim != activation.input_dim:
            return torch.zeros(stats.weight.shape[dim], device=stats.weight.device, dtype=torch.float64)
        return self.consumer_scores(stats.weight, dim, activation)

    @abstractmethod
    def consumer_scores(self, weight: torch.Tensor, dim: int, activation: ActivationStats) -> torch.Tensor:
        """A score per input channel (``dim``) of the consuming layer's ``weight`` (for stacked
        experts, summed over the experts: an expert channel is that channel in every expert)."""


class Fluctuation(ConsumerScore):
    """FLAP: for a layer's input channel j, Var(X_j)·‖W[:, j]‖² (how much removing it perturbs the
    output beyond a constant); only the consuming side of a unit scores."""

    name = "flap"
    needs_activations = True

    def consumer_scores(self, weight: torch.Tensor, dim: int, activation: ActivationStats) -> torch.Tensor:
        return _sum_except(weight.square() * activation.along_weight(activation.variance, weight), dim)


class ObsSaliency(ConsumerScore):
    """OBS selection (SlimGPT-style), in two parts. For planning (how many units each layer loses):
    the diagonal OBS cost of removing input channel j of a consuming layer, ‖W[:, j]‖²·Σx_j² (the
    output error with nothing updated; only the consuming side scores). For choosing which units:
    ``reselects`` — the reconstruction pass picks each layer's units by greedy OBS with the inverse
    Gram matrix of its pruned inputs (``structprune.plan.reconstruct.obs_removals``), then refits."""

    name = "obs"
    needs_activations = True
    reselects = True

    def consumer_scores(self, weight: torch.Tensor, dim: int, activation: ActivationStats) -> torch.Tensor:
        weight = weight.double()
        return _sum_except(weight.square() * activation.along_weight(activation.squares, weight), dim)


class ActivationEntropy(ConsumerScore):
    """Information carried by a unit's output, measured where it is consumed: for input channel j
    of a consuming layer (o_proj for heads, down_proj for MLP channels), the differential entropy
    of its calibration distribution taken as Gaussian, H_j = ½·log(2πe·Var(X_j)); a unit scores
    the sum over its channels (their joint entropy if independent). The entropy criterion of Luo &
    Wu 2017 ("An Entropy-based Pruning Method for CNN Compression"), which bins activations into a
    histogram; the Gaussian form needs only the sums of squares already recorded, and ranks units
    as their summed log-variances do. Only the consuming side of a unit scores; a channel constant
    on the calibration data scores the floor (log of the smallest float64)."""

    name = "entropy"
    needs_activations = True

    def consumer_scores(self, weight: torch.Tensor, dim: int, activation: ActivationStats) -> torch.Tensor:
        variance = activation.variance.double().clamp_min(torch.finfo(torch.float64).tiny)
        entropy = 0.5 * torch.log(2 * math.pi * math.e * variance)
        return entropy.sum(0) if activation.per_expert else entropy


class HeadGate(TaylorVector):
    """Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"): a gate ξ = 1 multiplies
    every unit's output, and a unit's importance is |∂L/∂ξ| averaged over calibration samples. A
    head's output is its slice of o_proj's input ``x``, so ∂L/∂ξ = Σ over tokens and the head's
    channels of x·∂L/∂x; the same gate on an MLP channel (down_proj's input) scores channels. The
    |·| is taken per sample (``gates``), so gradients of opposite sign in different samples do not
    cancel, as they do in vector-wise Taylor's |Σ w·g|. Per parameter and sample, the score is
    vector-wise Taylor's: the gate's derivative is the sum of w·g over the unit's weights."""

    name = "head-gate"
    gates = True
    # A head's gate sums x·∂L/∂x over 64+ channels that partly cancel; per parameter it reads ~5x
    # lower than a channel's on SmolLM2, and the planner then spends the budget on heads.
    kinds_share_a_scale = False


class Bonsai(Importance):
    """Bonsai (Dery et al. 2024), forward-only: ``masks`` sub-models each drop a random
    ``drop`` fraction of the units (a unit is dropped by zeroing its columns at the input of the
    layer that consumes it), their calibration losses are measured, and a unit's importance is its
    coefficient in the ridge regression of the losses on which units each sub-model dropped: the
    loss a unit's removal adds. No backward pass; ``masks`` forwards of the calibration set (all
    sub-models advance block by block together, so each block is read once).

    The scorer regresses on the finest units of each consuming layer (a query head, an MLP
    channel) and passes each input column its unit's coefficient divided by the unit's width
    (``weight``), so that summing over a unit's columns, or a KV group's, gives its coefficient."""

    name = "bonsai"
    perturbs = True
    masks: ClassVar[int] = 64
    drop: ClassVar[float] = 0.2
    ridge: ClassVar[float] = 1e-3
    """λ relative to the mean diagonal of the masks' Gram matrix (keeps the regression defined when
    there are more units than sub-models)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        return stats.weight


class LoraGrad(Importance):
    """LoRAPrune (Zhang et al. 2023, "LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient
    Fine-Tuning", arXiv 2305.18403): the weight gradient estimated from the gradients of a LoRA
    adapter ``s·B·A`` on the weight, so that scoring needs a LoRA fine-tune's memory, not a full
    backward's. Per weight, as the paper's criterion (and its code, ``compute_sensitivity``):

        |(W + s·B·A) ⊙ (G_B·A + B·G_A − G_B·G_A)|,   G_A = ∂L/∂A, G_B = ∂L/∂B,

    summed over the unit's weights as element-wise Taylor sums |w·g|; parameters without an adapter
    (biases, norms) score zero. ``W + s·B·A`` is the layer's effective weight, the one loaded
    (``structprune.score.lora_probes``: a trained adapter was merged into it, and the adapter is
    hooked in at zero value). ``adapter``: a peft adapter trained on this checkpoint (what recovery
    between ``--iterations`` steps leaves); without one, fresh probes of rank ``rank`` with A and B
    both random (see ``lora_probes`` for why not B = 0). Unlike LoRAPrune, whose moving average runs
    over fine-tuning steps, the gradients are those of the calibration loss over the whole batch,
    as Taylor's are; LoRAPrune's per-layer L2 normalisation is ``--normalize l2`` (with ``--global``)."""

    name = "lora-grad"
    needs_gradients = True
    adapts = True
    kinds_share_a_scale = False  # the sketch's error scales with each layer's width, not with the loss
    rank: ClassVar[int] = 16
    """Rank of the fresh probes (that of recovery's adapters by default)."""

    def __init__(self, seed: int = 0, adapter: Optional[Path] = None) -> None:
        self.seed = seed
        self.adapter = adapter

    def index_scores(self, stats: ParamStats, dim: int, activation: Optional[ActivationStats]) -> torch.Tensor:
        adapter, weight = stats.adapter, stats.weight
        if adapter is None:
            return torch.zeros(weight.shape[dim], dtype=torch.float64, device=weight.device)
        if weight.dim() == 2:
            return _lora_criterion(weight, adapter.a, adapter.b, adapter.grad_a, adapter.grad_b, dim)
        # Stacked experts [E, rows, cols], one adapter per expert: dimension 0 scores each expert
        # whole, the others each channel summed over the experts (as every estimator's stacked sums).
        per_expert = [
            _lora_criterion(weight[e], adapter.a[e], adapter.b[e], adapter.grad_a[e], adapter.grad_b[e], max(dim - 1, 0))
            for e in range(weight.shape[0])
        ]
        if dim == 0:
            return torch.stack([scores.sum() for scores in per_expert])
        return torch.stack(per_expert).sum(dim=0)


def _lora_criterion(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, dim: int) -> torch.Tensor:
    """LoRAPrune's criterion of one matrix, summed along every dimension but ``dim``."""
    scores = torch.zeros(weight.shape[dim], dtype=torch.float64, device=weight.device)
    # G_B·A + B·G_A − G_B·G_A = [G_B, B − G_B]·[A; G_A]: one product of inner size 2r.
    left = torch.cat([grad_b, b - grad_b], dim=1)
    right = torch.cat([a, grad_a], dim=0)
    # Row slices of the weight's size at most 16 MiB in float32: the estimate is never whole.
    step = max(1, (16 << 20) // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        part = (left[rows] @ right).mul_(weight[rows]).abs_()
        if dim == 0:
            scores[rows] = part.sum(dim=1).double()
        else:
            scores += part.sum(dim=0).double()
    return scores


def _grad(stats: ParamStats) -> torch.Tensor:
    if stats.grad is None:
        raise ValueError(f"{stats.name}: no gradient reached this parameter")
    return stats.grad


ESTIMATORS: Dict[str, Type[Importance]] = {
    cls.name: cls
    for cls in (TaylorElementFirst, TaylorVector, TaylorElementSecond, MagnitudeL1, MagnitudeL2, RandomImportance, WandaStructured, Fluctuation, ObsSaliency, ActivationEntropy, HeadGate, Bonsai, LoraGrad)
}


def estimator(name: str, *, seed: int = 0, lora_adapter: Optional[Path] = None) -> Importance:
    """The estimator registered under ``name`` (``lora_adapter``: the trained adapter ``lora-grad`` reads)."""
    if name not in ESTIMATORS:
        raise SettingError(f"--importance: unknown estimator {name!r}; choose one of {', '.join(sorted(ESTIMATORS))}", option="--importance")
    cls = ESTIMATORS[name]
    if lora_adapter is not None and cls is not LoraGrad:
        raise SettingError(f"--lora-adapter: is the adapter whose gradients lora-grad reads; importance {name!r} reads none", option="--lora-adapter")
    if cls is LoraGrad:
        return LoraGrad(seed, lora_adapter)
    return cls(seed) if cls in (RandomImportance, Bonsai) else cls()
