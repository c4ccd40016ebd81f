"""Checkpoint formats for pruned models: what each can hold, the config it is written with, and how
the model it describes is built.

``stock``
    The architecture's own config with new widths (``intermediate_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``hidden_size``, ``num_hidden_layers``). Every loader of
    the architecture reads it. Holds only plans that leave the same widths in every layer.
``decilm``
    NVIDIA's DeciLM / Nemotron-NAS layout, Llama models only: ``model_type: nemotron-nas``,
    ``architectures: [DeciLMForCausalLM]`` and one ``block_configs`` entry per layer giving its MLP
    width (``ffn.intermediate_size``) and KV-head count (``attention.n_heads_in_group``). vLLM
    serves it; transformers loads it with ``trust_remote_code=True`` through the
    ``configuration_decilm.py``/``modeling_decilm.py`` that structprune writes beside the weights
    (``structprune.models.decilm``); ``structprune.load_pruned`` loads it without remote code. The format
    has one query-head count for all layers, so it cannot hold per-layer query-head counts.
``layers``
    Any architecture: the stock config plus ``structprune_layers``, the per-layer config
    attributes that differ (``{"blocks": "model.layers", "layers": [{"intermediate_size": 448}, …]}``).
    Only ``structprune.load_pruned`` reads it; a stock loader refuses it (its shapes do not match the
    stock config), never loads it wrongly.

``auto`` picks ``stock`` when the plan is uniform, else ``decilm`` when the model and plan fit it,
else ``layers``.

Encoders (BERT, RoBERTa, DistilBERT): transformers 5 sizes their attention heads as
``hidden_size / num_attention_heads`` and no longer reads ``pruned_heads`` (transformers 4's
record of removed heads), so no stock config holds an encoder with heads removed: ``auto`` writes
such a plan as ``layers``, ``stock`` refuses it. In the ``layers`` format every layer of an
encoder states its head count, the model-wide count stays the dense one (so that the dense layers
transformers builds first are valid), and :func:`fit_encoder_heads` gives each attention its
heads of the dense width (``head_dim``).
"""

from __future__ import annotations

from importlib import resources
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, cast

from structprune.errors import PlanError

if TYPE_CHECKING:  # torch is imported by the functions that build models, not by the CLI
    from torch import nn

FORMATS = ("auto", "stock", "decilm", "layers")
LAYERS_KEY = "structprune_layers"
DECILM_MODEL_TYPE = "nemotron-nas"
DECILM_FILES = ("configuration_decilm.py", "modeling_decilm.py")
# Llama-architecture model types whose decoder layers the DeciLM layout describes exactly.
DECILM_SOURCES = ("llama",)

PerLayer = Dict[str, List[int]]
"""Config attribute → its value in each kept layer, for the attributes that differ between layers."""


@dataclass(frozen=True)
class EncoderAttention:
    """Where an encoder layer's attention keeps its head geometry (module paths inside a layer)."""

    module: str
    count_attribute: str
    projections: Tuple[str, ...]
    output: str


_BERT_ATTENTION = EncoderAttention("attention.self", "num_attention_heads", ("query", "key", "value"), "attention.output.dense")
ENCODER_ATTENTION = {
    "bert": _BERT_ATTENTION,
    "roberta": _BERT_ATTENTION,
    "distilbert": EncoderAttention("attention", "n_heads", ("q_lin", "k_lin", "v_lin"), "attention.out_lin"),
}
"""Encoder families whose heads the ``layers`` format removes, by ``model_type``."""
ENCODER_HEADS_REFUSAL = (
    "transformers 5 sizes {model_type} attention heads as hidden_size / num_attention_heads and no "
    "longer reads pruned_heads, so no stock config holds a {model_type} model with heads removed: "
    "write it with --format layers (loaded by structprune.load_pruned) or keep the heads with --structures mlp"
)


def choose_format(requested: str, config: Mapping[str, Any], per_layer: PerLayer, head_key: str) -> str:
    """The format to write: ``requested``, or for ``auto`` the most widely loadable one that holds
    the plan."""
    if requested not in FORMATS:
        raise PlanError(f"unknown checkpoint format '{requested}'; choose one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested
    if not per_layer:
        return "stock"
    return "decilm" if decilm_refusal(config, per_layer, head_key) is None else "layers"


def decilm_refusal(config: Mapping[str, Any], per_layer: PerLayer, head_key: str) -> Optional[str]:
    """Why the DeciLM layout cannot hold this plan, or ``None`` when it can."""
    if config.get("model_type") not in DECILM_SOURCES:
        return f"the DeciLM layout describes Llama models, not {config.get('model_type')!r}"
    if head_key in per_layer:
        return "the DeciLM layout has one query-head count for every layer, this plan varies it per layer (plan heads uniformly and MLP channels per layer, or write --format layers)"
    return None


def layers_patch(config: Mapping[str, Any], per_layer: PerLayer, blocks_prefix: str, layer_count: int) -> Dict[str, Any]:
    """The ``layers`` format's additions to the config patch."""
    overrides: List[Dict[str, int]] = [{} for _ in range(layer_count)]
    for key, values in sorted(per_layer.items()):
        for layer, value in enumerate(values):
            overrides[layer][key] = value
    return {LAYERS_KEY: {"blocks": blocks_prefix, "layers": overrides}}


def decilm_patch(config: Mapping[str, Any], per_layer: PerLayer, uniform: Mapping[str, Any], layer_count: int) -> Dict[str, Any]:
    """The ``decilm`` format's config patch (on top of the uniform edits in ``uniform``)."""
    merged = {**config, **uniform}
    heads = int(merged["num_attention_heads"])
    kv_heads = per_layer.get("num_key_value_heads", [int(merged.get("num_key_value_heads") or heads)] * layer_count)
    widths = per_layer.get("intermediate_size", [int(merged["intermediate_size"])] * layer_count)
    blocks = []
    for layer in range(layer_count):
        if heads % kv_heads[layer]:
            raise PlanError(f"the DeciLM layout needs the query heads ({heads}) to be a multiple of layer {layer}'s KV heads ({kv_heads[layer]})")
        blocks.append(
            {
                "attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // kv_heads[layer]},
                "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": widths[layer]},
            }
        )
    head_dim = merged.get("head_dim") or int(merged["hidden_size"]) // int(config["num_attention_heads"])
    return {
        "model_type": DECILM_MODEL_TYPE,
        "architectures": ["DeciLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        },
        "block_configs": blocks,
        "head_dim": int(head_dim),
        # The first layer's values, which readers of the top-level keys (vLLM's KV-cache sizing) take.
        "num_key_value_heads": kv_heads[0],
        "intermediate_size": max(widths),
    }


def decilm_files() -> Dict[str, str]:
    """The configuration and modeling sources written beside a DeciLM checkpoint. They are the only
    code a plan may write: the engine embeds these same files and refuses any other ``.py`` file,
    or these with other bytes (an editable install needs its extension rebuilt after editing them)."""
    package = resources.files("structprune.models.decilm")
    return {name: package.joinpath(name).read_text(encoding="utf-8") for name in DECILM_FILES}


def is_pruned_layout(config: Any) -> bool:
    """Whether a config (object or dict) describes a non-uniform checkpoint only ``load_pruned`` reads."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    return get(LAYERS_KEY) is not None or get("model_type") == DECILM_MODEL_TYPE


def apply_layer_overrides(model: nn.Module, config: Any) -> None:
    """Rebuilds the decoder layers of ``model`` that the ``layers`` format gives their own shapes.

    The new layers are created in the current default device and dtype context, like the ones
    they replace (so on the meta device inside ``from_pretrained``)."""
    from structprune.models.decilm.modeling_decilm import rebuild_layer

    layout = getattr(config, LAYERS_KEY, None) if not isinstance(config, Mapping) else config.get(LAYERS_KEY)
    if layout is None:
        return
    stack = cast("nn.ModuleList", model.get_submodule(layout["blocks"]))
    if len(stack) != len(layout["layers"]):
        raise PlanError(f"{LAYERS_KEY} describes {len(layout['layers'])} layers, the model has {len(stack)}")
    encoder = ENCODER_ATTENTION.get(str(getattr(config, "model_type", "")))
    for index, overrides in enumerate(layout["layers"]):
        # An encoder's head count is never handed to its layer class, which would size the heads
        # from it; fit_encoder_heads sets it.
        shapes = {k: v for k, v in overrides.items() if encoder is None or k != encoder.count_attribute}
        if shapes:
            stack[index] = rebuild_layer(stack[index], config, index, shapes)
        if encoder is not None and encoder.count_attribute in overrides:
            fit_encoder_heads(stack[index], encoder, int(overrides[encoder.count_attribute]), int(config.head_dim))


def fit_encoder_heads(layer: nn.Module, encoder: EncoderAttention, heads: int, head_dim: int) -> None:
    """Gives an encoder layer's attention ``heads`` heads of ``head_dim`` channels: new query, key,
    value and output projections of those widths (in the current device and dtype context), and
    the attributes its forward reads the head geometry from."""
    from torch import nn

    attention = layer.get_submodule(encoder.module)
    width = heads * head_dim
    setattr(attention, encoder.count_attribute, heads)
    setattr(attention, "attention_head_size", head_dim)
    setattr(attention, "scaling", head_dim**-0.5)
    if hasattr(attention, "all_head_size"):
        setattr(attention, "all_head_size", width)
    for name in encoder.projections:
        projection = cast(nn.Linear, attention.get_submodule(name))
        setattr(attention, name, nn.Linear(projection.in_features, width, bias=projection.bias is not None, dtype=projection.weight.dtype))
    parent_path, _, output_name = encoder.output.rpartition(".")
    parent = layer.get_submodule(parent_path)
    output = cast(nn.Linear, parent.get_submodule(output_name))
    setattr(parent, output_name, nn.Linear(width, output.out_features, bias=output.bias is not None, dtype=output.weight.dtype))


def pruned_model_class(base: type) -> type:
    """A subclass of the transformers model class ``base`` that applies ``structprune_layers`` after
    building, so ``from_pretrained`` loads, ties and casts a ``layers`` checkpoint as usual."""

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        cast(Any, base).__init__(self, config, *args, **kwargs)
        apply_layer_overrides(self, config)

    return type(f"Pruned{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
