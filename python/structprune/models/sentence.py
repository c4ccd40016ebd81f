"""Encoders (BERT, RoBERTa, DistilBERT…) as sentence-embedding models: how a model's token states
become one embedding per text, and the losses scoring and recovery take on it.

The pooling is the one the model is deployed with: a sentence-transformers folder says it in
``modules.json`` (a ``Pooling`` module, whose ``config.json`` names the mode, and whether a
``Normalize`` module follows). A checkpoint without that folder layout is pooled like most
sentence-embedding models: the mean of its token states, L2-normalised.

Losses (a model with an MLM head has its own loss, see ``structprune.score.streaming``):

- scoring, :func:`probe_loss`: the distillation loss against the dense model's own embeddings
  is zero at the dense model, and so is its gradient, which would make every gradient-based
  score zero. Its curvature is not: for each sample, the gradient of ``r · e(x)`` with a random
  direction ``r`` has the Gauss–Newton curvature of the squared embedding error as its expected
  square (Hutchinson), and ``|w · g|`` is, in expectation over ``r``, proportional to how far the
  embedding moves to first order when the weights ``w`` are removed.
- recovery, :func:`distillation_loss`: one minus the cosine between the pruned and the dense
  model's embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Union

from structprune.errors import ConfigError

if TYPE_CHECKING:  # torch is imported by the functions that compute, not by apply's folder copy
    import torch

PathLike = Union[str, "os.PathLike[str]"]

# sentence-transformers' Pooling config: one boolean per mode.
_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


@dataclass(frozen=True)
class Pooling:
    """How token states become a text's embedding."""

    mode: str = "mean"
    normalize: bool = True


def read_modules(model_dir: PathLike) -> List[Dict[str, Any]]:
    """The modules of a sentence-transformers folder (``modules.json``), or ``[]`` without one."""
    path = Path(model_dir) / "modules.json"
    if not path.is_file():
        return []
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _config_error(path, f"{path}: not a readable sentence-transformers modules list: {err}") from err
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise _config_error(path, f"{path}: expected a list of modules, each with a 'type'")
    return modules


def read_pooling(model_dir: PathLike) -> Pooling:
    """The pooling of the model in ``model_dir`` (see the module docstring)."""
    modules = read_modules(model_dir)
    if not modules:
        return Pooling()
    types = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
    normalize = "Normalize" in types
    if "Pooling" not in types:
        return Pooling(normalize=normalize)
    folder = Path(model_dir) / str(modules[types.index("Pooling")].get("path", ""))
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _config_error(path, f"{path}: cannot read the pooling config: {err}") from err
    return Pooling(mode=_pooling_mode(path, config), normalize=normalize)


def _pooling_mode(path: Path, config: Mapping[str, Any]) -> str:
    chosen = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
    if len(chosen) != 1:
        raise _config_error(path, f"{path}: structprune pools with exactly one of {', '.join(_POOLING_KEYS)}, this config turns on {chosen or 'none'}")
    return chosen[0]


def pool(hidden: "torch.Tensor", mask: "torch.Tensor", pooling: Pooling) -> "torch.Tensor":
    """``[batch, width]`` embeddings of ``[batch, tokens, width]`` token states; ``mask`` is 1 on
    tokens, 0 on padding."""
    import torch

    weights = mask.to(hidden.dtype).unsqueeze(-1)
    if pooling.mode == "cls":
        pooled = hidden[:, 0]
    elif pooling.mode == "max":
        pooled = hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    else:
        summed = (hidden * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1.0)
        pooled = summed / (counts.sqrt() if pooling.mode == "mean_sqrt_len" else counts)
    return torch.nn.functional.normalize(pooled, dim=-1) if pooling.normalize else pooled


def probe_directions(input_ids: "torch.Tensor", width: int) -> "torch.Tensor":
    """One unit-length Gaussian direction per sample, ``[batch, width]``, seeded by the sample's
    tokens: the same sample gets the same direction however the batch is split."""
    import torch

    rows = []
    for sample in input_ids.detach().to("cpu", torch.int64):
        digest = hashlib.sha256(sample.numpy().astype("<i8").tobytes()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        rows.append(torch.randn(width, generator=generator, dtype=torch.float64))
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def probe_loss(embeddings: "torch.Tensor", input_ids: "torch.Tensor") -> "torch.Tensor":
    """The scoring loss of a sentence-embedding model: the mean over samples of the embedding
    projected on the sample's :func:`probe_directions` (see the module docstring)."""
    directions = probe_directions(input_ids, embeddings.shape[-1]).to(embeddings.device, embeddings.dtype)
    return (embeddings * directions).sum(dim=-1).mean()


def distillation_loss(student: "torch.Tensor", teacher: "torch.Tensor") -> "torch.Tensor":
    """The recovery loss: mean over samples of one minus the cosine of the two embeddings."""
    import torch

    cosine = torch.nn.functional.cosine_similarity(student, teacher.detach().to(student.dtype), dim=-1)
    return (1.0 - cosine).mean()


def module_folders(model_dir: PathLike) -> List[str]:
    """The folders of a sentence-transformers checkpoint's modules (``1_Pooling``, ``2_Dense``…),
    relative to ``model_dir``: those ``modules.json`` names that exist. The transformer module's
    own files are the checkpoint's (path ``""``)."""
    root = Path(model_dir).resolve()
    folders = []
    for module in read_modules(model_dir):
        relative = str(module.get("path") or "")
        if not relative:
            continue
        folder = (root / relative).resolve()
        if not folder.is_relative_to(root) or folder == root:
            raise _config_error(root / "modules.json", f"{root / 'modules.json'}: module path {relative!r} is outside the model directory")
        if folder.is_dir():
            folders.append(relative)
    return folders


def _config_error(path: Path, message: str) -> ConfigError:
    error = ConfigError(message)
    error.path = str(path)
    return error


__all__ = [
    "Pooling",
    "distillation_loss",
    "module_folders",
    "pool",
    "probe_directions",
    "probe_loss",
    "read_modules",
    "read_pooling",
]
