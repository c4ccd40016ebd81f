"""``structprune prune``: trace → score → plan → apply in one call."""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from structprune.apply import ApplyReport, apply_plan, check_output, plan_output
from structprune.calibration import batch_sha256
from structprune.checkpoint import read_checkpoint, read_config
from structprune.compensation import check_request, compensate_biases
from structprune.cuts import Selection, checkpoint_cut_plan
from structprune.distributed import Workers, current
from structprune.errors import PlanError
from structprune.graph import KINDS, StructureGraph, trace
from structprune.importance import Importance, estimator
from structprune.plan import CutPlan
from structprune.planner import PLANNINGS, Target, default_protection, layer_widths, plan_global, plan_uniform
from structprune.reconstruct import DEFAULT_DAMPING, HIDDEN_REFUSAL, Reconstruction, apply_to_plan, reconstruct, stored_dtype_map
from structprune.resume import Journal, default_directory, run_key
from structprune.scoring import Scores, score
from structprune.sizes import DEFAULT_ACTIVATION_MEMORY, DEFAULT_SAMPLES
from structprune.streaming import StreamedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PruneOptions:
    ratio: float
    importance: str = "obs"
    """How units are chosen; ``obs`` (the default: best on SmolLM2 at 20% and 50%,
    docs/benchmarks.md) sets each layer's widths from diagonal OBS costs and picks the units by
    greedy OBS while reconstructing. Every name of ``structprune.importance.ESTIMATORS`` works."""
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
    """Checkpoint format (``structprune.formats``): auto, stock, decilm or layers."""
    blocks: Optional[int] = None
    """Whole blocks to remove when ``structures`` combines blocks with widths (the rest of the ratio
    comes from widths); ``None`` when blocks are pruned on their own."""
    bias_compensation: bool = False
    """FLAP's bias compensation (``structprune.compensation``): the removed input channels of
    o_proj/down_proj (and their equivalents) are replaced by their calibration means, folded into the
    layers' biases. Needs calibration data, whatever the estimator."""
    reconstruct: Optional[bool] = None
    """Refit the kept input columns of every layer that loses inputs (least squares on the pruned
    model's calibration activations, block by block: ``structprune.reconstruct``). Needs
    calibration data, whatever the estimator. ``None``: on wherever it applies (not with hidden
    channels, bias compensation, or blocks alone); see ``reconstructs``."""
    damping: float = DEFAULT_DAMPING
    """Reconstruction's λ relative to the mean diagonal of the kept inputs' Gram matrix."""
    reconstruction_target: str = "dense"
    """What refitted layers reproduce (``structprune.reconstruct.TARGETS``): ``layer``, the outputs
    of their own dense weights on the pruned inputs; ``dense`` (measured best on SmolLM2 at 20% and
    50%), the same except that a layer feeding the residual stream (down_proj) reproduces the dense
    block's output, correcting the drift of the blocks before."""


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
    ``structprune.resume``). ``workers``: the processes scoring together (default: the process group
    this process is in, if any); each scores its share of the calibration batch and every process
    gets the same result."""
    started = time.perf_counter()
    model_dir = Path(model_dir)
    if options.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype}")
    if options.planning not in PLANNINGS:
        raise PlanError(f"planning must be one of {', '.join(PLANNINGS)}, got {options.planning!r}")
    graph = trace(model_dir)
    if graph.blocks is None:
        raise PlanError(f"{model_dir}: no repeated blocks found, so the model cannot be scored block by block")
    importance = estimator(options.importance, seed=options.seed)
    if options.bias_compensation:
        check_request(tuple(options.structures), options.layout)
    reconstruct_ = reconstructs(options)
    if importance.reselects:
        _check_reselection(options, reconstruct_)
    owned_dir = None
    if reconstruct_:
        _check_reconstruction(options)
        if reconstruction_dir is None:
            owned_dir = tempfile.TemporaryDirectory(prefix="structprune-reconstruct-")
            reconstruction_dir = Path(owned_dir.name)
    needs_data = (
        importance.needs_gradients or importance.needs_activations or "blocks" in options.structures or options.bias_compensation or reconstruct_
    )
    input_ids, calibration = _calibration(model_dir, options) if needs_data else (None, None)
    workers = workers or current()
    device = workers.compute_device(options.device)
    model = StreamedModel(model_dir, device=device, dtype=DTYPES[options.dtype], blocks_prefix=graph.blocks.prefix)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    scores = _score(model, graph, importance, input_ids, options, workers=workers, resume=resume, progress=progress)
    selection, target = plan_selection(model_dir, graph, scores, options)
    protect, multiple = target.protect, target.multiple
    metadata = {
        "method": {
            "importance": options.importance, "reduction": options.reduction, "planning": options.planning, "structures": list(options.structures),
            "gqa": options.gqa, "multiple": multiple, "protect": list(protect), "normalize": options.normalize, "blocks": options.blocks,
            "reconstruct": reconstruct_,
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
    target = Target(
        ratio=options.ratio, structures=tuple(options.structures), gqa=options.gqa,
        multiple=options.multiple or default_multiple(graph), protect=protect, normalize=options.normalize,
        blocks=options.blocks,
    )
    if options.planning == "global":
        return plan_global(graph, scores, target), target
    config = read_config(Path(model_dir)) or {}
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 0)
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    return plan_uniform(graph, scores, target, heads, hidden), target


def reconstructs(options: PruneOptions) -> bool:
    """Whether ``options`` reconstruct: as asked, else wherever reconstruction applies (measured to
    win on SmolLM2 at every ratio tried: docs/benchmarks.md)."""
    if options.reconstruct is not None:
        return options.reconstruct
    if tuple(options.structures) == ("blocks",):
        return False  # no layer loses inputs: nothing to refit
    if options.calib is None and options.importance != "obs":
        return False  # nothing to fit on; a data-free estimator still prunes
    if options.importance == "obs":
        return True
    return not ("hidden" in options.structures or options.bias_compensation)


def _check_reselection(options: PruneOptions, reconstruct: bool) -> None:
    """An estimator that chooses units while reconstructing (obs) needs what reconstruction needs."""
    if tuple(options.structures) == ("blocks",):
        return  # blocks are chosen by Block Influence, whatever the estimator
    unsupported = [why for why, present in (
        ("--no-reconstruct", not reconstruct), ("hidden channels", "hidden" in options.structures),
        ("bias compensation", options.bias_compensation),
    ) if present]
    if unsupported:
        raise PlanError(
            f"importance '{options.importance}' (the default) chooses the units while reconstructing, which rules out "
            f"{' and '.join(unsupported)}: pass another --importance (taylor, wanda-sp, flap…)"
        )


def _check_reconstruction(options: PruneOptions) -> None:
    if "hidden" in options.structures:
        raise PlanError(HIDDEN_REFUSAL)
    if options.bias_compensation:
        raise PlanError("reconstruction refits the kept weights, which subsumes bias compensation: choose one of them")
    if options.damping < 0:
        raise PlanError(f"reconstruction damping must be at least 0, got {options.damping}")


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
    from structprune.tracing import checkpoint_name_map

    names = list(read_checkpoint(model.model_dir).tensors)
    stored_names = {model_name: name for name, model_name in checkpoint_name_map(model.model_dir, names).items()}
    result = reconstruct(
        model, graph, selection, share, directory, stored_names=stored_names, stored_dtypes=stored_dtype_map(model.model_dir),
        damping=options.damping, target=options.reconstruction_target, micro_batch=options.micro_batch, activation_memory=options.activation_memory, workers=workers,
        progress=progress, reselect=reselect,
    )
    return result


def default_multiple(graph: StructureGraph) -> int:
    """64 when the MLP has at least 2048 channels (large models, where 64 keeps GEMMs on full
    tiles), else 8 (small models, where 64 would be too coarse a step)."""
    channels = graph.by_kind("channels")
    return 64 if channels and channels[0].units >= 2048 else 8


def prune(
    model_dir: Union[str, Path],
    output_dir: Union[str, Path],
    options: PruneOptions,
    *,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
    apply_progress: bool = False,
    resume: Union[bool, str, Path] = False,
) -> PruneResult:
    """Scores, plans and writes the pruned checkpoint to ``output_dir`` (only process 0 writes it
    when several score together; ``resume`` as for ``make_plan``)."""
    check_output(model_dir, output_dir, overwrite=overwrite)  # before scoring, not after it
    workers = current()
    with reconstruction_work_dir(output_dir, options) as work_dir:
        result = make_plan(model_dir, options, progress=progress, resume=resume, workers=workers, reconstruction_dir=work_dir)
        if workers.is_main:
            result.report = apply_plan(model_dir, result.plan, output_dir, overwrite=overwrite, progress=apply_progress)
    return result


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
    if tuple(options.structures) == ("blocks",):
        kinds = []  # Block Influence comes from the forward pass: no unit scores, no backward pass
    if input_ids is None:
        return score(model, graph, importance, None, reduction=options.reduction, progress=progress, kinds=kinds)
    share = input_ids[workers.share(input_ids.shape[0])]
    common = {
        "reduction": options.reduction, "micro_batch": options.micro_batch, "progress": progress, "workers": workers, "kinds": kinds,
        "record_means": options.bias_compensation, "activation_memory": options.activation_memory,
    }
    if resume is False:
        return score(model, graph, importance, share, **common)
    key = run_key(
        model.model_dir, calibration_sha256=batch_sha256(input_ids), importance=options.importance, seed=options.seed,
        micro_batch=options.micro_batch, dtype=options.dtype, device=str(model.device), processes=workers.world_size,
        kinds=kinds, input_means=options.bias_compensation,
    )
    directory = default_directory(key) if resume is True else Path(resume)
    with Journal(directory, key, workers) as journal:
        return score(model, graph, importance, share, journal=journal, **common)


def _calibration(model_dir: Path, options: PruneOptions) -> tuple:
    from structprune.calibration import calibration_batch, load_texts
    from structprune.loading import load_tokenizer

    if options.calib is None:
        needing = f"importance '{options.importance}'" + (" with bias compensation" if options.bias_compensation else "")
        if reconstructs(options) and not options.bias_compensation:
            needing += " with reconstruction (on by default; --no-reconstruct turns it off)"
        raise PlanError(f"{needing} needs calibration text: pass --calib FILE")
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
