"""Quality of a pruned sentence-embedding model: how close its embeddings stay to the dense
model's, and whether they still retrieve.

Protocol (:func:`sentence_pairs`): the held-out documents are cut into paragraphs (blank-line
separated); a paragraph of prose (it starts with a letter or a quote, so reStructuredText
directives, tables and code are left out) of at least ``MIN_WORDS`` words gives one pair, its
first half of words and its second half. Both halves of every pair are embedded, pooled as the
model is deployed (``structprune.models.sentence``), and

- mean cosine: the mean over all halves of the cosine between the pruned and the dense embedding;
- retrieval top-1: the fraction of first halves whose most cosine-similar second half, among all
  pairs' second halves, is their own. Pairs are taken from the documents in turn, so the
  distractors include paragraphs of the same document (a hard set: both halves of a paragraph
  share its topic, and so do its neighbours).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from structprune.errors import EvaluationError
from structprune.models.sentence import Pooling, pool

if TYPE_CHECKING:  # transformers is imported by the callers that load models
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MIN_WORDS = 16
"""Words a paragraph needs to make a pair (two halves of at least 8 words)."""
DEFAULT_PAIRS = 256
DEFAULT_MAX_LENGTH = 128
"""Tokens an embedded text is truncated to (all-MiniLM-L6-v2 was trained on 128)."""
DEFAULT_BATCH_SIZE = 32

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class EmbeddingQuality:
    mean_cosine: float
    """Mean cosine to the dense model's embeddings (1.0 for the dense model itself)."""
    retrieval_top1: float
    pairs: int


def sentence_pairs(texts: Sequence[str], *, limit: int = DEFAULT_PAIRS) -> List[Tuple[str, str]]:
    """``limit`` (first half, second half) pairs of the documents' prose paragraphs (see the module
    docstring), taken from the documents in turn (the first paragraph of each, then the second…),
    so that every document contributes."""
    per_document = [_halves(text) for text in texts]
    pairs = [pair for row in itertools.zip_longest(*per_document) for pair in row if pair is not None][:limit]
    if len(pairs) < 2:
        raise EvaluationError(f"the held-out text has {len(pairs)} prose paragraph(s) of {MIN_WORDS}+ words; retrieval needs at least 2")
    return pairs


def _halves(text: str) -> List[Tuple[str, str]]:
    """The (first half, second half) of each prose paragraph of one document."""
    halves = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        words = paragraph.split()
        if len(words) >= MIN_WORDS and (words[0][0].isalpha() or words[0][0] in "\"'"):
            middle = len(words) // 2
            halves.append((" ".join(words[:middle]), " ".join(words[middle:])))
    return halves


def encode(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: Sequence[str],
    pooling: Pooling,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: Optional[str] = None,
) -> torch.Tensor:
    """``[len(texts), width]`` float32 embeddings on the CPU, texts truncated to ``max_length`` tokens."""
    device = next(model.parameters()).device
    chunks = []
    starts = range(0, len(texts), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
            batch = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            chunks.append(pool(hidden.float(), mask, pooling).cpu())
    return torch.cat(chunks)


def pair_embeddings(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    pairs: Sequence[Tuple[str, str]],
    pooling: Pooling,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The embeddings of the pairs' first halves and of their second halves."""
    firsts = encode(model, tokenizer, [first for first, _ in pairs], pooling, batch_size=batch_size, max_length=max_length)
    seconds = encode(model, tokenizer, [second for _, second in pairs], pooling, batch_size=batch_size, max_length=max_length)
    return firsts, seconds


def retrieval_top1(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """The fraction of queries whose most cosine-similar key has their own index."""
    similarity = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    return float((similarity.argmax(dim=1) == torch.arange(len(queries))).float().mean())


def embedding_quality(pruned: Tuple[torch.Tensor, torch.Tensor], dense: Tuple[torch.Tensor, torch.Tensor]) -> EmbeddingQuality:
    """The quality of ``pruned``'s pair embeddings against ``dense``'s (both from :func:`pair_embeddings`)."""
    cosine = torch.nn.functional.cosine_similarity(torch.cat(pruned), torch.cat(dense), dim=-1)
    return EmbeddingQuality(mean_cosine=float(cosine.mean()), retrieval_top1=retrieval_top1(*pruned), pairs=len(pruned[0]))


__all__ = [
    "DEFAULT_PAIRS",
    "EmbeddingQuality",
    "embedding_quality",
    "encode",
    "pair_embeddings",
    "retrieval_top1",
    "sentence_pairs",
]
