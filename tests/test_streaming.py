"""Block-by-block execution reproduces full-model autograd exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest



torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from structprune.score.streaming import ActivationStore, ParamStats, StreamedModel, backward_pass, forward_pass  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "model"


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 4096, (4, 24), generator=generator)


@pytest.fixture(scope="module")
def full_model() -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32, attn_implementation="sdpa").eval()


def streamed_stats(ids: torch.Tensor, *, micro_batch: int, fisher: bool, budget: int = 1 << 30) -> Dict[str, ParamStats]:
    model = StreamedModel(DEMO, blocks_prefix="model.layers")
    store = ActivationStore(budget)
    stats: Dict[str, ParamStats] = {}
    try:
        streamed = forward_pass(model, ids, micro_batch=micro_batch, store=store)
        # The statistics are the loaded block's own tensors, valid during the call: keep copies.
        backward_pass(model, streamed, fisher=fisher, on_params=lambda block: stats.update(copies(block)))
    finally:
        store.close()
    return stats


def copies(block: Dict[str, ParamStats]) -> Dict[str, ParamStats]:
    return {
        name: ParamStats(name, s.weight.clone(), None if s.grad is None else s.grad.clone(), None if s.fisher is None else s.fisher.clone())
        for name, s in block.items()
    }


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    scale = want.abs().max().item() or 1.0
    worst = (got - want).abs().max().item() / scale
    assert worst <= tol, f"{name}: relative difference {worst:.2e}"


@pytest.mark.parametrize("micro_batch", [1, 3, 4])
def test_gradients_equal_full_autograd(full_model: torch.nn.Module, batch: torch.Tensor, micro_batch: int) -> None:
    full_model.zero_grad()
    full_model(input_ids=batch, labels=batch).loss.backward()
    stats = streamed_stats(batch, micro_batch=micro_batch, fisher=False)
    params = dict(full_model.named_parameters())
    assert set(stats) == set(params)
    for name, param in params.items():
        assert_close_relative(stats[name].grad, param.grad, name)
        assert torch.equal(stats[name].weight, param.detach())


def test_fisher_is_mean_squared_per_sample_gradient(full_model: torch.nn.Module, batch: torch.Tensor) -> None:
    params = dict(full_model.named_parameters())
    squares = {n: torch.zeros_like(p) for n, p in params.items()}
    for sample in batch:
        full_model.zero_grad()
        full_model(input_ids=sample[None], labels=sample[None]).loss.backward()
        for n, p in params.items():
            squares[n] += p.grad.square()
    stats = streamed_stats(batch, micro_batch=1, fisher=True)
    for name in params:
        assert_close_relative(stats[name].fisher, squares[name] / len(batch), name, tol=1e-4)


def test_spilled_activations_give_the_same_gradients(batch: torch.Tensor) -> None:
    in_memory = streamed_stats(batch, micro_batch=2, fisher=False)
    spilled = streamed_stats(batch, micro_batch=2, fisher=False, budget=0)
    for name, stats in in_memory.items():
        assert torch.equal(stats.grad, spilled[name].grad), name


def test_second_order_needs_single_sample_micro_batches(batch: torch.Tensor) -> None:
    from structprune.errors import StreamingError

    model = StreamedModel(DEMO, blocks_prefix="model.layers")
    store = ActivationStore()
    try:
        streamed = forward_pass(model, batch, micro_batch=2, store=store)
        with pytest.raises(StreamingError, match="one sample per micro-batch"):
            backward_pass(model, streamed, fisher=True, on_params=lambda stats: None)
    finally:
        store.close()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_untied_models_read_each_embedding_only_where_it_is_used(arch: str, tmp_path: Path) -> None:
    """The token lookup is read for ``embed`` only and the head for the loss only (each is as
    large as a block on a 7B model); the gradients still equal full-model autograd."""
    from arch_configs import CONFIGS, PREFIX

    config = CONFIGS[arch]()
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    full = getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.float32).eval()
    full.save_pretrained(tmp_path)
    ids = torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    full(input_ids=ids, labels=ids).loss.backward()

    model = StreamedModel(tmp_path, blocks_prefix=PREFIX[arch])
    lookup = next(n for n, p in model.shell.named_parameters() if p is model.shell.get_input_embeddings().weight)
    head = next(n for n, p in model.shell.named_parameters() if p is model.shell.get_output_embeddings().weight)
    reads: list = []
    read = model._read
    model._read = lambda name: reads.append(name) or read(name)  # type: ignore[method-assign]
    store = ActivationStore(0)
    stats: Dict[str, ParamStats] = {}
    try:
        streamed = forward_pass(model, ids, micro_batch=2, store=store)
        assert lookup in reads and head not in reads
        reads.clear()
        backward_pass(model, streamed, fisher=False, on_params=lambda block: stats.update(copies(block)), outside=False)
        assert head in reads and lookup not in reads
    finally:
        store.close()
    for name, param in full.named_parameters():
        if name.startswith(PREFIX[arch] + "."):
            assert_close_relative(stats[name].grad, param.grad, name)


def test_backward_frees_the_saved_inputs_it_has_used(batch: torch.Tensor) -> None:
    model = StreamedModel(DEMO, blocks_prefix="model.layers")
    store = ActivationStore()
    try:
        streamed = forward_pass(model, batch, micro_batch=2, store=store)
        last_outputs = sum(store.get((model.num_blocks, m), model.device).numel() * 4 for m in range(2))
        assert store.in_memory == (model.num_blocks + 1) * last_outputs
        backward_pass(model, streamed, fisher=False, on_params=lambda block: None)
        # Only the last block's outputs stay (the pass through the head reads them); no saved
        # tensor was made to require or hold a gradient.
        assert store.in_memory == last_outputs
        for m in range(2):
            kept = store.get((model.num_blocks, m), model.device)
            assert kept.grad is None and not kept.requires_grad
    finally:
        store.close()


def test_a_forward_only_pass_keeps_one_boundary_of_activations(batch: torch.Tensor) -> None:
    """Without a backward pass to follow (forward-only estimators), a block's saved inputs leave
    memory once it ran: what is held at the end is the last block's outputs, whatever the depth."""
    model = StreamedModel(DEMO, blocks_prefix="model.layers")
    store = ActivationStore()
    try:
        forward_pass(model, batch, micro_batch=2, store=store, keep_inputs=False)
        last_outputs = sum(store.get((model.num_blocks, m), model.device).numel() * 4 for m in range(2))
        assert store.in_memory == last_outputs
    finally:
        store.close()


def _gemma3() -> object:
    # Five sliding-window blocks, then one of full attention with its own rotary base (Gemma 3's pattern).
    return transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        architectures=["Gemma3ForCausalLM"],
    )


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_blocks_of_several_attention_kinds_get_their_own_mask_and_rotary_table(arch: str, tmp_path: Path) -> None:
    """``layer_types`` mixing sliding-window and full attention: every block runs with its own
    kind's mask (and, in Gemma 3, rotary table), so the gradients equal full-model autograd on
    windows longer than the sliding window."""
    from arch_configs import CONFIGS

    config = _gemma3() if arch == "gemma3" else CONFIGS[arch]()
    assert len(set(config.layer_types)) == 2 and config.sliding_window < 16
    torch.manual_seed(0)
    full = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in full.parameters():  # large weights, so that attention reaches past the window
            parameter.normal_(0.0, 0.2)
    full.save_pretrained(tmp_path)
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    full(input_ids=ids, labels=ids).loss.backward()

    model = StreamedModel(tmp_path, blocks_prefix="model.layers")
    store = ActivationStore(1 << 30)
    stats: Dict[str, ParamStats] = {}
    try:
        streamed = forward_pass(model, ids, micro_batch=2, store=store)
        backward_pass(model, streamed, fisher=False, on_params=lambda block: stats.update(copies(block)))
    finally:
        store.close()
    for name, param in full.named_parameters():
        assert_close_relative(stats[name].grad, param.grad, name)


# Blocks the modeling code builds differently from their index: DeepSeek-V3's dense first block
# before MoE ones, Qwen2-MoE's mlp_only_layers, Qwen3-MoE's decoder_sparse_step (every second block MoE).
MIXED_BLOCKS = {
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        norm_topk_prob=True, routed_scaling_factor=2.5, pad_token_id=0, eos_token_id=0, bos_token_id=0,
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[0], pad_token_id=0, eos_token_id=0, bos_token_id=0,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        moe_intermediate_size=16, num_experts=5, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[], head_dim=8,
        pad_token_id=0, eos_token_id=0, bos_token_id=0,
    ),
}


@pytest.mark.parametrize("arch", sorted(MIXED_BLOCKS))
def test_blocks_built_differently_by_index_stream_through_their_own_representative(arch: str, tmp_path: Path) -> None:
    """Blocks whose weights differ by layer index (dense and mixture-of-experts blocks) each run in
    a block built as the model builds theirs, holding one block's weights at a time: the loss and
    every gradient equal full-model autograd."""
    config = MIXED_BLOCKS[arch]()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(1, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    want = full(input_ids=ids, labels=ids).loss
    want.backward()

    model = StreamedModel(tmp_path, blocks_prefix="model.layers")
    kinds = {type(model.block_of(i).mlp).__name__ for i in range(model.num_blocks)}
    assert len(kinds) == 2, kinds
    store = ActivationStore(1 << 30)
    stats: Dict[str, ParamStats] = {}
    loaded: list[int] = []
    try:
        streamed = forward_pass(model, ids, micro_batch=2, store=store)
        got = backward_pass(
            model, streamed, fisher=False, on_params=lambda block: stats.update(copies(block)),
            on_load=lambda index: loaded.append(sum(p.numel() for m in model.representatives for p in m.parameters())),
        )
    finally:
        store.close()
    assert got == pytest.approx(float(want.detach()), rel=1e-5)
    # Only the loaded block's weights are allocated among the representatives.
    assert loaded == [sum(p.numel() for n, p in full.named_parameters() if n.startswith(f"model.layers.{i}.")) for i in reversed(range(model.num_blocks))]
    for name, param in full.named_parameters():
        assert_close_relative(stats[name].grad, param.grad, name)
