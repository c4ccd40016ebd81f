"""Tiny configs of the supported architectures, shared by the trace, graph and equivalence tests.

Every config has three blocks (two are traced, the third is a replica of the second) and, where
the architecture allows it, distinct widths: hidden (64) differs from the MLP width and from the
attention width (heads × head_dim), and no other dimension (vocabulary 128, positions 72) equals
the hidden size, so a dimension's size says which space it belongs to. GPT-NeoX, OPT, GPT-2 and
BERT tie their attention width to hidden_size, and Phi-3's widths are pinned by the trace tests
(fused qkv of (4 + 2·2)·16 rows over 64 columns), so for those heads × head_dim == hidden.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import transformers as t

LAYERS = 3
HIDDEN = 64
VOCAB = 128
POSITIONS = 72
NO_SPECIAL_TOKENS: Dict[str, Any] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
COMMON: Dict[str, Any] = dict(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=LAYERS, **NO_SPECIAL_TOKENS)
DECODER: Dict[str, Any] = dict(hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **COMMON)


def _with(**overrides: Any) -> Dict[str, Any]:
    return {**DECODER, **overrides}


def _configs() -> Dict[str, Callable[[], Any]]:
    return {
        # GQA (4 query heads, 2 KV heads) with an explicit head_dim that is not hidden / heads:
        # q 96 rows, k/v 48 rows, MLP 80.
        "llama": lambda: t.LlamaConfig(**_with(head_dim=24, intermediate_size=80), architectures=["LlamaForCausalLM"]),
        # q 80 rows, k/v 40 rows, MLP 96.
        "mistral": lambda: t.MistralConfig(**_with(head_dim=20), architectures=["MistralForCausalLM"]),
        # q/k/v biases and tied embeddings; q 48 rows, k/v 24 rows, MLP 96.
        "qwen2": lambda: t.Qwen2Config(**_with(head_dim=12), tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"]),
        # q_norm/k_norm over head_dim 16; three query heads per KV head: q 96 rows, k/v 32 rows, MLP 112.
        "qwen3": lambda: t.Qwen3Config(
            **_with(num_attention_heads=6, intermediate_size=112), head_dim=16, architectures=["Qwen3ForCausalLM"]
        ),
        # MQA (one KV head): q 96 rows, k/v 24 rows, MLP 80; embeddings scaled by sqrt(hidden), tied.
        "gemma": lambda: t.GemmaConfig(
            **_with(num_key_value_heads=1, intermediate_size=80), head_dim=24, architectures=["GemmaForCausalLM"]
        ),
        # eager attention (logit softcapping), sliding/full layer_types, sandwich norms: q 80 rows, MLP 96.
        "gemma2": lambda: t.Gemma2Config(**DECODER, head_dim=20, sliding_window=4, architectures=["Gemma2ForCausalLM"]),
        # fused qkv_proj and gate_up_proj (head_dim 16: q 64 rows, k/v 32 rows each, MLP 96).
        "phi3": lambda: t.Phi3Config(**DECODER, architectures=["Phi3ForCausalLM"]),
        # interleaved per-head q|k|v, parallel residual, 25% rotary.
        "gpt_neox": lambda: t.GPTNeoXConfig(
            hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=4, rotary_pct=0.25,
            use_parallel_residual=True, architectures=["GPTNeoXForCausalLM"], **COMMON,
        ),
        "opt": lambda: t.OPTConfig(
            hidden_size=HIDDEN, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=HIDDEN,
            architectures=["OPTForCausalLM"], **COMMON,
        ),
        # Conv1D weights stored [in, out]; n_inner unset (MLP 4 × 64 = 256).
        "gpt2": lambda: t.GPT2Config(
            n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=POSITIONS, vocab_size=VOCAB,
            architectures=["GPT2LMHeadModel"], **NO_SPECIAL_TOKENS,
        ),
        "bert_mlm": lambda: t.BertConfig(
            hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=4, architectures=["BertForMaskedLM"], **COMMON
        ),
        "bert": lambda: t.BertConfig(
            hidden_size=HIDDEN, intermediate_size=96, num_attention_heads=4, architectures=["BertModel"], **COMMON
        ),
    }


CONFIGS: Dict[str, Callable[[], Any]] = _configs()

# Where the repeated blocks live in each model's state dict.
PREFIX: Dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "bert_mlm": "bert.encoder.layer",
    "bert": "encoder.layer",
}

# Architectures whose stock config ties the attention width to hidden_size: heads and hidden
# cuts cannot be written as a stock checkpoint.
TIED_ATTENTION_WIDTH = ("gpt_neox", "opt", "gpt2", "bert_mlm", "bert")
GQA = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
MQA = ("gemma",)

# The structure kinds (plus "blocks") each architecture offers.
KINDS: Dict[str, frozenset] = {
    **{arch: frozenset({"kv_groups", "query_heads", "channels", "hidden", "blocks"}) for arch in GQA},
    "gemma": frozenset({"query_heads", "channels", "hidden", "blocks"}),
    **{arch: frozenset({"heads", "channels", "hidden", "blocks"}) for arch in ("gpt_neox", "opt", "gpt2", "bert_mlm")},
    # BertModel returns the hidden state itself: the residual channels are a model output.
    "bert": frozenset({"heads", "channels", "blocks"}),
}

# The kinds a stock config cannot express.
NOT_EXPRESSIBLE: Dict[str, frozenset] = {
    arch: KINDS[arch] & {"heads", "hidden"} if arch in TIED_ATTENTION_WIDTH else frozenset() for arch in CONFIGS
}
