#!/usr/bin/env python3
"""Quality of structprune's pruning: held-out perplexity after removing 20% / 50% of the
parameters of the team's trained tiny Llama, for every importance estimator, next to
Torch-Pruning's Taylor pipeline (LLM-Pruner's method) on the same model, data and ratio.

In one run it:

1. reads the fixture ``../shared/fixtures/tiny-llama`` (8 layers, hidden 256, 8 heads / 2 KV heads,
   MLP 704, vocab 4096, untied; ``../shared/fixtures/README.md``), its calibration text
   ``text/calib.txt`` and held-out text ``text/heldout.txt`` (skips with a message when ``../shared``
   is absent), and measures the dense held-out perplexity (window 128; reference 40.26);
2. for every estimator in ``structprune.score.importance.ESTIMATORS``, and ``flap+bias`` (FLAP with bias
   compensation, ``PruneOptions(bias_compensation=True)``), and every ratio, with structures
   ("heads", "mlp") and both GQA modes ("query-heads", the default, and "kv-groups"):
   ``structprune.prune.make_plan`` (PruneOptions(ratio, importance, structures, gqa, calib, samples
   32, seq_len 128, seed 0)), ``structprune.apply_plan`` into a temporary directory, then
   ``AutoModelForCausalLM.from_pretrained`` of the result and its held-out perplexity
   (``structprune.evaluate.perplexity.perplexity``, the protocol of ``perplexity_of_text``);
3. for the best estimator (lowest mean log-perplexity over the ratios), also structures
   ("heads", "mlp", "hidden") in both GQA modes and ("mlp",) alone;
4. Torch-Pruning (1.6.x): the dense model in memory (eager attention), gradients of the
   calibration loss over the same 32x128 windows (``loss.backward`` per micro-batch of 4, scaled to
   the mean over windows), ``tp.pruner.MetaPruner`` with ``tp.importance.GroupTaylorImportance()``,
   ``num_heads`` for q/k/v of every layer (8/2/2), ``prune_num_heads=True``,
   ``prune_head_dims=False``, ``head_pruning_ratio = pruning_ratio = r`` (one ratio for heads and MLP
   channels, as Torch-Pruning's LLM example), local (per-layer) ranking, lm_head and embeddings
   ignored (so the hidden size is kept, as structprune's ("heads", "mlp")); ``r`` is searched (a
   0.05 grid, then bisection inside each grid interval that crosses the target: the removed
   fraction is not monotone in r) so that the removed fraction of all parameters comes closest to
   the target. The
   pruned model's config (num_attention_heads, num_key_value_heads, intermediate_size) and each
   attention module's ``num_key_value_groups`` are updated as LLM-Pruner / Torch-Pruning's example
   do; the model is checked to compute exactly what the dense model computes with the removed
   query heads and MLP channels masked (a wrong GQA mapping would show), then evaluated with the
   same protocol;
5. cuts structprune's scores (best estimator and taylor) to exactly Torch-Pruning's widths (same
   query heads per KV group and MLP width), through the library below make_plan, to separate the
   estimator from the planner;
6. prints one table and whether "structprune's best estimator <= Torch-Pruning's perplexity at
   both ratios" holds; ``--json OUT`` saves everything.

See benches/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
DENSE_REFERENCE = 40.26  # ../shared/fixtures/README.md, window 128
BIAS_SUFFIX = "+bias"  # an estimator name with this suffix prunes with bias compensation


@dataclass
class Row:
    method: str  # "structprune" | "torch-pruning" | "dense"
    estimator: str
    structures: str
    gqa: str
    target: float
    status: str = "ok"  # ok | error
    error: str = ""
    removed_all: Optional[float] = None
    removed_blocks: Optional[float] = None
    params_after: Optional[int] = None
    heads: str = ""
    mlp: Optional[int] = None
    hidden: Optional[int] = None
    perplexity: Optional[float] = None
    mean_loss: Optional[float] = None
    plan_s: Optional[float] = None  # scoring + planning (structprune) / gradients + one prune (TP)
    apply_s: Optional[float] = None  # writing the checkpoint (structprune) / the ratio search (TP)
    eval_s: Optional[float] = None
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import transformers
        from transformers import AutoTokenizer

        from structprune.score.calibration import calibration_batch, load_texts, token_stream

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, one per model load

        self.args = args
        self.model_dir = Path(args.model)
        self.calib = Path(args.calib)
        self.heldout = Path(args.heldout)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.stream = token_stream(load_texts(self.heldout), self.tokenizer)
        # The batch make_plan draws (structprune.prune._calibration): same texts, sizes and seed.
        self.batch = calibration_batch(load_texts(self.calib), self.tokenizer, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
        self.torch = torch
        dense = self.load(self.model_dir)
        self.total_params = sum(p.numel() for p in dense.parameters())
        self.block_params = sum(p.numel() for n, p in dense.named_parameters() if is_block(n))
        self.config = dense.config

    def load(self, path: Path, attn: str = "sdpa") -> Any:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
        model.eval()
        return model

    def perplexity(self, model: Any) -> Tuple[Any, float]:
        from structprune.evaluate.perplexity import perplexity

        started = time.perf_counter()
        result = perplexity(model, self.stream, window=self.args.window, batch_size=self.args.eval_batch)
        return result, time.perf_counter() - started

    def fractions(self, named_shapes: Sequence[Tuple[str, Sequence[int]]]) -> Tuple[int, float, float]:
        after = sum(math.prod(s) for _, s in named_shapes)
        after_blocks = sum(math.prod(s) for n, s in named_shapes if is_block(n))
        return after, 1 - after / self.total_params, 1 - after_blocks / self.block_params


def is_block(name: str) -> bool:
    return ".layers." in name


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


# --------------------------------------------------------------------------------------------
# structprune
# --------------------------------------------------------------------------------------------


def run_structprune(ctx: Context, estimator: str, ratio: float, structures: Tuple[str, ...], gqa: str, work: Path,
                    tracebacks: Dict[str, str]) -> Row:
    import structprune
    from structprune.apply import plan_output
    from structprune.prune import PruneOptions, make_plan

    row = Row("structprune", estimator, "+".join(structures), gqa, ratio)
    importance, compensate = split_estimator(estimator)
    options = PruneOptions(ratio=ratio, importance=importance, structures=structures, gqa=gqa, calib=ctx.calib,
                           samples=ctx.args.samples, seq_len=ctx.args.seq_len, seed=ctx.args.seed, bias_compensation=compensate)
    out = work / f"{estimator}-{ratio}-{row.structures}-{gqa}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = make_plan(ctx.model_dir, options)
        row.plan_s = result.seconds
        shapes = [(t.name, t.shape) for t in plan_output(ctx.model_dir, result.plan).tensors]
        row.params_after, row.removed_all, row.removed_blocks = ctx.fractions(shapes)
        if result.params_after != row.params_after:
            row.note = f"make_plan counted {result.params_after} params after, the plan writes {row.params_after}"
        patch = result.plan.config or {}
        heads = patch.get("num_attention_heads", ctx.config.num_attention_heads)
        kv = patch.get("num_key_value_heads", ctx.config.num_key_value_heads)
        row.heads = f"{heads}/{kv}"
        row.mlp = patch.get("intermediate_size", ctx.config.intermediate_size)
        row.hidden = patch.get("hidden_size", ctx.config.hidden_size)
        row.extra["calibration_loss"] = result.plan.metadata.get("scores", {}).get("calibration_loss")
        started = time.perf_counter()
        structprune.apply_plan(ctx.model_dir, result.plan, out, overwrite=True)
        row.apply_s = time.perf_counter() - started
        model = ctx.load(out)
        loaded = sum(p.numel() for p in model.parameters())
        if loaded != row.params_after:
            row.note = (row.note + "; " if row.note else "") + f"loaded model has {loaded} params, plan {row.params_after}"
        ppl, row.eval_s = ctx.perplexity(model)
        row.perplexity, row.mean_loss = ppl.perplexity, ppl.mean_loss
        if not math.isfinite(ppl.perplexity):
            row.note = (row.note + "; " if row.note else "") + "non-finite perplexity"
    except Exception as err:  # noqa: BLE001 - every failure is reported in the table
        row.status = "error"
        row.error = short_error(err)
        tracebacks.setdefault(row.error, traceback.format_exc())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row


# --------------------------------------------------------------------------------------------
# Torch-Pruning (LLM-Pruner's Taylor pipeline)
# --------------------------------------------------------------------------------------------


class TorchPruning:
    def __init__(self, ctx: Context) -> None:
        import torch
        import torch_pruning as tp

        self.ctx = ctx
        self.tp = tp
        self.torch = torch
        started = time.perf_counter()
        self.dense = ctx.load(ctx.model_dir, attn="eager")
        self.dense.config.use_cache = False
        n = ctx.batch.shape[0]
        for mb in ctx.batch.split(ctx.args.micro_batch):
            loss = self.dense(input_ids=mb, labels=mb, use_cache=False).loss * (mb.shape[0] / n)
            loss.backward()
        self.grads = {name: p.grad.detach().clone() for name, p in self.dense.named_parameters() if p.grad is not None}
        self.dense.zero_grad(set_to_none=True)
        self.grad_s = time.perf_counter() - started

    def prune(self, r: float) -> Tuple[Any, float, float]:
        """A pruned copy of the dense model at per-layer ratio ``r``; its removed fraction; seconds."""
        torch, tp = self.torch, self.tp
        started = time.perf_counter()
        model = copy.deepcopy(self.dense)
        for name, p in model.named_parameters():
            p.grad = self.grads[name].clone() if name in self.grads else None
        cfg = model.config
        num_heads = {}
        for name, module in model.named_modules():
            if name.endswith("self_attn"):
                num_heads[module.q_proj] = cfg.num_attention_heads
                num_heads[module.k_proj] = cfg.num_key_value_heads
                num_heads[module.v_proj] = cfg.num_key_value_heads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unwrapped parameters detected" (RMSNorm weights)
            pruner = tp.pruner.MetaPruner(
                model,
                example_inputs={"input_ids": self.ctx.batch[:1, :16]},
                importance=tp.importance.GroupTaylorImportance(),
                global_pruning=False,
                pruning_ratio=r,
                ignored_layers=[model.lm_head, model.model.embed_tokens],
                num_heads=num_heads,
                prune_num_heads=True,
                prune_head_dims=False,
                head_pruning_ratio=r,
            )
            pruner.step()
        model.zero_grad(set_to_none=True)
        after = sum(p.numel() for p in model.parameters())
        return model, 1 - after / self.ctx.total_params, time.perf_counter() - started

    def search(self, target: float, iterations: int) -> Tuple[float, List[Tuple[float, float]]]:
        """The r whose removed fraction comes closest to ``target``. The fraction is a step function
        of r and not monotone (past r = 0.75 Torch-Pruning would remove every query head of a KV
        group, refuses, and keeps all heads), so: a grid of r every 0.05, then bisection inside
        every grid interval that crosses the target."""
        tried: List[Tuple[float, float]] = []
        for i in range(20):
            r = round(0.05 * i, 2)
            tried.append((r, self.prune(r)[1]))
        grid = list(tried)
        for (r0, f0), (r1, f1) in zip(grid, grid[1:]):
            if not f0 < target <= f1:
                continue
            lo, hi = r0, r1
            for _ in range(iterations):
                mid = (lo + hi) / 2
                fraction = self.prune(mid)[1]
                tried.append((mid, fraction))
                if fraction < target:
                    lo = mid
                else:
                    hi = mid
        # The smallest r within half a point of the target (what a user raising r from 0 finds);
        # else the closest. Past r = 0.75 a run keeps every head and prunes only MLP channels.
        near = [t for t in tried if abs(t[1] - target) <= 0.005]
        best = min(near, key=lambda t: t[0]) if near else min(tried, key=lambda t: (abs(t[1] - target), t[0]))
        return best[0], tried

    def finish(self, model: Any) -> Dict[str, Any]:
        """Config edits as LLM-Pruner / Torch-Pruning's LLM example make them; returns widths."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layers = model.model.layers
        q = {l.self_attn.q_proj.out_features for l in layers}
        kv = {l.self_attn.k_proj.out_features for l in layers}
        mlp = {l.mlp.gate_proj.out_features for l in layers}
        uniform = len(q) == len(kv) == len(mlp) == 1
        heads, kv_heads = max(q) // head_dim, max(kv) // head_dim
        for layer in layers:
            attn = layer.self_attn
            attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features
        # Direct attribute writes, as LLM-Pruner does (no re-validation of the whole config).
        cfg.num_attention_heads = heads
        cfg.num_key_value_heads = kv_heads
        cfg.intermediate_size = max(mlp)
        try:
            type(cfg).from_dict(cfg.to_dict())
            reloadable = True
            reason = ""
        except Exception as err:  # noqa: BLE001
            reloadable = False
            reason = short_error(err)
        return {"heads": heads, "kv_heads": kv_heads, "mlp": max(mlp), "uniform": uniform, "reloadable": reloadable,
                "reload_error": reason}

    def masked_equivalence(self, pruned: Any) -> Dict[str, Any]:
        """Compares the pruned model with the dense one whose removed query heads (o_proj columns)
        and MLP channels (down_proj columns) are zeroed: equal logits mean every kept query head
        still reads its own KV head, i.e. GQA was kept consistent."""
        torch = self.torch
        masked = copy.deepcopy(self.dense)
        masked.zero_grad(set_to_none=True)
        head_dim = masked.config.head_dim
        info: Dict[str, Any] = {"kv_heads_untouched": True, "heads_per_group": []}
        with torch.no_grad():
            for dl, pl in zip(masked.model.layers, pruned.model.layers):
                kept_q = kept_rows(dl.self_attn.q_proj.weight, pl.self_attn.q_proj.weight)
                kept_heads = sorted({int(i) // head_dim for i in kept_q})
                removed = [h for h in range(dl.self_attn.q_proj.out_features // head_dim) if h not in kept_heads]
                for h in removed:
                    dl.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
                group = dl.self_attn.q_proj.out_features // dl.self_attn.k_proj.out_features  # query heads per KV head
                per_group = [sum(1 for h in kept_heads if h // group == g) for g in range(dl.self_attn.k_proj.out_features // head_dim)]
                info["heads_per_group"].append(per_group)
                if not (torch.equal(dl.self_attn.k_proj.weight, pl.self_attn.k_proj.weight)
                        and torch.equal(dl.self_attn.v_proj.weight, pl.self_attn.v_proj.weight)):
                    info["kv_heads_untouched"] = False
                kept_m = set(int(i) for i in kept_rows(dl.mlp.gate_proj.weight, pl.mlp.gate_proj.weight))
                gone = [i for i in range(dl.mlp.gate_proj.out_features) if i not in kept_m]
                dl.mlp.down_proj.weight[:, gone] = 0
            ids = self.ctx.batch[:4]
            a = masked(input_ids=ids, use_cache=False).logits
            b = pruned(input_ids=ids, use_cache=False).logits
        diff = float((a - b).abs().max())
        info["max_abs_logit_diff"] = diff
        info["consistent"] = diff < 1e-3 and info["kv_heads_untouched"]
        return info


def kept_rows(dense_weight: Any, pruned_weight: Any) -> List[int]:
    """Indices of the dense rows that the pruned weight kept (rows are matched exactly)."""
    index = {bytes(dense_weight[i].detach().numpy().tobytes()): i for i in range(dense_weight.shape[0])}
    return [index[bytes(pruned_weight[j].detach().numpy().tobytes())] for j in range(pruned_weight.shape[0])]


def run_torch_pruning(ctx: Context, tpr: "TorchPruning", target: float, tracebacks: Dict[str, str]) -> Row:
    row = Row("torch-pruning", "GroupTaylor", "heads+mlp", "query-heads", target)
    try:
        started = time.perf_counter()
        r, tried = tpr.search(target, ctx.args.tp_iterations)
        search_s = time.perf_counter() - started
        model, fraction, prune_s = tpr.prune(r)
        widths = tpr.finish(model)
        check = tpr.masked_equivalence(model)
        shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        row.params_after, row.removed_all, row.removed_blocks = ctx.fractions(shapes)
        row.heads = f"{widths['heads']}/{widths['kv_heads']}"
        row.mlp = widths["mlp"]
        row.hidden = model.config.hidden_size
        row.plan_s = tpr.grad_s + prune_s
        row.apply_s = search_s
        ppl, row.eval_s = ctx.perplexity(model)
        row.perplexity, row.mean_loss = ppl.perplexity, ppl.mean_loss
        notes = [f"r={r:.4f}"]
        if not check["consistent"]:
            notes.append(f"GQA NOT consistent (max |dlogit| {check['max_abs_logit_diff']:.2e}, kv untouched {check['kv_heads_untouched']})")
        else:
            notes.append(f"GQA consistent (= masked dense, max |dlogit| {check['max_abs_logit_diff']:.1e})")
        if not widths["uniform"]:
            notes.append("widths differ between layers")
        if not widths["reloadable"]:
            notes.append(f"config not loadable by this transformers ({widths['reload_error']})")
        row.note = "; ".join(notes)
        row.extra = {"r": r, "search": tried, "widths": widths, "gqa_check": check, "grad_s": tpr.grad_s, "prune_s": prune_s}
    except Exception as err:  # noqa: BLE001
        row.status = "error"
        row.error = short_error(err)
        tracebacks.setdefault(row.error, traceback.format_exc())
    return row


def run_matched(ctx: Context, est: str, tp_row: Row, work: Path, tracebacks: Dict[str, str]) -> Row:
    """structprune's scores cut to Torch-Pruning's widths (same query heads per KV group and MLP
    width in every layer): separates the estimator from the planner. Uses the library below
    make_plan: trace, StreamedModel + score on the same calibration batch, a Selection of the
    lowest-scoring units, checkpoint_cut_plan, apply_plan."""
    import structprune
    from structprune.plan.cuts import Selection, checkpoint_cut_plan
    from structprune.score.importance import estimator
    from structprune.score.scorer import score
    from structprune.score.streaming import ActivationStore, StreamedModel

    row = Row("structprune@TP-widths", est, "heads+mlp", "query-heads", tp_row.target)
    out = work / f"matched-{est}-{tp_row.target}"
    try:
        heads, kv = (int(x) for x in tp_row.heads.split("/"))
        cfg = ctx.config
        if kv != cfg.num_key_value_heads or (cfg.num_attention_heads - heads) % kv:
            raise ValueError(f"Torch-Pruning's widths {tp_row.heads} are not the same query heads removed per KV group")
        q_removed = (cfg.num_attention_heads - heads) // kv
        mlp_removed = cfg.intermediate_size - int(tp_row.mlp or 0)
        started = time.perf_counter()
        graph = structprune.trace(ctx.model_dir)
        model = StreamedModel(ctx.model_dir, blocks_prefix=graph.blocks.prefix)
        importance = estimator(est, seed=ctx.args.seed)
        # As make_plan: data only for estimators that use it (score() given data scores only
        # gradient / activation estimators).
        ids = ctx.batch if importance.needs_gradients or importance.needs_activations else None
        scores = score(model, graph, importance, ids, micro_batch=4, store=ActivationStore())
        selection = Selection()
        for s in graph.by_kind("channels"):
            if mlp_removed:
                selection.units[s.id] = lowest(scores.units[s.id], mlp_removed)
        for s in graph.by_kind("query_heads"):
            if q_removed:
                selection.per_group[s.id] = [lowest(g, q_removed) for g in scores.per_group[s.id]]
        plan = checkpoint_cut_plan(ctx.model_dir, graph, selection)
        row.plan_s = time.perf_counter() - started
        structprune.apply_plan(ctx.model_dir, plan, out, overwrite=True)
        from structprune.apply import plan_output

        row.params_after, row.removed_all, row.removed_blocks = ctx.fractions([(t.name, t.shape) for t in plan_output(ctx.model_dir, plan).tensors])
        patch = plan.config or {}
        row.heads = f"{patch.get('num_attention_heads', cfg.num_attention_heads)}/{patch.get('num_key_value_heads', cfg.num_key_value_heads)}"
        row.mlp = patch.get("intermediate_size", cfg.intermediate_size)
        row.hidden = patch.get("hidden_size", cfg.hidden_size)
        pruned = ctx.load(out)
        ppl, row.eval_s = ctx.perplexity(pruned)
        row.perplexity, row.mean_loss = ppl.perplexity, ppl.mean_loss
        row.note = "structprune scores, Torch-Pruning's widths"
    except Exception as err:  # noqa: BLE001
        row.status = "error"
        row.error = short_error(err)
        tracebacks.setdefault(row.error, traceback.format_exc())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row


def lowest(values: Any, count: int) -> List[int]:
    import numpy as np

    order = np.lexsort((np.arange(len(values)), np.asarray(values)))
    return sorted(int(i) for i in order[:count])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def secs(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def render(rows: Sequence[Row], dense_ppl: float) -> str:
    header = ["method", "estimator", "structures", "gqa", "target", "removed all", "removed blocks", "heads q/kv", "mlp", "hidden",
              "ppl", "x dense", "plan s", "apply s", "eval s", "note"]
    lines = [header]
    for r in rows:
        if r.status != "ok":
            lines.append([r.method, r.estimator, r.structures, r.gqa, pct(r.target), "-", "-", "-", "-", "-", "ERROR", "-",
                          secs(r.plan_s), "-", "-", r.error[:150]])
            continue
        lines.append([r.method, r.estimator, r.structures, r.gqa, pct(r.target) if r.target else "-", pct(r.removed_all),
                      pct(r.removed_blocks), r.heads, str(r.mlp), str(r.hidden), f"{r.perplexity:.2f}",
                      f"{r.perplexity / dense_ppl:.2f}", secs(r.plan_s), secs(r.apply_s), secs(r.eval_s), r.note])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def split_estimator(name: str) -> Tuple[str, bool]:
    """``flap+bias`` → (``flap``, with bias compensation)."""
    return (name[: -len(BIAS_SUFFIX)], True) if name.endswith(BIAS_SUFFIX) else (name, False)


def best_estimator(rows: Sequence[Row], ratios: Sequence[float]) -> Optional[str]:
    """Lowest mean log-perplexity over the ratios, each (estimator, ratio) taking its best
    heads+mlp run over the GQA modes; estimators missing a ratio are not eligible, nor compensated
    ones (their hidden variant is refused, and the runs at Torch-Pruning's widths score estimators
    without compensation)."""
    best: Optional[Tuple[float, str]] = None
    for est in sorted({r.estimator for r in rows if not split_estimator(r.estimator)[1]}):
        logs = []
        for ratio in ratios:
            ok = [r.perplexity for r in rows if r.estimator == est and r.target == ratio and r.status == "ok"
                  and r.structures == "heads+mlp" and r.perplexity is not None and math.isfinite(r.perplexity)]
            if not ok:
                break
            logs.append(math.log(min(ok)))
        else:
            score = sum(logs) / len(logs)
            if best is None or score < best[0]:
                best = (score, est)
    return best[1] if best else None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from_root = lambda p: str(FIXTURES / p)  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=from_root("tiny-llama"))
    p.add_argument("--calib", default=from_root("text/calib.txt"))
    p.add_argument("--heldout", default=from_root("text/heldout.txt"))
    p.add_argument("--ratios", default="0.2,0.5", help="fractions of all parameters to remove (default 0.2,0.5)")
    p.add_argument("--estimators", default="", help="comma list; NAME+bias adds bias compensation (default: all of structprune.score.importance.ESTIMATORS and flap+bias)")
    p.add_argument("--gqa-modes", default="query-heads,kv-groups")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=128, help="perplexity window (default 128; dense reference 40.26)")
    p.add_argument("--eval-batch", type=int, default=32, help="windows per forward in evaluation (does not change the figure)")
    p.add_argument("--micro-batch", type=int, default=4, help="Torch-Pruning gradient micro-batch (default 4, as make_plan)")
    p.add_argument("--tp-iterations", type=int, default=8,
                   help="bisection steps inside each crossing grid interval of Torch-Pruning's ratio search (default 8)")
    p.add_argument("--skip-torch-pruning", action="store_true")
    p.add_argument("--skip-variants", action="store_true", help="no hidden / mlp-only runs for the best estimator")
    p.add_argument("--skip-matched", action="store_true",
                   help="no runs of structprune's scores (best estimator and taylor) cut to Torch-Pruning's widths")
    p.add_argument("--work", default="", help="where pruned checkpoints are written (default: a temporary directory)")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = [p for p in (args.model, args.calib, args.heldout) if not Path(p).exists()]
    if missing:
        print(f"SKIPPED: the team fixtures are not here ({', '.join(missing)} missing); they live in ../shared beside the "
              f"repository (see ../shared/fixtures/README.md)")
        return 0
    import torch

    from structprune.score.importance import ESTIMATORS

    ratios = [float(x) for x in args.ratios.split(",") if x]
    estimators = [e for e in (args.estimators.split(",") if args.estimators else [*ESTIMATORS, "flap" + BIAS_SUFFIX]) if e]
    gqa_modes = [g for g in args.gqa_modes.split(",") if g]
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    ctx = Context(args)
    tracebacks: Dict[str, str] = {}
    dense = ctx.load(ctx.model_dir)
    dense_result, dense_s = ctx.perplexity(dense)
    del dense
    print(f"model {ctx.model_dir}: {ctx.total_params:,} params, {ctx.block_params:,} in blocks "
          f"({100 * (1 - ctx.block_params / ctx.total_params):.1f}% embeddings + head + final norm); "
          f"dense held-out perplexity {dense_result.perplexity:.2f} @ window {args.window} ({dense_result.windows} windows; "
          f"reference {DENSE_REFERENCE}) in {dense_s:.1f} s; torch threads {torch.get_num_threads()}", flush=True)
    rows: List[Row] = [Row("dense", "-", "-", "-", 0.0, removed_all=0.0, removed_blocks=0.0, params_after=ctx.total_params,
                           heads=f"{ctx.config.num_attention_heads}/{ctx.config.num_key_value_heads}",
                           mlp=ctx.config.intermediate_size, hidden=ctx.config.hidden_size, perplexity=dense_result.perplexity,
                           mean_loss=dense_result.mean_loss, eval_s=dense_s)]

    work_ctx = tempfile.TemporaryDirectory(prefix="structprune-quality-") if not args.work else None
    work = Path(args.work) if args.work else Path(work_ctx.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        for est in estimators:
            for ratio in ratios:
                for gqa in gqa_modes:
                    row = run_structprune(ctx, est, ratio, ("heads", "mlp"), gqa, work, tracebacks)
                    rows.append(row)
                    print(f"  {est:14s} {ratio:.2f} heads+mlp {gqa:11s} -> "
                          + (f"ppl {row.perplexity:.2f}, removed {pct(row.removed_all)} / blocks {pct(row.removed_blocks)}"
                             if row.status == "ok" else row.error[:160]), flush=True)
        best = best_estimator(rows[1:], ratios)
        if best and not args.skip_variants:
            for structures in (("heads", "mlp", "hidden"), ("mlp",)):
                for gqa in (gqa_modes if "heads" in structures else gqa_modes[:1]):
                    for ratio in ratios:
                        row = run_structprune(ctx, best, ratio, structures, gqa, work, tracebacks)
                        rows.append(row)
                        print(f"  {best:14s} {ratio:.2f} {row.structures} {gqa:11s} -> "
                              + (f"ppl {row.perplexity:.2f}, removed {pct(row.removed_all)} / blocks {pct(row.removed_blocks)}"
                                 if row.status == "ok" else row.error[:160]), flush=True)
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()

    tp_rows: List[Row] = []
    tp_version = None
    if not args.skip_torch_pruning:
        try:
            import torch_pruning

            tp_version = getattr(torch_pruning, "__version__", None)
            tpr = TorchPruning(ctx)
            for ratio in ratios:
                row = run_torch_pruning(ctx, tpr, ratio, tracebacks)
                tp_rows.append(row)
                print(f"  torch-pruning  {ratio:.2f} -> " + (f"ppl {row.perplexity:.2f}, removed {pct(row.removed_all)}; {row.note}"
                                                          if row.status == "ok" else row.error[:160]), flush=True)
        except ImportError:
            print("Torch-Pruning is not installed (pip install 'torch-pruning>=1.6,<1.7'): skipped")
    rows.extend(tp_rows)
    if tp_rows and not args.skip_matched:
        with tempfile.TemporaryDirectory(prefix="structprune-quality-") as tmp:
            for est in dict.fromkeys(e for e in (best, "taylor") if e in estimators):
                for t in tp_rows:
                    if t.status != "ok":
                        continue
                    row = run_matched(ctx, est, t, Path(tmp), tracebacks)
                    rows.append(row)
                    print(f"  {est:14s} {t.target:.2f} at Torch-Pruning's widths {t.heads}, mlp {t.mlp} -> "
                          + (f"ppl {row.perplexity:.2f}, removed {pct(row.removed_all)}" if row.status == "ok" else row.error[:160]),
                          flush=True)

    print()
    print(render(rows, dense_result.perplexity))
    print()
    print("removed all = of all parameters; removed blocks = of the decoder blocks' parameters (what embeddings, head and "
          "final norm keep is excluded); plan s = scoring + planning (structprune; Torch-Pruning: gradients + one prune at the "
          "final r); apply s = writing the checkpoint (structprune; Torch-Pruning: the search for r); eval s = held-out "
          "perplexity.")

    verdict: Dict[str, Any] = {"best_estimator": best, "per_ratio": {}}
    if best:
        print(f"\nbest structprune estimator (heads+mlp, lowest mean log-perplexity over {', '.join(pct(r) for r in ratios)}): {best}")
    holds = bool(best) and bool(tp_rows)
    for ratio in ratios:
        ours = [r for r in rows if r.method == "structprune" and r.estimator == best and r.target == ratio and r.status == "ok"
                and r.structures == "heads+mlp"]
        theirs = [r for r in tp_rows if r.target == ratio and r.status == "ok"]
        if not ours or not theirs:
            holds = False
            verdict["per_ratio"][str(ratio)] = None
            continue
        o = min(ours, key=lambda r: r.perplexity)
        t = theirs[0]
        ok = o.perplexity <= t.perplexity
        holds = holds and ok
        verdict["per_ratio"][str(ratio)] = {"structprune": o.perplexity, "structprune_gqa": o.gqa, "structprune_removed": o.removed_all,
                                            "torch_pruning": t.perplexity, "torch_pruning_removed": t.removed_all, "holds": ok}
        caveat = ""
        if o.removed_all is not None and t.removed_all is not None and o.removed_all + 0.01 < t.removed_all:
            caveat = " (structprune removed less)"
        elif o.removed_all is not None and t.removed_all is not None and t.removed_all + 0.01 < o.removed_all:
            caveat = " (Torch-Pruning removed less)"
        print(f"  target {pct(ratio)}: structprune {best} ({o.gqa}) {o.perplexity:.2f} at {pct(o.removed_all)} removed vs "
              f"Torch-Pruning {t.perplexity:.2f} at {pct(t.removed_all)} removed -> {'<=' if ok else '>'}{caveat}")
    verdict["holds"] = holds
    for ratio in ratios:
        ok_rows = [r for r in rows if r.method == "structprune" and r.target == ratio and r.status == "ok"]
        if ok_rows:
            o = min(ok_rows, key=lambda r: r.perplexity)
            print(f"  best structprune row at target {pct(ratio)} (any structures): {o.estimator} {o.structures} {o.gqa} "
                  f"{o.perplexity:.2f} at {pct(o.removed_all)} removed")
    print(f"\n\"structprune's best estimator <= Torch-Pruning's perplexity at both ratios\": {'HOLDS' if holds else 'DOES NOT HOLD'}")
    notes = []
    if load_start > (os.cpu_count() or 1) * 0.75:
        notes.append(f"the machine was busy at the start (1-min load {load_start:.1f} on {os.cpu_count()} CPUs): times are noisy")
    for n in notes:
        print(f"note: {n}")
    if tracebacks:
        print("\nerrors (first traceback of each):")
        for err, tb in tracebacks.items():
            print(f"--- {err}\n{tb}")
    total_s = time.perf_counter() - started
    print(f"total {total_s:.0f} s")

    if args.json:
        out = {
            "rows": [asdict(r) for r in rows],
            "dense": {"perplexity": dense_result.perplexity, "windows": dense_result.windows, "reference": DENSE_REFERENCE},
            "params": {"total": ctx.total_params, "blocks": ctx.block_params},
            "verdict": verdict,
            "errors": tracebacks,
            "args": vars(args),
            "environment": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                            "torch": torch.__version__, "torch_pruning": tp_version,
                            "transformers": __import__("transformers").__version__, "torch_threads": torch.get_num_threads(),
                            "load1_at_start": load_start},
            "total_s": total_s,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
