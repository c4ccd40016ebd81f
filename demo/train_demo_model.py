#!/usr/bin/env python3
"""Train structprune's bundled demo model from scratch.

The corpus is the reStructuredText source of the Python 3.11 documentation
as shipped by Debian's ``python3.11-doc`` package, so the model can be rebuilt
on a stock Debian system without downloading any data set or weights.

Outputs, under ``--out`` (default: the folder holding this script):

* ``model/``  a tied-embedding GQA ``LlamaForCausalLM`` plus its byte-level
  BPE tokenizer, saved with ``save_pretrained`` (safetensors, fp32);
* ``text/calib.txt``   training documents for calibration;
* ``text/heldout.txt`` held-out documents for evaluation.

Documents in both text files are separated by lines holding ``<|endoftext|>``;
the model is trained on a stream in exactly that format, so the files can be
tokenised as a whole.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
EOS = "<|endoftext|>"
SEPARATOR = f"\n{EOS}\n"

VOCAB_SIZE = 4096
HIDDEN = 192
LAYERS = 6
HEADS = 6
KV_HEADS = 2
HEAD_DIM = 32
INTERMEDIATE = 512  # ~2.7x hidden, a multiple of 64
SEQ_LEN = 256

BATCH = 8
PEAK_LR = 3e-3
WARMUP_STEPS = 40
MIN_LR_RATIO = 0.1
WEIGHT_DECAY = 0.1
LOG_EVERY = 25

HELDOUT_BUCKETS = 20  # 1 bucket in 20 -> ~5% of files held out
CALIB_DOCS = 40
CALIB_MAX_BYTES = 300_000
HELDOUT_MAX_BYTES = 500_000
EVAL_WINDOWS = (128, 256)


def load_corpus() -> dict[str, str]:
    """Return {relative path: text} for every ``.rst.txt`` file, sorted by path."""
    if not DOC_SOURCES.is_dir():
        sys.exit(
            f"error: {DOC_SOURCES} not found; the corpus comes from Debian's "
            "python3.11-doc package: run `apt-get install python3.11-doc`"
        )
    files = sorted(DOC_SOURCES.rglob("*.rst.txt"))
    # Trailing whitespace would otherwise sit next to the separator line.
    return {
        f.relative_to(DOC_SOURCES).as_posix(): f.read_text(encoding="utf-8").rstrip() for f in files
    }


def path_hash(path: str) -> int:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big")


def split_corpus(corpus: dict[str, str]) -> tuple[list[str], list[str]]:
    """Split by file on a hash of its path, so the split never depends on file order or contents."""
    train = [p for p in corpus if path_hash(p) % HELDOUT_BUCKETS != 0]
    heldout = [p for p in corpus if path_hash(p) % HELDOUT_BUCKETS == 0]
    return train, heldout


def pick_within_budget(docs: list[str], max_bytes: int, max_docs: int | None = None) -> list[str]:
    """Greedily keep documents, in the given order, while the joined text fits in max_bytes."""
    picked: list[str] = []
    size = 0
    for doc in docs:
        extra = len(doc.encode()) + (len(SEPARATOR.encode()) if picked else 0)
        if size + extra > max_bytes:
            continue
        picked.append(doc)
        size += extra
        if max_docs is not None and len(picked) == max_docs:
            break
    return picked


def train_tokenizer(docs: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        # All 256 bytes up front, so no input can ever be out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def build_model(eos_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    return LlamaForCausalLM(config)


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    # Norm gains (the only 1-D tensors) are not decayed: pulling them to 0 just fights the norm.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


def lr_at(step: int, total: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR_RATIO * PEAK_LR."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return PEAK_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, stream: torch.Tensor, steps: int, seed: int) -> None:
    optimizer = make_optimizer(model)
    # A dedicated generator keeps the data order independent of any other use of the global RNG.
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(SEQ_LEN)
    model.train()
    start = time.monotonic()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=gen)
        batch = stream[starts[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            elapsed = time.monotonic() - start
            print(
                f"step {step + 1:5d}/{steps}  loss {loss.item():.4f}  lr {lr_at(step, steps):.2e}  "
                f"{elapsed:7.1f}s ({elapsed / (step + 1):.2f}s/step)",
                flush=True,
            )


@torch.no_grad()
def heldout_perplexity(model: LlamaForCausalLM, ids: torch.Tensor, window: int) -> tuple[float, int]:
    """exp(mean token loss) over non-overlapping windows; returns (perplexity, window count)."""
    model.eval()
    n = len(ids) // window
    total = 0.0
    for chunk in ids[: n * window].view(n, window).split(32):
        # Every window has the same length, so weighting by window count gives the per-token mean.
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    return math.exp(total / n), n


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor) -> float:
    """Add-one-smoothed unigram baseline: what the model has to beat to have learnt anything."""
    counts = Counter(train_ids.tolist())
    total = len(train_ids) + VOCAB_SIZE
    nll = -sum(math.log((counts[t] + 1) / total) for t in eval_ids.tolist()) / len(eval_ids)
    return math.exp(nll)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder (default: demo/)"
    )
    parser.add_argument("--steps", type=int, default=800, help=f"optimizer steps of {BATCH}x{SEQ_LEN} tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    corpus = load_corpus()
    train_paths, heldout_paths = split_corpus(corpus)
    train_docs = [corpus[p] for p in train_paths]
    print(f"corpus: {len(corpus)} files, {len(train_paths)} train / {len(heldout_paths)} held out")

    tok = train_tokenizer(train_docs)
    eos_id = tok.token_to_id(EOS)
    stream = torch.tensor(tok.encode(SEPARATOR.join(train_docs)).ids, dtype=torch.long)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train stream {len(stream)} tokens")

    heldout_docs = pick_within_budget([corpus[p] for p in heldout_paths], HELDOUT_MAX_BYTES)
    heldout_text = SEPARATOR.join(heldout_docs) + "\n"
    # Hash order gives a spread-out sample of the training files rather than one folder's worth.
    calib_order = sorted(train_paths, key=path_hash)
    # Capping each document at twice the average share stops a few big files from eating the budget.
    max_doc_bytes = 2 * CALIB_MAX_BYTES // CALIB_DOCS
    calib_candidates = [corpus[p] for p in calib_order if len(corpus[p].encode()) <= max_doc_bytes]
    calib_docs = pick_within_budget(calib_candidates, CALIB_MAX_BYTES, CALIB_DOCS)
    calib_text = SEPARATOR.join(calib_docs) + "\n"
    heldout_ids = torch.tensor(tok.encode(heldout_text).ids, dtype=torch.long)

    model = build_model(eos_id)
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters")
    start = time.monotonic()
    train(model, stream, args.steps, args.seed)
    print(f"training took {time.monotonic() - start:.0f}s")

    model_dir = args.out / "model"
    text_dir = args.out / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=SEQ_LEN
    ).save_pretrained(model_dir)
    (text_dir / "calib.txt").write_text(calib_text, encoding="utf-8")
    (text_dir / "heldout.txt").write_text(heldout_text, encoding="utf-8")

    baseline = unigram_perplexity(stream, heldout_ids)
    print(f"held-out: {len(heldout_ids)} tokens, unigram baseline perplexity {baseline:.1f}")
    for window in EVAL_WINDOWS:
        ppl, n = heldout_perplexity(model, heldout_ids, window)
        print(f"held-out perplexity @ {window} tokens: {ppl:.2f} ({n} windows)")


if __name__ == "__main__":
    main()
