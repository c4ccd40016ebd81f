"""LoRA adapters on the loaded block's linear layers, whose gradients stand in for the weights'
(the ``lora-grad`` estimator, LoRAPrune: Zhang et al. 2023, arXiv 2305.18403).

Every scored linear layer ``y = W x`` gets an adapter ``s·B·A`` (A: ``[r, in]``, B: ``[out, r]``)
during the streamed backward pass. Its output is added as ``d − d.detach()`` with ``d = s·B·A·x``
of the detached input (x's gradient flows through W already): exactly zero in value, so the block
computes what it did without the adapter, and the gradients are those of a LoRA model sitting at
the block's current weights, W being its effective weight ``W + s·B·A`` (LoRAPrune's notation). Autograd then gives ``∂L/∂A = s·Bᵀ·G`` and ``∂L/∂B = s·G·Aᵀ``
(G: the gradient of the weight, never formed: the block's weights keep ``requires_grad=False``),
which is all the estimator reads.

Where the adapters come from:

- a trained adapter (``adapter_dir``, peft's format): the one recovery trained on this checkpoint
  and merged into it (``prune --iterations K --recover-steps N``), so W already is ``W + s·B·A``;
- otherwise fresh probes, A and B both drawn N(0, 1/r) (seeded by the layer's name), scale 1.
  LoRA's own start (B = 0) would give ∂L/∂A = 0 and leave only ``G·AᵀA``, which sketches G from the
  right only: a column of it mixes all of G's columns, so units that are input columns (o_proj's
  heads, down_proj's channels) would score noise. With both random, ``G·AᵀA + B·Bᵀ·G`` has
  expectation ``2·G`` (E[AᵀA] = I, E[BBᵀ] = I) and sketches G from both sides, rows and columns;
  the cross term ``G·Aᵀ·Bᵀ·G`` has expectation zero (A and B independent).

A mixture-of-experts layer's stacked expert weights (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj``
``[E, H, I]``, transposed in some models) get one adapter per expert, ``A`` ``[E, r, cols]`` and
``B`` ``[E, rows, r]`` in the weight's own layout, so that expert e's effective weight is
``W_e + s·B_e·A_e`` and ``∂L/∂A_e = s·B_eᵀ·G_e``. The experts module multiplies slices of its
stacked weights inside whatever kernel it runs (eager loop, ``batched_mm``, ``grouped_mm``), where
no hook reaches, so a forward hook on the module recomputes each expert on its routed tokens
(``score.expert_inputs``) with the adapters in: the gate/up product gets ``d₁ − d₁.detach()``
before the gating, the down product ``d₂ − d₂.detach()`` of the detached gated input, and the
recomputed expert output ``y`` enters the module's output as ``w·(y − y.detach())`` (w the token's
detached routing weight): zero in value, and autograd carries the gradient at the module's output
back through W_down and the gating to both adapters, as it would through the experts' own
weights. This costs one more pass of the experts, and no expert weight gradient is formed. No
trained adapter covers stacked weights (recovery adapts linear layers: ``all-linear``), so they
always get fresh probes, also when ``adapter_dir`` is given for the linear layers.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from structprune.errors import SettingError, StreamingError
from structprune.score.expert_inputs import stacked_names
from structprune.score.routing import EXPERTS_ARGUMENTS, argument
from structprune.score.streaming import holds

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class AdapterGrads:
    """One linear layer's adapter and the gradients of the calibration loss with respect to it."""

    a: torch.Tensor
    """``[r, in]`` (``[E, r, cols]`` for stacked expert weights)"""
    b: torch.Tensor
    """``[out, r]`` (``[E, rows, r]`` for stacked expert weights)"""
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    scaling: float


def check_adapter_dir(adapter_dir: Path) -> None:
    """Refuses a directory that is not a plain LoRA adapter saved by peft (what recovery writes)."""
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise SettingError(f"--lora-adapter: {adapter_dir} holds no peft adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})", option="--lora-adapter")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise SettingError(f"--lora-adapter: {adapter_dir} is not a plain LoRA adapter (peft_type {config.get('peft_type')!r}, use_dora {config.get('use_dora')})", option="--lora-adapter")


def adapter_sha256(adapter_dir: Path) -> str:
    """The adapter's weights' hash (a few MB): part of a resumable scoring run's key."""
    return hashlib.sha256((Path(adapter_dir) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def _trained_adapters(adapter_dir: Path) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], float]:
    """Module name in the model → (A, B) of a peft LoRA adapter, and its scale (α/r, α/√r with rsLoRA)."""
    from safetensors.torch import load_file

    check_adapter_dir(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    # peft names them base_model.model.<module>.lora_A.weight (the adapter's own name left out).
    pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            pairs[module] = (a, weights[key.replace(".lora_A.weight", ".lora_B.weight")])
    return pairs, scaling


class LoraProbes:
    """The adapters of the linear layers ``linears`` and of the stacked weights of the experts
    modules ``experts`` (module paths inside a block) of the loaded block (``block()``), set for one
    block at a time (``load``: those of the paths it holds, where blocks differ in structure);
    hooked into the forward of every module that runs blocks (``modules()``) while ``attached``."""

    def __init__(
        self, block: Callable[[], nn.Module], modules: Callable[[], List[nn.Module]], prefix: str, linears: List[str], *,
        experts: Sequence[str] = (), rank: int, seed: int, dtype: torch.dtype, device: torch.device, adapter_dir: Optional[Path],
    ) -> None:
        self.block, self.modules, self.prefix, self.linears, self.experts = block, modules, prefix, linears, list(experts)
        self.rank, self.seed, self.dtype, self.device = rank, seed, dtype, device
        self.trained, self.scaling = _trained_adapters(adapter_dir) if adapter_dir is not None else ({}, 1.0)
        self.adapter_dir = adapter_dir
        self.current: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        """Parameter path inside the block (``mlp.down_proj.weight``, ``mlp.experts.down_proj``) → (A, B)."""
        self.index = -1

    def load(self, index: int) -> None:
        """Sets the adapters of block ``index`` (its trained ones, or fresh seeded probes), with no gradients yet."""
        self.index = index
        block = self.block()
        self.current = {
            f"{path}.weight": self._linear_adapter(block, path, f"{self.prefix}.{index}.{path}") for path in self.linears if holds(block, path)
        }
        for path in self.experts:
            if not holds(block, path):
                continue
            module = block.get_submodule(path)
            for name in stacked_names(module):
                weight = getattr(module, name)
                self.current[f"{path}.{name}"] = self._tensors(fresh_probe(self.seed, f"{self.prefix}.{index}.{path}.{name}", self.rank, tuple(weight.shape)))

    def _linear_adapter(self, block: nn.Module, path: str, module: str) -> Tuple[torch.Tensor, torch.Tensor]:
        weight = cast(nn.Linear, block.get_submodule(path)).weight
        out_features, in_features = weight.shape
        if self.adapter_dir is None:
            return self._tensors(fresh_probe(self.seed, module, self.rank, (out_features, in_features)))
        if module not in self.trained:
            raise SettingError(f"--lora-adapter: {self.adapter_dir} has no adapter for {module}", option="--lora-adapter")
        a, b = self.trained[module]
        if a.shape[1] != in_features or tuple(b.shape) != (out_features, a.shape[0]):
            raise SettingError(f"--lora-adapter: {self.adapter_dir}: the adapter of {module} does not fit its weight {list(weight.shape)}", option="--lora-adapter")
        return self._tensors((a, b))

    def _tensors(self, adapter: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        # Copies: a trained adapter's tensors stay gradient-free for a block loaded again (a resumed pass).
        a, b = adapter
        return (a.to(self.device, self.dtype, copy=True).requires_grad_(True), b.to(self.device, self.dtype, copy=True).requires_grad_(True))

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles: List[Any] = []
        for block in self.modules():
            handles.extend(block.get_submodule(path).register_forward_hook(self._linear_hook(path)) for path in self.linears if holds(block, path))
            handles.extend(
                block.get_submodule(path).register_forward_hook(self._experts_hook(path), with_kwargs=True) for path in self.experts if holds(block, path)
            )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _linear_hook(self, path: str) -> Callable[..., torch.Tensor]:
        def add_adapter(_module: nn.Module, inputs: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            a, b = self.current[f"{path}.weight"]
            # The input is detached: its gradient already flows through the effective weight W + s·B·A.
            delta = F.linear(F.linear(inputs[0].detach().to(a.dtype), a), b) * self.scaling
            # Zero in value (the block computes as before), the adapter's gradients in the backward.
            return output + (delta - delta.detach()).to(output.dtype)

        return add_adapter

    def _experts_hook(self, path: str) -> Callable[..., torch.Tensor]:
        def add_adapters(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: torch.Tensor) -> torch.Tensor:
            hidden, index, weights = (argument(args, kwargs, i, name) for i, name in enumerate(EXPERTS_ARGUMENTS))
            # Routing and inputs detached: their gradients already flow through the module's own computation.
            flat = hidden.detach().reshape(-1, hidden.shape[-1]).to(self.dtype)
            index = index.reshape(flat.shape[0], -1)
            weights = weights.detach().reshape(index.shape).to(self.dtype)
            delta = torch.zeros_like(flat)
            experts = int(getattr(module, stacked_names(module)[1]).shape[0])
            for expert in torch.unique(index).tolist():
                if 0 <= expert < experts:
                    tokens, slots = torch.nonzero(index == expert, as_tuple=True)
                    change = self._expert_change(module, path, flat[tokens], expert)
                    delta = delta.index_add(0, tokens, change * weights[tokens, slots, None])
            return output + delta.reshape(output.shape).to(output.dtype)

        return add_adapters

    def _expert_change(self, module: nn.Module, path: str, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s output on ``hidden`` (its tokens) with both adapters in, less itself:
        zero, with the adapters' gradients."""
        first, last = stacked_names(module)
        (a1, b1), (a2, b2) = self.current[f"{path}.{first}"], self.current[f"{path}.{last}"]
        transposed = bool(module.is_transposed)
        inner = _product(hidden, _weight(module, first, expert, hidden), transposed)
        if module.has_bias:
            inner = inner + _weight(module, f"{first}_bias", expert, hidden)
        shift = _low_rank(hidden, a1[expert], b1[expert], transposed) * self.scaling
        gate: Callable[[torch.Tensor], torch.Tensor] = getattr(module, "_apply_gate" if module.has_gate else "act_fn")
        gated = gate(inner + (shift - shift.detach()))
        out = _product(gated, _weight(module, last, expert, hidden), transposed)
        shift = _low_rank(gated.detach(), a2[expert], b2[expert], transposed) * self.scaling
        out = out + (shift - shift.detach())
        return out - out.detach()

    def grads(self) -> Dict[str, AdapterGrads]:
        """The loaded block's adapters and their gradients so far, by weight name (model naming)."""
        out = {}
        for path, (a, b) in self.current.items():
            name = f"{self.prefix}.{self.index}.{path}"
            if a.grad is None or b.grad is None:
                raise StreamingError(f"lora-grad: no gradient reached the adapter of {name}")
            out[name] = AdapterGrads(a.detach(), b.detach(), a.grad, b.grad, self.scaling)
        return out


def fresh_probe(seed: int, name: str, rank: int, shape: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The probe (A, B) of the weight ``name`` of ``shape`` (``[rows, cols]``, or ``[E, rows, cols]``
    for stacked experts: one per expert), both N(0, 1/r), seeded by the weight's name, in float64."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    *experts, rows, cols = shape
    std = rank ** -0.5
    a = torch.randn(*experts, rank, cols, generator=generator, dtype=torch.float64) * std
    b = torch.randn(*experts, rows, rank, generator=generator, dtype=torch.float64) * std
    return a, b


def _weight(module: nn.Module, name: str, expert: int, like: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, getattr(module, name))[expert].detach().to(like.dtype)


def _product(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x`` through one expert's weight: ``[out, in]``, or ``[in, out]`` when transposed."""
    return x @ weight if transposed else F.linear(x, weight)


def _low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x`` through ``B·A`` in the layout of the weight it adapts (``_product``), never formed."""
    return (x @ b) @ a if transposed else F.linear(F.linear(x, a), b)
