"""The inputs of a mixture-of-experts layer's stacked expert weights, per expert over the tokens
routed to it: what the activation estimators (wanda-sp, flap, entropy) read for expert channels and
whole experts, and what a gate on an expert channel (head-gate) multiplies, where an nn.Linear
layer's inputs come from a forward hook on the layer.

transformers' experts modules hold every expert's weights stacked (``gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``; ``[E, H, 2I]`` and ``[E, I, H]`` when ``is_transposed``) and are called
as ``experts(hidden_states, top_k_index, top_k_weights)``. A forward pre-hook sees the routing as
the model uses it and, for each expert, recomputes that expert's down_proj input from its tokens
with the module's own gating (``_apply_gate``; the activation alone for ungated experts). The
kernels transformers can run the experts with (eager, ``batched_mm``, ``grouped_mm``) order their
rows differently and the eager one exposes no intermediate at all, so recomputing is what keeps the
statistics independent of the kernel: it costs one gate/up product per routed token, not a second
forward of the experts.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, List, Tuple

import torch
from torch import nn

from structprune.errors import StreamingError
from structprune.score.importance import ActivationStats
from structprune.score.routing import EXPERTS_ARGUMENTS, argument, experts_module_path
from structprune.tracing.graph import StructureGraph

EXPERT_KINDS = ("experts", "expert_channels")

INTERFACE = ("has_gate", "has_bias", "is_transposed", "down_proj")
"""What transformers' ``use_experts_implementation`` gives an experts module, which the
recomputation reads (with ``gate_up_proj``/``_apply_gate``, or ``up_proj``/``act_fn`` ungated)."""


def stacked_names(module: nn.Module) -> Tuple[str, str]:
    """The stacked weights an expert's input passes through first (gate/up) and last (down)."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def expert_input_dim(module: nn.Module) -> int:
    """The dimension of a stacked expert weight that indexes the expert's input channels."""
    return 1 if module.is_transposed else 2


def down_inputs(module: nn.Module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s down_proj input on ``hidden`` (its tokens, ``[tokens, H]``): the
    gated intermediate activations, ``[tokens, I]``, as the module computes them."""
    first = stacked_names(module)[0]
    weight = _stacked(module, first)[expert]
    out = hidden @ weight if module.is_transposed else nn.functional.linear(hidden, weight)
    if module.has_bias:
        out = out + _stacked(module, f"{first}_bias")[expert]
    gate: Callable[[torch.Tensor], torch.Tensor] = getattr(module, "_apply_gate" if module.has_gate else "act_fn")
    return gate(out)


def weighted_down_grams(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, experts: List[int]) -> torch.Tensor:
    """For each of ``experts``, ``G_e = Σ g² z zᵀ`` over the (token, slot) pairs routed to it: z the
    pair's down_proj input, g its gate weight (``hidden``, ``index``, ``weights``: the experts
    module's arguments). ``[len(experts), I, I]`` in float64: the expert's block of the Hessian of
    the layer's output error (its output reaches the layer's output scaled by g)."""
    hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    index = index.reshape(hidden.shape[0], -1)
    weights = weights.reshape(index.shape)
    width = _stacked(module, "down_proj").shape[expert_input_dim(module)]
    grams = torch.zeros(len(experts), width, width, dtype=torch.float64, device=hidden.device)
    with torch.no_grad():
        for slot, expert in enumerate(experts):
            tokens, slots = torch.nonzero(index == expert, as_tuple=True)
            if len(tokens):
                z = down_inputs(module, hidden[tokens], expert).double() * weights[tokens, slots, None].double()
                grams[slot] = z.T @ z
    return grams


def _stacked(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor), f"{type(module).__name__}.{name} is no tensor"
    return value


def check_experts_module(module: nn.Module, path: str, *, gated: bool = False) -> None:
    """Refuses an experts module without transformers' experts interface (nothing to recompute
    with); ``gated``: also one whose experts normalise their outputs, where a gate's derivative
    is no longer the down_proj input times the gradient of the experts' output (below)."""
    missing = [name for name in INTERFACE if not hasattr(module, name)]
    if missing:
        raise StreamingError(
            f"{path} ({type(module).__name__}): the activations of stacked experts are recomputed through transformers' "
            f"experts interface (use_experts_implementation), and this module lacks {', '.join(missing)}"
        )
    if gated and getattr(module, "has_post_expert_norm", False):
        raise StreamingError(f"{path} ({type(module).__name__}): its experts normalise their outputs, which a gate on their channels cannot see through")


def expert_gate_derivatives(module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """For a gate ξ_c = 1 on channel c of every expert's down_proj input, ∂L/∂ξ_c: the sum over
    the routed (token, slot) pairs of z_c·∂L/∂z_c, z the pair's down_proj input, with
    ∂L/∂z = w·W_downᵀ·∂L/∂y (w the pair's gate weight, ∂L/∂y ``grad``, the gradient at the experts'
    output for the token). ``[I]``, in float64."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    grad = grad.reshape(-1, grad.shape[-1])
    index = index.reshape(hidden.shape[0], -1)
    weights = weights.reshape(index.shape)
    down = _stacked(module, "down_proj").detach()
    derivatives = torch.zeros(down.shape[expert_input_dim(module)], dtype=torch.float64, device=hidden.device)
    with torch.no_grad():
        for expert in torch.unique(index).tolist():
            tokens, slots = torch.nonzero(index == expert, as_tuple=True)
            inner = down_inputs(module, hidden[tokens], expert)
            projection = down[expert].T if module.is_transposed else down[expert]  # [H, I]
            inner_grad = (grad[tokens].to(projection) @ projection) * weights[tokens, slots, None].to(projection)
            derivatives += (inner.double() * inner_grad.double()).sum(0)
    return derivatives


class ExpertInputRecorder:
    """Forward pre-hook on one layer's experts module: per expert, per input channel, the sums and
    sums of squares of the inputs of its gate/up and of its down projection over the tokens routed
    to it (``ActivationStats`` with a leading expert axis), keyed by the stacked weights' names."""

    def __init__(self, module: nn.Module, weight_prefix: str) -> None:
        self.module = module
        first, last = stacked_names(module)
        self.first_name, self.last_name = f"{weight_prefix}.{first}", f"{weight_prefix}.{last}"
        self.stats: Dict[str, ActivationStats] = {}

    def hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        hidden, index = (argument(args, kwargs, i, name) for i, name in enumerate(EXPERTS_ARGUMENTS[:2]))
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        with torch.no_grad():
            for expert in torch.unique(index).tolist():
                tokens = (index == expert).any(dim=-1)  # top-k picks an expert at most once per token
                routed = hidden[tokens]
                self._add(self.first_name, expert, routed)
                self._add(self.last_name, expert, down_inputs(module, routed, expert))

    def _add(self, name: str, expert: int, inputs: torch.Tensor) -> None:
        x = inputs.double()
        stats = self.stats.get(name)
        if stats is None:
            experts = int(_stacked(self.module, "down_proj").shape[0])
            zeros = torch.zeros(experts, x.shape[1], dtype=torch.float64, device=x.device)
            counts = torch.zeros(experts, dtype=torch.float64, device=x.device)
            stats = self.stats[name] = ActivationStats(zeros.clone(), zeros.clone(), counts, expert_input_dim(self.module))
        stats.total[expert] += x.sum(0)
        stats.squares[expert] += x.square().sum(0)
        assert isinstance(stats.count, torch.Tensor)
        stats.count[expert] += x.shape[0]


def attach_expert_recorders(block: nn.Module, paths: List[str], weight_prefix: str) -> Tuple[List[ExpertInputRecorder], List[Any]]:
    """A recorder on each experts module of ``block`` at ``paths`` (inside the block), with the
    stacked weights named ``{weight_prefix}.{path}.{weight}``; returns them and the hook handles."""
    recorders, handles = [], []
    for path in paths:
        module = block.get_submodule(path)
        check_experts_module(module, path)
        recorder = ExpertInputRecorder(module, f"{weight_prefix}.{path}")
        recorders.append(recorder)
        handles.append(module.register_forward_pre_hook(recorder.hook, with_kwargs=True))
    return recorders, handles


def experts_modules(graph: StructureGraph, prefix: str, scored: Collection[int]) -> Dict[int, List[str]]:
    """Block index → the paths inside the block of the experts modules holding units of the
    ``scored`` structures (experts, expert channels)."""
    paths: Dict[int, List[str]] = {}
    for structure in graph.structures:
        if structure.id in scored and structure.kind in EXPERT_KINDS and structure.layer is not None:
            path = experts_module_path(prefix, structure)
            if path not in paths.setdefault(structure.layer, []):
                paths[structure.layer].append(path)
    return paths


def consumes_expert_channels(block: nn.Module, path: str, dim: int) -> bool:
    """Whether ``path`` (inside ``block``) is the stacked down projection of an experts module
    and ``dim`` its input dimension: the one weight consuming the layer's expert channels."""
    owner_path, _, name = path.rpartition(".")
    try:
        owner = block.get_submodule(owner_path)
    except AttributeError:
        return False
    return has_experts_interface(owner) and name == stacked_names(owner)[1] and dim == expert_input_dim(owner)


def has_experts_interface(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module with transformers' experts interface (``INTERFACE``)."""
    return all(hasattr(module, attribute) for attribute in INTERFACE)
