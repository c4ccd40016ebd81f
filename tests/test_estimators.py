"""The estimators that need more than one parameter's statistics, on a tiny random Llama built
here: ``head-gate`` (gates on units' outputs, |∂L/∂ξ| per sample) against finite differences of
each sample's loss in a plain transformers model in float64, and ``bonsai`` (losses of sub-models
with random units masked, regressed on the masks) against sub-models measured here; ``entropy``'s
formula."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from structprune import SettingError  # noqa: E402
from structprune.score.distributed import SINGLE  # noqa: E402
from structprune.score.importance import ActivationStats, Bonsai, estimator  # noqa: E402
from structprune.score.scorer import _Folder, _MaskedScoring, score  # noqa: E402
from structprune.score.streaming import ActivationStore, ParamStats, StreamedModel  # noqa: E402
from structprune.tracing.graph import trace  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, CHANNELS, LAYERS = 4, 2, 8, 24, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=CHANNELS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        num_hidden_layers=LAYERS, vocab_size=64, max_position_embeddings=32, architectures=["LlamaForCausalLM"],
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gates")
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so that every head matters
        for parameter in model.parameters():
            parameter.mul_(8.0 if parameter.dim() == 2 else 1.0)
    model.save_pretrained(directory)
    return directory


def _in_float64(model: "transformers.PreTrainedModel") -> "transformers.PreTrainedModel":
    """``model`` with its RMS norms computed in float64: transformers' compute in float32 whatever
    the dtype, whose rounding would swamp a finite difference of the loss."""

    def forward(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return norm.weight * hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + norm.variance_epsilon)

    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = forward.__get__(module)
    return model


def _sample_losses(model: "transformers.PreTrainedModel", batch: torch.Tensor) -> torch.Tensor:
    """Each sample's mean next-token loss, in float64 (transformers' own loss is cast to float32,
    too coarse for finite differences)."""
    with torch.no_grad():
        logits = model(input_ids=batch).logits.double()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
    return losses.mean(dim=1)


def _scaled(model: "transformers.PreTrainedModel", module: torch.nn.Module, columns: slice, factor: float, batch: torch.Tensor) -> torch.Tensor:
    """Per-sample losses with ``module``'s input columns (one unit's output) multiplied by ``factor``."""

    def scale(_module: torch.nn.Module, inputs: tuple) -> tuple:
        x = inputs[0].clone()
        x[..., columns] *= factor
        return (x,)

    handle = module.register_forward_pre_hook(scale)
    try:
        return _sample_losses(model, batch)
    finally:
        handle.remove()


def _gate_derivatives(model: "transformers.PreTrainedModel", module: torch.nn.Module, columns: slice, batch: torch.Tensor) -> torch.Tensor:
    step = 1e-6
    return (_scaled(model, module, columns, 1 + step, batch) - _scaled(model, module, columns, 1 - step, batch)) / (2 * step)


def test_head_gate_is_the_mean_absolute_finite_difference_of_each_samples_loss(tiny: Path) -> None:
    graph = trace(tiny)
    batch = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    streamed = StreamedModel(tiny, dtype=torch.float64, blocks_prefix="model.layers")
    scores = score(streamed, graph, estimator("head-gate"), batch, micro_batch=2, kinds=["query_heads", "kv_groups", "channels"])
    reference = _in_float64(transformers.LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float64).eval())
    rep = HEADS // KV_HEADS
    checked: List[str] = []
    for s in graph.structures:
        if s.kind == "hidden":
            continue
        layer = reference.model.layers[s.layer]
        if s.kind == "query_heads":  # per KV group g and slot r: query head g·rep + r
            for head in range(HEADS):
                columns = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                expected = float(_gate_derivatives(reference, layer.self_attn.o_proj, columns, batch).abs().mean())
                assert scores.per_group[s.id][head // rep, head % rep] == pytest.approx(expected, rel=1e-5, abs=1e-9)
            checked.append(s.kind)
        elif s.kind == "channels":
            for channel in (0, 7, CHANNELS - 1):
                expected = float(_gate_derivatives(reference, layer.mlp.down_proj, slice(channel, channel + 1), batch).abs().mean())
                assert scores.units[s.id][channel] == pytest.approx(expected, rel=1e-5, abs=1e-9)
            checked.append(s.kind)
        elif s.kind == "kv_groups":  # a KV group's gate scales all its query heads' outputs at once
            for group in range(KV_HEADS):
                columns = slice(group * rep * HEAD_DIM, (group + 1) * rep * HEAD_DIM)
                expected = float(_gate_derivatives(reference, layer.self_attn.o_proj, columns, batch).abs().mean())
                assert scores.units[s.id][group] == pytest.approx(expected, rel=1e-5, abs=1e-9)
            checked.append(s.kind)
    assert sorted(set(checked)) == ["channels", "kv_groups", "query_heads"] and len(checked) == 3 * LAYERS


def test_head_gate_refuses_hidden_channels(tiny: Path) -> None:
    streamed = StreamedModel(tiny, blocks_prefix="model.layers")
    batch = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    with pytest.raises(SettingError, match=r"head-gate: acts on a unit at the input of the one layer.*hidden units have none or several.*--structures"):
        score(streamed, trace(tiny), estimator("head-gate"), batch, kinds=["hidden", "channels"])



class _FewMasks(Bonsai):
    masks = 6


def test_bonsai_scores_are_the_ridge_regression_of_the_submodels_losses(tiny: Path) -> None:
    """The sub-models' losses are measured again here on a plain transformers model with the same
    units zeroed at o_proj's and down_proj's inputs, and regressed in the primal form (one row per
    unit), which the scorer's dual form must equal (to the float32 rounding of transformers' loss)."""
    graph = trace(tiny)
    batch = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(3))
    importance = _FewMasks(seed=5)
    folder = _Folder(graph, importance, ["query_heads", "kv_groups", "channels"])
    run = _MaskedScoring(
        StreamedModel(tiny, dtype=torch.float64, blocks_prefix="model.layers"), folder, importance, micro_batch=2, store=ActivationStore(),
        workers=SINGLE, progress=None,
    )
    influence = run.run(batch)
    units, groups, _ = folder.result("sum")
    reference = transformers.LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float64).eval()
    losses = []
    for mask in range(importance.masks):
        handles = []
        for (name, _, labels), drops in zip(run.atoms, run.drops):
            keep = torch.ones(len(labels), dtype=torch.float64)
            keep[labels >= 0] = (~drops[mask, labels[labels >= 0]]).double()
            module = reference.get_submodule(name[: -len(".weight")])
            handles.append(module.register_forward_pre_hook(lambda _m, inputs, keep=keep: (inputs[0] * keep,)))
        with torch.no_grad():
            losses.append(float(reference(input_ids=batch, labels=batch).loss))
        for handle in handles:
            handle.remove()
    drops = torch.cat(run.drops, dim=1).double()
    centred = drops - drops.mean(0)
    target = torch.tensor(losses, dtype=torch.float64)
    damping = importance.ridge * float((centred.square().sum(1)).mean())
    coefficients = torch.linalg.solve(centred.T @ centred + damping * torch.eye(drops.shape[1], dtype=torch.float64), centred.T @ (target - target.mean()))
    offsets = dict(zip((name for name, _, _ in run.atoms), torch.tensor([0] + [d.shape[1] for d in run.drops]).cumsum(0).tolist()))
    atoms = {name: labels for name, _, labels in run.atoms}

    def coefficient(name: str, column: int) -> float:
        return float(coefficients[offsets[name] + atoms[name][column]])

    rep = HEADS // KV_HEADS
    for s in graph.structures:
        if s.kind == "channels":
            name = f"model.layers.{s.layer}.mlp.down_proj.weight"
            assert units[s.id] == pytest.approx([coefficient(name, c) for c in range(CHANNELS)], rel=2e-4, abs=1e-6)
        elif s.kind == "query_heads":
            name = f"model.layers.{s.layer}.self_attn.o_proj.weight"
            expected = [coefficient(name, (g * rep + r) * HEAD_DIM) for g in range(KV_HEADS) for r in range(rep)]
            assert groups[s.id].reshape(-1).tolist() == pytest.approx(expected, rel=2e-4, abs=1e-6)
        elif s.kind == "kv_groups":
            name = f"model.layers.{s.layer}.self_attn.o_proj.weight"
            expected = [sum(coefficient(name, (g * rep + r) * HEAD_DIM) for r in range(rep)) for g in range(KV_HEADS)]
            assert units[s.id].tolist() == pytest.approx(expected, rel=2e-4, abs=1e-6)
    assert len(set(atoms["model.layers.0.self_attn.o_proj.weight"].tolist())) == HEADS
    dense = score(StreamedModel(tiny, dtype=torch.float64, blocks_prefix="model.layers"), graph, estimator("l1"), batch, kinds=[])
    assert influence == pytest.approx(dense.block_influence, rel=1e-9)  # measured on the dense stream


def test_entropy_is_the_gaussian_entropy_of_each_consumed_input_channel() -> None:
    inputs = torch.randn(500, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * torch.tensor([0.1, 1, 3, 0.5, 2, 0.0])
    activation = ActivationStats(inputs.sum(0), inputs.square().sum(0), inputs.shape[0], input_dim=1)
    weight = torch.randn(4, 6, dtype=torch.float64)
    scores = estimator("entropy").index_scores(ParamStats("o_proj.weight", weight), 1, activation)
    expected = torch.distributions.Normal(inputs.mean(0)[:5], inputs.std(0, unbiased=False)[:5]).entropy()
    torch.testing.assert_close(scores[:5], expected)
    assert scores[5] == 0.5 * math.log(2 * math.pi * math.e * torch.finfo(torch.float64).tiny)  # a constant channel: the floor
    assert torch.equal(estimator("entropy").index_scores(ParamStats("o_proj.weight", weight), 0, activation), torch.zeros(4, dtype=torch.float64))


def test_kinds_on_one_scale_equalises_each_kinds_score_per_parameter_and_keeps_every_ranking(tiny: Path) -> None:
    import numpy as np

    from structprune.score.importance import ESTIMATORS
    from structprune.score.scorer import Scores, kinds_on_one_scale

    graph = trace(tiny)
    generator = np.random.default_rng(0)
    scale = {"channels": 1.0, "kv_groups": 40.0, "query_heads": 0.01}  # kinds on unrelated scales
    scored = [s for s in graph.structures if s.kind in scale]
    raw = Scores(estimator="test", reduction="sum", units={s.id: generator.random(s.units) * scale[s.kind] for s in scored})
    raw.per_group = {s.id: raw.units[s.id][None, :].repeat(2, axis=0) for s in scored if s.kind == "query_heads"}
    fixed = kinds_on_one_scale(graph, raw)
    per_parameter = {}
    for s in scored:
        per_parameter.setdefault(s.kind, []).append(float(np.mean(fixed.units[s.id])) / s.unit_params)
        ratio = fixed.units[s.id] / raw.units[s.id]
        np.testing.assert_allclose(ratio, ratio[0])  # one factor per kind: every ranking kept
        if s.id in raw.per_group:
            np.testing.assert_allclose(fixed.per_group[s.id], raw.per_group[s.id] * ratio[0])
    means = [float(np.mean(v)) for v in per_parameter.values()]
    np.testing.assert_allclose(means, means[0])
    assert not ESTIMATORS["head-gate"].kinds_share_a_scale and not ESTIMATORS["lora-grad"].kinds_share_a_scale
    assert ESTIMATORS["taylor"].kinds_share_a_scale  # a loss change is one scale: left as it is
