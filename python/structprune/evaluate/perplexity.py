"""Held-out perplexity with one stated protocol, the one behind the reference figures.

Protocol (the fixtures' README: "tokenised with the model's tokenizer as one stream,
non-overlapping windows, mean token loss over windows, exp"):

1. The held-out file is read with :func:`structprune.score.calibration.load_texts` and tokenized as one
   stream by :func:`structprune.score.calibration.token_stream` (documents joined by
   ``"\\n" + eos + "\\n"``, i.e. a ``.txt`` file tokenized as one string; no BOS).
2. The stream is cut into ``len // window`` non-overlapping windows of ``window`` tokens; the
   incomplete tail is dropped.
3. Each window is evaluated on its own, from an empty context: ``labels = input_ids``, the causal
   LM loss shifted inside the window, so ``window - 1`` tokens are predicted per window.
4. The loss is the mean over windows of each window's mean token loss (all windows have the same
   length, so this is also the mean over all predicted tokens), and perplexity is its exp.

The figure depends on ``window`` (longer windows give each token more context), so a perplexity
is only comparable with others at the same window: :class:`PerplexityResult` carries it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from structprune.score.calibration import load_texts, token_stream
from structprune.errors import CalibrationError

if TYPE_CHECKING:  # transformers is only imported when a model has to be loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PathLike = Union[str, "os.PathLike[str]"]
DeviceLike = Union[str, torch.device, None]

DEFAULT_WINDOW = 128
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and what it was measured on."""

    perplexity: float
    """exp(mean_loss)."""
    mean_loss: float
    """Mean over windows of the mean next-token cross-entropy (nats) inside each window."""
    windows: int
    """Windows evaluated: ``tokens // window``."""
    tokens: int
    """Tokens in the stream, including the dropped tail (``tokens - windows * window`` tokens)."""
    window: int
    """Tokens per window (``window - 1`` of them predicted)."""


def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    *,
    window: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: DeviceLike = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a causal LM on a 1-D token stream, by the protocol in the module doc.

    ``device``: where to run; the model is moved there if it is elsewhere. ``None`` runs on the
    device of the model's first parameter and leaves the model where it is. The model is put in
    eval mode for the computation and its training flag restored afterwards.
    """
    windows = _windows(token_ids, window)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    target = _target_device(model, device)
    losses = torch.empty(len(windows), dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(
            total=len(windows), unit="window", desc=f"perplexity @ {window}", disable=not progress
        ) as bar:
            for start in range(0, len(windows), batch_size):
                chunk = windows[start : start + batch_size].to(target)
                losses[start : start + len(chunk)] = window_losses(model, chunk).cpu()
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    mean_loss = losses.mean().item()
    return PerplexityResult(
        perplexity=math.exp(mean_loss),
        mean_loss=mean_loss,
        windows=len(windows),
        tokens=token_ids.numel(),
        window=window,
    )


def window_losses(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy (float64, ``[batch]``), as transformers computes
    ``model(input_ids, labels=input_ids).loss`` for that row alone (logits upcast to float32).

    Computed from the logits rather than with ``labels=`` because transformers' loss is one mean
    over the whole batch, and the protocol needs one loss per window.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    predicted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_losses = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="none")
    return token_losses.view(targets.shape).double().mean(dim=1)


def perplexity_of_text(
    model_dir_or_model: Union[PathLike, "PreTrainedModel"],
    text_path: PathLike,
    *,
    window: int = DEFAULT_WINDOW,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: DeviceLike = None,
    progress: bool = False,
    tokenizer: Optional["PreTrainedTokenizerBase"] = None,
    text_field: str = "text",
) -> PerplexityResult:
    """Perplexity of a model (a checkpoint directory or a loaded model) on a held-out text file.

    The tokenizer is loaded from the model directory (for a loaded model: from its
    ``name_or_path``) unless one is passed. ``text_path`` is anything
    :func:`~structprune.score.calibration.load_texts` reads.
    """
    model, tokenizer = _model_and_tokenizer(model_dir_or_model, tokenizer)
    stream = token_stream(load_texts(text_path, text_field=text_field), tokenizer)
    return perplexity(model, stream, window=window, batch_size=batch_size, device=device, progress=progress)


def _windows(token_ids: torch.Tensor, window: int) -> torch.Tensor:
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be a 1-D token stream, got shape {tuple(token_ids.shape)}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex:
        raise ValueError(f"token_ids must be integer token ids, got {token_ids.dtype}")
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (one context, one predicted), got {window}")
    count = token_ids.numel() // window
    if count == 0:
        raise CalibrationError(
            f"the token stream has {token_ids.numel()} tokens, fewer than one {window}-token window"
        )
    return token_ids[: count * window].to(torch.int64).reshape(count, window)


def _target_device(model: torch.nn.Module, device: DeviceLike) -> torch.device:
    if device is None:
        first = next(model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")
    target = torch.device(device)
    model.to(target)
    return target


def _model_and_tokenizer(
    model_dir_or_model: Union[PathLike, "PreTrainedModel"],
    tokenizer: Optional["PreTrainedTokenizerBase"],
) -> Tuple[torch.nn.Module, "PreTrainedTokenizerBase"]:
    from structprune.models.loading import load_model, load_tokenizer

    model_dir: Optional[Path]
    model: torch.nn.Module  # transformers' own annotations of from_pretrained/.to confuse checkers
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        model_dir = Path(model_dir_or_model)
        model = load_model(model_dir, dtype="float32", device="cpu")  # perplexity() moves it to device
    else:
        model = model_dir_or_model
        name = getattr(model, "name_or_path", "") or ""
        # An empty name would be Path("."), the working directory: never a tokenizer to guess.
        model_dir = Path(name) if name else None
    if tokenizer is None:
        if model_dir is None or not model_dir.is_dir():
            raise ValueError("the model was not loaded from a local directory: pass tokenizer=")
        tokenizer = load_tokenizer(model_dir)
    return model, tokenizer


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_WINDOW",
    "PerplexityResult",
    "perplexity",
    "perplexity_of_text",
    "window_losses",
]
