"""Encoders end to end on tiny random BERT, RoBERTa and DistilBERT models: calibration passages,
gradient scores (taylor), heads and MLP channels removed (the output equals the original with the
removed units switched off, and loads), the stock refusal for heads, sentence pooling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

import structprune  # noqa: E402
from structprune import PlanError, apply_plan  # noqa: E402
from structprune.models.loading import load_pruned  # noqa: E402
from structprune.models.sentence import Pooling, distillation_loss, pool, probe_directions, read_pooling  # noqa: E402
from structprune.plan.cuts import Selection, checkpoint_cut_plan  # noqa: E402
from structprune.prune import PruneOptions, make_plan  # noqa: E402
from structprune.score.calibration import attention_mask, calibration_batch, passage_batch, separates_passages  # noqa: E402

WORDS = "the a of to and in is it for on with as by that this be are from at or".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = len(SPECIAL) + len(WORDS)
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + 9 * (i % 4))) for i in range(12)]
ATOL = 1e-5


def _configs() -> Dict[str, Callable[[], Any]]:
    common: Dict[str, Any] = dict(vocab_size=VOCAB, max_position_embeddings=72, pad_token_id=0)
    return {
        "bert": lambda: transformers.BertConfig(
            hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3, architectures=["BertModel"], **common
        ),
        # RoBERTa's positions start after the pad id: pad 1, so position ids are shifted by 2.
        "roberta": lambda: transformers.RobertaConfig(
            hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3, architectures=["RobertaModel"],
            **{**common, "pad_token_id": 1, "max_position_embeddings": 74},
        ),
        "distilbert": lambda: transformers.DistilBertConfig(
            dim=64, hidden_dim=96, n_heads=4, n_layers=3, architectures=["DistilBertModel"], **common
        ),
    }


CONFIGS = _configs()


def tokenizer() -> Any:
    return transformers.BertTokenizer(vocab={word: i for i, word in enumerate(SPECIAL + WORDS)})


def randomise(model: Any) -> None:
    """Unit-scale weights, so that attention is far from uniform and every removed unit shows."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if isinstance(module, nn.Linear) and name == "weight":
                parameter.data = torch.randn(parameter.shape, generator=generator) / math.sqrt(module.in_features)
            elif parameter.dim() == 1:
                parameter.data += torch.randn(parameter.shape, generator=generator) * 0.2
            else:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5


def save_model(arch: str, path: Path) -> Any:
    config = CONFIGS[arch]()
    model = getattr(transformers, config.architectures[0])._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    randomise(model)
    model.eval()
    model.save_pretrained(path)
    tok = tokenizer()
    if arch == "roberta":
        # The same words; pad id 1 as the config says.
        tok = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)})
    tok.save_pretrained(path)
    return model


def inputs(arch: str) -> Tuple[Any, Any]:
    """Two passages, the second padded: ids and attention mask."""
    pad = CONFIGS[arch]().pad_token_id
    ids = torch.tensor([[2, 5, 9, 7, 12, 6, 3], [2, 8, 11, 3, pad, pad, pad]])
    return ids, attention_mask(ids, pad)


def hidden_states(model: Any, arch: str) -> Any:
    ids, mask = inputs(arch)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1)  # padded positions are not outputs of anything


def per_layer_selection(graph: structprune.StructureGraph) -> Selection:
    """Heads removed in different numbers per layer (1, 2, 1) and a third of every MLP."""
    units = {}
    for layer, structure in enumerate(graph.by_kind("heads")):
        units[structure.id] = [[1], [0, 3], [2]][layer]
    for layer, structure in enumerate(graph.by_kind("channels")):
        units[structure.id] = list(range(layer, structure.units, 3))
    return Selection(units=units)


def masked_original(model: Any, graph: structprune.StructureGraph, selection: Selection) -> Any:
    """A copy of ``model`` with the removed units' output-side weights (the input columns of the
    attention output and MLP down projections) zeroed: what the pruned model must compute."""
    import copy

    masked = copy.deepcopy(model)
    for sid, removed in selection.units.items():
        for member in graph.get(sid).members:
            module_name, _, leaf = member.param.rpartition(".")
            if leaf == "weight" and member.dim == 1 and isinstance(masked.get_submodule(module_name), nn.Linear):
                index = torch.as_tensor(member.indices(removed), dtype=torch.long)
                masked.get_parameter(member.param).data.index_fill_(1, index, 0.0)
    return masked


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_heads_and_mlp_removed_equal_masked_original_and_load(tmp_path: Path, arch: str) -> None:
    model = save_model(arch, tmp_path / "model")
    graph = structprune.trace(tmp_path / "model")
    selection = per_layer_selection(graph)
    plan = checkpoint_cut_plan(tmp_path / "model", graph, selection, layout="auto")
    assert plan.metadata["format"] == "layers"
    apply_plan(tmp_path / "model", plan, tmp_path / "out")
    pruned = load_pruned(tmp_path / "out")
    expected = hidden_states(masked_original(model, graph, selection), arch)
    assert (expected - hidden_states(model, arch)).abs().max() > 1e-3  # the removal shows
    torch.testing.assert_close(hidden_states(pruned, arch), expected, atol=ATOL, rtol=ATOL)
    kept = sum(p.numel() for p in pruned.parameters())
    assert kept < sum(p.numel() for p in model.parameters())
    # A stock loader refuses the per-layer shapes rather than loading them wrongly.
    with pytest.raises((RuntimeError, ValueError, OSError)):
        transformers.AutoModel.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_stock_format_refuses_encoder_heads_and_keeps_mlp_cuts_stock(tmp_path: Path, arch: str) -> None:
    model = save_model(arch, tmp_path / "model")
    graph = structprune.trace(tmp_path / "model")
    heads = Selection(units={s.id: [1] for s in graph.by_kind("heads")})
    with pytest.raises(PlanError, match="pruned_heads.*--format layers.*--structures mlp"):
        checkpoint_cut_plan(tmp_path / "model", graph, heads, layout="stock")
    mlp = Selection(units={s.id: list(range(0, s.units, 4)) for s in graph.by_kind("channels")})
    plan = checkpoint_cut_plan(tmp_path / "model", graph, mlp, layout="auto")
    assert plan.metadata["format"] == "stock"
    apply_plan(tmp_path / "model", plan, tmp_path / "out")
    stock = transformers.AutoModel.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(hidden_states(stock, arch), hidden_states(masked_original(model, graph, mlp), arch), atol=ATOL, rtol=ATOL)


def test_passages_are_single_documents_between_special_tokens_padded() -> None:
    tok = tokenizer()
    assert separates_passages(tok)
    batch = passage_batch(TEXTS, tok, samples=16, seq_len=24, seed=3)
    assert batch.shape == (16, 24)
    assert torch.equal(batch, calibration_batch(TEXTS, tok, samples=16, seq_len=24, seed=3))
    assert torch.equal(batch, passage_batch(TEXTS, tok, samples=16, seq_len=24, seed=3))
    documents = [tok(text, add_special_tokens=False)["input_ids"] for text in TEXTS]
    for row in batch.tolist():
        assert row[0] == tok.cls_token_id
        length = sum(1 for t in row if t != tok.pad_token_id)
        assert row[length - 1] == tok.sep_token_id and all(t == tok.pad_token_id for t in row[length:])
        content = row[1 : length - 1]
        assert any(content == doc[i : i + len(content)] for doc in documents for i in range(len(doc))), content
    assert (attention_mask(batch, tok.pad_token_id) == 0).any()  # short documents are padded
    with pytest.raises(structprune.errors.CalibrationError, match="seq_len 2 leaves no room"):
        passage_batch(TEXTS, tok, samples=1, seq_len=2)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_taylor_scores_an_encoder_without_a_head(tmp_path: Path, arch: str) -> None:
    save_model(arch, tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n<|endoftext|>\n".join(TEXTS), encoding="utf-8")
    options = PruneOptions(ratio=0.2, importance="taylor", calib=calib, samples=8, seq_len=16, structures=("heads", "mlp"), multiple=8, reconstruct=False)
    result = make_plan(tmp_path / "model", options)
    assert result.params_after < result.params_before
    scores = np.concatenate([np.asarray(v) for v in result.scores.units.values()])
    assert np.isfinite(scores).all() and (scores > 0).all()
    again = make_plan(tmp_path / "model", options)
    assert again.widths == result.widths
    assert all(np.array_equal(again.scores.units[sid], values) for sid, values in result.scores.units.items())


def test_pooling_read_from_a_sentence_transformers_folder(tmp_path: Path) -> None:
    assert read_pooling(tmp_path) == Pooling("mean", True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}), encoding="utf-8")
    assert read_pooling(tmp_path) == Pooling("cls", False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}), encoding="utf-8")
    with pytest.raises(structprune.errors.ConfigError, match="exactly one of"):
        read_pooling(tmp_path)
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[2.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(pool(hidden, mask, Pooling("mean", False)), torch.tensor([[2.0, 2.0], [2.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, Pooling("max", False)), torch.tensor([[3.0, 4.0], [2.0, 2.0]]))
    embeddings = pool(hidden, mask, Pooling("cls", True))
    assert distillation_loss(embeddings, embeddings).abs() < 1e-6
    ids = torch.tensor([[2, 5, 3], [2, 6, 3]])
    torch.testing.assert_close(probe_directions(ids, 8)[1:], probe_directions(ids[1:], 8))  # split-independent



def sentence_transformers_folder(path: Path) -> None:
    """Makes ``path`` a sentence-transformers folder: transformer, mean pooling, normalisation."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    (path / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling), encoding="utf-8")


def embeddings_of(model_dir: Path, ids: Any, mask: Any) -> Any:
    with torch.no_grad():
        hidden = load_pruned(model_dir)(input_ids=ids, attention_mask=mask).last_hidden_state
    return pool(hidden, mask, read_pooling(model_dir))


def test_recover_distils_an_encoder_from_the_dense_model_and_keeps_its_folder(tmp_path: Path) -> None:
    from structprune.errors import SettingError
    from structprune.recover.training import RecoverOptions, recover

    dense = tmp_path / "model"
    save_model("bert", dense)
    sentence_transformers_folder(dense)
    graph = structprune.trace(dense)
    apply_plan(dense, checkpoint_cut_plan(dense, graph, per_layer_selection(graph), layout="auto"), tmp_path / "pruned")
    assert (tmp_path / "pruned" / "1_Pooling" / "config.json").is_file()
    calib = tmp_path / "calib.txt"
    calib.write_text("\n<|endoftext|>\n".join(TEXTS * 4), encoding="utf-8")
    options = RecoverOptions(data=calib, teacher=dense, seq_len=16, batch_size=8, max_steps=12, lr=1e-2, warmup_steps=0)
    with pytest.raises(SettingError, match="--teacher DENSE"):
        recover(tmp_path / "pruned", tmp_path / "out", RecoverOptions(data=calib, seq_len=16))
    result = recover(tmp_path / "pruned", tmp_path / "out", options)
    assert np.mean(result.losses[-3:]) < result.losses[0]
    assert (tmp_path / "out" / "1_Pooling" / "config.json").is_file()
    ids, mask = inputs("bert")
    target = embeddings_of(dense, ids, mask)
    before = torch.nn.functional.cosine_similarity(embeddings_of(tmp_path / "pruned", ids, mask), target).mean()
    after = torch.nn.functional.cosine_similarity(embeddings_of(tmp_path / "out", ids, mask), target).mean()
    assert after > before


def test_sentence_transformers_loads_a_stock_mlp_cut(tmp_path: Path) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (test extra)")
    dense = tmp_path / "model"
    save_model("bert", dense)
    sentence_transformers_folder(dense)
    graph = structprune.trace(dense)
    mlp = Selection(units={s.id: list(range(0, s.units, 4)) for s in graph.by_kind("channels")})
    apply_plan(dense, checkpoint_cut_plan(dense, graph, mlp, layout="stock"), tmp_path / "out")
    loaded = sentence_transformers.SentenceTransformer(str(tmp_path / "out"), device="cpu", local_files_only=True)
    texts = [" ".join(WORDS[:5]), " ".join(WORDS[5:8])]
    encoded = torch.as_tensor(loaded.encode(texts, convert_to_numpy=True))
    batch = tokenizer()(texts, padding=True, return_tensors="pt")
    expected = embeddings_of(tmp_path / "out", batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(encoded, expected, atol=ATOL, rtol=ATOL)


def test_streamed_gradients_of_the_probe_loss_equal_full_autograd_with_padding(tmp_path: Path) -> None:
    from structprune.models.sentence import probe_loss
    from structprune.score.streaming import ActivationStore, StreamedModel, backward_pass, forward_pass

    model = save_model("bert", tmp_path / "model")
    sentence_transformers_folder(tmp_path / "model")
    ids = passage_batch(TEXTS, tokenizer(), samples=6, seq_len=24, seed=1)
    mask = attention_mask(ids, 0)
    assert (mask == 0).any() and (mask == 1).any()
    model.zero_grad()
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    probe_loss(pool(hidden, mask, read_pooling(tmp_path / "model")), ids).backward()
    streamed = StreamedModel(tmp_path / "model", blocks_prefix="encoder.layer")
    store = ActivationStore(1 << 30)
    grads: Dict[str, Any] = {}
    try:
        passed = forward_pass(streamed, ids, micro_batch=4, store=store)
        backward_pass(streamed, passed, fisher=False, on_params=lambda block: grads.update({n: s.grad.clone() for n, s in block.items() if s.grad is not None}))
    finally:
        store.close()
    blocks = {name: p.grad for name, p in model.named_parameters() if name.startswith("encoder.layer.")}
    # Relative to the largest gradient: the key biases' gradients are zero up to rounding.
    scale = max(grad.abs().max().item() for grad in blocks.values())
    assert set(blocks) <= set(grads)
    for name, grad in blocks.items():
        assert (grads[name] - grad).abs().max().item() <= 1e-5 * scale, name


def test_sweep_measures_an_encoder_by_embeddings(tmp_path: Path) -> None:
    from structprune.evaluate.sweep import SweepOptions, run_sweep

    save_model("bert", tmp_path / "model")
    heldout = tmp_path / "heldout.txt"
    paragraphs = [text for text in TEXTS if len(text.split()) >= 16]
    heldout.write_text("\n\n".join(paragraphs) + "\n<|endoftext|>\n" + "\n\n".join(reversed(paragraphs)), encoding="utf-8")
    pruning = PruneOptions(ratio=0.2, importance="l2", structures=("heads", "mlp"), multiple=8, reconstruct=False)
    options = SweepOptions(ratios=(0.2, 0.4), importances=("l2",), ppl=heldout, pruning=pruning)
    rows = run_sweep(tmp_path / "model", tmp_path / "sweep", options, progress=False)
    assert [row.importance for row in rows] == ["dense", "l2", "l2"]
    assert rows[0].embedding is not None and rows[0].embedding.mean_cosine == pytest.approx(1.0)
    assert all(row.embedding is not None and row.embedding.mean_cosine < 1.0 and not row.perplexity for row in rows[1:])
    assert rows[2].parameters < rows[1].parameters < rows[0].parameters
    assert "mean cosine" in (tmp_path / "sweep" / "sweep.md").read_text(encoding="utf-8")


def test_module_folders_are_committed_with_the_weights_and_bad_ones_leave_no_output(tmp_path: Path) -> None:
    model = tmp_path / "model"
    save_model("bert", model)
    sentence_transformers_folder(model)
    graph = structprune.trace(model)
    plan = checkpoint_cut_plan(model, graph, per_layer_selection(graph), layout="auto")
    report = apply_plan(model, plan, tmp_path / "out")
    assert "1_Pooling/config.json" in report.copied_files  # 2_Normalize has no folder
    assert (tmp_path / "out" / "1_Pooling" / "config.json").read_bytes() == (model / "1_Pooling" / "config.json").read_bytes()
    (tmp_path / "outside").mkdir()
    (model / "1_Pooling" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(structprune.errors.OutputError, match="not followed"):
        apply_plan(model, plan, tmp_path / "linked")
    (model / "1_Pooling" / "linked").unlink()
    modules = json.loads((model / "modules.json").read_text(encoding="utf-8"))
    modules[1]["path"] = "../outside"
    (model / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    with pytest.raises(structprune.errors.ConfigError, match="outside the model directory"):
        apply_plan(model, plan, tmp_path / "escaped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out", "outside"]  # nothing half-written


def reconstructed_states(model_dir: Path, graph: structprune.StructureGraph, selection: Selection, ids: Any, out: Path, target: str) -> Tuple[Any, Any]:
    """The layer reports of reconstructing ``selection`` towards ``target``, and the last hidden
    states on ``ids`` of the checkpoint written with the refitted weights."""
    from structprune.plan.reconstruct import apply_to_plan, reconstruct, stored_dtype_map
    from structprune.score.streaming import StreamedModel
    from structprune.tracing.export import checkpoint_name_map

    assert graph.blocks is not None
    names = list(structprune.read_checkpoint(model_dir).tensors)
    stored = {model_name: name for name, model_name in checkpoint_name_map(model_dir, names).items()}
    streamed = StreamedModel(model_dir, blocks_prefix=graph.blocks.prefix)
    result = reconstruct(streamed, graph, selection, ids, out.with_suffix(".weights"), stored_names=stored, stored_dtypes=stored_dtype_map(model_dir), target=target, micro_batch=4)
    plan = checkpoint_cut_plan(model_dir, graph, selection, layout="auto")
    apply_to_plan(plan, result)
    apply_plan(model_dir, plan, out)
    mask = attention_mask(ids, load_pruned(out).config.pad_token_id)
    with torch.no_grad():
        return result.layers, load_pruned(out)(input_ids=ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_post_norm_mlp_output_is_fitted_towards_the_dense_block_output(tmp_path: Path, arch: str) -> None:
    """In a post-norm block the MLP's output projection feeds the block's final LayerNorm: the
    ``dense`` target refits it so that the norm's input normalises to the dense block's output
    (found by a probe; the attention output projection, whose norm does not end the block, keeps
    the ``layer`` target), which brings the last hidden states closer to the dense model's than
    the ``layer`` target does."""
    model = save_model(arch, tmp_path / "model")
    graph = structprune.trace(tmp_path / "model")
    selection = per_layer_selection(graph)
    pad = CONFIGS[arch]().pad_token_id
    ids = passage_batch(TEXTS, tokenizer(), samples=16, seq_len=24, seed=1)
    ids[ids == 0] = pad  # the test tokenizer pads with id 0; RoBERTa's pad is 1
    mask = attention_mask(ids, pad)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).last_hidden_state * mask.unsqueeze(-1)
    layer_reports, layer_states = reconstructed_states(tmp_path / "model", graph, selection, ids, tmp_path / "layer", "layer")
    dense_reports, dense_states = reconstructed_states(tmp_path / "model", graph, selection, ids, tmp_path / "dense", "dense")
    assert not any(r.to_block_output for r in layer_reports)
    assert [r.to_block_output for r in dense_reports] == [r.weight.endswith(("output.dense.weight", "lin2.weight")) and "attention" not in r.weight for r in dense_reports]
    assert any(r.to_block_output for r in dense_reports)
    assert float(((dense_states - dense) ** 2).mean()) < float(((layer_states - dense) ** 2).mean())


def test_hidden_channels_of_an_encoder_are_refused_as_pinned(tmp_path: Path) -> None:
    """An encoder's hidden states are its output (the embeddings), so no hidden structure exists:
    asking for one is a PlanError that says so, not a failure inside the planner."""
    save_model("bert", tmp_path / "model")
    options = PruneOptions(ratio=0.2, importance="l2", structures=("hidden",), reconstruct=False)
    with pytest.raises(PlanError, match="hidden width is pinned"):
        make_plan(tmp_path / "model", options)
