"""Reconstruction and OBS selection of expert channels (``plan/reconstruct.py``): each kept expert's
slice of the stacked down projection is the routing-weighted least-squares fit on its own routed
inputs in the pruned model, lands on the checkpoint's per-expert tensors, and the result loads as a
stock checkpoint computing what the original computes with the refitted weights, the removed
channels zeroed and the removed experts masked out of the router, whether the experts keep the
same channels or each its own; OBS chooses one channel list for all experts by their summed costs,
or each expert's own by its own costs.

The references are built here from a plain transformers model: hooks on the experts modules
record each layer's routing, and every expert's down_proj input is recomputed by hand from its
slice of ``gate_up_proj``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import transformers
from click.testing import CliRunner

from structprune import apply_plan, trace
from structprune.cli import main
from structprune.io.checkpoint import read_checkpoint
from structprune.plan.cut_plan import CutPlan
from structprune.plan.cuts import Selection, checkpoint_cut_plan
from structprune.plan.reconstruct import Reconstruction, apply_to_plan, fit_kept_columns, obs_removals, reconstruct, stored_dtype_map
from structprune.score.streaming import StreamedModel
from structprune.tracing.export import checkpoint_layout
from test_moe import CALIB, CONFIGS, _experts_masked, _load, mixtral_with_tokenizer, moe_model  # noqa: F401 (fixtures)

CHANNELS = [0, 3, 7, 9]
"""Expert channels removed in every layer (four: transformers' grouped GEMM wants expert rows of a
multiple of 16 bytes on CPU); chosen per expert, expert e loses ``CHANNELS`` shifted by e."""
EXPERT = 1
"""The expert removed from every layer."""


def _calibration() -> torch.Tensor:
    # Enough routed tokens per expert (hundreds) for a well-posed fit of its kept columns.
    return torch.randint(1, 128, (8, 48), generator=torch.Generator().manual_seed(4))


def _removed_channels(expert: int, per_expert: bool) -> List[int]:
    return [c + expert for c in CHANNELS] if per_expert else CHANNELS


def _reconstructed(path: Path, out: Path, work: Path, per_expert: bool) -> Tuple[Reconstruction, CutPlan]:
    """``EXPERT`` and the channels of ``_removed_channels`` removed from every MoE layer of
    ``path``, undamped ``layer``-target reconstruction on ``_calibration()``, written to ``out``."""
    graph = trace(path)
    assert graph.blocks is not None
    channels = graph.by_kind("expert_channels")
    experts = graph.params[channels[0].members[0].param][0]
    selection = Selection(units={s.id: [EXPERT] for s in graph.by_kind("experts")})
    if per_expert:
        selection.per_expert = {s.id: [_removed_channels(e, True) for e in range(experts)] for s in channels}
    else:
        selection.units.update({s.id: CHANNELS for s in channels})
    layout = checkpoint_layout(path, list(read_checkpoint(path).tensors))
    stored = {model_name: name for name, model_name in layout.renamed.items()}
    model = StreamedModel(path, blocks_prefix=graph.blocks.prefix)
    result = reconstruct(
        model, graph, selection, _calibration(), work, stored_names=stored, stored_dtypes=stored_dtype_map(path),
        expert_pieces=layout.experts, damping=0.0, target="layer", micro_batch=4,
    )
    plan = checkpoint_cut_plan(path, graph, selection)
    apply_to_plan(plan, result)
    report = apply_plan(path, plan, out)
    assert report.shape_check.checked, report.shape_check.note
    return result, plan


def _kept(width: int, expert: int, per_expert: bool) -> List[int]:
    return [c for c in range(width) if c not in _removed_channels(expert, per_expert)]


def _with_pruned_experts(original: Any, pruned: Any, per_expert: bool) -> Any:
    """``original`` with each kept expert's down_proj the pruned one at its kept channels and zeros
    at the removed ones: with ``EXPERT`` masked out of the router, it computes what ``pruned`` does."""
    with torch.no_grad():
        for mine, theirs in zip(original.model.layers, pruned.model.layers):
            down = mine.mlp.experts.down_proj
            for new, expert in enumerate(e for e in range(down.shape[0]) if e != EXPERT):
                full = torch.zeros_like(down[expert])
                full[:, _kept(down.shape[-1], expert, per_expert)] = theirs.mlp.experts.down_proj[new]
                down[expert] = full
    return original


def _routing(model: Any, ids: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Per MoE layer: the experts module's arguments (hidden states, top-k indices and weights) on ``ids``."""
    seen: List[Dict[str, torch.Tensor]] = []

    def keep(_module: Any, args: Any, kwargs: Any) -> None:
        hidden = args[0].reshape(-1, args[0].shape[-1])
        seen.append({"hidden": hidden, "index": args[1].reshape(hidden.shape[0], -1), "weights": args[2].reshape(hidden.shape[0], -1)})

    handles = [layer.mlp.experts.register_forward_pre_hook(keep, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            for batch in ids.split(4):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    layers = len(model.model.layers)
    return [{key: torch.cat([s[key] for s in seen[layer::layers]]) for key in seen[0]} for layer in range(layers)]


def _weighted_inputs(experts: Any, routing: Dict[str, torch.Tensor], expert: int) -> torch.Tensor:
    """``[pairs, I]``: the expert's down_proj inputs on its routed (token, slot) pairs, each scaled
    by the pair's gate weight, computed by hand (act(gate)·up from its slice of gate_up_proj) in float64."""
    tokens, slots = torch.nonzero(routing["index"] == expert, as_tuple=True)
    gate, up = torch.nn.functional.linear(routing["hidden"][tokens].double(), experts.gate_up_proj[expert].detach().double()).chunk(2, dim=-1)
    return experts.act_fn(gate) * up * routing["weights"][tokens, slots, None].double()


@pytest.mark.parametrize("per_expert", [False, True], ids=["shared-channels", "per-expert-channels"])
def test_each_expert_is_the_routing_weighted_least_squares_fit_on_its_own_inputs_and_the_output_loads_as_that_model(
    moe_model: Path, tmp_path: Path, per_expert: bool  # noqa: F811
) -> None:
    result, plan = _reconstructed(moe_model, tmp_path / "out", tmp_path / "weights", per_expert)
    # The refitted weights are written to the checkpoint's per-expert tensors, and only those change.
    replaced = sorted(name for name, cut in plan.tensors.items() if cut.replace is not None)
    assert replaced and all(name.endswith(("w2.weight", "down_proj.weight")) and ".experts." in name for name in replaced)
    assert not any(f".experts.{EXPERT}." in name for name in replaced)
    pruned, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    dense = _load(moe_model)
    original = {i: layer.mlp.experts.down_proj.detach().double().clone() for i, layer in enumerate(dense.model.layers)}
    reference = _with_pruned_experts(dense, pruned.eval(), per_expert)
    removed = {layer: [EXPERT] for layer in range(len(reference.model.layers))}
    ids = _calibration()
    with _experts_masked(reference, removed):
        routing = _routing(reference, ids)
        with torch.no_grad():
            expected = reference(ids).logits
    # (b) the stock checkpoint computes the original model with the refitted weights, removed channels zeroed.
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # (a) each kept expert: the least-squares fit of its dense output, tokens weighted by their gate weight.
    fitted = 0
    for layer, (mine, theirs) in enumerate(zip(reference.model.layers, pruned.model.layers)):
        kept_experts = [e for e in range(original[layer].shape[0]) if e != EXPERT]
        for new, expert in enumerate(kept_experts):
            kept = _kept(original[layer].shape[-1], expert, per_expert)
            z = _weighted_inputs(mine.mlp.experts, routing[layer], expert)
            assert len(z) > len(kept), "enough routed pairs for a well-posed fit"
            weight = original[layer][expert]
            expected_fit = torch.linalg.lstsq(z[:, kept], z @ weight.T).solution.T
            got = theirs.mlp.experts.down_proj[new].detach().double()
            assert float(torch.linalg.norm(got - expected_fit) / torch.linalg.norm(expected_fit)) < 1e-4, (layer, expert)
            plain_error = float(((z @ weight.T - z[:, kept] @ weight[:, kept].T) ** 2).sum())
            fitted_error = float(((z @ weight.T - z[:, kept] @ got.T) ** 2).sum())
            assert fitted_error < plain_error, (layer, expert)
            fitted += 1
    reports = {r.weight for r in result.layers}
    assert fitted == len(reports) and all(r.error_after < r.error_before for r in result.layers)


def _brute_force_greedy(weights: torch.Tensor, grams: torch.Tensor, count: int) -> List[int]:
    """Greedy removal of one channel position at a time from every expert, each step choosing the
    position whose removal leaves the least summed error of the experts' optimal fits (the error
    OBS's updates track)."""
    chosen: List[int] = []
    width = weights.shape[-1]

    def error(extra: int) -> float:
        kept = torch.tensor([c for c in range(width) if c not in chosen and c != extra])
        return sum(fit_kept_columns(w, g, kept, damping=0.0).error_after for w, g in zip(weights, grams))

    for _ in range(count):
        chosen.append(min((c for c in range(width) if c not in chosen), key=error))
    return chosen


def test_obs_on_expert_channels_minimises_the_experts_summed_cost() -> None:
    generator = torch.Generator().manual_seed(5)
    experts, width = 3, 8
    weights = torch.randn(experts, 5, width, generator=generator, dtype=torch.float64)
    inputs = torch.randn(experts, width, 80, generator=generator, dtype=torch.float64)
    inputs[0, 2] = inputs[0, 1] + 0.05 * inputs[0, 2]  # channel 2 nearly redundant in expert 0 only
    inputs[2, 6] *= 0.01  # channel 6 nearly silent in expert 2 only
    grams = inputs @ inputs.transpose(1, 2)
    singles = [torch.tensor([c]) for c in range(width)]
    # The general path (one removal at a time: buckets force it) is brute-force greedy.
    general = obs_removals(weights, grams, singles, 3, damping=0.0, buckets=[0] * width, per_bucket=width)
    assert general == _brute_force_greedy(weights, grams, 3)
    # The vectorised path of single columns takes the same first choice.
    assert obs_removals(weights, grams, singles, 3, damping=0.0)[0] == general[0]
    # The sum is over experts: not what any one expert alone would remove first.
    alone = {obs_removals(weights[e], grams[e], singles, 1, damping=0.0)[0] for e in range(experts)}
    assert len(alone) > 1
    # One expert in a batch is the layer on its own.
    assert obs_removals(weights[:1], grams[:1], singles, 4, damping=0.01) == obs_removals(weights[0], grams[0], singles, 4, damping=0.01)


def test_obs_on_one_channel_list_for_all_experts_sums_their_costs(tmp_path: Path) -> None:
    """Where every expert keeps the same channels (a checkpoint storing its experts stacked, or a
    selection made so), the reselection removes the positions greedy OBS picks by the kept
    experts' summed costs: layer 0, whose inputs are the dense model's."""
    torch.manual_seed(0)
    config = CONFIGS["mixtral"]()
    config.pad_token_id = config.eos_token_id = config.bos_token_id = 0
    path = tmp_path / "mixtral"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    graph = trace(path)
    assert graph.blocks is not None
    selection = Selection(units={s.id: list(range(8)) for s in graph.by_kind("expert_channels")})
    selection.units.update({s.id: [EXPERT] for s in graph.by_kind("experts")})
    layout = checkpoint_layout(path, list(read_checkpoint(path).tensors))
    stored = {model_name: name for name, model_name in layout.renamed.items()}
    result = reconstruct(
        StreamedModel(path, blocks_prefix=graph.blocks.prefix), graph, selection, _calibration(), tmp_path / "weights",
        stored_names=stored, stored_dtypes=stored_dtype_map(path), expert_pieces=layout.experts, damping=0.01, target="layer", reselect=True,
    )
    chosen = result.selection.units[graph.by_kind("expert_channels")[0].id]
    dense = _load(path)
    experts = dense.model.layers[0].mlp.experts
    with _experts_masked(dense, {0: [EXPERT]}):
        routing = _routing(dense, _calibration())[0]
    kept = [e for e in range(4) if e != EXPERT]
    z = [_weighted_inputs(experts, routing, e) for e in kept]
    grams = torch.stack([x.T @ x for x in z])
    expected = obs_removals(experts.down_proj.detach()[kept].double(), grams, [torch.tensor([c]) for c in range(48)], 8, damping=0.01)
    assert chosen == sorted(expected) and chosen != list(range(8))


CLI_OPTIONS = ("--ratio", "0.2", "--structures", "expert-channels", "--importance", "obs", "--damping", "0.01", *CALIB)


def test_obs_chooses_layer_zeros_expert_channels_by_greedy_obs_on_the_routed_inputs(mixtral_with_tokenizer: Path, tmp_path: Path) -> None:  # noqa: F811
    """Mixtral's checkpoint stores its experts apart, so each expert keeps channels of its own,
    chosen by its own OBS costs."""
    outcome = CliRunner().invoke(main, ["prune", str(mixtral_with_tokenizer), "-o", str(tmp_path / "out"), "--plan-out", str(tmp_path / "plan.json"), *CLI_OPTIONS])
    assert outcome.exit_code == 0, outcome.output
    plan = CutPlan.load(tmp_path / "plan.json")
    removed = []
    for expert in range(4):
        cut = plan.tensors[f"model.layers.0.block_sparse_moe.experts.{expert}.w2.weight"]
        kept = plan.index_sets[cut.keep[1]] if isinstance(cut.keep[1], str) else cut.keep[1]
        removed.append(sorted(set(range(48)) - set(kept)))
        assert cut.replace is not None, "refitted"
    assert len({tuple(r) for r in removed}) > 1, "the experts chose differently"
    # Layer 0 sees the dense model's inputs: the same calibration windows through the original model.
    from structprune.models.loading import load_tokenizer
    from structprune.score.calibration import calibration_batch, load_texts

    ids = calibration_batch(load_texts(Path(CALIB[1])), load_tokenizer(mixtral_with_tokenizer), samples=int(CALIB[3]), seq_len=int(CALIB[5]), seed=0)
    dense = _load(mixtral_with_tokenizer)
    routing = _routing(dense, ids)[0]
    experts = dense.model.layers[0].mlp.experts
    singles = [torch.tensor([c]) for c in range(48)]
    for expert in range(4):
        z = _weighted_inputs(experts, routing, expert)
        weight = experts.down_proj[expert].detach().double()
        assert sorted(obs_removals(weight, z.T @ z, singles, len(removed[expert]), damping=0.01)) == removed[expert], expert
    assert plan.metadata["method"]["importance"] == "obs" and plan.metadata["method"]["reconstruct"] is True


def test_expert_reconstruction_is_byte_reproducible(mixtral_with_tokenizer: Path, tmp_path: Path) -> None:  # noqa: F811
    for run in ("a", "b"):
        outcome = CliRunner().invoke(main, ["prune", str(mixtral_with_tokenizer), "-o", str(tmp_path / run), "--plan-out", str(tmp_path / f"{run}.json"), *CLI_OPTIONS])
        assert outcome.exit_code == 0, outcome.output
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "a" / "model.safetensors") == digest(tmp_path / "b" / "model.safetensors")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_taylor_with_reconstruction_prunes_experts_and_their_channels_end_to_end(mixtral_with_tokenizer: Path, tmp_path: Path) -> None:  # noqa: F811
    outcome = CliRunner().invoke(main, [
        "prune", str(mixtral_with_tokenizer), "-o", str(tmp_path / "out"), "--ratio", "0.2", "--structures", "experts,expert-channels",
        "--experts", "1", "--importance", "taylor", "--reconstruct", *CALIB,
    ])
    assert outcome.exit_code == 0, outcome.output
    pruned = _load(tmp_path / "out")
    assert pruned.config.num_local_experts == 3 and pruned.config.intermediate_size < 48
    with torch.no_grad():
        assert torch.isfinite(pruned(_calibration()).logits).all()


def test_reconstruction_is_on_by_default_for_expert_channels_only_under_obs() -> None:
    """Measured not to pay after Taylor once experts keep channels of their own (benches/README.md);
    obs needs it; whole experts alone have nothing to refit."""
    from structprune.prune import PruneOptions, reconstructs

    calib = Path(CALIB[1])
    assert reconstructs(PruneOptions(ratio=0.2, structures=("expert-channels",), calib=calib))
    assert not reconstructs(PruneOptions(ratio=0.2, structures=("expert-channels",), importance="taylor", calib=calib))
    assert not reconstructs(PruneOptions(ratio=0.2, structures=("experts",), importance="taylor", calib=calib))
    assert reconstructs(PruneOptions(ratio=0.2, structures=("heads", "experts"), importance="taylor", calib=calib))
