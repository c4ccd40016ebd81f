"""``structprune recover``: a short LoRA fine-tune of a pruned checkpoint, merged back into a stock
checkpoint of the same shapes and dtypes.

Pipeline:

1. **Data.** ``.txt`` files (and ``.jsonl`` files where some record has a ``text`` field, and
   ``save_to_disk`` directories) are read by :func:`structprune.score.calibration.load_texts`, tokenized as one stream by
   :func:`~structprune.score.calibration.token_stream` and cut into non-overlapping ``seq_len`` windows;
   every token after the first of a window is a target. ``.jsonl`` files of Alpaca records
   (``instruction``, ``output``, optional ``input``; no ``text`` field) become one example each:
   the prompt is :data:`~structprune.score.calibration.ALPACA_TEMPLATE` (or ``..._NO_INPUT`` when
   ``input`` is empty) up to and including ``### Response:\\n``, the response is ``output``
   followed by eos, both tokenized without special tokens; the loss is on the response tokens
   only (the prompt is given, not predicted), examples are truncated to ``seq_len`` and padded
   with ignored positions.
2. **Schedule.** Examples are visited in a seeded random order, one permutation per epoch, the
   epochs concatenated; optimizer step ``k`` takes the next ``batch_size × grad_accum × processes``
   examples, so the data a step sees depends only on the seed and ``k`` (which makes resuming
   exact and makes N processes see the same global batches as one). The loss of a step is the
   mean over all its target tokens, whichever process or micro-batch holds them.
3. **Training** runs under an ``accelerate.Accelerator``: one process, or several under
   ``torchrun``/``accelerate launch`` (DDP; FSDP through an accelerate config, see
   ``docs/architecture.md``). LoRA adapters come from peft; the optimizer is AdamW with a
   transformers scheduler, gradients are clipped. With a teacher (``RecoverOptions.teacher``) the
   loss is the distillation objective of :mod:`structprune.recover.distill`, optionally mixed with the LM
   loss, over the same target positions and normalised the same way. An encoder (BERT family)
   trains on passages instead, with the dense model's embeddings as targets
   (:mod:`structprune.recover.encoder`; ``--teacher`` is required).
4. **Checkpoints** for ``resume`` (adapter weights, optimizer, scheduler, every process's RNG,
   step, losses) are written every ``save_every`` steps into a hidden work area beside the output,
   ``.OUT.structprune-recover/``, which is removed once the output is complete.
5. **Merge and write.** The adapter is saved with peft's ``save_pretrained``; the pruned base is
   loaded again on the CPU in its stored dtype, the adapter applied and merged
   (``merge_and_unload``), and every tensor of the input checkpoint (same names, so tied weights
   stay stored once; same dtypes) is written by the Rust shard writer, with the input's other
   files (config, tokenizer), the adapter under ``adapter/`` and a ``recovery.json`` report. The
   output appears only when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from functools import lru_cache
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from structprune.apply import DEFAULT_MAX_SHARD_SIZE, check_output, write_checkpoint
from structprune.io.console import import_peft, quiet_peft_deprecations
from structprune.score.calibration import (
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    batch_sha256,
    load_texts,
    read_jsonl_records,
    token_stream,
)
from structprune.io.checkpoint import Checkpoint, read_checkpoint, read_config
from structprune.recover.distill import (
    DEFAULT_TOPK,
    CacheKey,
    Distillation,
    LiveTeacher,
    Teacher,
    TeacherLogitsCache,
    check_distillation_options,
    distillation_loss,
    prepare_cache,
    resolve_distillation,
)
from structprune.errors import CalibrationError, MissingDependencyError, RecoveryError, SettingError
from structprune.evaluate.perplexity import DEFAULT_WINDOW, perplexity
from structprune.io.atomic import write_json_atomically
from structprune.io.dtypes import COMPUTE_DTYPES, SAFETENSORS_DTYPES, STORED_COMPUTE_DTYPES
from structprune.models.loading import encoder_class, load_model, load_tokenizer, resolve_device
from structprune.models.sentence import Pooling, module_folders, read_pooling
from structprune.recover import encoder as encoder_recovery

if TYPE_CHECKING:  # heavy imports, done when training starts
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PathLike = Union[str, "os.PathLike[str]"]

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt and padding)."""
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "bf16", "fp16")
LOAD_IN = ("4bit", "8bit")
_STATE_PREFIX = "step-"
_STATE_DONE = "progress.json"
# Options that change what training computes: a resumed run must agree on all of them.
_TRAJECTORY_OPTIONS = (
    "seq_len", "text_field", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler",
    "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "rank", "alpha", "dropout",
    "target_modules", "mixed_precision", "dtype", "seed", "load_in",
)


@dataclass(frozen=True)
class RecoverOptions:
    """Everything ``structprune recover`` can be told (the CLI's flags, with the same defaults).

    The defaults (1.5 epochs of 16 × 128-token examples, lr 5e-4 cosine, rank 16, alpha 32, no
    dropout) were tuned on the team's tiny Llama pruned by 20% (``benches/bench_recover.py``,
    ``docs/benchmarks.md``): fewer tokens closed less of the perplexity gap, higher learning rates
    overshot, and dropout cost a tenth of the CPU time of a step for no gain.
    """

    data: Path
    """Training text: ``.txt``, ``.jsonl`` (text records, or Alpaca records for instruction
    tuning) or a ``save_to_disk`` directory."""
    eval_data: Optional[Path] = None
    """Held-out text for perplexity before, every ``eval_every`` steps, and after."""
    text_field: str = "text"
    seq_len: int = 128
    epochs: float = 1.5
    max_steps: Optional[int] = None
    """Optimizer steps; overrides ``epochs``."""
    batch_size: int = 16
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    lr: float = 5e-4
    scheduler: str = "cosine"
    warmup_steps: Optional[int] = None
    """Overrides ``warmup_ratio``."""
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Tuple[str, ...] = ("all-linear",)
    """Module names for LoRA; ``all-linear`` is every linear layer except the LM head."""
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    """``bf16``/``fp16`` autocast (CUDA only); ``no`` computes in ``dtype``."""
    dtype: str = "float32"
    """Dtype the frozen base is loaded in for training."""
    load_in: Optional[str] = None
    """``4bit``/``8bit``: frozen base quantized by bitsandbytes (QLoRA); CUDA, or the CPU with a
    bitsandbytes that has CPU kernels."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (under a launcher each process takes its own GPU)."""
    teacher: Optional[Path] = None
    """Dense checkpoint to distil from (same vocabulary as the pruned one): the loss becomes
    ``distill_weight`` × the teacher-student KL + (1 − ``distill_weight``) × the LM loss
    (``structprune.recover.distill``)."""
    teacher_logits: Optional[Path] = None
    """Directory for the teacher's top-``teacher_topk`` logits of every example, computed once
    before training (the teacher is then freed) and reused by later runs; ``None``: the teacher
    runs beside the student."""
    teacher_topk: int = DEFAULT_TOPK
    teacher_dtype: Optional[str] = None
    """Dtype the teacher computes in; ``None``: the student's compute dtype. Never more precise
    than the student's."""
    temperature: float = 1.0
    distill_weight: float = 1.0
    """alpha of alpha · KL + (1 − alpha) · LM loss. 1 (distillation only) recovered the most on
    the demo model (``docs/architecture.md``)."""
    seed: int = 0
    eval_every: Optional[int] = None
    eval_window: int = DEFAULT_WINDOW
    save_every: Optional[int] = None
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE


@dataclass(frozen=True)
class EvalPoint:
    step: int
    perplexity: float


@dataclass(frozen=True)
class StepReport:
    """Passed to the ``on_step`` callback after every optimizer step."""

    step: int
    total_steps: int
    loss: float
    """Mean token loss of the step's global batch."""
    lr: float


@dataclass
class RecoverResult:
    output_dir: Path
    steps: int
    examples: int
    global_batch: int
    trainable_params: int
    losses: List[float]
    evals: List[EvalPoint]
    resumed_from: Optional[int]
    seconds: float
    main_process: bool
    """Whether this process wrote the output (the first one under a launcher)."""


@dataclass(frozen=True)
class TrainingData:
    """Examples as padded ``[N, seq_len]`` tensors; labels are ``IGNORE_INDEX`` where no loss."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    kind: str
    """``text`` (packed windows), ``instruction`` (one Alpaca record per example) or ``passages``
    (an encoder's, ``structprune.recover.encoder``: no token targets)."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def sha256(self) -> str:
        return batch_sha256(torch.cat([self.input_ids, self.labels], dim=1))


# ----------------------------------------------------------------------------- data


def load_training_data(path: PathLike, tokenizer: "PreTrainedTokenizerBase", *, seq_len: int, text_field: str = "text") -> TrainingData:
    """The training examples of ``path`` (see the module doc for the formats)."""
    if seq_len < 2:
        raise RecoveryError(f"seq_len must be at least 2 tokens, got {seq_len}")
    source = Path(path)
    records = _jsonl_records(source) if source.suffix == ".jsonl" and source.is_file() else None
    if records is not None and not any(text_field in record for _, record in records):
        return _instruction_examples(source, records, tokenizer, seq_len)
    stream = token_stream(load_texts(source, text_field=text_field), tokenizer)
    count = stream.numel() // seq_len
    if count == 0:
        raise _data_error(source, f"{source}: {stream.numel()} tokens, fewer than one {seq_len}-token training window")
    windows = stream[: count * seq_len].reshape(count, seq_len).contiguous()
    return TrainingData(windows, windows.clone(), torch.ones_like(windows), "text")


def _jsonl_records(path: Path) -> List[Tuple[int, Dict[str, Any]]]:
    records = read_jsonl_records(path)
    if not records:
        raise _data_error(path, f"{path}: empty: no records")
    return records


def _instruction_examples(path: Path, records: Sequence[Tuple[int, Mapping[str, Any]]], tokenizer: "PreTrainedTokenizerBase", seq_len: int) -> TrainingData:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RecoveryError(f"tokenizer {type(tokenizer).__name__} has no eos token to end responses with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.full((len(records), seq_len), pad, dtype=torch.int64)
    labels = torch.full((len(records), seq_len), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(records), seq_len), dtype=torch.int64)
    for row, (number, record) in enumerate(records):
        prompt, response = _alpaca_parts(path, number, record)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        ids = (prompt_ids + response_ids)[:seq_len]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt_ids) : len(ids)] = input_ids[row, len(prompt_ids) : len(ids)]
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise _data_error(path, f"{path}: every prompt fills the {seq_len}-token window, so no response token is left to train on; raise seq_len")
    return TrainingData(input_ids, labels, attention_mask, "instruction")


def _alpaca_parts(path: Path, number: int, record: Mapping[str, Any]) -> Tuple[str, str]:
    """(prompt, response) of one Alpaca record, the prompt ending with ``### Response:\\n``."""
    missing = [name for name in ("instruction", "output") if name not in record]
    if missing:
        fields = ", ".join(repr(key) for key in record) or "none"
        raise _data_error(path, f"{path}:{number}: an instruction record needs 'instruction' and 'output' (missing {', '.join(map(repr, missing))}; fields: {fields})", number)
    for name in ("instruction", "output", "input"):
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise _data_error(path, f"{path}:{number}: field {name!r} is {type(value).__name__}, not a string", number)
    extra = record.get("input") or ""
    if extra:
        prompt = ALPACA_TEMPLATE.format(instruction=record["instruction"], input=extra, output="")
    else:
        prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=record["instruction"], output="")
    return prompt, record["output"]


def _data_error(path: Path, message: str, line: Optional[int] = None) -> CalibrationError:
    error = CalibrationError(message)
    error.path = str(path)
    error.line = line
    return error


# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """Which examples every micro-batch of every step takes (see the module doc)."""

    examples: int
    batch_size: int
    grad_accum: int
    processes: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def step_examples(self, step: int) -> np.ndarray:
        """Example indices of optimizer step ``step`` (0-based), in micro-batch then process order."""
        start = step * self.global_batch
        first_epoch, last_epoch = start // self.examples, (start + self.global_batch - 1) // self.examples
        order = np.concatenate([_epoch_order(self.seed, epoch, self.examples) for epoch in range(first_epoch, last_epoch + 1)])
        offset = start - first_epoch * self.examples
        return order[offset : offset + self.global_batch]

    def micro_batch(self, step: int, micro: int, process: int) -> np.ndarray:
        per_micro = self.batch_size * self.processes
        begin = micro * per_micro + process * self.batch_size
        return self.step_examples(step)[begin : begin + self.batch_size]


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, examples: int) -> np.ndarray:
    """The order examples are visited in during ``epoch`` (cached: every micro-batch asks)."""
    return np.random.default_rng([seed, epoch]).permutation(examples)


def total_steps(options: RecoverOptions, examples: int, global_batch: int) -> int:
    if options.max_steps is not None:
        return options.max_steps
    return max(1, math.ceil(options.epochs * examples / global_batch))


# ----------------------------------------------------------------------------- checks


def check_options(options: RecoverOptions) -> None:
    """Refuses option values that cannot work, before anything is loaded."""
    positive = {"seq_len": options.seq_len, "batch_size": options.batch_size, "grad_accum": options.grad_accum, "rank": options.rank, "eval_window": options.eval_window}
    for name, value in positive.items():
        if value < 1:
            raise SettingError(f"{name} must be a positive integer, got {value}", option=_flag(name))
    for name in ("max_steps", "eval_every", "save_every", "warmup_steps"):
        value = getattr(options, name)
        if value is not None and value < (0 if name == "warmup_steps" else 1):
            raise SettingError(f"{name} must be {'non-negative' if name == 'warmup_steps' else 'positive'}, got {value}", option=_flag(name))
    if options.epochs <= 0:
        raise SettingError(f"epochs must be positive, got {options.epochs}", option="--epochs")
    if options.lr <= 0:
        raise SettingError(f"lr must be positive, got {options.lr}", option="--lr")
    if not 0 <= options.dropout < 1:
        raise SettingError(f"dropout must be in [0, 1), got {options.dropout}", option="--dropout")
    if not 0 <= options.warmup_ratio < 1:
        raise SettingError(f"warmup_ratio must be in [0, 1), got {options.warmup_ratio}", option="--warmup-ratio")
    _check_choice("scheduler", options.scheduler, SCHEDULERS)
    _check_choice("mixed_precision", options.mixed_precision, MIXED_PRECISION)
    if options.load_in is not None:
        _check_choice("load_in", options.load_in, LOAD_IN)
    _check_choice("dtype", options.dtype, tuple(COMPUTE_DTYPES))
    if not options.target_modules:
        raise SettingError("target_modules is empty: name the modules to adapt, or all-linear", option="--target-modules")
    check_distillation_options(
        options.teacher, options.teacher_logits, options.teacher_topk, options.temperature, options.distill_weight,
        options.teacher_dtype, compute_dtype(options),
    )
    on_cpu = resolve_device(options.device).type == "cpu"
    if on_cpu and options.mixed_precision != "no":
        raise SettingError(f"mixed precision {options.mixed_precision} needs a CUDA device (--device cuda); on the CPU train with --mixed-precision no (float32)", option="--mixed-precision")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SettingError(f"{name} must be one of {', '.join(choices)}, got {value!r}", option=_flag(name))


def _flag(name: str) -> str:
    """The command line's spelling of an option the API spells ``name``."""
    return "--" + name.replace("_", "-")


def compute_dtype(options: RecoverOptions) -> str:
    """The dtype the student computes in: the autocast dtype, else the frozen base's (float32
    for a quantized base, whose bitsandbytes layers compute in float32 without autocast)."""
    if options.mixed_precision != "no":
        return {"bf16": "bfloat16", "fp16": "float16"}[options.mixed_precision]
    return "float32" if options.load_in else options.dtype


def fingerprint(options: RecoverOptions, pruned: Checkpoint, data: TrainingData, processes: int, distillation: Optional[Distillation] = None) -> str:
    """Identifies a training run, so a resume continues only the run it was saved from."""
    described = {name: getattr(options, name) for name in _TRAJECTORY_OPTIONS}
    if distillation is not None:
        described["distillation"] = distillation.trajectory()
    described["target_modules"] = list(options.target_modules)
    described["data"] = data.sha256()
    described["processes"] = processes
    described["model"] = {
        "config": pruned.config,
        "tensors": [(t.name, t.dtype, list(t.shape)) for t in pruned.tensors.values()],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- work area


class WorkArea:
    """``.OUT.structprune-recover/`` beside the output: resumable states and the final adapter.

    A state is a directory ``step-NNNNNNNN`` that counts only once its ``progress.json`` exists
    (written last, by rename), so a run killed while saving leaves the previous state usable.
    """

    def __init__(self, output: Path) -> None:
        self.root = output.parent / f".{output.name}.structprune-recover"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def report(self) -> Path:
        return self.root / "recovery.json"

    def latest_state(self) -> Optional[Path]:
        if not self.root.is_dir():
            return None
        states = sorted(p for p in self.root.glob(f"{_STATE_PREFIX}*") if (p / _STATE_DONE).is_file())
        return states[-1] if states else None

    def state_dir(self, step: int) -> Path:
        return self.root / f"{_STATE_PREFIX}{step:08d}"

    def drop_states_before(self, keep: Path) -> None:
        for state in self.root.glob(f"{_STATE_PREFIX}*"):
            if state != keep:
                shutil.rmtree(state, ignore_errors=True)


# ----------------------------------------------------------------------------- training


def recover(
    pruned_dir: PathLike,
    output_dir: PathLike,
    options: RecoverOptions,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    on_step: Optional[Callable[[StepReport], None]] = None,
) -> RecoverResult:
    """LoRA-fine-tunes the checkpoint ``pruned_dir`` and writes the merged checkpoint to
    ``output_dir`` (with the adapter in ``output_dir/adapter``). Under a distributed launcher every
    process calls this; only the main process writes the output.

    ``resume``: continue from the latest state saved (``save_every``) by an earlier run of the
    same command; without a saved state the run starts from the beginning.
    """
    started = time.perf_counter()
    pruned, output = Path(pruned_dir), Path(output_dir)
    check_options(options)
    check_output(pruned, output, overwrite=overwrite)  # before training, not after it
    distillation = _distillation(pruned, options)
    pooling = _encoder_pooling(pruned, options)
    accelerator = _accelerator(options)
    tokenizer = load_tokenizer(pruned)
    if pooling is None:
        data = load_training_data(options.data, tokenizer, seq_len=options.seq_len, text_field=options.text_field)
    else:
        input_ids, mask = encoder_recovery.passages(Path(options.data), tokenizer, seq_len=options.seq_len, text_field=options.text_field)
        data = TrainingData(input_ids, torch.full_like(input_ids, IGNORE_INDEX), mask, "passages")
    eval_stream = token_stream(load_texts(options.eval_data), tokenizer) if options.eval_data is not None else None
    schedule = Schedule(len(data), options.batch_size, options.grad_accum, accelerator.num_processes, options.seed)
    if len(data) < schedule.global_batch:
        raise RecoveryError(f"{options.data}: {len(data)} training examples, fewer than one global batch of {schedule.global_batch} (batch size × grad accum × processes)")
    steps = total_steps(options, len(data), schedule.global_batch)
    run_id = fingerprint(options, read_checkpoint(pruned), data, accelerator.num_processes, distillation)
    work = WorkArea(output)

    # Before the student is loaded: a cached teacher is freed before the student needs the memory.
    teacher, embedding_targets = None, None
    if pooling is not None and distillation is not None:
        embedding_targets = encoder_recovery.teacher_embeddings(
            distillation.teacher, data.input_ids, data.attention_mask, pooling, dtype=distillation.teacher_dtype, device=accelerator.device,
            progress=progress and accelerator.is_main_process,
        )
    elif distillation is not None:
        teacher = _teacher(distillation, options, data, accelerator, progress=progress and accelerator.is_main_process)
    trainer = _Trainer(accelerator, pruned, options, data, schedule, steps, teacher, distillation, embedding_targets=embedding_targets, pooling=pooling)
    history, resumed_from = _starting_point(trainer, work, run_id, resume)
    if eval_stream is not None and not history.evals:
        history.evals.append(EvalPoint(0, trainer.evaluate(eval_stream)))
    _train(trainer, history, steps, eval_stream, work, run_id, progress=progress and accelerator.is_main_process, on_step=on_step)

    adapter_state = trainer.adapter_state_dict()
    if accelerator.is_main_process:
        report = _report(options, pruned, data, schedule, steps, trainer.trainable_params, history, _parallelism(accelerator), distillation)
        _write_output(pruned, output, trainer.unwrapped(), adapter_state, work, report, options, overwrite, progress)
    accelerator.wait_for_everyone()
    return RecoverResult(
        output_dir=output,
        steps=steps,
        examples=len(data),
        global_batch=schedule.global_batch,
        trainable_params=trainer.trainable_params,
        losses=history.losses,
        evals=history.evals,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
        main_process=accelerator.is_main_process,
    )


def _encoder_pooling(pruned: Path, options: RecoverOptions) -> Optional[Pooling]:
    """The pooling of an encoder's embeddings (``None`` for a causal LM), after refusing the
    options an encoder's recovery has no use for (``structprune.recover.encoder``)."""
    if encoder_class(read_config(pruned) or {}) is None:
        return None
    refusals = {
        "--teacher": (options.teacher is None, "recovering an encoder distils the dense model's embeddings: pass --teacher DENSE"),
        "--teacher-logits": (options.teacher_logits is not None, "an encoder's teacher embeddings are computed once in memory; there are no logits to cache"),
        "--distill-weight": (options.distill_weight != 1, "an encoder without an LM head has only the embedding distillation loss; leave --distill-weight at 1"),
        "--eval-data": (options.eval_data is not None, "held-out perplexity needs a causal LM; measure an encoder with benches/bench_encoder.py's embedding cosine and retrieval"),
        "--load-in": (options.load_in is not None, "quantized training is for causal LMs"),
    }
    for option, (refused, why) in refusals.items():
        if refused:
            raise SettingError(f"{pruned} is an encoder: {why}", option=option)
    return read_pooling(pruned)


def _distillation(pruned: Path, options: RecoverOptions) -> Optional[Distillation]:
    if options.teacher is None:
        return None
    return resolve_distillation(
        pruned, Path(options.teacher), teacher_dtype=options.teacher_dtype or compute_dtype(options), temperature=options.temperature,
        weight=options.distill_weight, logits_dir=None if options.teacher_logits is None else Path(options.teacher_logits), topk=options.teacher_topk,
    )


def _teacher(distillation: Distillation, options: RecoverOptions, data: TrainingData, accelerator: "Accelerator", *, progress: bool) -> Teacher:
    """The live teacher on this process's device, or the reader of the top-k cache (computed
    first, over all processes, if the directory lacks it)."""
    if distillation.logits_dir is None or distillation.topk is None:
        return LiveTeacher(distillation.teacher, distillation.teacher_dtype, accelerator.device)
    key = CacheKey(distillation.teacher_sha256, distillation.teacher_dtype, data.sha256(), options.seq_len, distillation.topk)
    cache = TeacherLogitsCache(distillation.logits_dir, key, len(data))
    return prepare_cache(
        cache, distillation.teacher, data.input_ids, data.attention_mask, device=accelerator.device, batch_size=options.batch_size,
        process=accelerator.process_index, processes=accelerator.num_processes, wait=accelerator.wait_for_everyone, progress=progress,
    )


def _starting_point(trainer: "_Trainer", work: WorkArea, run_id: str, resume: bool) -> Tuple["_History", Optional[int]]:
    """The history to continue (restored into ``trainer``), and the step resumed from if any.
    Without a state to resume, an earlier run's leftovers are cleared."""
    accelerator = trainer.accelerator
    state = work.latest_state() if resume else None
    if state is None and accelerator.is_main_process and work.root.exists():
        shutil.rmtree(work.root)
    accelerator.wait_for_everyone()
    if state is None:
        return _History(), None
    history = trainer.restore(state, run_id)
    return history, history.step


def _train(
    trainer: "_Trainer",
    history: "_History",
    steps: int,
    eval_stream: Optional[torch.Tensor],
    work: WorkArea,
    run_id: str,
    *,
    progress: bool,
    on_step: Optional[Callable[[StepReport], None]],
) -> None:
    """The optimizer steps from ``history.step`` to ``steps``, with evaluations and saved states."""
    from tqdm.auto import tqdm

    options = trainer.options
    with tqdm(total=steps, initial=history.step, desc="recover", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(history.step, steps):
            loss = trainer.train_step(step)
            history.record_step(loss)
            done = step + 1
            if eval_stream is not None and (done == steps or _every(options.eval_every, done)):
                history.evals.append(EvalPoint(done, trainer.evaluate(eval_stream)))
            if _every(options.save_every, done) and done < steps:
                trainer.save(work, history, run_id)
            report = StepReport(done, steps, loss, trainer.lr())
            bar.update(1)
            bar.set_postfix(_postfix(report, history))
            if on_step is not None:
                on_step(report)


def _every(interval: Optional[int], step: int) -> bool:
    return interval is not None and step % interval == 0


@dataclass
class _History:
    step: int = 0
    losses: List[float] = field(default_factory=list)
    evals: List[EvalPoint] = field(default_factory=list)

    def record_step(self, loss: float) -> None:
        self.step += 1
        self.losses.append(loss)


def _accelerator(options: RecoverOptions) -> "Accelerator":
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=not options.device.startswith("cuda"))
    wanted = "cuda" if options.device.startswith("cuda") else "cpu"
    if accelerator.device.type != wanted:
        raise RecoveryError(f"--device {options.device} asked for, but accelerate placed this process on {accelerator.device}")
    if accelerator.distributed_type == DistributedType.FSDP and options.save_every is not None:
        # States are saved from each process's own parameters and optimizer, which FSDP shards.
        raise RecoveryError("--save-every/--resume are not supported under FSDP: run without them")
    set_seed(options.seed)
    return accelerator


class _Trainer:
    """The LoRA model, optimizer and scheduler of one process, and one optimizer step."""

    def __init__(
        self, accelerator: "Accelerator", pruned: Path, options: RecoverOptions, data: TrainingData, schedule: Schedule, steps: int, teacher: Optional[Teacher],
        distillation: Optional[Distillation], *, embedding_targets: Optional[torch.Tensor] = None, pooling: Optional[Pooling] = None,
    ) -> None:
        import_peft(quantizing=options.load_in is not None)  # first import: bitsandbytes' warning only where it matters
        from peft import LoraConfig, get_peft_model
        from transformers import get_scheduler

        self.accelerator, self.options, self.data, self.schedule = accelerator, options, data, schedule
        self.teacher, self.distillation = teacher, distillation
        self.embedding_targets, self.pooling = embedding_targets, pooling
        """An encoder's teacher embeddings of every example, and its pooling."""
        base = _training_base(pruned, options, accelerator.device)
        lora = LoraConfig(
            r=options.rank,
            lora_alpha=options.alpha,  # type: ignore[arg-type]  # peft annotates int, and scales by any number
            lora_dropout=options.dropout,
            target_modules=_target_modules(options.target_modules),
            task_type="CAUSAL_LM" if embedding_targets is None else "FEATURE_EXTRACTION",
        )
        with quiet_peft_deprecations():
            model = get_peft_model(base, lora)
        self.trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for _, p in self.trainable)
        optimizer = torch.optim.AdamW([p for _, p in self.trainable], lr=options.lr, weight_decay=options.weight_decay)
        warmup = options.warmup_steps if options.warmup_steps is not None else round(options.warmup_ratio * steps)
        self.scheduler = get_scheduler(options.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.model.train()

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train_step(self, step: int) -> float:
        """One optimizer step; returns the mean token loss of the global batch."""
        examples = self.schedule.step_examples(step)
        # An encoder's loss is per passage, a causal LM's per target token.
        targets = len(examples) if self.embedding_targets is not None else int((self.data.labels[examples, 1:] != IGNORE_INDEX).sum())
        # DDP averages gradients over processes; scaling by their count makes the step's gradient
        # the gradient of the mean over all target tokens of the global batch.
        scale = self.accelerator.num_processes / max(targets, 1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        for micro in range(self.schedule.grad_accum):
            rows = torch.from_numpy(self.schedule.micro_batch(step, micro, self.accelerator.process_index))
            last = micro == self.schedule.grad_accum - 1
            # Gradients are exchanged between processes once per step, on the last micro-batch.
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                token_loss = self._summed_loss(rows)
                self.accelerator.backward(token_loss * scale)
            loss_sum += token_loss.detach().double()
        if self.options.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.options.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.accelerator.reduce(loss_sum, reduction="sum")) / max(targets, 1)

    def _summed_loss(self, rows: torch.Tensor) -> torch.Tensor:
        device = self.accelerator.device
        input_ids = self.data.input_ids[rows].to(device)
        labels = self.data.labels[rows].to(device)
        mask = self.data.attention_mask[rows].to(device)
        if self.embedding_targets is not None and self.pooling is not None:
            return encoder_recovery.summed_embedding_loss(self.model, input_ids, mask, self.embedding_targets[rows], self.pooling)
        logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        predicted, targets = logits[:, :-1].float(), labels[:, 1:]
        if self.teacher is None or self.distillation is None:
            return _lm_loss(predicted, targets)
        weight = self.distillation.weight
        # Summed over the same target positions as the LM loss, so train_step's normalisation
        # makes either term a mean over the global batch's target tokens.
        distilled = distillation_loss(predicted, self.teacher.targets(rows, input_ids, mask), targets != IGNORE_INDEX, self.distillation.temperature)
        return distilled if weight == 1 else weight * distilled + (1 - weight) * _lm_loss(predicted, targets)

    def evaluate(self, stream: torch.Tensor) -> float:
        return perplexity(self.model, stream, window=self.options.eval_window).perplexity

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """The full state dict (gathered from every process under FSDP); peft keeps the adapter part."""
        return self.accelerator.get_state_dict(self.model)

    # -- resumable state

    def save(self, work: WorkArea, history: _History, run_id: str) -> None:
        from safetensors.torch import save_file

        accelerator = self.accelerator
        target = work.state_dir(history.step)
        if accelerator.is_main_process:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), target / f"rng-{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            save_file({name: p.detach().cpu().contiguous() for name, p in self.trainable}, str(target / "adapter.safetensors"))
            training = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            if accelerator.scaler is not None:
                training["scaler"] = accelerator.scaler.state_dict()
            torch.save(training, target / "training.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            progress = {"run": run_id, "step": history.step, "losses": history.losses, "evals": [asdict(e) for e in history.evals]}
            write_json_atomically(target / _STATE_DONE, progress)
            work.drop_states_before(target)
        accelerator.wait_for_everyone()

    def restore(self, state: Path, run_id: str) -> _History:
        from safetensors.torch import load_file

        progress = json.loads((state / _STATE_DONE).read_text())
        if progress["run"] != run_id:
            raise RecoveryError(f"{state}: the saved state belongs to a run with other options, data, model or process count; run without --resume to start over")
        rng_file = state / f"rng-{self.accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise RecoveryError(f"{state}: no RNG state for process {self.accelerator.process_index} ({rng_file.name} missing)")
        weights = load_file(str(state / "adapter.safetensors"))
        with torch.no_grad():
            for name, parameter in self.trainable:
                parameter.copy_(weights[name].to(parameter.device))
        training = torch.load(state / "training.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        if self.accelerator.scaler is not None and "scaler" in training:
            self.accelerator.scaler.load_state_dict(training["scaler"])
        _set_rng_state(torch.load(rng_file, weights_only=True))
        return _History(progress["step"], list(progress["losses"]), [EvalPoint(**e) for e in progress["evals"]])


def _lm_loss(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the target positions."""
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _target_modules(names: Sequence[str]) -> Union[str, List[str]]:
    return "all-linear" if list(names) == ["all-linear"] else list(names)


def _training_base(pruned: Path, options: RecoverOptions, device: torch.device) -> "PreTrainedModel":
    model = _quantized_base(pruned, options, device) if options.load_in else load_model(pruned, dtype=options.dtype, device=device)
    model.config.use_cache = False
    if options.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so frozen embeddings are fine.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _quantized_base(pruned: Path, options: RecoverOptions, device: torch.device) -> "PreTrainedModel":
    """The frozen base quantized by bitsandbytes (QLoRA): loading.load_model has no quantization."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise MissingDependencyError(f"--load-in {options.load_in} needs bitsandbytes: pip install bitsandbytes") from err
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if options.mixed_precision == "bf16" else torch.float16 if options.mixed_precision == "fp16" else torch.float32
    if options.load_in == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            pruned, quantization_config=quantization, device_map={"": device}, local_files_only=True, trust_remote_code=False
        )
    except (RuntimeError, NotImplementedError) as err:
        if device.type != "cpu":
            raise
        raise RecoveryError(
            f"--load-in {options.load_in}: bitsandbytes {bitsandbytes.__version__} could not quantize {pruned} on the CPU "
            f"(CPU kernels need a recent bitsandbytes; 0.50 works): {err}"
        ) from err
    with quiet_peft_deprecations():
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _postfix(report: StepReport, history: _History) -> Dict[str, str]:
    postfix = {"loss": f"{report.loss:.4f}", "lr": f"{report.lr:.2e}"}
    if history.evals:
        postfix["ppl"] = f"{history.evals[-1].perplexity:.2f}"
    return postfix


# ----------------------------------------------------------------------------- output


def _parallelism(accelerator: "Accelerator") -> str:
    """How the processes shared the work: ``single``, ``ddp`` (replicas) or ``fsdp`` (sharded)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def _report(options: RecoverOptions, pruned: Path, data: TrainingData, schedule: Schedule, steps: int, trainable: int, history: _History, parallelism: str, distillation: Optional[Distillation]) -> Dict[str, Any]:
    """recovery.json: what was trained on and how, and the losses; nothing machine-dependent."""
    settings = {name: getattr(options, name) for name in _TRAJECTORY_OPTIONS}
    settings["target_modules"] = list(options.target_modules)
    return {
        "base": str(pruned),
        "data": {"source": str(options.data), "kind": data.kind, "examples": len(data), "sha256": data.sha256()},
        "eval_data": None if options.eval_data is None else str(options.eval_data),
        "options": settings,
        "distillation": None if distillation is None else distillation.report(),
        "processes": schedule.processes,
        "parallelism": parallelism,
        "global_batch": schedule.global_batch,
        "steps": steps,
        "trainable_params": trainable,
        "losses": history.losses,
        "evals": [asdict(e) for e in history.evals],
    }


def _write_output(pruned: Path, output: Path, trained: torch.nn.Module, state_dict: Dict[str, torch.Tensor], work: WorkArea, report: Dict[str, Any], options: RecoverOptions, overwrite: bool, progress: bool) -> None:
    """Saves the adapter, merges it into a fresh copy of the base and writes the checkpoint."""
    shutil.rmtree(work.adapter, ignore_errors=True)
    cast(Any, trained).save_pretrained(str(work.adapter), state_dict=state_dict)  # a peft model
    write_json_atomically(work.report, report)
    merged = merged_model(pruned, work.adapter)
    # A sentence-transformers checkpoint's module folders (pooling) come with it.
    modules = [(pruned / folder, folder) for folder in module_folders(pruned)]
    includes = [(work.adapter, "adapter"), (work.report, "recovery.json"), *modules]
    write_merged(merged, pruned, output, includes=includes, max_shard_size=options.max_shard_size, overwrite=overwrite, progress=progress)
    shutil.rmtree(work.root, ignore_errors=True)


def merged_model(pruned: PathLike, adapter: PathLike) -> torch.nn.Module:
    """The base in its stored dtype on the CPU with the adapter merged into its weights."""
    import_peft(quantizing=False)
    from peft import PeftModel

    base = load_model(pruned, dtype=stored_dtype(read_checkpoint(pruned)), device="cpu")
    with quiet_peft_deprecations():
        return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def stored_dtype(checkpoint: Checkpoint) -> str:
    """The floating dtype the checkpoint stores its weights in (float32 when they are mixed)."""
    found = {t.dtype for t in checkpoint.tensors.values() if t.dtype in STORED_COMPUTE_DTYPES}
    return STORED_COMPUTE_DTYPES[found.pop()] if len(found) == 1 else "float32"


def write_merged(
    model: torch.nn.Module,
    pruned: PathLike,
    output: PathLike,
    *,
    includes: Sequence[Tuple[Path, str]] = (),
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
) -> None:
    """Writes ``model``'s weights as a checkpoint with the tensors (names, order, dtypes, shapes)
    of the checkpoint ``pruned``, and its other files, through the Rust shard writer."""
    checkpoint = read_checkpoint(pruned)
    # Checkpoints saved by older transformers store buffers that are no longer persistent
    # (BERT's embeddings.position_ids): written back from the model's buffers, as they were read.
    weights = {**dict(model.named_buffers()), **model.state_dict()}
    specs = []
    for info in checkpoint.tensors.values():
        tensor = weights.get(info.name)
        if tensor is None:
            raise RecoveryError(f"{pruned}: tensor {info.name} of the checkpoint is not in the merged model")
        if tuple(tensor.shape) != tuple(info.shape):
            raise RecoveryError(f"{pruned}: tensor {info.name} is {tuple(info.shape)} in the checkpoint but {tuple(tensor.shape)} in the merged model")
        specs.append((info.name, info.dtype, list(info.shape)))

    def read_tensor(index: int) -> bytes:
        name, dtype, _ = specs[index]
        tensor = weights[name].detach().to("cpu", SAFETENSORS_DTYPES[dtype]).contiguous()
        return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()

    write_checkpoint(output, specs, read_tensor, pruned, includes=includes, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)


__all__ = [
    "IGNORE_INDEX",
    "EvalPoint",
    "RecoverOptions",
    "RecoverResult",
    "Schedule",
    "StepReport",
    "TrainingData",
    "check_options",
    "compute_dtype",
    "load_training_data",
    "merged_model",
    "recover",
    "stored_dtype",
    "write_merged",
]
