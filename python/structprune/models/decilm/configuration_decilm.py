"""DeciLM / Nemotron-NAS configuration, written by structprune beside the checkpoints it prunes.

A Llama configuration whose ``block_configs`` give every decoder layer its own shape::

    {"attention": {"no_op": false, "replace_with_linear": false, "n_heads_in_group": 4},
     "ffn": {"no_op": false, "replace_with_linear": false, "intermediate_size": 1536}}

Every layer with attention has ``num_attention_heads`` query heads and
``num_attention_heads // n_heads_in_group`` KV heads; ``no_op`` removes the attention or MLP
sub-layer (and its norm) entirely. This is the layout vLLM serves as ``DeciLMForCausalLM``; vLLM and
other readers access the entries as attributes (``block.attention.no_op``), so they are parsed into
dicts that also allow attribute access and serialise back to plain JSON.

The file only depends on transformers, so ``AutoConfig.from_pretrained(path, trust_remote_code=True)``
reads it without structprune installed.
"""

from typing import Any, Dict, Iterable, List, Optional

from transformers import LlamaConfig


class BlockSection(dict):
    """One JSON object of a block config, readable as ``section.key`` as well as ``section["key"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return BlockSection(value) if isinstance(value, dict) else value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs: Optional[Iterable[Dict[str, Any]]] = None, **kwargs: Any) -> None:
        self.block_configs: List[BlockSection] = [BlockSection(block) for block in block_configs or []]
        super().__init__(**kwargs)
        if self.block_configs and len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(f"block_configs has {len(self.block_configs)} entries for {self.num_hidden_layers} layers")
