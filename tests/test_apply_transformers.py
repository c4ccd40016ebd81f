"""End to end with transformers: a cut plan applied on disk must give the same model as the
same cuts done in memory with torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structprune
from ckpt import INDEX_FILE, plan_dict, tree_hashes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, LAYERS, VOCAB = 64, 4, 2, 16, 128, 2, 100
N_REP = HEADS // KV_HEADS  # consecutive query heads sharing one KV head
KEPT_CHANNELS = 96
# Which KV head each layer loses: all layers must end with the same head count (one config).
REMOVED_KV_HEAD = {0: 1, 1: 0}


@dataclass(frozen=True)
class LayerCut:
    q_rows: list[int]  # rows of q_proj (= columns of o_proj) that stay
    kv_rows: list[int]  # rows of k_proj / v_proj that stay
    channels: list[int]  # MLP channels that stay


def head_rows(heads: list[int]) -> list[int]:
    return [h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)]


def layer_cuts(seed: int = 0) -> dict[int, LayerCut]:
    rng = np.random.default_rng(seed)
    cuts = {}
    for layer, removed in REMOVED_KV_HEAD.items():
        kv_heads = [j for j in range(KV_HEADS) if j != removed]
        q_heads = [h for h in range(HEADS) if h // N_REP != removed]
        channels = sorted(int(c) for c in rng.choice(INTERMEDIATE, KEPT_CHANNELS, replace=False))
        cuts[layer] = LayerCut(head_rows(q_heads), head_rows(kv_heads), channels)
    return cuts


def make_config(**overrides: Any) -> Any:
    settings: dict[str, Any] = dict(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_bias=True,  # biases exercise 1-D cuts
        mlp_bias=True,
    )
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def make_model(config: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    # Default init leaves biases at zero; randomise them so that cutting them matters.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model


def build_plan(cuts: dict[int, LayerCut], biases: bool) -> dict[str, Any]:
    index_sets: dict[str, list[int]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for layer, cut in cuts.items():
        prefix = f"model.layers.{layer}"
        q, kv, mlp = f"{prefix}.q", f"{prefix}.kv", f"{prefix}.mlp"
        index_sets.update({q: cut.q_rows, kv: cut.kv_rows, mlp: cut.channels})
        rows = {"q_proj": q, "k_proj": kv, "v_proj": kv}
        for proj, index_set in rows.items():
            tensors[f"{prefix}.self_attn.{proj}.weight"] = {"keep": {"0": index_set}}
        tensors[f"{prefix}.self_attn.o_proj.weight"] = {"keep": {"1": q}}
        for proj in ("gate_proj", "up_proj"):
            tensors[f"{prefix}.mlp.{proj}.weight"] = {"keep": {"0": mlp}}
        tensors[f"{prefix}.mlp.down_proj.weight"] = {"keep": {"1": mlp}}
        if biases:
            for proj, index_set in rows.items():
                tensors[f"{prefix}.self_attn.{proj}.bias"] = {"keep": {"0": index_set}}
            for proj in ("gate_proj", "up_proj"):
                tensors[f"{prefix}.mlp.{proj}.bias"] = {"keep": {"0": mlp}}
    config = {
        "num_attention_heads": HEADS - N_REP,
        "num_key_value_heads": KV_HEADS - 1,
        "intermediate_size": KEPT_CHANNELS,
        "head_dim": HEAD_DIM,
    }
    return plan_dict(tensors, index_sets=index_sets, config=config, metadata={"test": "llama"})


def slice_linear(linear: Any, dim: int, keep: list[int]) -> None:
    """Keep `keep` along weight dim `dim` (0 = outputs, 1 = inputs) of an nn.Linear in place."""
    index = torch.tensor(keep, dtype=torch.long)
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight.index_select(dim, index).clone())
        if dim == 0 and linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.index_select(0, index).clone())
    if dim == 0:
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def prune_in_memory(model: Any, cuts: dict[int, LayerCut]) -> None:
    for layer, cut in cuts.items():
        block = model.model.layers[layer]
        attn, mlp = block.self_attn, block.mlp
        slice_linear(attn.q_proj, 0, cut.q_rows)
        slice_linear(attn.k_proj, 0, cut.kv_rows)
        slice_linear(attn.v_proj, 0, cut.kv_rows)
        slice_linear(attn.o_proj, 1, cut.q_rows)
        slice_linear(mlp.gate_proj, 0, cut.channels)
        slice_linear(mlp.up_proj, 0, cut.channels)
        slice_linear(mlp.down_proj, 1, cut.channels)
        mlp.intermediate_size = KEPT_CHANNELS
        # Heads and KV heads halve together, so num_key_value_groups and head_dim stay as they are.
        assert attn.num_key_value_groups == N_REP and attn.head_dim == HEAD_DIM
    model.config.num_attention_heads = HEADS - N_REP
    model.config.num_key_value_heads = KV_HEADS - 1
    model.config.intermediate_size = KEPT_CHANNELS


def logits(model: Any) -> Any:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def load(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def roundtrip(tmp_path: Path, config: Any, *, save_kwargs: dict[str, Any], apply_kwargs: dict[str, Any], biases: bool) -> tuple[Any, Any, Path]:
    """Save a random model, apply the plan on disk, prune the in-memory copy; return both
    pruned models and the output dir."""
    model = make_model(config)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, **save_kwargs)
    before = tree_hashes(model_dir)
    cuts = layer_cuts()
    structprune.apply_plan(model_dir, build_plan(cuts, biases), tmp_path / "pruned", **apply_kwargs)
    assert tree_hashes(model_dir) == before
    original = logits(model)
    prune_in_memory(model, cuts)
    expected = logits(model)
    # Sanity: the cuts do change the function, so equality below is not vacuous.
    assert not torch.allclose(original, expected, atol=1e-3)
    return model, load(tmp_path / "pruned"), tmp_path / "pruned"


def assert_config_patched(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == HEADS - N_REP
    assert config["num_key_value_heads"] == KV_HEADS - 1
    assert config["intermediate_size"] == KEPT_CHANNELS
    assert config["head_dim"] == HEAD_DIM
    assert config["hidden_size"] == HIDDEN


def test_llama_gqa_and_mlp_pruning(tmp_path: Path) -> None:
    config = make_config(attn_implementation="eager")
    reference, loaded, out = roundtrip(tmp_path, config, save_kwargs={}, apply_kwargs={}, biases=True)
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-5, rtol=0)
    assert_config_patched(out)
    attn = loaded.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2 * HEAD_DIM, HIDDEN)
    assert attn.k_proj.weight.shape == (HEAD_DIM, HIDDEN)
    assert loaded.model.layers[1].mlp.down_proj.weight.shape == (HIDDEN, KEPT_CHANNELS)


def test_llama_tied_embeddings(tmp_path: Path) -> None:
    config = make_config(attn_implementation="eager", tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    reference, loaded, out = roundtrip(tmp_path, config, save_kwargs={}, apply_kwargs={"threads": 2}, biases=False)
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-5, rtol=0)
    # The tie survives: the output has no separate lm_head tensor and the loaded model shares it.
    assert "lm_head.weight" not in structprune.read_checkpoint(out).tensors
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_llama_sharded_input_and_output(tmp_path: Path) -> None:
    config = make_config(attn_implementation="eager")
    reference, loaded, out = roundtrip(
        tmp_path,
        config,
        save_kwargs={"max_shard_size": "100KB"},
        apply_kwargs={"max_shard_size": "150KB", "memory_budget": "4KiB", "threads": 3},
        biases=True,
    )
    assert (tmp_path / "model" / INDEX_FILE).exists(), "input was meant to be sharded"
    assert len(structprune.read_checkpoint(tmp_path / "model").shards) > 1
    assert (out / INDEX_FILE).exists()
    assert len(structprune.read_checkpoint(out).shards) > 1
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-5, rtol=0)
    assert_config_patched(out)
    # Files save_pretrained writes besides weights and config are copied.
    generation = tmp_path / "model" / "generation_config.json"
    if generation.exists():
        assert (out / "generation_config.json").read_bytes() == generation.read_bytes()
