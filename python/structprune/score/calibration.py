"""Calibration text: read documents, turn them into one token stream, draw fixed-length windows
(for an encoder: passages of single documents, padded, see :func:`passage_batch`).

Importance scoring runs the dense model on a small batch of token windows (the *calibration
batch*). This module makes that batch reproducible: the same files, tokenizer, sizes and seed give
a byte-identical ``[samples, seq_len]`` tensor, and :class:`CalibrationSummary` records what a plan
was scored on (with the SHA-256 of the batch) so a result can be traced back to its data.

Inputs (:func:`load_texts`):

- ``.txt``: documents separated by lines that hold exactly ``<|endoftext|>`` (the format of
  ``demo/text/`` and the team fixtures); a file without such a line is one document.
- ``.jsonl``: one JSON object per line; the document is its ``text_field`` (default ``"text"``)
  or, when that field is absent, an Alpaca-style ``instruction``/``input``/``output`` record
  rendered with :data:`ALPACA_TEMPLATE` / :data:`ALPACA_TEMPLATE_NO_INPUT`.
- a directory written by ``datasets.Dataset.save_to_disk`` (needs ``pip install datasets``),
  whose rows are read like JSON Lines records.

The token stream (:func:`token_stream`) is what the model sees when the documents are written as a
``.txt`` file and that file is tokenized as one string: documents joined by ``"\\n" + eos + "\\n"``.
Evaluation (``structprune.evaluate.perplexity``) uses the same stream, so a held-out file is scored exactly as
the reference perplexities in ``demo/README.md`` and the fixtures' README were computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from structprune.io import sizes
from structprune.errors import CalibrationError, StructpruneIOError

if TYPE_CHECKING:  # transformers is heavy to import and only needed by callers that have a tokenizer
    from transformers import PreTrainedTokenizerBase

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_SAMPLES = sizes.DEFAULT_SAMPLES
"""Windows in a calibration batch."""
DEFAULT_SEQ_LEN = 128
"""Tokens per calibration window."""
DEFAULT_SEED = 0
"""Seed of the ``numpy.random.default_rng`` that draws the window start offsets."""

DOCUMENT_SEPARATOR = "<|endoftext|>"
"""A line holding exactly this separates documents in a ``.txt`` file, whatever the model's eos."""

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
"""The Stanford Alpaca prompt, used for records with a non-empty ``input``."""
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
)
"""The Stanford Alpaca prompt, used for records whose ``input`` is missing, null or empty."""

# A separator line takes the line break before it and its own line break with it, so that
# "A\n<|endoftext|>\nB\n" splits into "A" and "B\n" and joining with "\n<|endoftext|>\n" gives
# the file back byte for byte (the separator written by demo/train_demo_model.py).
_SEPARATOR_LINE = re.compile(r"(?:\r?\n)?^<\|endoftext\|>\r?$\n?", re.MULTILINE)

# Files that datasets' save_to_disk writes: a Dataset has the first two, a DatasetDict the last.
_DATASET_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


# ----------------------------------------------------------------------------- reading documents


def load_texts(path: PathLike, *, text_field: str = "text") -> List[str]:
    """The documents in a ``.txt``/``.jsonl`` file or a ``save_to_disk`` dataset directory.

    Empty and whitespace-only documents are dropped (they add nothing but separators). Raises
    :class:`~structprune.errors.CalibrationError` naming the file (and line or row) for bad
    content, including a source with no documents, and
    :class:`~structprune.errors.StructpruneIOError` when the path cannot be read.
    """
    source = Path(path)
    if source.is_dir():
        texts = _load_dataset_dir(source, text_field)
    elif not source.exists():
        raise _io_error(source, f"{source}: no such file or directory")
    elif source.suffix == ".txt":
        texts = split_documents(_read_text(source))
    elif source.suffix == ".jsonl":
        texts = _load_jsonl(source, text_field)
    else:
        raise _error(
            source,
            f"{source}: unsupported calibration file type {source.suffix!r} "
            "(expected .txt, .jsonl or a datasets save_to_disk directory)",
        )
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise _error(source, f"{source}: empty: no non-blank documents")
    return texts


def split_documents(text: str) -> List[str]:
    """Split ``.txt`` content at lines that are exactly ``<|endoftext|>`` (see the module doc)."""
    return _SEPARATOR_LINE.split(text)


def record_text(record: Mapping[str, Any], text_field: str = "text") -> str:
    """The document of one JSON Lines record or dataset row.

    ``record[text_field]`` when present; otherwise an Alpaca record (``instruction`` and
    ``output``, optional ``input``) rendered with the Alpaca templates. Raises ``ValueError``
    saying which field is missing or mistyped (callers add the file and line).
    """
    if text_field in record:
        return _string_field(record, text_field)
    if "instruction" in record and "output" in record:
        return _alpaca_text(record)
    fields = ", ".join(repr(key) for key in record) or "none"
    raise ValueError(
        f"no {text_field!r} field and no Alpaca 'instruction'/'output' fields (fields: {fields})"
    )


def _alpaca_text(record: Mapping[str, Any]) -> str:
    instruction = _string_field(record, "instruction")
    output = _string_field(record, "output")
    extra = record.get("input")
    if extra is None or extra == "":
        return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction, output=output)
    return ALPACA_TEMPLATE.format(instruction=instruction, input=_string_field(record, "input"), output=output)


def _string_field(record: Mapping[str, Any], name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} is {type(value).__name__}, not a string")
    return value


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _io_error(path, f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _error(path, f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})", line) from exc


def read_jsonl_records(path: Path) -> List[Tuple[int, Dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of a JSON Lines file; a line that is
    not a JSON object raises ``CalibrationError`` naming the file and line."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing one above all) are common and carry no record
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(path, f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})", number) from exc
        if not isinstance(record, dict):
            raise _error(path, f"{path}:{number}: expected a JSON object, got {type(record).__name__}", number)
        records.append((number, record))
    return records


def _load_jsonl(path: Path, text_field: str) -> List[str]:
    texts = []
    for number, record in read_jsonl_records(path):
        try:
            texts.append(record_text(record, text_field))
        except ValueError as exc:
            raise _error(path, f"{path}:{number}: {exc}", number) from exc
    return texts


def _load_dataset_dir(path: Path, text_field: str) -> List[str]:
    if not any((path / marker).is_file() for marker in _DATASET_MARKERS):
        raise _error(
            path,
            f"{path}: a directory, but not a Hugging Face dataset saved with save_to_disk "
            f"(none of {', '.join(_DATASET_MARKERS)} in it)",
        )
    try:
        import datasets  # optional dependency: only this input format needs it
    except ImportError as exc:
        raise _error(
            path,
            f"{path}: reading a Hugging Face datasets directory needs the `datasets` package: "
            "pip install datasets",
        ) from exc
    loaded = datasets.load_from_disk(str(path))
    rows = _pick_split(path, loaded) if isinstance(loaded, datasets.DatasetDict) else loaded
    return _dataset_texts(path, rows, text_field)


def _pick_split(path: Path, splits: Mapping[str, Any]) -> Any:
    # load_texts has no split argument, so take the only split or the conventional one.
    if len(splits) == 1:
        return next(iter(splits.values()))
    if "train" in splits:
        return splits["train"]
    raise _error(path, f"{path}: a DatasetDict with splits {sorted(splits)} and no 'train' split; save one split")


def _dataset_texts(path: Path, rows: Iterable[Mapping[str, Any]], text_field: str) -> List[str]:
    texts = []
    for number, row in enumerate(rows):
        try:
            texts.append(record_text(row, text_field))
        except ValueError as exc:
            raise _error(path, f"{path}: row {number}: {exc}", number) from exc
    return texts


def _error(path: Path, message: str, line: Optional[int] = None) -> CalibrationError:
    error = CalibrationError(message)
    error.path = str(path)
    error.line = line
    return error


def _io_error(path: Path, message: str) -> StructpruneIOError:
    error = StructpruneIOError(message)
    error.path = str(path)
    return error


# ------------------------------------------------------------------------------ token stream


def token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """All documents as one 1-D ``int64`` token stream, separated by the tokenizer's eos token.

    The stream is the tokenization of ``("\\n" + eos + "\\n").join(texts)`` as one string (the
    ``.txt`` format; it is how the demo model and the fixtures were trained and evaluated), and
    so of a ``.txt`` file read back by :func:`load_texts`. It is built piece by piece instead,
    each document with the line breaks around its separators, and the eos inserted by id, so that
    no sequence longer than a document is tokenized and eos is never parsed from text. Tokenizers
    split text at special tokens before anything else, so for byte-level BPE tokenizers (GPT-2,
    Llama 3, the demo model's) the tokens are identical; SentencePiece-style ones that mark only
    the start of the whole string with a space may differ in that marker after each eos. No BOS
    or other special tokens are added.
    """
    if not texts:
        raise CalibrationError("no documents to tokenize")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise CalibrationError(
            f"tokenizer {type(tokenizer).__name__} has no eos token to separate documents with"
        )
    last = len(texts) - 1
    pieces = [("\n" if i else "") + text + ("\n" if i < last else "") for i, text in enumerate(texts)]
    # verbose=False: long documents are expected here and are not truncated, so the
    # "longer than model_max_length" warning would only be noise.
    encoded = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
    separator = np.array([eos_id], dtype=np.int64)
    parts: List[np.ndarray] = []
    for i, ids in enumerate(encoded):
        if i:
            parts.append(separator)
        parts.append(np.asarray(ids, dtype=np.int64))
    return torch.from_numpy(np.concatenate(parts))


# ------------------------------------------------------------------------------ windows


def sample_windows(
    stream: torch.Tensor,
    *,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` consecutive tokens of ``stream``, as ``[samples, seq_len]``.

    Start offsets are drawn independently (windows may overlap) and uniformly from
    ``[0, len(stream) - seq_len)`` by ``numpy.random.default_rng(seed)``, the range the demo
    trainer draws its windows from; so the stream needs at least ``seq_len + 1`` tokens.
    """
    _check_positive(samples=samples, seq_len=seq_len)
    if seed < 0:
        raise CalibrationError(f"seed must be a non-negative integer, got {seed}")
    if stream.dim() != 1:
        raise CalibrationError(f"the token stream must be 1-D, got shape {tuple(stream.shape)}")
    length = stream.numel()
    if length < seq_len + 1:
        raise CalibrationError(
            f"the token stream has {length} tokens; {seq_len}-token windows need at least {seq_len + 1}"
        )
    starts = np.random.default_rng(seed).integers(0, length - seq_len, size=samples, dtype=np.int64)
    index = torch.from_numpy(starts)[:, None] + torch.arange(seq_len, dtype=torch.int64)
    return stream.to(torch.int64)[index].contiguous()


def calibration_batch(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
) -> torch.Tensor:
    """The calibration batch ``[samples, seq_len]`` (``int64``): windows of :func:`token_stream`
    ``(texts)`` for a causal LM's tokenizer, :func:`passage_batch` for an encoder's (see
    :func:`separates_passages`).

    Deterministic: the same texts, tokenizer, sizes and seed give an identical tensor.
    """
    if separates_passages(tokenizer):
        return passage_batch(texts, tokenizer, samples=samples, seq_len=seq_len, seed=seed)
    return sample_windows(token_stream(texts, tokenizer), samples=samples, seq_len=seq_len, seed=seed)


def separates_passages(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer is an encoder's: it has a classification token (BERT's ``[CLS]``,
    RoBERTa's ``<s>``) or no eos to join documents with. An encoder reads one passage at a time
    between its own special tokens, never a stream of documents."""
    return tokenizer.cls_token_id is not None or tokenizer.eos_token_id is None


def passage_batch(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
) -> torch.Tensor:
    """``samples`` encoder inputs of ``seq_len`` tokens, each one passage of a single document
    between the tokenizer's special tokens (``[CLS] … [SEP]``), as ``[samples, seq_len]``.

    A passage is a window of ``seq_len`` tokens (less the special tokens) of one document, drawn
    by ``numpy.random.default_rng(seed)`` uniformly among all windows of all documents; a document
    shorter than that is one passage, padded at the end with the pad token, which therefore marks
    the positions an attention mask hides (:func:`attention_mask`). Pad tokens inside the text
    are dropped, so that they cannot be taken for padding.
    """
    _check_positive(samples=samples, seq_len=seq_len)
    if seed < 0:
        raise CalibrationError(f"seed must be a non-negative integer, got {seed}")
    if not texts:
        raise CalibrationError("no documents to tokenize")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise CalibrationError(f"tokenizer {type(tokenizer).__name__} has no pad token to pad passages with")
    prefix, suffix = special_frame(tokenizer)
    content = seq_len - len(prefix) - len(suffix)
    if content < 1:
        raise CalibrationError(f"seq_len {seq_len} leaves no room for text between the tokenizer's special tokens")
    documents = document_tokens(texts, tokenizer)
    # Window starts per document; numbering them all lets one draw pick a document and an offset.
    starts = np.asarray([max(ids.size - content, 0) + 1 for ids in documents], dtype=np.int64)
    firsts = np.concatenate([[0], np.cumsum(starts)])
    drawn = np.random.default_rng(seed).integers(0, int(firsts[-1]), size=samples, dtype=np.int64)
    batch = np.full((samples, seq_len), pad_id, dtype=np.int64)
    for row, number in enumerate(drawn):
        document = int(np.searchsorted(firsts, number, side="right")) - 1
        offset = int(number - firsts[document])
        window = documents[document][offset : offset + content].tolist()
        ids = prefix + window + suffix
        batch[row, : len(ids)] = ids
    return torch.from_numpy(batch)


def special_frame(tokenizer: PreTrainedTokenizerBase) -> Tuple[List[int], List[int]]:
    """The special tokens the tokenizer puts before and after one text (``[CLS]``, ``[SEP]``).

    Read off a one-word text tokenized with and without them: transformers 5 tokenizers no longer
    all have ``build_inputs_with_special_tokens``."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return list(marked[:start]), list(marked[start + len(plain) :])
    raise CalibrationError(f"tokenizer {type(tokenizer).__name__} changes a text's tokens when it adds its special tokens")


def document_tokens(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> List[np.ndarray]:
    """Each non-empty document's tokens without special tokens, pad tokens dropped."""
    pad_id = tokenizer.pad_token_id
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    documents = [np.asarray([t for t in ids if t != pad_id], dtype=np.int64) for ids in encoded]
    documents = [ids for ids in documents if ids.size]
    if not documents:
        raise CalibrationError("the documents hold no tokens")
    return documents


def attention_mask(input_ids: torch.Tensor, pad_token_id: Optional[int]) -> torch.Tensor:
    """1 where a :func:`passage_batch` sample has a token, 0 on its padding."""
    if pad_token_id is None:
        return torch.ones_like(input_ids)
    return (input_ids != pad_token_id).to(torch.int64)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class CalibrationSummary:
    """What a calibration batch was made from, for recording next to a plan."""

    source: Optional[str]
    """The file or directory the documents came from (``None`` for texts passed in directly)."""
    samples: int
    seq_len: int
    seed: int
    stream_tokens: int
    """Tokens in the stream the windows were drawn from."""
    sha256: str
    """SHA-256 (hex) of the batch as row-major little-endian int64 bytes: the same on any machine."""

    @classmethod
    def of(
        cls, batch: torch.Tensor, *, source: Optional[PathLike], seed: int, stream_tokens: int
    ) -> "CalibrationSummary":
        """The summary of a ``[samples, seq_len]`` batch."""
        samples, seq_len = batch.shape
        return cls(
            source=None if source is None else str(source),
            samples=int(samples),
            seq_len=int(seq_len),
            seed=seed,
            stream_tokens=stream_tokens,
            sha256=batch_sha256(batch),
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CalibrationSummary":
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})


def batch_sha256(batch: torch.Tensor) -> str:
    """SHA-256 of a token batch's values (dtype, device and byte order do not matter)."""
    data = batch.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(data.tobytes()).hexdigest()


def load_calibration(
    path: PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
    text_field: str = "text",
) -> Tuple[torch.Tensor, CalibrationSummary]:
    """Read ``path``, draw the calibration batch and describe it: ``(batch, summary)``."""
    texts = load_texts(path, text_field=text_field)
    if separates_passages(tokenizer):
        batch = passage_batch(texts, tokenizer, samples=samples, seq_len=seq_len, seed=seed)
        tokens = sum(ids.size for ids in document_tokens(texts, tokenizer))
        return batch, CalibrationSummary.of(batch, source=path, seed=seed, stream_tokens=tokens)
    stream = token_stream(texts, tokenizer)
    batch = sample_windows(stream, samples=samples, seq_len=seq_len, seed=seed)
    return batch, CalibrationSummary.of(batch, source=path, seed=seed, stream_tokens=stream.numel())


__all__ = [
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "DEFAULT_SAMPLES",
    "DEFAULT_SEED",
    "DEFAULT_SEQ_LEN",
    "DOCUMENT_SEPARATOR",
    "CalibrationSummary",
    "batch_sha256",
    "calibration_batch",
    "document_tokens",
    "load_calibration",
    "attention_mask",
    "load_texts",
    "passage_batch",
    "record_text",
    "sample_windows",
    "separates_passages",
    "special_frame",
    "split_documents",
    "token_stream",
]
