"""Recovering a pruned encoder (``structprune recover PRUNED --teacher DENSE`` on a BERT-family
model): the pruned model, with its LoRA adapter, learns the dense model's sentence embeddings.

- Data: every document is cut into consecutive passages of ``seq_len`` tokens (special tokens
  included, ``[CLS] … [SEP]``); a document's last, shorter passage is padded. No token is a target.
- Teacher: the dense model embeds every passage once, before training (the pooling of
  ``structprune.models.sentence``, read from the pruned model's folder); then it is freed.
- Loss: the sum over a micro-batch of one minus the cosine between the student's embedding and
  the teacher's (``structprune.models.sentence.distillation_loss``), normalised by the number of
  passages in the global batch.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from structprune.errors import RecoveryError
from structprune.models.loading import load_model
from structprune.models.sentence import Pooling, distillation_loss, pool
from structprune.score.calibration import attention_mask, document_tokens, load_texts, special_frame

if TYPE_CHECKING:  # transformers is imported when a model is loaded
    from transformers import PreTrainedTokenizerBase

TEACHER_BATCH = 32
"""Passages per teacher forward pass."""


def passages(path: Path, tokenizer: "PreTrainedTokenizerBase", *, seq_len: int, text_field: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, ``[N, seq_len]``: the documents of ``path`` cut into
    consecutive passages (see the module docstring)."""
    prefix, suffix = special_frame(tokenizer)
    content = seq_len - len(prefix) - len(suffix)
    if content < 1:
        raise RecoveryError(f"seq_len {seq_len} leaves no room for text between the tokenizer's special tokens")
    rows = []
    for ids in document_tokens(load_texts(path, text_field=text_field), tokenizer):
        for start in range(0, ids.size, content):
            framed = prefix + ids[start : start + content].tolist() + suffix
            rows.append(framed + [tokenizer.pad_token_id] * (seq_len - len(framed)))
    input_ids = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return input_ids, attention_mask(input_ids, tokenizer.pad_token_id)


def teacher_embeddings(teacher: Path, input_ids: torch.Tensor, mask: torch.Tensor, pooling: Pooling, *, dtype: str, device: torch.device, progress: bool) -> torch.Tensor:
    """The dense model's float32 embeddings of every passage, ``[N, width]``, on the CPU."""
    model = load_model(teacher, dtype=dtype, device=device)
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(input_ids), TEACHER_BATCH), desc="teacher embeddings", disable=not progress, leave=False):
            ids, part = input_ids[start : start + TEACHER_BATCH].to(device), mask[start : start + TEACHER_BATCH].to(device)
            hidden = model(input_ids=ids, attention_mask=part).last_hidden_state
            chunks.append(pool(hidden.float(), part, pooling).cpu())
    del model
    gc.collect()
    return torch.cat(chunks)


def summed_embedding_loss(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Σ over the micro-batch of 1 − cos(student embedding, teacher embedding)."""
    hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return distillation_loss(pool(hidden.float(), mask, pooling), targets.to(hidden.device)) * len(input_ids)


__all__ = ["passages", "summed_embedding_loss", "teacher_embeddings"]
