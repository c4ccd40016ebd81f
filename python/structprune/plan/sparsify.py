"""Unstructured and semi-structured (N:M) sparsity, for contrast with structured pruning.

Individual weights of every linear layer inside the repeated blocks are set to zero; the embeddings
and the LM head stay dense, as in Wanda and SparseGPT. Weights compete within their output row
(Wanda's comparison group): every row of a layer loses ``round(sparsity · inputs)`` weights
(``torch.nn.utils.prune.l1_unstructured``'s rounding), or, with an ``N:M`` pattern, keeps at most
``N`` of every ``M`` consecutive inputs (2:4 is what sparse tensor cores run).

Methods (``METHODS``), by the score whose lowest weights go:

- ``magnitude``: ``|W_ij|``; data-free.
- ``wanda`` (Sun et al., 2023): ``|W_ij| · ‖X_j‖``, ``‖X_j‖`` the norm of input channel ``j`` over
  every calibration token.
- ``sparsegpt`` (Frantar & Alistarh, 2023): the optimal brain surgeon with ``H = X Xᵀ + λI``
  (``λ = damping · mean diag``), column block by column block (``block_size`` columns): inside a
  block each row's weights are chosen by ``W_ij² / [U_jj]²`` (``U`` the upper Cholesky factor of
  ``H⁻¹``), then the columns are taken in order, a pruned weight's error ``e = w / U_jj`` spread
  over the row's later columns of the block (``W[:, j:] -= e · U[j, j:]``) and, once a block is
  done, over the later blocks. The kept weights therefore change; the other two methods only zero.
  A row's removals are spread over the blocks by cumulative rounding, so that every row loses
  exactly as many weights as with the other methods.

Wanda and SparseGPT run block by block on the calibration data like reconstruction
(``structprune.plan.reconstruct``): the statistics of a block's layers are measured on the inputs
that the already sparsified blocks before produce, all of the block's layers in one pass over the
calibration windows (their reference implementations' default), and the sparsified block is then
run once more to give the next block its inputs: two block forwards per block and micro-batch.

The new tensors are written block by block into safetensors files of a work directory and applied
as a plan whose tensors are ``replace``d from those files (docs/plan-format.md): the output is a
stock checkpoint written by the shard engine (staged, renamed when complete, byte-reproducible),
with the input's config unchanged and ``sparsity.json`` saying how it was sparsified.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from structprune.apply import ApplyReport, apply_plan, check_output
from structprune.errors import PlanError, SettingError
from structprune.io.checkpoint import read_checkpoint
from structprune.io.sizes import DEFAULT_ACTIVATION_MEMORY, DEFAULT_DAMPING, DEFAULT_SAMPLES
from structprune.plan.cut_plan import CutPlan, TensorCut, Values
from structprune.plan.reconstruct import save_by_content
from structprune.score.scorer import linear_input_dim
from structprune.score.streaming import ActivationStore, StreamedModel

METHODS = ("magnitude", "wanda", "sparsegpt")
METHODS_NEEDING_DATA = ("wanda", "sparsegpt")
DEFAULT_BLOCK_SIZE = 128
"""SparseGPT's column block (its paper's choice): the lazy batch of columns updated together."""
SPARSITY_FILE = "sparsity.json"
"""Written into the output: the pattern, method and achieved sparsity (the config stays as it was)."""
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Pattern:
    """N:M sparsity: at most ``kept`` non-zeros in every ``group`` consecutive inputs of a row."""

    kept: int
    group: int

    def __str__(self) -> str:
        return f"{self.kept}:{self.group}"

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """``"2:4"`` → ``Pattern(2, 4)``; refuses anything but ``N:M`` with ``0 < N < M``."""
        match = _PATTERN.match(text)
        if match is None:
            raise SettingError(f"pattern (--pattern): expected N:M such as 2:4, got {text!r}", option="--pattern")
        kept, group = int(match.group(1)), int(match.group(2))
        if not 0 < kept < group:
            raise SettingError(f"pattern (--pattern): N:M needs 0 < N < M, got {text!r}", option="--pattern")
        return cls(kept, group)


@dataclass(frozen=True)
class SparsifyOptions:
    sparsity: Optional[float] = None
    """Fraction of each row's weights to zero (unstructured); exactly one of this and ``pattern``."""
    pattern: Optional[str] = None
    """``N:M`` (semi-structured): at most N non-zeros in every M consecutive inputs."""
    method: str = "wanda"
    calib: Optional[Path] = None
    text_field: str = "text"
    samples: int = DEFAULT_SAMPLES
    seq_len: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    micro_batch: int = 4
    activation_memory: int = DEFAULT_ACTIVATION_MEMORY
    damping: float = DEFAULT_DAMPING
    """SparseGPT's λ relative to the mean diagonal of the inputs' Gram matrix."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """SparseGPT's column block."""

    def target(self) -> Union[float, Pattern]:
        """The validated sparsity target: a fraction per row, or an N:M pattern."""
        if (self.sparsity is None) == (self.pattern is None):
            raise SettingError("give exactly one of sparsity (--sparsity) and pattern (--pattern)", option="--sparsity")
        if self.pattern is not None:
            return Pattern.parse(self.pattern)
        assert self.sparsity is not None
        if not 0 < self.sparsity < 1:
            raise SettingError(f"sparsity (--sparsity): must lie strictly between 0 and 1, got {self.sparsity}", option="--sparsity")
        return float(self.sparsity)

    def check(self) -> Union[float, Pattern]:
        """Refuses bad values before any work; returns the target."""
        target = self.target()
        if self.method not in METHODS:
            raise SettingError(f"method (--method): unknown {self.method!r}; choose one of {', '.join(METHODS)}", option="--method")
        if self.method in METHODS_NEEDING_DATA and self.calib is None:
            raise SettingError(f"method (--method) {self.method} needs calibration text: pass calib (--calib FILE)", option="--method")
        if self.dtype not in COMPUTE_DTYPES:
            raise SettingError(f"dtype (--dtype): must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}", option="--dtype")
        if self.damping < 0:
            raise SettingError(f"damping (--damping): must be at least 0, got {self.damping}", option="--damping")
        if self.block_size < 1:
            raise SettingError(f"block_size (--block-size): must be positive, got {self.block_size}", option="--block-size")
        if self.method == "sparsegpt" and isinstance(target, Pattern) and self.block_size % target.group:
            # A group of M columns must lie inside one block: its mask is chosen from one block's state.
            raise SettingError(f"block_size (--block-size): with --pattern {target} it must be a multiple of {target.group}, got {self.block_size}", option="--block-size")
        return target


@dataclass
class SparsifyResult:
    plan: CutPlan
    zeroed: int
    """Weights set to zero by sparsification (weights that were zero already not counted twice)."""
    sparsified_parameters: int
    """Parameters of the layers sparsified (the blocks' linear weights)."""
    total_parameters: int
    seconds: float
    peak_rss_bytes: int
    report: Optional[ApplyReport] = None
    work_dir: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)
    """Holds the tensor files the plan reads when ``sparsify_plan`` was given no ``work_dir``."""

    @property
    def zeroed_fraction(self) -> float:
        """Of all the checkpoint's parameters (embeddings and head included)."""
        return self.zeroed / self.total_parameters if self.total_parameters else 0.0


# ------------------------------------------------------------------------------------------------
# masks and the three methods, on one layer's [out, in] weight


def keep_mask(scores: torch.Tensor, target: Union[float, Pattern]) -> torch.Tensor:
    """Which weights stay (``True``), the lowest ``scores`` of each row going: ``round(sparsity ·
    inputs)`` per row, or ``M − N`` of every ``M`` consecutive inputs. Ties go by column order."""
    rows, inputs = scores.shape
    if isinstance(target, Pattern):
        groups = scores.reshape(rows * inputs // target.group, target.group)
        return _lowest_removed(groups, target.group - target.kept).reshape(rows, inputs)
    return _lowest_removed(scores, round(target * inputs))


def check_pattern_fits(name: str, inputs: int, target: Union[float, Pattern]) -> None:
    if isinstance(target, Pattern) and inputs % target.group:
        raise SettingError(f"pattern (--pattern) {target}: tensor '{name}' has {inputs} inputs, not a multiple of {target.group}", option="--pattern")


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


def wanda_scores(weight: torch.Tensor, input_squares: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖`` from the sums of squares of the inputs."""
    return weight.double().abs() * input_squares.double().sqrt()[None, :]


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    target: Union[float, Pattern],
    *,
    damping: float = DEFAULT_DAMPING,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer (see the module docstring): the new ``[out, in]`` weights (float64,
    exactly zero where pruned) and the keep mask. ``gram``: ``X Xᵀ`` of the layer's inputs."""
    w = weight.double().clone()
    rows, inputs = w.shape
    upper = _inverse_cholesky(gram.double(), damping)
    keep = torch.ones(rows, inputs, dtype=torch.bool, device=w.device)
    for start in range(0, inputs, block_size):
        end = min(start + block_size, inputs)
        block = w[:, start:end].clone()
        factor = upper[start:end, start:end]
        errors = torch.zeros_like(block)
        diagonal = torch.diagonal(factor)
        if not isinstance(target, Pattern):
            # Cumulative rounding: the blocks' removals add up to round(sparsity · inputs) per row.
            count = round(target * end) - round(target * start)
            keep[:, start:end] = _lowest_removed(block.square() / diagonal.square(), count)
        for j in range(end - start):
            if isinstance(target, Pattern) and j % target.group == 0:
                span = slice(j, j + target.group)
                keep[:, start + j : start + j + target.group] = keep_mask(block[:, span].square() / diagonal[span].square(), target)
            column = block[:, j]
            pruned = torch.where(keep[:, start + j], column, torch.zeros_like(column))
            error = (column - pruned) / factor[j, j]
            block[:, j:] -= error[:, None] * factor[j, j:][None, :]
            block[:, j] = pruned  # exactly, not up to rounding
            errors[:, j] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ upper[start:end, end:]
    return w, keep


def _lowest_removed(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The keep mask without the ``count`` lowest scores of each row (ties by column order)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    return keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :count], False)


def _inverse_cholesky(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(G + λI)⁻¹`` (``H⁻¹ = Uᵀ U``). Inputs that were zero on
    every calibration token get 1 on the diagonal: their weights never act, so any choice for them
    is exact, and the matrix stays invertible without damping."""
    h = gram.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    scale = float(torch.diagonal(h).mean()) if h.numel() else 0.0
    h.diagonal().add_(damping * scale)
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise SettingError(
            f"damping (--damping) {damping}: the inputs' Gram matrix is not positive definite even with it; raise the damping",
            option="--damping",
        )
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


# ------------------------------------------------------------------------------------------------
# streaming over the checkpoint


@dataclass(frozen=True)
class _Layer:
    module: str
    """Path inside the block (``self_attn.q_proj``)."""
    stored: str
    """Name of its weight in the checkpoint."""
    input_dim: int
    """The weight dimension that indexes inputs (1 for nn.Linear, 0 for GPT-2's Conv1D)."""


class _InputStatistics:
    """Per-layer sums over the calibration tokens of the loaded block: squares of each input
    channel (Wanda) or the Gram matrix ``X Xᵀ`` (SparseGPT). Layers fed the same tensor (q, k
    and v; gate and up) share one product per call."""

    def __init__(self, gram: bool) -> None:
        self.gram = gram
        self.sums: Dict[str, torch.Tensor] = {}
        self._last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @contextmanager
    def recording(self, block: nn.Module, layers: List[_Layer]) -> Iterator[None]:
        handles = [block.get_submodule(layer.module).register_forward_hook(self._hook(layer.module)) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._last = None

    def _hook(self, module: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: Tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0]
            if self._last is None or self._last[0] is not x:
                rows = x.detach().reshape(-1, x.shape[-1]).double()
                self._last = (x, rows.T @ rows if self.gram else rows.square().sum(0))
            product = self._last[1]
            if module in self.sums:
                self.sums[module] += product
            else:
                self.sums[module] = product.clone()

        return record


def sparsify_plan(
    model_dir: Union[str, Path],
    options: SparsifyOptions,
    *,
    work_dir: Optional[Path] = None,
    progress: Optional[Progress] = None,
) -> SparsifyResult:
    """Sparsifies the checkpoint's block linear layers into tensor files under ``work_dir`` (a
    temporary directory held by the result when ``None``) and returns the plan that writes them."""
    from structprune.tracing.graph import trace

    started = time.perf_counter()
    model_dir = Path(model_dir)
    target = options.check()
    graph = trace(model_dir)
    if graph.blocks is None:
        raise PlanError(f"{model_dir}: no repeated blocks found, so the model cannot be sparsified block by block")
    owned = None
    if work_dir is None:
        owned = tempfile.TemporaryDirectory(prefix="structprune-sparsify-")
        work_dir = Path(owned.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    input_ids = _calibration(model_dir, options) if options.method in METHODS_NEEDING_DATA else None
    model = StreamedModel(model_dir, device=options.device, dtype=COMPUTE_DTYPES[options.dtype], blocks_prefix=graph.blocks.prefix)
    checkpoint = read_checkpoint(model_dir)
    run = _Run(model, model_dir, options, target, work_dir, progress)
    run.sparsify_blocks(input_ids)
    summary: Dict[str, Any] = {
        "format": "structprune.sparsity", "method": options.method, "pattern": str(target) if isinstance(target, Pattern) else None,
        "sparsity": None if isinstance(target, Pattern) else target, "comparison_group": "output row",
        "layers": len(run.files), "zeroed": run.zeroed, "sparsified_parameters": run.sparsified,
        "zeroed_fraction_of_sparsified": run.zeroed / run.sparsified if run.sparsified else 0.0,
        "zeroed_fraction_of_all": run.zeroed / checkpoint.parameters if checkpoint.parameters else 0.0,
    }
    if input_ids is not None:
        summary["calibration"] = {"samples": options.samples, "seq_len": options.seq_len, "seed": options.seed}
    if options.method == "sparsegpt":
        summary.update(damping=options.damping, block_size=options.block_size)
    plan = CutPlan(
        tensors={stored: TensorCut(replace=Values.from_file(path.resolve(), stored)) for stored, path in sorted(run.files.items())},
        files={SPARSITY_FILE: json.dumps(summary, indent=1, sort_keys=True) + "\n"},
        metadata={"sparsity": summary, **({"calibration_source": str(options.calib)} if input_ids is not None else {})},
    )
    return SparsifyResult(
        plan=plan, zeroed=run.zeroed, sparsified_parameters=run.sparsified, total_parameters=checkpoint.parameters,
        seconds=time.perf_counter() - started, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, work_dir=owned,
    )


def sparsify(
    model_dir: Union[str, Path],
    output_dir: Union[str, Path],
    options: SparsifyOptions,
    *,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
    apply_progress: bool = False,
) -> SparsifyResult:
    """Sparsifies ``model_dir`` and writes the result to ``output_dir`` (appearing only when
    complete; the input is never modified)."""
    options.check()
    check_output(model_dir, output_dir, overwrite=overwrite)  # before the work, not after it
    with _work_dir_beside(Path(output_dir)) as work_dir:
        result = sparsify_plan(model_dir, options, work_dir=work_dir, progress=progress)
        result.report = apply_plan(model_dir, result.plan, output_dir, overwrite=overwrite, progress=apply_progress)
    return result


@contextmanager
def _work_dir_beside(output_dir: Path) -> Iterator[Path]:
    """A hidden directory beside the output for the tensor files while the plan is applied,
    removed afterwards whatever happens (on the output's file system: no copy across disks)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.structprune-sparsify-", dir=output_dir.parent))
    try:
        yield work_dir
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _calibration(model_dir: Path, options: SparsifyOptions) -> torch.Tensor:
    from structprune.models.loading import load_tokenizer
    from structprune.score.calibration import calibration_batch, load_texts

    assert options.calib is not None
    texts = load_texts(options.calib, text_field=options.text_field)
    return calibration_batch(texts, load_tokenizer(model_dir), samples=options.samples, seq_len=options.seq_len, seed=options.seed)


class _Run:
    """One sparsification, block by block; ``files`` maps each new tensor to its file."""

    def __init__(self, model: StreamedModel, model_dir: Path, options: SparsifyOptions, target: Union[float, Pattern], work_dir: Path, progress: Optional[Progress]) -> None:
        from structprune.tracing.export import checkpoint_name_map

        self.model = model
        self.options = options
        self.target = target
        self.work_dir = work_dir
        self.progress = progress
        self.checkpoint = read_checkpoint(model_dir)
        names = list(self.checkpoint.tensors)
        self.stored_names = {model_name: name for name, model_name in checkpoint_name_map(model_dir, names).items()}
        self.model_dir = model_dir
        self.files: Dict[str, Path] = {}
        self.zeroed = 0
        self.sparsified = 0

    def layers(self, index: int) -> List[_Layer]:
        """The loaded block's linear layers, in module order."""
        out = []
        for path, module in self.model.block.named_modules():
            input_dim = linear_input_dim(module)
            if input_dim is not None:
                model_name = f"{self.model.prefix}.{index}.{path}.weight"
                out.append(_Layer(path, self.stored_names[model_name], input_dim))
        return out

    def sparsify_blocks(self, input_ids: Optional[torch.Tensor]) -> None:
        if input_ids is None:
            for index in range(self.model.num_blocks):
                self.model.load_block(index)
                self._save(index, self._sparsify_block(index, {}))
                self._report(index)
            return
        store = ActivationStore(self.options.activation_memory)
        try:
            self._sparsify_on_data(input_ids, store)
        finally:
            store.close()

    def _sparsify_on_data(self, input_ids: torch.Tensor, store: ActivationStore) -> None:
        model = self.model
        block_args = []
        with torch.no_grad():
            for m, batch in enumerate(input_ids.split(self.options.micro_batch)):
                hidden, args, kwargs = model.embed(batch)
                store.put((0, m), hidden)
                block_args.append((args, kwargs))
            model.unload_outside()
            for index in range(model.num_blocks):
                model.load_block(index)
                statistics = _InputStatistics(gram=self.options.method == "sparsegpt")
                with statistics.recording(model.block, self.layers(index)):
                    for m, (args, kwargs) in enumerate(block_args):
                        model.run_block(store.get((index, m), model.device), args, kwargs)
                tensors = self._sparsify_block(index, statistics.sums)
                # The next block sees what this sparsified block gives (SparseGPT's sequential order).
                for m, (args, kwargs) in enumerate(block_args):
                    store.put((index + 1, m), model.run_block(store.get((index, m), model.device), args, kwargs))
                    store.release((index, m))
                self._save(index, tensors)
                self._report(index)

    def _sparsify_block(self, index: int, sums: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The loaded block's sparsified weights by checkpoint name, in the stored dtype and
        orientation; the block's own weights are replaced by them (so it runs sparsified)."""
        tensors = {}
        for layer in self.layers(index):
            weight = self.model.block.get_submodule(layer.module).weight
            assert isinstance(weight, torch.Tensor)  # a linear layer's (``layers`` found it)
            # Scored and updated from the stored values, not the loaded ones (which a lower compute
            # dtype may have rounded into ties).
            stored = self._stored_tensor(layer)
            stored_oriented = stored if layer.input_dim == 1 else stored.T
            check_pattern_fits(layer.stored, stored_oriented.shape[1], self.target)
            if self.options.method == "sparsegpt":
                gram = self._sums(sums, layer, index)
                new, keep = sparsegpt(stored_oriented, gram, self.target, damping=self.options.damping, block_size=self.options.block_size)
                result = new.to(stored.dtype)
            else:
                plain = stored_oriented.double()
                scores = magnitude_scores(plain) if self.options.method == "magnitude" else wanda_scores(plain, self._sums(sums, layer, index))
                keep = keep_mask(scores, self.target)
                # Zeroing only: the kept weights are the stored ones, bit for bit.
                result = torch.where(keep, stored_oriented, torch.zeros_like(stored_oriented))
            self.zeroed += int((stored_oriented != 0).logical_and(~keep).sum())
            self.sparsified += stored.numel()
            weight.data.copy_((result if layer.input_dim == 1 else result.T).to(weight))
            tensors[layer.stored] = (result if layer.input_dim == 1 else result.T).contiguous()
        return tensors

    def _sums(self, sums: Dict[str, torch.Tensor], layer: _Layer, index: int) -> torch.Tensor:
        if layer.module not in sums:
            raise PlanError(f"{self.options.method}: the layer '{layer.module}' of block {index} never ran on the calibration data")
        return sums[layer.module]

    def _stored_tensor(self, layer: _Layer) -> torch.Tensor:
        from safetensors import safe_open

        info = self.checkpoint.tensors[layer.stored]
        with safe_open(str(self.model_dir / info.file), framework="pt") as handle:
            return handle.get_tensor(layer.stored)

    def _save(self, index: int, tensors: Dict[str, torch.Tensor]) -> None:
        if tensors:
            path = save_by_content(tensors, self.work_dir, f"sparse-block-{index:05d}")
            self.files.update({name: path for name in tensors})

    def _report(self, index: int) -> None:
        if self.progress is not None:
            self.progress("sparsify", index + 1, self.model.num_blocks)
