"""LoRA recovery: it lowers held-out perplexity, its merged output is a stock checkpoint equal to
base + adapter, two processes train like one, a resumed run ends where an uninterrupted one does,
and bad data and options are refused clearly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from structprune import _core, apply_plan, read_checkpoint
from structprune.errors import CalibrationError, OutputError, OutputExistsError, RecoveryError, SettingError
from structprune.recover.training import IGNORE_INDEX, RecoverOptions, Schedule, StepReport, load_training_data, recover

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "model"
DEMO_PLAN = REPO / "demo" / "example-plan.json"
DEMO_CALIB = REPO / "demo" / "text" / "calib.txt"
DEMO_HELDOUT = REPO / "demo" / "text" / "heldout.txt"
FSDP_ON_CPU = [str(REPO / "tests" / "fsdp_on_cpu.py")]  # torchrun entry: the CLI with accelerate's FSDP2 on CPU processes


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The demo model cut by the example plan, and small training and held-out files."""
    root = tmp_path_factory.mktemp("recover")
    apply_plan(DEMO_MODEL, DEMO_PLAN, root / "pruned")
    # Whole-document prefixes keep the tests fast; training text never comes from the held-out file.
    (root / "train.txt").write_text(DEMO_CALIB.read_text()[:24_000])
    (root / "heldout.txt").write_text(DEMO_HELDOUT.read_text()[:6_000])
    return {"root": root, "pruned": root / "pruned", "train": root / "train.txt", "heldout": root / "heldout.txt"}


def small_options(workspace: Dict[str, Path], **changes: object) -> RecoverOptions:
    base = RecoverOptions(data=workspace["train"], seq_len=32, batch_size=2, max_steps=4, dropout=0.0)
    return replace(base, **changes)


@pytest.fixture(scope="module")
def recovered(workspace: Dict[str, Path]) -> Path:
    output = workspace["root"] / "recovered"
    options = RecoverOptions(data=workspace["train"], eval_data=workspace["heldout"], seq_len=64, batch_size=8, max_steps=6, lr=3e-3)
    result = recover(workspace["pruned"], output, options)
    assert result.steps == 6 and result.main_process
    workspace["evals"] = result.evals  # type: ignore[assignment]
    return output


def test_recovery_lowers_heldout_perplexity(workspace: Dict[str, Path], recovered: Path) -> None:
    evals = workspace["evals"]
    assert [e.step for e in evals] == [0, 6]  # type: ignore[attr-defined]
    before, after = evals[0].perplexity, evals[-1].perplexity  # type: ignore[index]
    assert after < 0.8 * before, f"perplexity {before:.1f} -> {after:.1f}"


def test_output_is_the_input_checkpoint_with_merged_weights(workspace: Dict[str, Path], recovered: Path) -> None:
    source, merged = read_checkpoint(workspace["pruned"]), read_checkpoint(recovered)
    described = lambda c: [(t.name, t.dtype, t.shape) for t in c.tensors.values()]  # noqa: E731
    assert described(merged) == described(source)
    assert "lm_head.weight" not in merged.tensors, "tied LM head stays stored once, as in the input"
    assert (recovered / "config.json").read_bytes() == (workspace["pruned"] / "config.json").read_bytes()
    assert (recovered / "tokenizer.json").is_file()
    assert json.loads((recovered / "adapter" / "adapter_config.json").read_text())["r"] == 16
    report = json.loads((recovered / "recovery.json").read_text())
    assert report["steps"] == 6 and len(report["losses"]) == 6
    before, after = load_file(str(workspace["pruned"] / "model.safetensors")), load_file(str(recovered / "model.safetensors"))
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"]), "LoRA touches linear layers only"
    assert not (workspace["root"] / ".recovered.structprune-recover").exists(), "the work area is removed"


_PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.arange(3, 3 + 48).reshape(2, 24)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[2])
assert "peft" not in sys.modules, "loading the merged checkpoint imported peft"
"""


def test_merged_checkpoint_loads_without_peft_and_equals_base_plus_adapter(workspace: Dict[str, Path], recovered: Path) -> None:
    from peft import PeftModel

    from structprune.models.loading import load_model

    logits_file = workspace["root"] / "plain-logits.pt"
    done = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(recovered), str(logits_file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    base = load_model(workspace["pruned"], dtype="float32", device="cpu")
    with_adapter = PeftModel.from_pretrained(base, str(recovered / "adapter")).eval()
    ids = torch.arange(3, 3 + 48).reshape(2, 24)
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        with with_adapter.disable_adapter():
            unadapted = with_adapter(input_ids=ids).logits
    merged = torch.load(logits_file)
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    assert (merged - unadapted).abs().max() > 1e-2, "the adapter changed the model"


def recover_interrupted_at(pruned: Path, output: Path, options: RecoverOptions, *, step: int) -> None:
    """Runs ``recover`` and stops it with an exception once optimizer step ``step`` is reported."""

    class Interrupted(Exception):
        pass

    def stop(report: StepReport) -> None:
        if report.step == step:
            raise Interrupted

    with pytest.raises(Interrupted):
        recover(pruned, output, options, on_step=stop)


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(workspace: Dict[str, Path]) -> None:
    root = workspace["root"]
    # Dropout on: the resumed run must also restore the random state.
    options = small_options(workspace, save_every=2, dropout=0.1)
    recover(workspace["pruned"], root / "straight", options)

    recover_interrupted_at(workspace["pruned"], root / "resumed", options, step=3)
    assert not (root / "resumed").exists()
    assert sorted(p.name for p in (root / ".resumed.structprune-recover").iterdir()) == ["step-00000002"]
    with pytest.raises(RecoveryError, match="belongs to a run with other options"):
        recover(workspace["pruned"], root / "resumed", replace(options, lr=options.lr / 2), resume=True)
    result = recover(workspace["pruned"], root / "resumed", options, resume=True)
    assert result.resumed_from == 2 and len(result.losses) == 4
    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "recovery.json"):
        assert (root / "resumed" / name).read_bytes() == (root / "straight" / name).read_bytes(), name


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def one_process(workspace: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three steps of global batch 4 in one process: what two processes must reproduce."""
    done = recover(workspace["pruned"], tmp_path_factory.mktemp("one") / "out", small_options(workspace, batch_size=4, max_steps=3))
    assert json.loads((done.output_dir / "recovery.json").read_text())["parallelism"] == "single"
    return done.output_dir


def _run_two_processes(workspace: Dict[str, Path], output: Path, entry: Sequence[str], *options: str) -> "subprocess.CompletedProcess[str]":
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()), *entry,
        "recover", str(workspace["pruned"]), "-o", str(output), "--batch-size", "2",
        "--data", str(workspace["train"]), "--seq-len", "32", "--max-steps", "3", "--dropout", "0", "-q", *options,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def _recover_in_two_processes(workspace: Dict[str, Path], output: Path, entry: Sequence[str]) -> Dict[str, object]:
    done = _run_two_processes(workspace, output, entry)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((output / "recovery.json").read_text())


def _assert_same_training(one: Path, two: Path, two_report: Dict[str, object]) -> None:
    one_report = json.loads((one / "recovery.json").read_text())
    assert (two_report["processes"], two_report["global_batch"]) == (2, one_report["global_batch"]) == (2, 4)
    np.testing.assert_allclose(two_report["losses"], one_report["losses"], rtol=1e-5)
    weights_one, weights_two = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_two_processes_train_like_one_with_the_same_global_batch(workspace: Dict[str, Path], one_process: Path, tmp_path: Path) -> None:
    report = _recover_in_two_processes(workspace, tmp_path / "two", ["-m", "structprune"])
    assert report["parallelism"] == "ddp"
    _assert_same_training(one_process, tmp_path / "two", report)


def test_two_fsdp_processes_shard_the_model_and_train_like_one(workspace: Dict[str, Path], one_process: Path, tmp_path: Path) -> None:
    # accelerate refuses FSDP to CPU processes (it runs DDP instead); the helper lifts that gate
    # so that the sharded path, with the adapter gathered from both processes, runs here.
    report = _recover_in_two_processes(workspace, tmp_path / "two", FSDP_ON_CPU)
    assert report["parallelism"] == "fsdp"
    _assert_same_training(one_process, tmp_path / "two", report)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_refuses_resumable_states_before_training(workspace: Dict[str, Path], tmp_path: Path) -> None:
    done = _run_two_processes(workspace, tmp_path / "out", FSDP_ON_CPU, "--save-every", "1")
    assert done.returncode == 1
    assert "--save-every/--resume are not supported under FSDP" in done.stderr
    assert not (tmp_path / "out").exists()


def test_schedule_splits_global_batches_over_processes_and_epochs() -> None:
    one = Schedule(examples=10, batch_size=4, grad_accum=2, processes=1, seed=3)
    two = Schedule(examples=10, batch_size=2, grad_accum=2, processes=2, seed=3)
    for step in range(4):
        whole = np.concatenate([one.micro_batch(step, m, 0) for m in range(2)])
        split = np.concatenate([two.micro_batch(step, m, p) for m in range(2) for p in range(2)])
        assert sorted(whole) == sorted(split) and len(whole) == 8
    # Steps 0..4 walk through 4 epochs of 10 examples exactly: each epoch is a permutation.
    visited = np.concatenate([one.step_examples(step) for step in range(5)])
    for epoch in range(4):
        assert sorted(visited[epoch * 10 : (epoch + 1) * 10]) == list(range(10))


def test_instruction_records_train_on_the_response_only(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    data_file = tmp_path / "alpaca.jsonl"
    records = [
        {"instruction": "Name a builtin.", "input": "", "output": "len"},
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
    ]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_training_data(data_file, tokenizer, seq_len=96)
    assert data.kind == "instruction" and data.input_ids.shape == (2, 96)
    response = tokenizer("len", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labelled = data.labels[0][data.labels[0] != IGNORE_INDEX].tolist()
    assert labelled == response
    prompt_length = int(data.attention_mask[0].sum()) - len(response)
    decoded_prompt = tokenizer.decode(data.input_ids[0, :prompt_length])
    assert decoded_prompt.endswith("### Instruction:\nName a builtin.\n\n### Response:\n")
    assert "### Input:\n1 and 2" in tokenizer.decode(data.input_ids[1][data.attention_mask[1] == 1])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"instruction": "x"}\n', r"alpaca.jsonl:1: an instruction record needs 'instruction' and 'output' \(missing 'output'"),
        ('{"instruction": "x", "output": "y"}\n{"instruction": 3, "output": "y"}\n', r"alpaca.jsonl:2: field 'instruction' is int"),
        ('{"instruction": "x", "output": "y"}\nnot json\n', r"alpaca.jsonl:2: invalid JSON"),
        ("[1, 2]\n", r"alpaca.jsonl:1: expected a JSON object, got list"),
        ("\n\n", r"alpaca.jsonl: empty"),
    ],
)
def test_bad_data_files_are_refused_with_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    from transformers import AutoTokenizer

    data_file = tmp_path / "alpaca.jsonl"
    data_file.write_text(content)
    with pytest.raises(CalibrationError, match=message) as caught:
        load_training_data(data_file, AutoTokenizer.from_pretrained(DEMO_MODEL), seq_len=64)
    assert caught.value.path == str(data_file)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_trains_an_adapter_merged_into_the_full_precision_base(workspace: Dict[str, Path], tmp_path: Path, bits: str) -> None:
    """QLoRA: the adapter learns against a bitsandbytes-quantized frozen base; the output is the
    unquantized base with that adapter merged (stock dtype, no quantization config)."""
    pytest.importorskip("bitsandbytes", reason="--load-in needs bitsandbytes (in the test extra)")
    from peft import PeftModel

    from structprune.models.loading import load_model

    result = recover(workspace["pruned"], tmp_path / "out", small_options(workspace, load_in=bits, max_steps=3, lr=3e-3))
    assert result.steps == 3 and all(np.isfinite(result.losses))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    report = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert report["options"]["load_in"] == bits
    base = load_model(workspace["pruned"], dtype="float32", device="cpu")
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter")).eval()
    merged = load_model(tmp_path / "out", dtype="float32", device="cpu").eval()
    ids = torch.arange(3, 3 + 48).reshape(2, 24)
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        with with_adapter.disable_adapter():
            unadapted = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - unadapted).abs().max() > 1e-3, "the adapter changed the model"


def test_bad_options_are_refused_before_training(workspace: Dict[str, Path], tmp_path: Path) -> None:
    pruned = workspace["pruned"]
    with pytest.raises(SettingError, match="needs a CUDA device"):
        recover(pruned, tmp_path / "a", small_options(workspace, mixed_precision="fp16"))
    with pytest.raises(SettingError, match="scheduler must be one of"):
        recover(pruned, tmp_path / "a", small_options(workspace, scheduler="exponential"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError):
        recover(pruned, tmp_path / "taken", small_options(workspace))
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(CalibrationError, match="fewer than one 32-token training window"):
        recover(pruned, tmp_path / "a", small_options(workspace, data=short))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt", "taken"]


def test_shard_writer_refuses_wrong_tensor_bytes_and_leaves_nothing(tmp_path: Path) -> None:
    specs = [("a", "F32", [2, 2]), ("b", "BF16", [3])]
    with pytest.raises(OutputError, match=r"tensor 'a' \(F32 \[2, 2\]\) needs 16 bytes, got 3"):
        _core.write_checkpoint(str(tmp_path / "out"), specs, lambda i: b"abc", None, [], None, 1 << 30, False)
    with pytest.raises(TypeError, match="must return bytes"):
        _core.write_checkpoint(str(tmp_path / "out"), specs, lambda i: [0] * 16, None, [], None, 1 << 30, False)
    assert list(tmp_path.iterdir()) == []
    payload = {0: bytes(range(16)), 1: bytes(range(6))}
    report = _core.write_checkpoint(str(tmp_path / "out"), specs, payload.__getitem__, None, [], '{"x": 1}', 1 << 30, False)
    assert report["shards"] == ["model.safetensors"] and report["total_size"] == 22
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert written["a"].flatten().view(torch.uint8).tolist() == list(range(16))
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"x": 1}


def test_recovers_a_non_uniform_checkpoint(tmp_path: Path) -> None:
    """A global plan written as DeciLM: recovery loads it without remote code, and the merged
    output keeps the DeciLM config and model code, so it loads like its input."""
    from structprune.plan.cuts import Selection, checkpoint_cut_plan
    from structprune.tracing.graph import trace
    from structprune.models.loading import load_pruned

    graph = trace(DEMO_MODEL)
    channels = graph.by_kind("channels")
    plan = checkpoint_cut_plan(DEMO_MODEL, graph, Selection(units={channels[1].id: list(range(128))}), layout="decilm")
    apply_plan(DEMO_MODEL, plan, tmp_path / "pruned")
    (tmp_path / "train.txt").write_text(DEMO_CALIB.read_text()[:8_000])
    options = RecoverOptions(data=tmp_path / "train.txt", seq_len=32, batch_size=2, max_steps=2, dropout=0.0)
    recover(tmp_path / "pruned", tmp_path / "recovered", options)
    config = json.loads((tmp_path / "recovered" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and (tmp_path / "recovered" / "modeling_decilm.py").is_file()
    model = load_pruned(tmp_path / "recovered")
    assert model.model.layers[1].mlp.up_proj.out_features == 384
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
