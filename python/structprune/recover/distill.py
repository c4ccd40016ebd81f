"""Knowledge distillation for ``structprune recover --teacher DENSE``: the student (the pruned
model with its LoRA adapter) learns the teacher's next-token distributions instead of, or as well
as, the data's next tokens.

Objective, per target position (the positions the LM loss counts; prompts and padding carry none),
with temperature ``T``, teacher logits ``z``, student logits ``s`` over the vocabulary ``V``:

* **live teacher**: ``T² · KL(softmax(z/T) ‖ softmax(s/T))``, summed over ``V``;
* **cached top-k** (``--teacher-logits DIR``): with ``I`` the teacher's ``k`` largest logits at
  that position, ``p_i = softmax(z_I/T)_i`` (the teacher renormalised over its top-k) and
  ``log q_i = log_softmax(s/T)_i`` (the student over the *full* vocabulary, gathered at ``I``),
  ``T² · Σ_{i∈I} p_i (log p_i − log q_i)``. This is ``KL(p ‖ q restricted to I and
  renormalised) − log q(I)``: never negative, zero only when the student puts all its mass on ``I``
  and matches ``p`` there, so it also pulls the student's mass into the teacher's support. With
  ``k = |V|`` it is the live objective.

The ``T²`` keeps gradient magnitudes comparable across temperatures (Hinton et al.). Sums over
positions are returned; :mod:`structprune.recover.training` mixes them with the LM loss and normalises them
exactly as it normalises the LM loss.

The teacher is a plain model in eval mode, evaluated under ``torch.no_grad`` on the training
device, never wrapped by accelerate (no DDP/FSDP, no autocast): it runs in its own dtype.

The cache (``TeacherLogitsCache``): ``chunk-NNNNNN.safetensors`` files of consecutive examples
holding ``values`` (float32 ``[examples, seq_len − 1, k]``, the raw logits, so any temperature can
use them) and ``indices`` (int32, same shape), each written to a temporary name and renamed into
place, each stamped with the cache key; ``teacher-logits.json`` is written last. The key hashes the
teacher's weights and config, its dtype, the training examples, ``seq_len`` and ``k``: a directory
made for anything else is refused, an interrupted one is completed (chunks that carry the key are
kept), a complete one is reused.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F

from structprune.io.checkpoint import read_checkpoint, read_config
from structprune.io.atomic import write_atomically, write_json_atomically
from structprune.io.dtypes import COMPUTE_DTYPES
from structprune.errors import RecoveryError, SettingError
from structprune.models.loading import load_model, load_tokenizer

TEACHER_DTYPES = tuple(COMPUTE_DTYPES)
DEFAULT_TOPK = 64
MANIFEST = "teacher-logits.json"
_CHUNK_BYTES = 64 << 20  # per chunk file: small enough to write in one go, few files for big data
_HASH_BLOCK = 16 << 20
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class Distillation:
    """What a run distils from and how, resolved from its options."""

    teacher: Path
    teacher_sha256: str
    """Hash of the teacher's config and weight files (:func:`teacher_sha256`)."""
    teacher_dtype: str
    temperature: float
    weight: float
    """alpha: loss = alpha · distillation + (1 − alpha) · LM loss."""
    logits_dir: Optional[Path]
    """Top-k cache directory; ``None``: the teacher runs live."""
    topk: Optional[int]
    """k of the cache; ``None`` for a live teacher (the full vocabulary)."""

    def report(self) -> Dict[str, Any]:
        """recovery.json's ``distillation`` entry."""
        described = asdict(self)
        described["teacher"] = str(self.teacher)
        described["logits_dir"] = None if self.logits_dir is None else str(self.logits_dir)
        return described

    def trajectory(self) -> Dict[str, Any]:
        """What changes the training trajectory (the resume fingerprint): no paths, so a moved
        teacher or cache resumes, but another teacher, dtype, temperature, weight or k does not."""
        described = asdict(self)
        del described["teacher"], described["logits_dir"]
        return described


def check_distillation_options(teacher: Optional[Path], teacher_logits: Optional[Path], topk: int, temperature: float, weight: float, teacher_dtype: Optional[str], student_dtype: str) -> None:
    """Refuses distillation option values that cannot work, before anything is loaded."""
    if teacher is None:
        given = {
            "--teacher-logits": teacher_logits is not None, "--teacher-dtype": teacher_dtype is not None,
            "--teacher-topk": topk != DEFAULT_TOPK, "--temperature": temperature != 1.0, "--distill-weight": weight != 1.0,
        }
        named = [flag for flag, set_ in given.items() if set_]
        if named:
            raise SettingError(f"{', '.join(named)} only apply to distillation: pass --teacher DENSE_DIR as well", option=named[0])
        return
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SettingError(f"temperature must be a positive number, got {temperature}", option="--temperature")
    if not 0 <= weight <= 1:
        raise SettingError(f"distill_weight must be in [0, 1] (1: distillation only, 0: LM loss only), got {weight}", option="--distill-weight")
    if topk < 1:
        raise SettingError(f"teacher_topk must be a positive integer, got {topk}", option="--teacher-topk")
    if teacher_dtype is not None:
        if teacher_dtype not in TEACHER_DTYPES:
            raise SettingError(f"teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {teacher_dtype!r}", option="--teacher-dtype")
        if torch.finfo(COMPUTE_DTYPES[teacher_dtype]).bits > torch.finfo(COMPUTE_DTYPES[student_dtype]).bits:
            raise SettingError(
                f"teacher dtype {teacher_dtype} is more precise than the student's compute dtype {student_dtype}: "
                f"the teacher runs in the same or a lower precision (--teacher-dtype {student_dtype})",
                option="--teacher-dtype",
            )


def resolve_distillation(student: Path, teacher: Path, *, teacher_dtype: str, temperature: float, weight: float, logits_dir: Optional[Path], topk: int) -> Distillation:
    """Checks that ``teacher`` can teach ``student`` (same vocabulary) and hashes it."""
    vocabulary = check_same_vocabulary(student, teacher)
    if logits_dir is not None and topk > vocabulary:
        raise RecoveryError(f"teacher_topk {topk} exceeds the vocabulary of teacher {teacher} ({vocabulary} tokens)")
    return Distillation(
        teacher=teacher, teacher_sha256=teacher_sha256(teacher), teacher_dtype=teacher_dtype, temperature=temperature,
        weight=weight, logits_dir=logits_dir, topk=topk if logits_dir is not None else None,
    )


def check_same_vocabulary(student: Path, teacher: Path) -> int:
    """The vocabulary size both share; refuses a teacher whose logits or tokenizer do not match
    the student's token for token."""
    if not (teacher / "config.json").is_file():
        raise RecoveryError(f"teacher {teacher}: not a model directory (config.json is missing)")
    sizes = [(read_config(path) or {}).get("vocab_size") for path in (student, teacher)]
    if None not in sizes and sizes[0] != sizes[1]:
        raise RecoveryError(f"teacher {teacher} has a vocabulary of {sizes[1]} tokens but the student {student} has {sizes[0]}: distillation needs the same vocabulary")
    student_tokens, teacher_tokens = load_tokenizer(student), load_tokenizer(teacher)
    if len(student_tokens) != len(teacher_tokens):
        raise RecoveryError(f"teacher {teacher}'s tokenizer has {len(teacher_tokens)} tokens but the student {student}'s has {len(student_tokens)}: distillation needs the same tokenizer")
    if student_tokens.get_vocab() != teacher_tokens.get_vocab():
        raise RecoveryError(f"teacher {teacher} and student {student} have tokenizers of the same size that map tokens to other ids: distillation needs the same tokenizer")
    return int(sizes[1] or len(teacher_tokens))


def teacher_sha256(teacher: Path) -> str:
    """sha256 of the teacher's config.json and weight files, in name order (its identity for the
    cache key and the resume fingerprint; reading the weights once costs seconds per GB)."""
    digest = hashlib.sha256()
    for name in ["config.json", *sorted(read_checkpoint(teacher).shards)]:
        digest.update(name.encode() + b"\0")
        with open(teacher / name, "rb") as handle:
            for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- objective


def distillation_loss(student_logits: torch.Tensor, targets: "TeacherTargets", mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²`` × the KL of the module doc, summed over the positions where ``mask`` holds.

    ``student_logits``: ``[B, L, V]`` float32; ``mask``: ``[B, L]`` bool; ``targets`` for the same
    positions (full teacher logits, or top-k values and indices)."""
    student = F.log_softmax(student_logits[mask] / temperature, dim=-1)
    teacher = F.log_softmax(targets.values[mask] / temperature, dim=-1)
    if targets.indices is not None:
        student = student.gather(-1, targets.indices[mask])
    elif teacher.shape[-1] != student.shape[-1]:
        raise RecoveryError(f"teacher logits have {teacher.shape[-1]} entries per token but the student's {student.shape[-1]}: distillation needs the same vocabulary")
    return F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature**2


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's side of a micro-batch, for the positions predicted (``[B, L − 1, ·]``)."""

    values: torch.Tensor
    """float32 logits: the full vocabulary, or the top-k when ``indices`` is given."""
    indices: Optional[torch.Tensor] = None
    """int64 vocabulary ids of the top-k ``values``."""


class LiveTeacher:
    """The teacher model on the training device, asked for each micro-batch."""

    def __init__(self, teacher: Path, dtype: str, device: torch.device) -> None:
        self.device = device
        self.model = load_model(teacher, dtype=dtype, device=device)
        self.model.requires_grad_(False)
        self.model.eval()

    def targets(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TeacherTargets:
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return TeacherTargets(logits[:, :-1].float())


class CachedTeacher:
    """The top-k teacher logits of a complete cache, read per micro-batch from its chunk files."""

    def __init__(self, directory: Path, chunk_examples: int) -> None:
        self.directory, self.chunk_examples = directory, chunk_examples

    def targets(self, rows: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TeacherTargets:
        from safetensors import safe_open

        values: List[torch.Tensor] = []
        indices: List[torch.Tensor] = []
        for row in rows.tolist():
            chunk, offset = divmod(int(row), self.chunk_examples)
            with safe_open(str(self.directory / _chunk_name(chunk)), framework="pt") as handle:
                values.append(handle.get_slice("values")[offset : offset + 1])
                indices.append(handle.get_slice("indices")[offset : offset + 1])
        device = input_ids.device
        return TeacherTargets(torch.cat(values).to(device), torch.cat(indices).to(device, torch.int64))


Teacher = Union[LiveTeacher, CachedTeacher]
"""Where a run's teacher targets come from."""


# ----------------------------------------------------------------------------- the top-k cache


@dataclass(frozen=True)
class CacheKey:
    """What cached logits depend on; a cache made for other values is refused."""

    teacher_sha256: str
    teacher_dtype: str
    data_sha256: str
    seq_len: int
    topk: int

    def digest(self) -> str:
        described = {"format": _CACHE_FORMAT, **asdict(self)}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


class TeacherLogitsCache:
    """A ``--teacher-logits`` directory (see the module doc)."""

    def __init__(self, directory: Path, key: CacheKey, examples: int, *, chunk_bytes: int = _CHUNK_BYTES) -> None:
        self.directory, self.key, self.examples = directory, key, examples
        positions = key.seq_len - 1
        self.chunk_examples = max(1, chunk_bytes // (positions * key.topk * 8))
        self.chunks = -(-examples // self.chunk_examples)

    def complete(self) -> bool:
        """Whether the directory holds every chunk of this key; refuses one made for another."""
        path = self.directory / MANIFEST
        if not path.is_file():
            return False
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RecoveryError(f"{path}: not valid JSON ({err}); delete {self.directory} to compute the teacher logits again") from err
        if manifest.get("key") != self.key.digest():
            raise RecoveryError(f"{self.directory}: these teacher logits were made for {_differences(manifest, self.key)}; pass another --teacher-logits directory, or delete this one")
        missing = [i for i in range(self.chunks) if not self._has_chunk(i)]
        if missing:
            raise RecoveryError(f"{self.directory}: {len(missing)} of {self.chunks} chunk files are missing or damaged (first: {_chunk_name(missing[0])}); delete the directory to compute them again")
        return True

    def fill(self, teacher: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, device: torch.device, batch_size: int, process: int, processes: int, wait: Callable[[], None], progress: bool) -> None:
        """Computes the chunks that are not there yet, process ``process`` of ``processes`` taking
        every ``processes``-th chunk; the first process then writes the manifest. Every process
        calls this (``wait`` is their barrier); the teacher is freed before it returns."""
        from tqdm.auto import tqdm

        self.directory.mkdir(parents=True, exist_ok=True)
        todo = [i for i in range(process, self.chunks, processes) if not self._has_chunk(i)]
        if todo:
            model = LiveTeacher(teacher, self.key.teacher_dtype, device)
            with tqdm(total=len(todo), desc="teacher logits", unit="chunk", disable=not progress, dynamic_ncols=True) as bar:
                for chunk in todo:
                    self._write_chunk(chunk, model, input_ids, attention_mask, batch_size)
                    bar.update(1)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        wait()
        if process == 0:
            missing = [i for i in range(self.chunks) if not self._has_chunk(i)]
            if missing:
                raise RecoveryError(f"{self.directory}: chunk files {_chunk_name(missing[0])} and {len(missing) - 1} more were not written; is the directory on a file system every process sees?")
            manifest = {"key": self.key.digest(), **asdict(self.key), "examples": self.examples, "chunk_examples": self.chunk_examples, "chunks": self.chunks}
            write_json_atomically(self.directory / MANIFEST, manifest)
        wait()

    def reader(self) -> CachedTeacher:
        return CachedTeacher(self.directory, self.chunk_examples)

    def _write_chunk(self, chunk: int, model: LiveTeacher, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> None:
        from safetensors.torch import save_file

        first, end = chunk * self.chunk_examples, min((chunk + 1) * self.chunk_examples, self.examples)
        values, indices = [], []
        for start in range(first, end, batch_size):
            rows = torch.arange(start, min(start + batch_size, end))
            logits = model.targets(rows, input_ids[rows].to(model.device), attention_mask[rows].to(model.device)).values
            top = torch.topk(logits, self.key.topk, dim=-1)
            values.append(top.values.cpu())
            indices.append(top.indices.to(torch.int32).cpu())
        tensors = {"values": torch.cat(values).contiguous(), "indices": torch.cat(indices).contiguous()}
        write_atomically(self.directory / _chunk_name(chunk), lambda path: save_file(tensors, str(path), metadata={"key": self.key.digest()}))

    def _has_chunk(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is in place and made for this key (a leftover of an interrupted
        run with other inputs is not, and is written again)."""
        from safetensors import SafetensorError, safe_open

        path = self.directory / _chunk_name(chunk)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                return (handle.metadata() or {}).get("key") == self.key.digest()
        except (SafetensorError, OSError):
            return False


def prepare_cache(cache: TeacherLogitsCache, teacher: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, device: torch.device, batch_size: int, process: int, processes: int, wait: Callable[[], None], progress: bool) -> CachedTeacher:
    """The cache's reader, after computing what it lacks (reused as it is when complete)."""
    if not cache.complete():
        cache.fill(teacher, input_ids, attention_mask, device=device, batch_size=batch_size, process=process, processes=processes, wait=wait, progress=progress)
    return cache.reader()


def _differences(manifest: Dict[str, Any], key: CacheKey) -> str:
    """What a cache was made for, where it differs from ``key`` (for the refusal message)."""
    labels = {"teacher_sha256": "another teacher", "teacher_dtype": "another teacher dtype", "data_sha256": "other data", "seq_len": "another seq_len", "topk": "another k"}
    found = [f"{label} ({manifest.get(name)!s:.16}, this run: {getattr(key, name)!s:.16})" for name, label in labels.items() if manifest.get(name) != getattr(key, name)]
    return ", ".join(found) or "another cache format"


def _chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}.safetensors"


__all__ = [
    "DEFAULT_TOPK",
    "TEACHER_DTYPES",
    "Teacher",
    "CacheKey",
    "CachedTeacher",
    "Distillation",
    "LiveTeacher",
    "TeacherLogitsCache",
    "TeacherTargets",
    "check_distillation_options",
    "distillation_loss",
    "prepare_cache",
    "resolve_distillation",
    "teacher_sha256",
]
