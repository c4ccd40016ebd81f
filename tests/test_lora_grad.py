"""``lora-grad`` (LoRAPrune): unit scores from the gradients of LoRA adapters, on a tiny random Llama
built here. The scores of a checkpoint with a trained adapter merged in equal LoRAPrune's formula
computed from a peft LoRA model's own adapter gradients; no block weight gets a gradient; the
command line prunes with it and lists it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

from structprune import SettingError  # noqa: E402
from structprune.cli import main  # noqa: E402
from structprune.prune import PruneOptions, check_options  # noqa: E402
from structprune.recover import iterative  # noqa: E402
from structprune.score import streaming  # noqa: E402
from structprune.score.importance import estimator  # noqa: E402
from structprune.score.scorer import score  # noqa: E402
from structprune.score.streaming import StreamedModel  # noqa: E402
from structprune.tracing.graph import trace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
CALIB = ROOT / "demo" / "text" / "calib.txt"
HEADS, KV_HEADS, HEAD_DIM, CHANNELS, LAYERS, RANK, ALPHA = 4, 2, 8, 24, 2, 4, 8.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config() -> Any:
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=CHANNELS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        num_hidden_layers=LAYERS, vocab_size=64, max_position_embeddings=32, architectures=["LlamaForCausalLM"],
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path, Any]:
    """A peft LoRA model on a random Llama with random A and B (B ≠ 0, as after fine-tuning), in
    float64; the checkpoint with the adapter merged into it, and the adapter as peft saves it."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config()).double()
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.mul_(8.0 if parameter.dim() == 2 else 1.0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LINEARS), lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
    directory = tmp_path_factory.mktemp("lora-grad")
    lora.save_pretrained(directory / "adapter")
    copy.deepcopy(lora).merge_and_unload().save_pretrained(directory / "merged")  # W + s·B·A; ``lora`` keeps its adapters
    return directory / "merged", directory / "adapter", lora


def _importance(layer: torch.nn.Module, module: str, scaling: float) -> torch.Tensor:
    """LoRAPrune's |(W + s·B·A) ⊙ (G_B·A + B·G_A − G_B·G_A)| of one peft LoRA linear layer."""
    linear = layer.get_submodule(module)
    a, b = linear.lora_A["default"].weight, linear.lora_B["default"].weight
    effective = linear.base_layer.weight + scaling * b @ a
    return (effective * (b.grad @ a + b @ a.grad - b.grad @ a.grad)).abs().detach()


def _reference_scores(lora: Any, batch: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Per layer, the MLP channels' and the KV groups' scores: each unit's sum over its weights in
    every member (gate and up rows, down columns; k, v and its query heads' q rows, o columns)."""
    lora.zero_grad()
    lora(input_ids=batch, labels=batch).loss.backward()
    scaling = ALPHA / RANK
    rep = HEADS // KV_HEADS
    out = []
    for layer in lora.base_model.model.model.layers:
        i = {name: _importance(layer, ("self_attn." if name[0] in "qkvo" else "mlp.") + name, scaling) for name in LINEARS}
        channels = i["gate_proj"].sum(1) + i["up_proj"].sum(1) + i["down_proj"].sum(0)
        groups = torch.stack([
            i["k_proj"][g * HEAD_DIM:(g + 1) * HEAD_DIM].sum() + i["v_proj"][g * HEAD_DIM:(g + 1) * HEAD_DIM].sum()
            + i["q_proj"][g * rep * HEAD_DIM:(g + 1) * rep * HEAD_DIM].sum() + i["o_proj"][:, g * rep * HEAD_DIM:(g + 1) * rep * HEAD_DIM].sum()
            for g in range(KV_HEADS)
        ])
        out.append({"channels": channels, "kv_groups": groups})
    return out


def test_scores_are_loraprunes_criterion_from_the_adapters_gradients(lora_model: Tuple[Path, Path, Any]) -> None:
    merged, adapter, lora = lora_model
    batch = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    graph = trace(merged)
    streamed = StreamedModel(merged, dtype=torch.float64, blocks_prefix="model.layers")
    scores = score(streamed, graph, estimator("lora-grad", lora_adapter=adapter), batch, micro_batch=2, kinds=["query_heads", "kv_groups", "channels"])
    reference = _reference_scores(lora, batch)
    checked = []
    for s in graph.structures:
        if s.kind in ("channels", "kv_groups"):
            expected = reference[s.layer][s.kind].numpy()
            assert scores.units[s.id] == pytest.approx(expected, rel=1e-7), s.kind
            checked.append(s.kind)
    assert sorted(checked) == ["channels", "channels", "kv_groups", "kv_groups"]


def _block_weights_with_gradients(monkeypatch: pytest.MonkeyPatch) -> List[Tuple[str, bool]]:
    """Filled, as scoring runs, with each block weight's name and whether it has (or asks for) a
    gradient, seen right after the block's backward, before anything is released."""
    seen: List[Tuple[str, bool]] = []
    collect = streaming._GradTracker.stats

    def spying(self: Any, samples: int) -> Any:
        seen.extend((name, p.grad is not None or p.requires_grad) for name, p in self.params.items())
        return collect(self, samples)

    monkeypatch.setattr(streaming._GradTracker, "stats", spying)
    return seen


def test_no_block_weight_gets_a_gradient(lora_model: Tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    merged, _, _ = lora_model
    seen = _block_weights_with_gradients(monkeypatch)
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    streamed = StreamedModel(merged, blocks_prefix="model.layers")
    scores = score(streamed, trace(merged), estimator("lora-grad"), batch, kinds=["query_heads", "kv_groups", "channels"])
    assert len(seen) == LAYERS * len(dict(streamed.block.named_parameters())) and not any(has for _, has in seen)
    assert all((values > 0).all() for values in scores.units.values())  # fresh probes (A and B random) score every unit


def test_refusals_name_the_option(lora_model: Tuple[Path, Path, Any]) -> None:
    merged, adapter, _ = lora_model
    with pytest.raises(SettingError, match="--structures") as hidden:
        check_options(PruneOptions(ratio=0.2, importance="lora-grad", structures=("hidden",), calib=CALIB))
    assert hidden.value.option == "--structures"
    with pytest.raises(SettingError, match="--lora-adapter"):
        check_options(PruneOptions(ratio=0.2, importance="taylor", calib=CALIB, lora_adapter=adapter))
    with pytest.raises(SettingError, match="no peft adapter"):
        check_options(PruneOptions(ratio=0.2, importance="lora-grad", calib=CALIB, lora_adapter=merged))


def test_cli_passes_the_adapter_and_refuses_it_where_nothing_reads_it(lora_model: Tuple[Path, Path, Any]) -> None:
    merged, adapter, _ = lora_model
    common = ["prune", str(DEMO), "--ratio", "0.2", "--calib", str(CALIB), "--samples", "2", "--seq-len", "16", "--dry-run"]
    with_taylor = CliRunner().invoke(main, [*common, "--importance", "taylor", "--lora-adapter", str(adapter)])
    assert with_taylor.exit_code == 2 and "--lora-adapter: is the adapter whose gradients lora-grad reads" in with_taylor.output
    no_adapter = CliRunner().invoke(main, [*common, "--importance", "lora-grad", "--lora-adapter", str(merged)])
    assert no_adapter.exit_code == 2 and "holds no peft adapter" in no_adapter.output, no_adapter.output
    # The demo model's modules are not those the adapter was trained on: refused by name, not a traceback.
    wrong_model = CliRunner().invoke(main, [*common, "--importance", "lora-grad", "--lora-adapter", str(adapter)])
    assert wrong_model.exit_code == 2 and "--lora-adapter" in wrong_model.output, wrong_model.output


def test_prune_with_lora_grad_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    output = tmp_path / "out"
    arguments = ["prune", str(DEMO), "-o", str(output), "--ratio", "0.2", "--importance", "lora-grad", "--calib", str(CALIB), "--samples", "4", "--seq-len", "32"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(output)
    logits = model(torch.zeros((1, 5), dtype=torch.long)).logits
    assert torch.isfinite(logits).all()
    assert model.config.intermediate_size < 512


def test_help_lists_lora_grad() -> None:
    result = CliRunner().invoke(main, ["prune", "--help"], terminal_width=10_000)
    assert result.exit_code == 0 and "lora-grad (LoRAPrune:" in result.output


def test_iterations_score_with_the_adapters_recovery_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``prune --iterations 2 --recover-steps N --importance lora-grad``: the second step reads the
    adapter the recovery after the first one trained (present, of that recovery's rank)."""
    model = tmp_path / "model"
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((DEMO / name).read_bytes())
    adapters: List[Any] = []
    real = iterative.make_plan

    def recording(source: Path, options: PruneOptions, **kwargs: Any) -> Any:
        adapter = options.lora_adapter
        adapters.append(None if adapter is None else json.loads((adapter / "adapter_config.json").read_text())["r"])
        return real(source, options, **kwargs)

    monkeypatch.setattr(iterative, "make_plan", recording)
    options = PruneOptions(ratio=0.1, importance="lora-grad", structures=("mlp",), calib=CALIB, samples=4, seq_len=32, micro_batch=2)
    result = iterative.prune_iteratively(model, tmp_path / "out", options, iterative.IterativeOptions(iterations=2, recover_steps=1, recover_batch_size=4))
    assert adapters == [None, 16]  # step 1: fresh probes; step 2: the recovery's adapter (rank 16)
    assert result.removed_fraction == pytest.approx(0.1, abs=0.02)
    assert not (tmp_path / ".out.structprune-iterative").exists()


# Stacked expert weights: one probe per expert, recomputed through the experts module by a hook.
# Over the demo tokenizer's 4096 tokens, which the prune test calibrates with.
MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=4096, hidden_size=32, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=5, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    ),
}


@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def moe_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Any]:
    torch.manual_seed(0)
    # grouped_mm, transformers' default experts kernel, has no float64 one.
    model = transformers.AutoModelForCausalLM.from_config(MOE_CONFIGS[request.param](), dtype=torch.float64, experts_implementation="eager")
    path = tmp_path_factory.mktemp(f"lora-grad-{request.param}") / "model"
    model.save_pretrained(path)
    return path, model


def _stacked_criteria(model: Any, batch: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Per layer, LoRAPrune's criterion |W ⊙ (G_B·A + B·G_A − G_B·G_A)| of each stacked expert
    weight, ``[E, rows, cols]``, from autograd through a model whose expert weights carry the
    probes the scorer draws (``fresh_probe``; scale 1) at zero value, as the scorer's do."""
    from structprune.score.lora_probes import fresh_probe

    probes: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    weights: Dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            a, b = (t.requires_grad_(True) for t in fresh_probe(0, name, 16, tuple(parameter.shape)))
            probes[name] = (a, b)
            product = b @ a  # fresh probes sit at the block's weights: W + B·A − (B·A).detach()
            weights[name] = parameter.detach() + (product - product.detach())
    loss = torch.func.functional_call(model, weights, (), {"input_ids": batch, "labels": batch}, strict=False).loss
    loss.backward()
    layers: List[Dict[str, torch.Tensor]] = [{} for _ in model.model.layers]
    for name, (a, b) in probes.items():
        criterion = (weights[name] * (b.grad @ a + b @ a.grad - b.grad @ a.grad)).abs().detach()
        layers[int(name.split(".")[2])][name.rsplit(".", 1)[1]] = criterion
    return layers


def test_expert_channels_and_experts_score_loraprunes_criterion_of_per_expert_adapters(moe_model: Tuple[Path, Any]) -> None:
    path, model = moe_model
    batch = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(3))
    graph = trace(path)
    streamed = StreamedModel(path, dtype=torch.float64, blocks_prefix="model.layers")
    scores = score(streamed, graph, estimator("lora-grad"), batch, micro_batch=2, kinds=["experts", "expert_channels"])
    reference = _stacked_criteria(model, batch)
    checked = []
    for s in graph.structures:
        if s.kind not in ("experts", "expert_channels"):
            continue
        gate_up, down = reference[s.layer]["gate_up_proj"], reference[s.layer]["down_proj"]
        width = down.shape[2]
        if s.kind == "experts":  # the router's row has no adapter: it scores zero
            expected = gate_up.sum(dim=(1, 2)) + down.sum(dim=(1, 2))
        else:  # channel c: rows c (gate) and width + c (up) of gate_up, column c of down, in every expert
            expected = gate_up[:, :width].sum(dim=(0, 2)) + gate_up[:, width:].sum(dim=(0, 2)) + down.sum(dim=(0, 1))
        assert scores.units[s.id] == pytest.approx(expected.numpy(), rel=1e-6), (s.kind, s.layer)
        checked.append(s.kind)
    assert sorted(checked) == ["expert_channels"] * 2 + ["experts"] * 2


def test_expert_adapters_leave_the_loss_and_the_expert_weights_untouched(moe_model: Tuple[Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = moe_model
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    graph = trace(path)
    plain = score(StreamedModel(path, dtype=torch.float64, blocks_prefix="model.layers"), graph, estimator("taylor"), batch, kinds=["expert_channels"])
    seen = _block_weights_with_gradients(monkeypatch)
    with_probes = score(StreamedModel(path, dtype=torch.float64, blocks_prefix="model.layers"), graph, estimator("lora-grad"), batch, kinds=["expert_channels"])
    assert with_probes.loss == pytest.approx(plain.loss, rel=1e-12)  # the adapters add exactly zero
    assert any(name.endswith("experts.down_proj") for name, _ in seen) and not any(has for _, has in seen)


def test_prune_expert_channels_with_lora_grad_writes_a_loadable_checkpoint(moe_model: Tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = moe_model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((DEMO / name).read_bytes())
    output = tmp_path / "out"
    arguments = [
        "prune", str(path), "-o", str(output), "--ratio", "0.02", "--structures", "expert-channels", "--importance", "lora-grad",
        "--no-reconstruct", "--calib", str(CALIB), "--samples", "4", "--seq-len", "16",
    ]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    pruned = transformers.AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    before = transformers.AutoConfig.from_pretrained(path)
    key = "moe_intermediate_size" if hasattr(before, "moe_intermediate_size") else "intermediate_size"
    assert getattr(pruned.config, key) < getattr(before, key)
    assert torch.isfinite(pruned(torch.zeros((1, 5), dtype=torch.long)).logits).all()
