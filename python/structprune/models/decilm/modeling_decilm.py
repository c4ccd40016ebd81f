"""DeciLM / Nemotron-NAS model for transformers, written by structprune beside the checkpoints it
prunes: a Llama model whose decoder layers are rebuilt one by one from ``block_configs`` (see
``configuration_decilm.py``). Loads with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` without structprune installed.

Layer shapes are overridden through :class:`LayerConfig`, a per-layer view of the model config,
rather than per-layer config objects, because a config with a head count that does not divide the
hidden size fails the stock config's validation even when ``head_dim`` is explicit.
"""

from typing import Any, Dict, Mapping, Tuple, cast

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .configuration_decilm import DeciLMConfig


class LayerConfig:
    """The model config as one layer sees it: ``overrides`` replace some attributes, every other
    attribute is read live from the model config (so later changes, e.g. the attention
    implementation, reach every layer)."""

    def __init__(self, base: Any, overrides: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name: str) -> Any:
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__getattribute__(self, "_overrides")[name] = value


class SkippedAttention(nn.Module):
    """An attention sub-layer removed by the plan: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """An MLP sub-layer removed by the plan: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def block_overrides(config: DeciLMConfig, block: Mapping[str, Any]) -> Dict[str, Any]:
    """Llama config attributes of one layer described by a DeciLM block config."""
    overrides: Dict[str, Any] = {}
    attention, ffn = block.get("attention", {}), block.get("ffn", {})
    if not attention.get("no_op") and attention.get("n_heads_in_group"):
        overrides["num_key_value_heads"] = config.num_attention_heads // attention["n_heads_in_group"]
    if not ffn.get("no_op"):
        if "intermediate_size" in ffn:
            overrides["intermediate_size"] = ffn["intermediate_size"]
        elif "ffn_mult" in ffn:
            overrides["intermediate_size"] = ffn_mult_to_intermediate_size(ffn["ffn_mult"], config.hidden_size)
    return overrides


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """NVIDIA's published convention: ⌈(2/3 · ffn_mult · hidden) rounded down⌉ up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size + (-size) % 256


def rebuild_layer(layer: nn.Module, config: Any, index: int, overrides: Mapping[str, Any]) -> nn.Module:
    """A fresh decoder layer of ``layer``'s class built from ``config`` with ``overrides``."""
    layer_class = type(layer)
    view = LayerConfig(config, overrides)
    try:
        return layer_class(view, index)
    except TypeError:
        return layer_class(view)


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        for index, block in enumerate(config.block_configs):
            self.model.layers[index] = self._decoder_layer(config, index, block)
        self.post_init()

    @staticmethod
    def _decoder_layer(config: DeciLMConfig, index: int, block: Mapping[str, Any]) -> nn.Module:
        # LayerConfig stands in for a LlamaConfig with this layer's widths.
        layer: nn.Module = LlamaDecoderLayer(cast(Any, LayerConfig(config, block_overrides(config, block))), index)
        attention, ffn = block.get("attention", {}), block.get("ffn", {})
        for section in (attention, ffn):
            if section.get("replace_with_linear"):
                raise ValueError("block configs with replace_with_linear are not supported")
        if attention.get("no_op"):
            layer.self_attn = SkippedAttention()
            layer.input_layernorm = nn.Identity()
        if ffn.get("no_op"):
            layer.mlp = SkippedMLP()
            layer.post_attention_layernorm = nn.Identity()
        return layer
