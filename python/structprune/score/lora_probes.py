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
"""

from __future__ import annotations

import hashlib
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from structprune.errors import SettingError, StreamingError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class AdapterGrads:
    """One linear layer's adapter and the gradients of the calibration loss with respect to it."""

    a: torch.Tensor
    """``[r, in]``"""
    b: torch.Tensor
    """``[out, r]``"""
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
    """The adapters of the linear layers ``paths`` (module paths inside a block) of ``block``, set
    for one block at a time (``load``); hooked into the block's forward while ``attached``."""

    def __init__(self, block: nn.Module, prefix: str, paths: List[str], *, rank: int, seed: int, dtype: torch.dtype, device: torch.device, adapter_dir: Optional[Path]) -> None:
        self.block, self.prefix, self.paths = block, prefix, paths
        self.rank, self.seed, self.dtype, self.device = rank, seed, dtype, device
        self.trained, self.scaling = _trained_adapters(adapter_dir) if adapter_dir is not None else ({}, 1.0)
        self.adapter_dir = adapter_dir
        self.current: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.index = -1

    def load(self, index: int) -> None:
        """Sets the adapters of block ``index`` (its trained ones, or fresh seeded probes), with no gradients yet."""
        self.index = index
        self.current = {path: self._adapter(path, f"{self.prefix}.{index}.{path}") for path in self.paths}

    def _adapter(self, path: str, module: str) -> Tuple[torch.Tensor, torch.Tensor]:
        weight = cast(nn.Linear, self.block.get_submodule(path)).weight
        out_features, in_features = weight.shape
        if self.adapter_dir is not None:
            if module not in self.trained:
                raise SettingError(f"--lora-adapter: {self.adapter_dir} has no adapter for {module}", option="--lora-adapter")
            a, b = self.trained[module]
            if a.shape[1] != in_features or tuple(b.shape) != (out_features, a.shape[0]):
                raise SettingError(f"--lora-adapter: {self.adapter_dir}: the adapter of {module} does not fit its weight {list(weight.shape)}", option="--lora-adapter")
        else:
            generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{module}".encode()))
            std = self.rank ** -0.5
            a = torch.randn(self.rank, in_features, generator=generator, dtype=torch.float64) * std
            b = torch.randn(out_features, self.rank, generator=generator, dtype=torch.float64) * std
        # Copies: a trained adapter's tensors stay gradient-free for a block loaded again (a resumed pass).
        return (a.to(self.device, self.dtype, copy=True).requires_grad_(True), b.to(self.device, self.dtype, copy=True).requires_grad_(True))

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = [self.block.get_submodule(path).register_forward_hook(self._hook(path)) for path in self.paths]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, path: str) -> Callable[..., torch.Tensor]:
        def add_adapter(_module: nn.Module, inputs: Tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            a, b = self.current[path]
            # The input is detached: its gradient already flows through the effective weight W + s·B·A.
            delta = F.linear(F.linear(inputs[0].detach().to(a.dtype), a), b) * self.scaling
            # Zero in value (the block computes as before), the adapter's gradients in the backward.
            return output + (delta - delta.detach()).to(output.dtype)

        return add_adapter

    def grads(self) -> Dict[str, AdapterGrads]:
        """The loaded block's adapters and their gradients so far, by weight name (model naming)."""
        out = {}
        for path, (a, b) in self.current.items():
            if a.grad is None or b.grad is None:
                raise StreamingError(f"lora-grad: no gradient reached the adapter of {self.prefix}.{self.index}.{path}")
            out[f"{self.prefix}.{self.index}.{path}.weight"] = AdapterGrads(a.detach(), b.detach(), a.grad, b.grad, self.scaling)
        return out
