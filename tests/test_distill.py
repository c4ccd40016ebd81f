"""Distillation in recovery (``recover --teacher``): a student equal to its teacher has nothing to
learn, distilling recovers more than the LM loss, cached top-k logits give the live teacher's loss
and are reused or refused as they should be, two processes distil like one, and bad options are
refused before anything is trained."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from structprune import apply_plan
from structprune.recover.distill import LiveTeacher, distillation_loss
from structprune.errors import RecoveryError, SettingError
from structprune.evaluate.perplexity import perplexity_of_text
from structprune.prune import PruneOptions, make_plan
from structprune.recover.training import IGNORE_INDEX, RecoverOptions, load_training_data, recover
from test_recover import DEMO_CALIB, DEMO_HELDOUT, DEMO_MODEL, _assert_same_training, _run_two_processes, recover_interrupted_at

VOCABULARY = 4096  # the demo model's


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The demo model pruned by 30% of its parameters with l2 importance, and small texts."""
    root = tmp_path_factory.mktemp("distill")
    # Plain l2 selection (no reconstruction): the setting the figures in docs/architecture.md were measured on.
    plan = make_plan(DEMO_MODEL, PruneOptions(ratio=0.3, importance="l2", reconstruct=False)).plan
    apply_plan(DEMO_MODEL, plan, root / "pruned")
    # Short prefixes keep a full-vocabulary cache small (examples × 31 positions × 4096 × 8 bytes).
    (root / "train.txt").write_text(DEMO_CALIB.read_text()[:4_000])
    (root / "other.txt").write_text(DEMO_CALIB.read_text()[4_000:8_000])
    return {"root": root, "pruned": root / "pruned", "train": root / "train.txt", "other": root / "other.txt"}


def distill_options(workspace: Dict[str, Path], **changes: object) -> RecoverOptions:
    base = RecoverOptions(data=workspace["train"], seq_len=32, batch_size=4, max_steps=3, lr=3e-3, teacher=DEMO_MODEL)
    return replace(base, **changes)


# ----------------------------------------------------------------------------- (1) student = teacher


def test_a_student_equal_to_its_teacher_has_zero_loss_and_zero_adapter_gradient(workspace: Dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from structprune.models.loading import load_model

    pruned = workspace["pruned"]
    data = load_training_data(workspace["train"], AutoTokenizer.from_pretrained(pruned), seq_len=32)
    rows = torch.arange(4)
    input_ids, mask = data.input_ids[rows], data.attention_mask[rows]
    targets = data.labels[rows, 1:] != IGNORE_INDEX
    student = get_peft_model(load_model(pruned, dtype="float32", device="cpu"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    student.train()
    teacher = LiveTeacher(pruned, "float32", torch.device("cpu"))
    logits = student(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    # A LoRA adapter starts at zero, so the student computes exactly what the teacher does.
    for temperature in (1.0, 2.0):
        loss = distillation_loss(logits, teacher.targets(rows, input_ids, mask), targets, temperature)
        assert abs(float(loss)) < 1e-6 * int(targets.sum()), temperature
    loss.backward()
    adapter = {name: p.grad for name, p in student.named_parameters() if p.requires_grad}
    assert adapter and all(g is not None for g in adapter.values())
    largest = max(float(g.abs().max()) for g in adapter.values())
    # For scale: the LM loss of the same batch gives gradients of order 1e-1 here.
    assert largest < 1e-6, f"largest adapter gradient {largest:.2e}"
    assert all(p.grad is None for p in teacher.model.parameters()), "the teacher takes no gradient"


def test_recovering_from_itself_starts_at_zero_loss(workspace: Dict[str, Path], tmp_path: Path) -> None:
    result = recover(workspace["pruned"], tmp_path / "out", distill_options(workspace, teacher=workspace["pruned"], max_steps=1))
    assert abs(result.losses[0]) < 1e-6


# ----------------------------------------------------------------------------- (2) distillation wins


def test_distillation_lowers_heldout_perplexity_more_than_the_lm_loss(workspace: Dict[str, Path], tmp_path: Path) -> None:
    # A few epochs of a little data, the regime where the teacher's soft targets help most on this
    # model (docs/architecture.md): 34 examples of 64 tokens, 24 steps of 8 (122 -> 106 measured).
    train, heldout = tmp_path / "train.txt", tmp_path / "heldout.txt"
    train.write_text(DEMO_CALIB.read_text()[:8_000])
    heldout.write_text(DEMO_HELDOUT.read_text()[:20_000])
    options = RecoverOptions(data=train, seq_len=64, batch_size=8, max_steps=24, lr=3e-3, seed=0)
    perplexities = {}
    for name, objective in {"lm": options, "kd": replace(options, teacher=DEMO_MODEL)}.items():
        recover(workspace["pruned"], tmp_path / name, objective)
        perplexities[name] = perplexity_of_text(tmp_path / name, heldout, window=128).perplexity
    pruned = perplexity_of_text(workspace["pruned"], heldout, window=128).perplexity
    assert perplexities["lm"] < pruned
    assert perplexities["kd"] < 0.95 * perplexities["lm"], f"pruned {pruned:.1f}, {perplexities}"


# ----------------------------------------------------------------------------- (3) cached top-k logits


def _chunk_stamps(directory: Path) -> List[int]:
    return [path.stat().st_mtime_ns for path in sorted(directory.glob("chunk-*.safetensors"))]


def test_full_vocabulary_cache_gives_the_live_loss_is_reused_and_refused_for_other_data(workspace: Dict[str, Path], tmp_path: Path) -> None:
    pruned, cache = workspace["pruned"], tmp_path / "logits"
    live = recover(pruned, tmp_path / "live", distill_options(workspace, temperature=2.0))
    cached_options = distill_options(workspace, temperature=2.0, teacher_logits=cache, teacher_topk=VOCABULARY)
    cached = recover(pruned, tmp_path / "cached", cached_options)
    np.testing.assert_allclose(cached.losses, live.losses, rtol=1e-5, atol=1e-6)
    manifest = json.loads((cache / "teacher-logits.json").read_text())
    assert manifest["topk"] == VOCABULARY and manifest["examples"] == cached.examples
    stamps = _chunk_stamps(cache)
    assert stamps
    again = recover(pruned, tmp_path / "again", cached_options)
    assert again.losses == cached.losses and _chunk_stamps(cache) == stamps, "the cache is reused, not rewritten"
    with pytest.raises(RecoveryError, match=r"logits: these teacher logits were made for other data \(") as caught:
        recover(pruned, tmp_path / "other", replace(cached_options, data=workspace["other"]))
    assert str(cache) in str(caught.value) and not (tmp_path / "other").exists()
    with pytest.raises(RecoveryError, match="made for another k"):
        recover(pruned, tmp_path / "other", replace(cached_options, teacher_topk=8))
    report = json.loads((tmp_path / "cached" / "recovery.json").read_text())["distillation"]
    assert report["teacher"] == str(DEMO_MODEL) and report["topk"] == VOCABULARY and report["temperature"] == 2.0
    assert report["logits_dir"] == str(cache) and report["weight"] == 1.0 and report["teacher_dtype"] == "float32"


def test_top_k_cache_trains_and_an_interrupted_cache_is_completed(workspace: Dict[str, Path], tmp_path: Path) -> None:
    pruned, cache = workspace["pruned"], tmp_path / "logits"
    options = distill_options(workspace, teacher_logits=cache, teacher_topk=16, distill_weight=0.5)
    first = recover(pruned, tmp_path / "first", options)
    assert all(np.isfinite(first.losses))
    chunk = load_file(str(cache / "chunk-000000.safetensors"))
    assert chunk["values"].dtype == torch.float32 and chunk["indices"].dtype == torch.int32
    assert chunk["values"].shape == (first.examples, 31, 16)
    assert bool((chunk["values"][..., :-1] >= chunk["values"][..., 1:]).all()), "top-k values in falling order"
    # As if killed after its chunks were renamed into place but before the manifest was written.
    (cache / "teacher-logits.json").unlink()
    second = recover(pruned, tmp_path / "second", options)
    assert second.losses == first.losses


def test_processes_fill_a_cache_by_turns_as_one_process_does(workspace: Dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from structprune.recover.distill import CacheKey, TeacherLogitsCache, teacher_sha256

    data = load_training_data(workspace["train"], AutoTokenizer.from_pretrained(workspace["pruned"]), seq_len=32)
    key = CacheKey(teacher_sha256(DEMO_MODEL), "float32", data.sha256(), 32, 8)
    # 31 positions × 8 logits × 8 bytes a row: chunks of 5 examples.
    caches = {name: TeacherLogitsCache(tmp_path / name, key, len(data), chunk_bytes=5 * 31 * 8 * 8) for name in ("one", "two")}
    assert caches["one"].chunks == -(-len(data) // 5) >= 3
    fill = dict(device=torch.device("cpu"), batch_size=4, wait=lambda: None, progress=False)
    caches["one"].fill(DEMO_MODEL, data.input_ids, data.attention_mask, process=0, processes=1, **fill)
    # The second process first: the first writes the manifest once every chunk is there.
    for process in (1, 0):
        caches["two"].fill(DEMO_MODEL, data.input_ids, data.attention_mask, process=process, processes=2, **fill)
    assert caches["two"].complete()
    for chunk in range(caches["one"].chunks):
        name = f"chunk-{chunk:06d}.safetensors"
        assert load_file(str(tmp_path / "one" / name)).keys() == load_file(str(tmp_path / "two" / name)).keys()
        for tensor, value in load_file(str(tmp_path / "one" / name)).items():
            assert torch.equal(load_file(str(tmp_path / "two" / name))[tensor], value), (name, tensor)
    (tmp_path / "one" / "chunk-000001.safetensors").unlink()
    with pytest.raises(RecoveryError, match="1 of .* chunk files are missing or damaged"):
        caches["one"].complete()


# ----------------------------------------------------------------------------- resume and processes


def test_resume_with_distillation_matches_an_uninterrupted_run_and_refuses_other_options(workspace: Dict[str, Path], tmp_path: Path) -> None:
    options = distill_options(workspace, max_steps=4, save_every=2, distill_weight=0.7)
    recover(workspace["pruned"], tmp_path / "straight", options)

    recover_interrupted_at(workspace["pruned"], tmp_path / "resumed", options, step=3)
    for other in (replace(options, temperature=2.0), replace(options, distill_weight=1.0), replace(options, teacher=workspace["pruned"])):
        with pytest.raises(RecoveryError, match="belongs to a run with other options"):
            recover(workspace["pruned"], tmp_path / "resumed", other, resume=True)
    result = recover(workspace["pruned"], tmp_path / "resumed", options, resume=True)
    assert result.resumed_from == 2
    for name in ("model.safetensors", "recovery.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_two_processes_distil_like_one_from_a_cache_they_compute_together(workspace: Dict[str, Path], tmp_path: Path) -> None:
    distilling = ["--teacher", str(DEMO_MODEL), "--teacher-topk", "32", "--distill-weight", "0.5", "--temperature", "2"]
    one_options = RecoverOptions(
        data=workspace["train"], seq_len=32, batch_size=4, max_steps=3, dropout=0.0, teacher=DEMO_MODEL,
        teacher_logits=tmp_path / "one-logits", teacher_topk=32, distill_weight=0.5, temperature=2.0,
    )
    recover(workspace["pruned"], tmp_path / "one", one_options)
    done = _run_two_processes(workspace, tmp_path / "two", ["-m", "structprune"], *distilling, "--teacher-logits", str(tmp_path / "two-logits"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "recovery.json").read_text())
    assert report["parallelism"] == "ddp" and report["distillation"]["topk"] == 32
    _assert_same_training(tmp_path / "one", tmp_path / "two", report)
    one_chunks, two_chunks = sorted((tmp_path / "one-logits").glob("chunk-*")), sorted((tmp_path / "two-logits").glob("chunk-*"))
    assert [p.name for p in one_chunks] == [p.name for p in two_chunks]
    for one, two in zip(one_chunks, two_chunks):
        one_tensors, two_tensors = load_file(str(one)), load_file(str(two))
        torch.testing.assert_close(two_tensors["values"], one_tensors["values"], atol=1e-5, rtol=1e-5)
        assert torch.equal(two_tensors["indices"], one_tensors["indices"])


# ----------------------------------------------------------------------------- (4) refusals


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"distill_weight": 1.5}, r"distill_weight must be in \[0, 1\]"),
        ({"distill_weight": -0.1}, r"distill_weight must be in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be a positive number"),
        ({"temperature": float("inf")}, "temperature must be a positive number"),
        ({"teacher_topk": 0}, "teacher_topk must be a positive integer"),
        ({"teacher_dtype": "float64"}, "teacher_dtype must be one of float32, bfloat16, float16"),
        ({"dtype": "bfloat16", "teacher_dtype": "float32"}, "teacher dtype float32 is more precise than the student's compute dtype bfloat16"),
        ({"teacher": None, "temperature": 2.0}, r"--temperature only apply to distillation: pass --teacher"),
        ({"teacher": None, "teacher_logits": Path("x"), "distill_weight": 0.5}, r"--teacher-logits, --distill-weight only apply to distillation"),
    ],
)
def test_bad_distillation_options_are_refused_before_training(workspace: Dict[str, Path], tmp_path: Path, changes: Dict[str, object], message: str) -> None:
    with pytest.raises(SettingError, match=message):
        recover(workspace["pruned"], tmp_path / "out", distill_options(workspace, **changes))
    assert not (tmp_path / "out").exists()


def test_a_teacher_with_another_vocabulary_is_refused_naming_both(workspace: Dict[str, Path], tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "teacher")
    with pytest.raises(RecoveryError, match="vocabulary of 1000 tokens but the student .* has 4096") as caught:
        recover(workspace["pruned"], tmp_path / "out", distill_options(workspace, teacher=tmp_path / "teacher"))
    assert str(tmp_path / "teacher") in str(caught.value) and str(workspace["pruned"]) in str(caught.value)
    with pytest.raises(RecoveryError, match="not a model directory"):
        recover(workspace["pruned"], tmp_path / "out", distill_options(workspace, teacher=tmp_path))
    with pytest.raises(RecoveryError, match="teacher_topk 5000 exceeds the vocabulary of teacher .* \\(4096 tokens\\)"):
        recover(workspace["pruned"], tmp_path / "out", distill_options(workspace, teacher_logits=tmp_path / "logits", teacher_topk=5000))
    assert not (tmp_path / "logits").exists()
