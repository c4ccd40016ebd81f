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


def test_no_block_weight_gets_a_gradient(lora_model: Tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    merged, _, _ = lora_model
    seen: List[Tuple[str, bool]] = []
    collect = streaming._GradTracker.stats

    def spying(self: Any, samples: int) -> Any:  # right after a block's backward, before any release
        seen.extend((name, p.grad is not None or p.requires_grad) for name, p in self.params.items())
        return collect(self, samples)

    monkeypatch.setattr(streaming._GradTracker, "stats", spying)
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
