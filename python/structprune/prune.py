"""``structprune prune``: trace → score → plan → apply in one call."""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from math import prod
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, NoReturn, Optional, Tuple, Union

import numpy as np
import torch

from structprune.apply import ApplyReport, apply_plan, check_output, plan_output
from structprune.errors import PlanError, SettingError
from structprune.io.checkpoint import read_checkpoint, read_config
from structprune.io.dtypes import compute_dtype
from structprune.io.sizes import DEFAULT_ACTIVATION_MEMORY, DEFAULT_SAMPLES, RECONSTRUCTION_TARGETS
from structprune.models.formats import FORMATS
from structprune.models.loading import resolve_device
from structprune.plan.compensation import DECILM_REFUSAL, compensate_biases
from structprune.plan.compensation import HIDDEN_REFUSAL as HIDDEN_COMPENSATION_REFUSAL
from structprune.plan.cut_plan import CutPlan
from structprune.plan.cuts import Selection, checkpoint_cut_plan, router_top_k, stock_config_check
from structprune.plan.refit import DEFAULT_REFIT_LR, RefitSettings
from structprune.plan.reconstruct import DEFAULT_DAMPING, HIDDEN_REFUSAL, Reconstruction, apply_to_plan, reconstruct, stored_dtype_map
from structprune.plan.selection import GQA_MODES, NORMALIZATIONS, PLANNINGS, STRUCTURE_CHOICES, Target, default_protection, layer_widths, plan_global, plan_uniform
from structprune.score.calibration import batch_sha256
from structprune.score.distributed import Workers, current, joined
from structprune.score.importance import ESTIMATORS, Importance, estimator
from structprune.score.journal import Journal, default_directory, run_key
from structprune.score.lora_probes import adapter_sha256, check_adapter_dir
from structprune.score.routing import SALIENCIES as ROUTING_SALIENCIES
from structprune.score.routing import expert_saliency, routing_stats
from structprune.score.scorer import REDUCTIONS, Scores, kinds_on_one_scale, score
from structprune.score.streaming import StreamedModel
from structprune.tracing.graph import KINDS, StructureGraph, trace

Progress = Callable[[str, int, int], None]
EXPERT_SALIENCIES = (*ROUTING_SALIENCIES, "importance")
MOE_STRUCTURES = ("experts", "expert-channels")
RECONSTRUCTED_DIR = "structprune-reconstructed"
"""Beside a saved plan: the refitted weights it reads (files named by their content's hash)."""


@dataclass(frozen=True)
class PruneOptions:
    ratio: float
    importance: str = "obs"
    """How units are chosen; ``obs`` (the default: best on SmolLM2 at 20% and 50%,
    docs/benchmarks.md) sets each layer's widths from diagonal OBS costs and picks the units by
    greedy OBS while reconstructing. Every name of ``structprune.score.importance.ESTIMATORS`` works."""
    structures: tuple = ("heads", "mlp")
    gqa: str = "query-heads"
    multiple: Optional[int] = None
    """Kept MLP and hidden widths are multiples of this; ``None``: 64 for MLPs of 2048 channels or
    more (tensor-core and GEMM tile friendly), 8 for smaller ones."""
    reduction: str = "sum"
    calib: Optional[Path] = None
    text_field: str = "text"
    samples: int = DEFAULT_SAMPLES
    seq_len: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    micro_batch: int = 4
    activation_memory: int = DEFAULT_ACTIVATION_MEMORY
    """Bytes of saved block inputs kept in memory during scoring; the rest go to a temporary file."""
    planning: str = "uniform"
    """``uniform`` (same widths in every layer) or ``global`` (per-layer widths by score)."""
    protect: Optional[Tuple[int, int]] = None
    """First and last blocks left unpruned; ``None``: none for uniform planning (so the result stays
    a stock checkpoint), LLM-Pruner's proportion for global planning (``default_protection``)."""
    normalize: str = "none"
    layout: str = "auto"
    """Checkpoint format (``structprune.models.formats``): auto, stock, decilm or layers."""
    blocks: Optional[int] = None
    """Whole blocks to remove when ``structures`` combines blocks with widths (the rest of the ratio
    comes from widths); ``None`` when blocks are pruned on their own."""
    experts: Optional[int] = None
    """Routed experts to remove in every MoE layer, exactly (the rest of the ratio from the other
    structures); ``None``: the planner chooses how many."""
    expert_saliency: str = "reap"
    """How whole experts are scored (``structprune.score.routing``): ``reap`` (gate weight × output
    norm over the tokens routed to each expert), ``frequency`` (how often each is chosen), or
    ``importance`` (the ``importance`` estimator on the experts' weights, e.g. Taylor)."""
    bias_compensation: bool = False
    """FLAP's bias compensation (``structprune.plan.compensation``): the removed input channels of
    o_proj/down_proj (and their equivalents) are replaced by their calibration means, folded into the
    layers' biases. Needs calibration data, whatever the estimator."""
    reconstruct: Optional[bool] = None
    """Refit the kept input columns of every layer that loses inputs (least squares on the pruned
    model's calibration activations, block by block: ``structprune.plan.reconstruct``). Needs
    calibration data, whatever the estimator. ``None``: on wherever it applies (not with hidden
    channels, bias compensation, or blocks and whole experts alone) and helps (not with expert
    channels but for obs); see ``reconstructs``."""
    damping: float = DEFAULT_DAMPING
    """Reconstruction's λ relative to the mean diagonal of the kept inputs' Gram matrix."""
    reconstruction_target: str = "dense"
    """What refitted layers reproduce (``structprune.plan.reconstruct.TARGETS``): ``layer``, the outputs
    of their own dense weights on the pruned inputs; ``dense`` (measured best on SmolLM2 at 20% and
    50%), the same except that a layer feeding the residual stream (down_proj) reproduces the dense
    block's output, correcting the drift of the blocks before."""
    refit_steps: int = 0
    """With reconstruction: Adam steps of the joint refit of every kept block after its
    least-squares fits (``structprune.plan.refit``: all the block's weights, towards the dense
    block's output on the dense inputs); 0: none."""
    refit_lr: float = DEFAULT_REFIT_LR
    """The block refit's peak learning rate."""
    lora_adapter: Optional[Path] = None
    """With ``lora-grad``: a peft LoRA adapter trained on (and merged into) this checkpoint, whose
    gradients the estimator reads (``prune --iterations K --recover-steps N`` passes the one each
    recovery trained); ``None``: fresh random probes."""


@dataclass
class PruneResult:
    plan: CutPlan
    params_before: int
    params_after: int
    widths: Dict[str, List[int]]
    blocks_removed: List[int]
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: Optional[int]
    report: Optional[ApplyReport] = None
    scores: Optional[Scores] = field(default=None, repr=False)
    work_dir: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)
    """Holds the refitted weights the plan reads when ``make_plan`` was given no
    ``reconstruction_dir``: removed when this result is garbage collected (or at exit)."""
    original_widths: Dict[str, List[int]] = field(default_factory=dict)
    """``widths`` of the input model (every layer), for the summary's original → new."""

    @property
    def removed_fraction(self) -> float:
        return 1 - self.params_after / self.params_before


def make_plan(
    model_dir: Union[str, Path],
    options: PruneOptions,
    *,
    progress: Optional[Progress] = None,
    resume: Union[bool, str, Path] = False,
    workers: Optional[Workers] = None,
    reconstruction_dir: Optional[Path] = None,
) -> PruneResult:
    """Scores the checkpoint and plans the cut, writing no checkpoint (with ``options.reconstruct``,
    the refitted weights go to ``reconstruction_dir``, which the plan then reads: keep it until the
    plan is applied).

    ``resume``: a directory where scoring saves its state after every block and continues a saved
    run (``True``: one under the user's cache directory, named by a hash of the inputs; see
    ``structprune.score.journal``). ``workers``: the processes scoring together (default: the process group
    this process is in, if any); each scores its share of the calibration batch and every process
    gets the same result."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    check_options(options)
    importance = estimator(options.importance, seed=options.seed, lora_adapter=options.lora_adapter)
    reconstruct_ = reconstructs(options)
    graph = trace(model_dir)
    if graph.blocks is None:
        raise PlanError(f"{model_dir}: no repeated blocks found, so the model cannot be scored block by block")
    _check_experts_offered(graph, options)
    _check_expert_width_expressible(model_dir, graph, options)
    owned_dir = None
    if reconstruct_ and reconstruction_dir is None:
        owned_dir = tempfile.TemporaryDirectory(prefix="structprune-reconstruct-")
        reconstruction_dir = Path(owned_dir.name)
    input_ids, calibration = _calibration(model_dir, options) if needs_calibration(options) else (None, None)
    workers = workers or current()
    device = workers.compute_device(options.device)
    model = StreamedModel(model_dir, device=device, dtype=compute_dtype(options.dtype), blocks_prefix=graph.blocks.prefix)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    scores = _score(model, graph, importance, input_ids, options, workers=workers, resume=resume, progress=progress)
    scores = _routed_expert_scores(model, graph, scores, input_ids, options, workers=workers, progress=progress)
    if not importance.kinds_share_a_scale:
        scores = kinds_on_one_scale(graph, scores)
    selection, target = plan_selection(model_dir, graph, scores, options)
    protect, multiple = target.protect, target.multiple
    metadata = {
        "method": {
            "importance": options.importance, "reduction": options.reduction, "planning": options.planning, "structures": list(options.structures),
            "gqa": options.gqa, "multiple": multiple, "protect": list(protect), "normalize": options.normalize, "blocks": options.blocks,
            "reconstruct": reconstruct_,
            **({"experts": options.experts, "expert_saliency": options.expert_saliency} if "experts" in options.structures else {}),
        },
        "seed": options.seed,
        "target_ratio": options.ratio,
        "calibration": calibration,
        "scores": _score_summary(graph, scores),
    }
    plan = checkpoint_cut_plan(model_dir, graph, selection, metadata=metadata, layout=options.layout)
    if options.bias_compensation:
        if plan.metadata["format"] == "decilm":  # chosen by auto; the layers format holds biases
            plan = checkpoint_cut_plan(model_dir, graph, selection, metadata=metadata, layout="layers")
        compensate_biases(model_dir, graph, selection, plan, scores.input_means)
    if reconstruct_:
        assert input_ids is not None and reconstruction_dir is not None
        share = input_ids[workers.share(input_ids.shape[0])]
        reconstruction = _reconstruct(model, graph, selection, share, options, reconstruction_dir, workers, progress, reselect=importance.reselects)
        if importance.reselects:
            selection = reconstruction.selection
            plan = checkpoint_cut_plan(model_dir, graph, selection, metadata=metadata, layout=options.layout)
        apply_to_plan(plan, reconstruction)
        plan.metadata["reconstruction"].update(damping=options.damping, target=options.reconstruction_target)
        if options.refit_steps:
            plan.metadata["reconstruction"]["refit"].update(lr=options.refit_lr)
    before = read_checkpoint(model_dir).parameters
    after = sum(prod(t.shape) for t in plan_output(model_dir, plan).tensors)
    plan.metadata["params"] = {"before": before, "after": after, "removed_fraction": 1 - after / before}
    return PruneResult(
        plan=plan,
        params_before=before,
        params_after=after,
        widths=layer_widths(graph, selection),
        original_widths=layer_widths(graph, Selection()),
        blocks_removed=list(selection.blocks),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None,
        scores=scores,
        work_dir=owned_dir,
    )


def plan_selection(model_dir: Union[str, Path], graph: StructureGraph, scores: Scores, options: PruneOptions) -> Tuple[Selection, Target]:
    """The units to remove given the scores, by ``options.planning``, and the target planned for
    (protection and multiple resolved from their defaults)."""
    assert graph.blocks is not None
    protect = options.protect
    if protect is None:
        protect = default_protection(graph.blocks.count) if options.planning == "global" else (0, 0)
    config = read_config(Path(model_dir)) or {}
    target = Target(
        ratio=options.ratio, structures=tuple(options.structures), gqa=options.gqa,
        multiple=options.multiple or default_multiple(graph), protect=protect, normalize=options.normalize,
        blocks=options.blocks, experts=options.experts, min_experts=router_top_k(config),
    )
    if options.planning == "global":
        return plan_global(graph, scores, target), target
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 0)
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    return plan_uniform(graph, scores, target, heads, hidden), target


def reconstructs(options: PruneOptions) -> bool:
    """Whether ``options`` reconstruct: as asked, else wherever reconstruction applies and was
    measured to help (on SmolLM2 at every ratio tried: docs/benchmarks.md). Not with expert
    channels, unless obs chooses them: on a tiny trained Mixtral whose experts keep channels of
    their own, refitting the experts after Taylor's choice moved held-out perplexity by −1.3% to
    +1.2% (benches/README.md), no gain to turn on unasked."""
    if options.reconstruct is not None:
        return options.reconstruct
    if tuple(options.structures) == ("blocks",):
        return False  # no layer loses inputs: nothing to refit
    if set(options.structures) <= {"blocks", "experts"}:
        return False  # whole experts need no refit (the router renormalises over the others)
    if options.calib is None and options.importance != "obs":
        return False  # nothing to fit on; a data-free estimator still prunes
    if options.importance == "obs":
        return True
    return not ("hidden" in options.structures or "expert-channels" in options.structures or options.bias_compensation)


def check_options(options: PruneOptions) -> None:
    """Every option on its own and with the others, before any file is read: a bad one is refused
    at once with a :class:`SettingError` naming it, not after the hours a large model's scoring
    takes (``make_plan`` calls it first; the CLI before it loads anything)."""
    if not 0 < options.ratio < 1:
        _refuse("--ratio", f"must be between 0 and 1, got {options.ratio}")
    estimator(options.importance, seed=options.seed, lora_adapter=options.lora_adapter)
    if options.lora_adapter is not None:
        check_adapter_dir(Path(options.lora_adapter))
    unknown = [s for s in options.structures if s not in STRUCTURE_CHOICES]
    if unknown or not options.structures:
        _refuse("--structures", f"{', '.join(map(repr, unknown)) or 'nothing'} given; choose from {', '.join(STRUCTURE_CHOICES)}")
    for option, value, choices in (
        ("--gqa", options.gqa, GQA_MODES), ("--reduction", options.reduction, REDUCTIONS), ("--uniform/--global", options.planning, PLANNINGS),
        ("--normalize", options.normalize, NORMALIZATIONS), ("--format", options.layout, FORMATS),
        ("--reconstruct-target", options.reconstruction_target, RECONSTRUCTION_TARGETS),
    ):
        if value not in choices:
            _refuse(option, f"must be one of {', '.join(choices)}, got {value!r}")
    compute_dtype(options.dtype)
    resolve_device(options.device)
    minimums: Tuple[Tuple[str, int, int], ...] = (("--samples", options.samples, 1), ("--seq-len", options.seq_len, 2), ("--micro-batch", options.micro_batch, 1))
    for option, number, least in minimums:
        if number < least:
            _refuse(option, f"must be at least {least}, got {number}")
    if options.damping < 0:
        _refuse("--damping", f"must be at least 0, got {options.damping}")
    if options.refit_steps < 0 or not options.refit_lr > 0:
        _refuse("--refit-steps", f"steps must be at least 0 and the learning rate positive, got {options.refit_steps} and {options.refit_lr}")
    if options.protect is not None and min(options.protect) < 0:
        _refuse("--protect", f"block counts must be at least 0, got {options.protect}")
    if options.blocks is not None and (options.blocks < 0 or "blocks" not in options.structures):
        _refuse("--blocks", f"removes whole blocks: it needs blocks among --structures and a count of at least 0, got {options.blocks} with {','.join(options.structures)}")
    _check_experts(options)
    _check_combinations(options)


def _check_experts(options: PruneOptions) -> None:
    """The MoE options: ``--experts`` needs experts among the structures; expert structures are
    scored from their weights, the routing or the per-expert inputs of the stacked expert weights
    (``score.expert_inputs``), by the estimators that can read those (``_refuse_expert_estimator``);
    expert channels are refitted per expert and reselected by obs (``plan.reconstruct``), whole
    experts need neither (obs on its own is refused there: it would have nothing to choose)."""
    if options.experts is not None and (options.experts < 0 or "experts" not in options.structures):
        _refuse("--experts", f"removes routed experts: it needs experts among --structures and a count of at least 0, got {options.experts} with {','.join(options.structures)}")
    if options.expert_saliency not in EXPERT_SALIENCIES:
        _refuse("--expert-saliency", f"must be one of {', '.join(EXPERT_SALIENCIES)}, got {options.expert_saliency!r}")
    moe = [s for s in options.structures if s in MOE_STRUCTURES]
    if not moe:
        return
    importance = ESTIMATORS[options.importance]
    if importance.reselects and set(options.structures) <= {"blocks", "experts"}:
        _refuse("--importance", (
            f"'{options.importance}'{' (the default)' if options.importance == 'obs' else ''} chooses units while reconstructing, "
            "and whole experts go by the routing (--expert-saliency) with nothing to refit: pass --importance taylor (or wanda-sp, l1…), "
            "or cut expert-channels too"
        ))
    if "experts" in moe and options.expert_saliency == "importance":
        _refuse_expert_estimator(options.importance, "whole experts", WHOLE_EXPERT_REFUSALS, ", or score whole experts by the routing (--expert-saliency reap or frequency)")
    if options.bias_compensation:
        _refuse("--bias-compensation", (
            f"routed experts' stacked down projections have no bias to take the removed units' means, and no stock config a switch "
            f"adding one: leave {', '.join(moe)} out of --structures or pass no --bias-compensation"
        ))


def _check_experts_offered(graph: StructureGraph, options: PruneOptions) -> None:
    """``--structures experts`` on a model whose experts dimension the tracer pinned is refused
    before any scoring, naming why (DeepSeek-V3's grouped router: its per-expert score-correction
    bias is a buffer, and its top-k runs over contiguous groups of experts, which removing experts
    would regroup)."""
    if "experts" not in options.structures or graph.by_kind("experts"):
        return
    reasons = sorted({pin.reason for pin in graph.pinned if pin.dim == 0 and ".experts." in pin.param})
    if not reasons:
        _refuse("--structures", "experts: the model has no routed experts; `structprune inspect` lists what can be cut")
    more = f" (and {len(reasons) - 1} more layers)" if len(reasons) > 1 else ""
    _refuse("--structures", f"experts: the model's experts cannot be removed, their dimension is pinned: {reasons[0]}{more}; `structprune inspect` lists what can be cut")


def _check_expert_width_expressible(model_dir: Path, graph: StructureGraph, options: PruneOptions) -> None:
    """``--structures expert-channels`` on a model whose config cannot hold a narrower expert is
    refused before scoring, naming why (DeepSeek: its shared experts' width is
    ``moe_intermediate_size × n_shared_experts``, so narrowing the routed experts narrows them too)."""
    if "expert-channels" not in options.structures or not graph.by_kind("expert_channels"):
        return
    reason = stock_config_check(graph, read_config(model_dir) or {}, "expert_channels")
    if reason is not None:
        _refuse("--structures", f"expert-channels: narrower experts cannot be written for this model: {reason}; `structprune inspect` lists what can be cut")


_CONSUMED_BY_THE_ROUTER = "a whole expert's output is consumed by the router's weighted sum, no layer"
WHOLE_EXPERT_REFUSALS = {
    **{name: f"scores a unit at the input of the layer that consumes it, and {_CONSUMED_BY_THE_ROUTER}" for name in ("flap", "entropy", "obs")},
    "head-gate": f"gates a unit at the input of the layer that consumes it, and {_CONSUMED_BY_THE_ROUTER}",
    "bonsai": f"masks a unit at the input of the layer that consumes it, and {_CONSUMED_BY_THE_ROUTER}",
}
"""Estimators that cannot score whole experts through their weights (``--expert-saliency importance``), and why."""


def _refuse_expert_estimator(name: str, units: str, refusals: Dict[str, str], alternative: str = "") -> None:
    if name in refusals:
        usable = [e for e in ESTIMATORS if e not in refusals and not ESTIMATORS[e].reselects]
        _refuse("--importance", f"'{name}' cannot score {units}: it {refusals[name]}; pass --importance {', '.join(usable)}{alternative}")


def needs_calibration(options: PruneOptions) -> bool:
    """Whether ``options`` need calibration text (gradients, activations, sub-model losses, block
    influence, means or reconstruction all come from it)."""
    importance = ESTIMATORS[options.importance]
    routed = "experts" in options.structures and options.expert_saliency in ROUTING_SALIENCIES
    return bool(
        importance.needs_gradients or importance.needs_activations or importance.perturbs or "blocks" in options.structures or options.bias_compensation
        or reconstructs(options) or routed
    )


def _check_combinations(options: PruneOptions) -> None:
    reconstruct_ = reconstructs(options)
    if options.bias_compensation:
        if "hidden" in options.structures:
            _refuse("--bias-compensation", HIDDEN_COMPENSATION_REFUSAL)
        if options.layout == "decilm":
            _refuse("--bias-compensation", DECILM_REFUSAL)
    if ESTIMATORS[options.importance].adapts and "hidden" in options.structures:
        _refuse("--structures", f"importance '{options.importance}' reads LoRA adapters on the blocks' linear layers; hidden channels also live in the embeddings and head, which carry none: leave hidden out")
    if ESTIMATORS[options.importance].reselects and tuple(options.structures) != ("blocks",):  # blocks go by Block Influence
        unsupported = [why for why, present in (
            ("--no-reconstruct", not reconstruct_), ("hidden channels", "hidden" in options.structures),
            ("bias compensation", options.bias_compensation),
        ) if present]
        if unsupported:
            _refuse("--importance", (
                f"'{options.importance}' (the default) chooses the units while reconstructing, which rules out "
                f"{' and '.join(unsupported)}: pass another --importance (taylor, wanda-sp, flap…)"
            ))
    if options.refit_steps and not reconstruct_:
        _refuse("--refit-steps", "the block refit starts from reconstruction's least-squares fits: it needs --reconstruct")
    if reconstruct_:
        if "hidden" in options.structures:
            _refuse("--reconstruct", HIDDEN_REFUSAL)
        if options.bias_compensation:
            _refuse("--reconstruct", "reconstruction refits the kept weights, which subsumes bias compensation: choose one of them")
    if options.planning == "global" and tuple(options.structures) == ("blocks",):
        _refuse("--global", "global planning chooses widths per layer; remove blocks on their own with --uniform, or name width structures too")
    if options.calib is None and needs_calibration(options):
        needing = f"importance '{options.importance}'" + (" with bias compensation" if options.bias_compensation else "")
        if reconstruct_ and not options.bias_compensation:
            needing += " with reconstruction (on by default; --no-reconstruct turns it off)"
        _refuse("--calib", f"{needing} needs calibration text: pass --calib FILE")


def _refuse(option: str, why: str) -> NoReturn:
    raise SettingError(f"{option}: {why}", option=option)


def _reconstruct(
    model: StreamedModel,
    graph: StructureGraph,
    selection: Selection,
    share: torch.Tensor,
    options: PruneOptions,
    directory: Path,
    workers: Workers,
    progress: Optional[Progress],
    *,
    reselect: bool,
) -> Reconstruction:
    from structprune.tracing.export import checkpoint_layout

    layout = checkpoint_layout(model.model_dir, list(read_checkpoint(model.model_dir).tensors))
    stored_names = {model_name: name for name, model_name in layout.renamed.items()}
    result = reconstruct(
        model, graph, selection, share, directory, stored_names=stored_names, stored_dtypes=stored_dtype_map(model.model_dir), expert_pieces=layout.experts,
        damping=options.damping, target=options.reconstruction_target, micro_batch=options.micro_batch, activation_memory=options.activation_memory, workers=workers,
        progress=progress, reselect=reselect,
        refit=RefitSettings(steps=options.refit_steps, lr=options.refit_lr, seed=options.seed) if options.refit_steps else None,
    )
    return result


def default_multiple(graph: StructureGraph) -> int:
    """64 when the MLP has at least 2048 channels (large models, where 64 keeps GEMMs on full
    tiles), else 8 (small models, where 64 would be too coarse a step)."""
    channels = graph.by_kind("channels")
    return 64 if channels and channels[0].units >= 2048 else 8


def prune(
    model_dir: Union[str, Path],
    output_dir: Optional[Union[str, Path]],
    options: PruneOptions,
    *,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
    apply_progress: bool = False,
    resume: Union[bool, str, Path] = False,
    plan_out: Optional[Union[str, Path]] = None,
) -> PruneResult:
    """Scores, plans and writes the pruned checkpoint to ``output_dir``: ``structprune prune``.

    ``output_dir`` ``None`` is a dry run (the plan only). ``plan_out``: the plan is also saved
    there, and with reconstruction the refitted weights it reads stay beside it, in
    ``structprune-reconstructed/``. Under torchrun every process scores its share of the
    calibration samples and only the first writes (``resume`` as for ``make_plan``)."""
    check_options(options)
    if output_dir is not None:
        check_output(model_dir, output_dir, overwrite=overwrite)  # before scoring, not after it
    with joined(options.device) as workers, _reconstruction_dir(options, output_dir, plan_out) as work_dir:
        result = make_plan(model_dir, options, progress=progress if workers.is_main else None, resume=resume, workers=workers, reconstruction_dir=work_dir)
        if workers.is_main:
            if plan_out is not None:
                result.plan.save(plan_out)
            if output_dir is not None:
                result.report = apply_plan(model_dir, result.plan, output_dir, overwrite=overwrite, progress=apply_progress)
    return result


def _reconstruction_dir(options: PruneOptions, output_dir: Optional[Union[str, Path]], plan_out: Optional[Union[str, Path]]) -> ContextManager[Optional[Path]]:
    """Where the refitted weights go: beside ``plan_out`` (the plan reads them, so they stay, named
    by content), else a hidden directory beside the output, removed after writing; a dry run
    without ``plan_out`` lets ``make_plan`` keep them while the result lives."""
    if reconstructs(options) and plan_out is not None:
        return nullcontext(Path(plan_out).resolve().parent / RECONSTRUCTED_DIR)
    if output_dir is None:
        return nullcontext(None)
    return reconstruction_work_dir(output_dir, options)


@contextmanager
def reconstruction_work_dir(output_dir: Union[str, Path], options: PruneOptions) -> Iterator[Optional[Path]]:
    """A hidden directory beside the output for the refitted weights while the plan is applied,
    removed afterwards whatever happens (``None`` without reconstruction)."""
    if not reconstructs(options):
        yield None
        return
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.structprune-reconstruct-", dir=output_dir.parent))
    try:
        yield work_dir
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _score(
    model: StreamedModel,
    graph: StructureGraph,
    importance: Importance,
    input_ids: Optional[torch.Tensor],
    options: PruneOptions,
    *,
    workers: Workers,
    resume: Union[bool, str, Path],
    progress: Optional[Progress],
) -> Scores:
    """Scores on this process's share of the calibration batch, journalled when ``resume`` asks."""
    # Hidden channels are scored only when asked for: their scores need the gradients of the
    # embeddings and head, the largest tensors of the model.
    kinds = [k for k in KINDS if k != "hidden" or "hidden" in options.structures]
    if importance.gates or importance.perturbs:
        # They act on a unit at the layer consuming it, which whole experts lack (the router's
        # weighted sum consumes them; _check_experts refuses them for experts, which the routing scores).
        kinds.remove("experts")
    if tuple(options.structures) == ("blocks",):
        kinds = []  # Block Influence comes from the forward pass: no unit scores, no backward pass
    if input_ids is None:
        return score(model, graph, importance, None, reduction=options.reduction, progress=progress, kinds=kinds)
    share = input_ids[workers.share(input_ids.shape[0])]
    scored = partial(
        score, model, graph, importance, share, reduction=options.reduction, micro_batch=options.micro_batch, progress=progress,
        workers=workers, kinds=kinds, record_means=options.bias_compensation, activation_memory=options.activation_memory,
    )
    if resume is False:
        return scored()
    key = run_key(
        model.model_dir, calibration_sha256=batch_sha256(input_ids), seed=options.seed,
        importance=options.importance if options.lora_adapter is None else f"{options.importance}@{adapter_sha256(options.lora_adapter)}",
        micro_batch=options.micro_batch, dtype=options.dtype, device=str(model.device), processes=workers.world_size,
        kinds=kinds, input_means=options.bias_compensation,
    )
    directory = default_directory(key) if resume is True else Path(resume)
    with Journal(directory, key, workers) as journal:
        return scored(journal=journal)


def _routed_expert_scores(
    model: StreamedModel,
    graph: StructureGraph,
    scores: Scores,
    input_ids: Optional[torch.Tensor],
    options: PruneOptions,
    *,
    workers: Workers,
    progress: Optional[Progress],
) -> Scores:
    """``scores`` with whole experts scored by the routing (``--expert-saliency reap`` or
    ``frequency``: one more streamed forward pass) instead of the estimator."""
    if "experts" not in options.structures or options.expert_saliency not in ROUTING_SALIENCIES or not graph.by_kind("experts"):
        return scores
    assert input_ids is not None  # needs_calibration asks for it
    share = input_ids[workers.share(input_ids.shape[0])]
    stats = routing_stats(
        model, graph, share, micro_batch=options.micro_batch, activation_memory=options.activation_memory, workers=workers, progress=progress,
    )
    units = {**scores.units, **expert_saliency(graph, stats, options.expert_saliency)}
    return replace(scores, units=units)


def _calibration(model_dir: Path, options: PruneOptions) -> tuple:
    from structprune.score.calibration import calibration_batch, load_texts
    from structprune.models.loading import load_tokenizer

    assert options.calib is not None  # check_options refused its absence
    texts = load_texts(options.calib, text_field=options.text_field)
    tokenizer = load_tokenizer(model_dir)
    batch = calibration_batch(texts, tokenizer, samples=options.samples, seq_len=options.seq_len, seed=options.seed)
    summary = {"source": str(options.calib), "samples": options.samples, "seq_len": options.seq_len, "seed": options.seed}
    return batch, summary


def _score_summary(graph: StructureGraph, scores: Scores) -> Dict[str, Any]:
    summary: Dict[str, Any] = {"estimator": scores.estimator, "reduction": scores.reduction}
    if scores.loss is not None:
        summary["calibration_loss"] = scores.loss
    by_kind: Dict[str, List[float]] = {}
    for sid, values in scores.units.items():
        by_kind.setdefault(graph.get(sid).kind, []).extend(float(v) for v in values)
    summary["per_kind"] = {k: {"min": min(v), "mean": float(np.mean(v)), "max": max(v)} for k, v in sorted(by_kind.items())}
    if scores.block_influence is not None:
        summary["block_influence"] = [round(float(b), 6) for b in scores.block_influence]
    return summary
