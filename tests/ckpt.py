"""Test helpers: write and read safetensors checkpoints without going through structprune.

The reader/writer here are deliberately independent of both structprune and the `safetensors`
package, so that byte comparisons work for dtypes neither numpy nor the library can express
(BF16, F8_*) and so that corrupted files can be produced on purpose.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

# Element size in bytes of every byte-addressable safetensors dtype the tests use.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
# Packed sub-byte dtypes: bits per element (a tensor's elements fill whole bytes).
SUB_BYTE_BITS: dict[str, int] = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

# safetensors dtype string <-> numpy dtype, for the dtypes numpy can represent natively.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
}

# Unsigned integer of each element width: reinterpreting any dtype's bytes as these makes
# fancy-indexing a pure byte-moving operation, which is what the engine must do too.
_STORAGE_BY_SIZE: dict[int, np.dtype[Any]] = {
    1: np.dtype("<u1"),
    2: np.dtype("<u2"),
    4: np.dtype("<u4"),
    8: np.dtype("<u8"),
}

SINGLE_FILE = "model.safetensors"

TOKENIZER_BYTES = b'{"version": "1.0", "model": {"type": "BPE"}}\n'
BASE_CONFIG: dict[str, Any] = {
    "architectures": ["ToyForCausalLM"],
    "hidden_size": 8,
    "intermediate_size": 6,
    "rope_scaling": {"type": "linear", "factor": 2.0},
}

# make_checkpoint fixture type: (tensors, name="model", *, config=..., extra_files=..., **write_checkpoint kwargs) -> dir
CheckpointFactory = Callable[..., Path]
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class RawTensor:
    """A tensor as safetensors stores it: dtype string, shape and little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> RawTensor:
        dtype = dtype_name(array.dtype)
        contiguous = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return cls(dtype, tuple(int(d) for d in array.shape), contiguous.tobytes())

    def storage(self) -> np.ndarray:
        """The bytes viewed as unsigned ints of the element width, in the tensor's shape."""
        flat = np.frombuffer(self.data, dtype=_STORAGE_BY_SIZE[DTYPE_SIZES[self.dtype]])
        return flat.reshape(self.shape)

    def to_numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=NUMPY_DTYPES[self.dtype]).reshape(self.shape)


TensorLike = Union[np.ndarray, RawTensor]


def dtype_name(dtype: np.dtype[Any]) -> str:
    for name, candidate in NUMPY_DTYPES.items():
        if candidate == dtype.newbyteorder("="):
            return name
    raise ValueError(f"no safetensors dtype for {dtype}")


def as_raw(tensor: TensorLike) -> RawTensor:
    return tensor if isinstance(tensor, RawTensor) else RawTensor.from_numpy(tensor)


def random_raw(dtype: str, shape: Sequence[int], seed: int) -> RawTensor:
    """Random bytes of the right length; BOOL is masked to 0/1 so it stays a valid bool."""
    count = math.prod(shape) * DTYPE_SIZES[dtype]
    data = np.random.default_rng(seed).bytes(count)
    if dtype == "BOOL":
        data = bytes(b & 1 for b in data)
    return RawTensor(dtype, tuple(shape), data)


def cut_reference(tensor: RawTensor, keep: Mapping[int, Sequence[int]]) -> RawTensor:
    """numpy reference of a cut: successive np.take along each kept dimension."""
    array = tensor.storage()
    for dim in sorted(keep):
        array = np.take(array, np.asarray(keep[dim], dtype=np.intp), axis=dim)
    return RawTensor(tensor.dtype, tuple(int(d) for d in array.shape), np.ascontiguousarray(array).tobytes())


def examples(count: int) -> int:
    """Hypothesis example count, multiplied by $STRUCTPRUNE_EXAMPLE_SCALE for soak runs."""
    return count * int(os.environ.get("STRUCTPRUNE_EXAMPLE_SCALE", "1"))


# ---------------------------------------------------------------------------------------------
# Raw safetensors encoding / parsing


def encode_header(header: Mapping[str, Any], data: bytes) -> bytes:
    """Serialise an arbitrary (possibly invalid) header + data blob the way safetensors does:
    u64 little-endian header length, JSON padded with spaces to a multiple of 8, then data."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def encode_safetensors(
    tensors: Mapping[str, TensorLike], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Valid safetensors bytes with tensors laid out in the mapping's order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        raw = as_raw(tensor)
        header[name] = {"dtype": raw.dtype, "shape": list(raw.shape), "data_offsets": [offset, offset + raw.nbytes]}
        chunks.append(raw.data)
        offset += raw.nbytes
    return encode_header(header, b"".join(chunks))


def write_safetensors(
    path: Path, tensors: Mapping[str, TensorLike], metadata: Mapping[str, str] | None = None
) -> None:
    path.write_bytes(encode_safetensors(tensors, {"format": "pt"} if metadata is None else metadata))


@dataclass(frozen=True)
class ParsedFile:
    metadata: dict[str, str] | None
    tensors: dict[str, RawTensor]  # in data-offset order


def parse_safetensors(blob: bytes) -> ParsedFile:
    """Strict parser: checks the layout rules the engine's output must obey."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    assert 8 + header_len <= len(blob), "header length past end of file"
    header = json.loads(blob[8 : 8 + header_len])
    metadata = header.pop("__metadata__", None)
    data = blob[8 + header_len :]
    entries = sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"]))
    tensors: dict[str, RawTensor] = {}
    position = 0
    for name, entry in entries:
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        assert begin == position, f"{name}: gap or overlap at {begin} (expected {position})"
        dtype = entry["dtype"]
        bits = math.prod(shape) * (SUB_BYTE_BITS[dtype] if dtype in SUB_BYTE_BITS else 8 * DTYPE_SIZES[dtype])
        assert bits % 8 == 0 and end - begin == bits // 8, f"{name}: bad byte span"
        tensors[name] = RawTensor(entry["dtype"], shape, data[begin:end])
        position = end
    assert position == len(data), "trailing bytes after the last tensor"
    return ParsedFile(metadata, tensors)


def read_safetensors(path: Path) -> ParsedFile:
    return parse_safetensors(path.read_bytes())


# ---------------------------------------------------------------------------------------------
# Checkpoint directories


def shard_name(index: int, count: int) -> str:
    """HF shard naming, 1-based: model-00001-of-00003.safetensors."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_checkpoint(
    model_dir: Path,
    tensors: Mapping[str, TensorLike],
    *,
    shards: Sequence[Sequence[str]] | None = None,
    force_index: bool = False,
    config: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    use_library: bool | None = None,
) -> Path:
    """Write a checkpoint directory.

    `shards` lists the tensor names of each shard (default: one shard with everything). With a
    single shard the file is `model.safetensors` unless `force_index` asks for the indexed
    layout. `use_library` picks safetensors.numpy.save_file (the default when every tensor is a
    numpy array) or the raw writer (needed for BF16/F8, and to control the on-disk order).
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    groups = [list(tensors)] if shards is None else [list(group) for group in shards]
    if use_library is None:
        use_library = all(isinstance(t, np.ndarray) for t in tensors.values())
    indexed = len(groups) > 1 or force_index
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        file_name = shard_name(number, len(groups)) if indexed else SINGLE_FILE
        members = {name: tensors[name] for name in group}
        if use_library:
            _save_with_library(model_dir / file_name, members)
        else:
            write_safetensors(model_dir / file_name, members)
        weight_map.update({name: file_name for name in group})
    if indexed:
        total = sum(as_raw(tensors[name]).nbytes for name in weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    if config is not None:
        (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name, content in (extra_files or {}).items():
        (model_dir / name).write_bytes(content)
    return model_dir


def _save_with_library(path: Path, tensors: Mapping[str, TensorLike]) -> None:
    from safetensors.numpy import save_file

    arrays = {name: _as_numpy(tensor) for name, tensor in tensors.items()}
    save_file(arrays, str(path), metadata={"format": "pt"})


def _as_numpy(tensor: TensorLike) -> np.ndarray:
    return tensor if isinstance(tensor, np.ndarray) else tensor.to_numpy()


@dataclass(frozen=True)
class OutputCheckpoint:
    shards: list[str]  # shard file names in order
    tensors: dict[str, RawTensor]  # all tensors, in output order (shard order, then offset)
    shard_of: dict[str, str]
    shard_metadata: dict[str, dict[str, str] | None]
    index: dict[str, Any] | None


def read_checkpoint_raw(model_dir: Path) -> OutputCheckpoint:
    """Read an output checkpoint with the strict raw parser."""
    index_path = model_dir / INDEX_FILE
    index: dict[str, Any] | None = None
    if index_path.exists():
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
    else:
        shards = [SINGLE_FILE]
    tensors: dict[str, RawTensor] = {}
    shard_of: dict[str, str] = {}
    shard_metadata: dict[str, dict[str, str] | None] = {}
    for shard in shards:
        parsed = read_safetensors(model_dir / shard)
        shard_metadata[shard] = parsed.metadata
        for name, tensor in parsed.tensors.items():
            assert name not in tensors, f"{name} appears in two output shards"
            tensors[name] = tensor
            shard_of[name] = shard
    return OutputCheckpoint(shards, tensors, shard_of, shard_metadata, index)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file under root, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_hashes(root: Path) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in tree_bytes(root).items()}


# ---------------------------------------------------------------------------------------------
# Plans


def plan_dict(
    tensors: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    index_sets: Mapping[str, Sequence[int]] | None = None,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A cut plan in the docs/plan-format.md JSON schema (format/version filled in)."""
    plan: dict[str, Any] = {"format": "structprune.cut-plan", "version": 1}
    plan["index_sets"] = {name: list(values) for name, values in (index_sets or {}).items()}
    plan["tensors"] = {name: dict(entry) for name, entry in (tensors or {}).items()}
    if config is not None:
        # Only when asked: an empty patch must be a no-op, but that has a test of its own.
        plan["config"] = dict(config)
    plan["metadata"] = dict(metadata or {})
    return plan


def write_plan(path: Path, plan: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(plan))
    return path


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON Merge Patch, the reference for the config edits."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
