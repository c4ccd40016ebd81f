"""`structprune eval` and `structprune sweep`: perplexity against transformers' own loss, counted
costs against hand computations, JSON and comparison output, the lm-eval and loading errors, and a
small sweep's files."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from arch_configs import CONFIGS
from click.testing import CliRunner, Result

import structprune
from structprune.score.calibration import load_texts
from structprune.cli import main
from structprune.evaluate.costs import TimingProtocol, count_parameters, macs_per_token, measure_throughput, timing_estimate
from structprune.errors import EvaluationError, MissingDependencyError, ModelLoadError, SettingError
from structprune.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "model"
DEMO_HELDOUT = REPO / "demo" / "text" / "heldout.txt"
CONTEXT = 128
# Timing options small enough for a test: the figures are checked for sanity, not speed.
QUICK_TIMING = ["--context", "16", "--batch-sizes", "1,2", "--decode-tokens", "2", "--warmup", "0", "--repeats", "1"]


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two held-out documents (about 1,600 tokens) in the .txt format: cheaper than the file."""
    texts = [load_texts(DEMO_HELDOUT)[i] for i in (0, 3)]
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text("\n<|endoftext|>\n".join(texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def half_mlp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with every other MLP channel removed in every layer (512 → 256)."""
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp"
        tensors[f"{prefix}.gate_proj.weight"] = structprune.TensorCut(keep={0: "mlp"})
        tensors[f"{prefix}.up_proj.weight"] = structprune.TensorCut(keep={0: "mlp"})
        tensors[f"{prefix}.down_proj.weight"] = structprune.TensorCut(keep={1: "mlp"})
    plan = structprune.CutPlan(index_sets={"mlp": list(range(0, 512, 2))}, tensors=tensors, config={"intermediate_size": 256})
    output = tmp_path_factory.mktemp("pruned") / "half-mlp"
    structprune.apply_plan(DEMO_MODEL, plan, output)
    return output


def direct_perplexity(model_dir: Path, text: Path, window: int) -> float:
    """The protocol written out with transformers alone: the file tokenized as one string, cut
    into non-overlapping windows (tail dropped), transformers' ``labels=input_ids`` loss, exp.
    All windows go in one batch: their lengths are equal, so transformers' mean over every
    predicted token is the mean of the per-window means."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text.read_text(encoding="utf-8"))["input_ids"])
    windows = ids[: ids.numel() // window * window].view(-1, window)
    with torch.no_grad():
        return math.exp(model(input_ids=windows, labels=windows).loss.item())


def test_eval_json_perplexity_matches_transformers(heldout: Path) -> None:
    result = invoke("eval", DEMO_MODEL, "--ppl", heldout, "--window", 64, "--window", 100, "--no-timing", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"protocol", "model", "machine_load"}
    measured = report["model"]
    assert [p["window"] for p in measured["perplexity"]] == [64, 100]
    for entry in measured["perplexity"]:
        assert entry["windows"] == entry["tokens"] // entry["window"]
        assert entry["perplexity"] == pytest.approx(direct_perplexity(DEMO_MODEL, heldout, entry["window"]), rel=1e-5)
        assert measured["metrics"][f"perplexity@{entry['window']}"] == entry["perplexity"]
    assert measured["throughput"] == [] and report["protocol"]["timing"] is None


def test_counted_costs_match_the_checkpoint_and_hand_formulas() -> None:
    model = load_model(DEMO_MODEL, dtype="float32", device="cpu")
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}  # the tied head counted once
    assert count_parameters(model) == sum(unique.values()) == structprune.read_checkpoint(DEMO_MODEL).parameters
    # Demo: hidden 192, 6 query heads x 32, 2 KV heads, MLP 512, vocab 4096, 6 layers, tied head.
    per_layer = 192 * 192 + 2 * (192 * 64) + 192 * 192 + 3 * (192 * 512)
    macs = macs_per_token(model, CONTEXT)
    assert macs.linear == 6 * per_layer + 192 * 4096
    assert macs.attention == 6 * 2 * 192 * CONTEXT
    assert macs.total == macs.linear + macs.attention


@pytest.mark.parametrize(
    ("arch", "linear_per_layer", "query_width"),
    [
        # q 4x24=96 rows, k/v 2x24=48, o 96 columns, MLP 80 (gate, up, down).
        pytest.param("llama", 64 * 96 + 2 * 64 * 48 + 96 * 64 + 3 * 64 * 80, 96, id="llama-gqa"),
        # fused qkv (64 + 2x32 rows) and gate_up (2x96 rows), no q_proj: widths from the config.
        pytest.param("phi3", 64 * 128 + 64 * 64 + 64 * 192 + 96 * 64, 64, id="phi3-fused"),
        # Conv1D: c_attn 64x192, c_proj 64x64, c_fc 64x256, mlp c_proj 256x64.
        pytest.param("gpt2", 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64, 64, id="gpt2-conv1d"),
    ],
)
def test_macs_formula_on_tiny_configs(arch: str, linear_per_layer: int, query_width: int) -> None:
    from transformers import AutoModelForCausalLM

    config = CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(config)
    for context in (1, 50):
        macs = macs_per_token(model, context)
        assert macs.linear == 3 * linear_per_layer + 64 * 128  # 3 layers + head (hidden 64, vocab 128)
        assert macs.attention == 3 * 2 * query_width * context


def test_throughput_protocol_on_a_tiny_model() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    model.train()
    protocol = TimingProtocol(context=8, batch_sizes=(1, 3), decode_tokens=2, warmup=1, repeats=2)
    estimates: List[float] = []
    results = measure_throughput(model, protocol, announce=estimates.append)
    assert len(estimates) == 1 and estimates[0] > 0  # said once, before the rest of the runs
    assert timing_estimate(protocol, 2.0) == 2.0 * 3 * (1 + 3)  # 3 runs at each size, batch 3 costing 3x
    assert model.training  # restored
    assert [r.batch for r in results] == [1, 3]
    for r in results:
        assert r.prefill_tokens_per_s == pytest.approx(r.batch * 8 / r.prefill_seconds)
        assert r.decode_tokens_per_s == pytest.approx(r.batch / r.decode_seconds_per_token)
        assert r.peak_memory_bytes is None or r.peak_memory_bytes >= count_parameters(model) * 4
    with pytest.raises(EvaluationError, match="exceeds the model's max_position_embeddings \\(72\\)"):
        measure_throughput(model, TimingProtocol(context=70, decode_tokens=4))
    with pytest.raises(EvaluationError, match="batch sizes must be positive"):
        measure_throughput(model, TimingProtocol(context=8, batch_sizes=(0,)))


def test_eval_compare_prints_ratios(heldout: Path, half_mlp_model: Path) -> None:
    result = invoke("eval", half_mlp_model, "--ppl", heldout, "--compare", DEMO_MODEL, *QUICK_TIMING, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"protocol", "model", "original", "ratios", "machine_load"}
    assert set(report["machine_load"]) == {"before", "after", "cpus", "warning"}
    pruned, original, ratios = report["model"]["metrics"], report["original"]["metrics"], report["ratios"]
    assert original["parameters"] - pruned["parameters"] == 6 * 3 * 192 * 256  # 256 channels x 3 weights x 6 layers
    assert original["macs_per_token"] - pruned["macs_per_token"] == 6 * 3 * 192 * 256
    expected_keys = {"parameters", "weight_bytes", "macs_per_token", "perplexity@128"} | {
        f"{name}@b{batch}"
        for batch in (1, 2)
        for name in ("prefill_tokens_per_s", "prefill_seconds", "decode_tokens_per_s", "decode_seconds_per_token", "peak_memory_bytes")
    }
    assert set(ratios) == expected_keys == set(pruned)
    for name in expected_keys:
        assert ratios[name] == pytest.approx(pruned[name] / original[name])
    assert report["protocol"]["timing"]["batch_sizes"] == [1, 2]
    assert report["model"]["throughput"][1]["context"] == 16
    said = [line for line in result.stderr.splitlines() if line.startswith("timing ") and "about" in line]
    assert [line.split()[1] for line in said] == [f"{half_mlp_model}:", f"{DEMO_MODEL}:"]  # each model, before its runs

    text = invoke("eval", half_mlp_model, "--compare", DEMO_MODEL, "--no-timing")
    assert text.exit_code == 0, text.output
    header, parameters_row = text.stdout.splitlines()[2:4]
    assert header.split() == [str(half_mlp_model), str(DEMO_MODEL), "ratio"]
    assert parameters_row.split() == ["parameters", f"{pruned['parameters']:,}", f"{original['parameters']:,}", f"{ratios['parameters']:.3f}"]


def test_tasks_without_lm_eval_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    from structprune.evaluate.zeroshot import run_tasks

    with pytest.raises(MissingDependencyError, match="pip install lm-eval"):
        run_tasks(torch.nn.Linear(1, 1), None, ["hellaswag"], batch_size=1)  # type: ignore[arg-type]
    result = invoke("eval", DEMO_MODEL, "--tasks", "hellaswag,arc_easy", "--no-timing")
    assert result.exit_code == 1
    assert "error: zero-shot tasks need lm-evaluation-harness" in result.stderr and "pip install lm-eval" in result.stderr


def _pick_the_continuation_task(directory: Path) -> List[Dict[str, Any]]:
    """A local lm-eval task: each held-out line's first words, and its own next words among two
    other lines' as the choices."""
    lines = [line.split() for line in DEMO_HELDOUT.read_text(encoding="utf-8").splitlines() if len(line.split()) >= 12][:12]
    docs = []
    for i, words in enumerate(lines):
        choices = [" ".join(lines[(i + shift) % len(lines)][6:10]) for shift in (0, 1, 2)]
        answer = i % 3
        choices[0], choices[answer] = choices[answer], choices[0]
        docs.append({"context": " ".join(words[:6]), "choices": choices, "answer": answer})
    data = directory / "pick.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    (directory / "pick.yaml").write_text(
        "task: structprune_pick\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return docs


def direct_choice_accuracy(model_dir: Path, docs: List[Dict[str, Any]]) -> float:
    """Multiple choice by hand: the choice whose tokens (after " ", tokenized with the context) have
    the highest summed log-probability given the context."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for doc in docs:
        context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logits[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(docs)


def test_zero_shot_task_on_local_data_scores_like_a_direct_computation(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (pip install lm-eval) is not installed")
    docs = _pick_the_continuation_task(tmp_path)
    result = invoke("eval", DEMO_MODEL, "--tasks", "structprune_pick", "--task-path", tmp_path, "--no-timing", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["model"]["tasks"]["structprune_pick"]
    assert metrics["acc"] == pytest.approx(direct_choice_accuracy(DEMO_MODEL, docs))
    assert metrics["acc_stderr"] > 0


def test_unknown_task_is_refused_naming_the_task_path(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness (pip install lm-eval) is not installed")
    result = invoke("eval", DEMO_MODEL, "--tasks", "no_such_task", "--task-path", tmp_path, "--no-timing")
    assert result.exit_code == 1
    assert f"unknown lm-eval task(s) no_such_task (including the task definitions in {tmp_path})" in result.output


def test_load_model_refuses_what_it_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(tmp_path / "absent", dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(tmp_path, dtype="float32", device="cpu")
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot load it as a causal LM"):
        load_model(tmp_path, dtype="float32", device="cpu")  # no weights
    deeper = tmp_path / "deeper"
    deeper.mkdir()
    (deeper / "model.safetensors").symlink_to(DEMO_MODEL / "model.safetensors")
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 7}))
    with pytest.raises(ModelLoadError, match="lacks weights the config needs: model.layers.6"):
        load_model(deeper, dtype="float32", device="cpu")
    with pytest.raises(SettingError, match="--dtype: must be one of"):
        load_model(DEMO_MODEL, dtype="int8", device="cpu")
    with pytest.raises(SettingError, match="--device: must be cpu or cuda"):
        load_model(DEMO_MODEL, dtype="float32", device="tpu")
    model = load_model(DEMO_MODEL, dtype="bfloat16", device="cpu")
    assert not model.training and {p.dtype for p in model.parameters()} == {torch.bfloat16}


def read_csv(path: Path) -> List[Dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_sweep_writes_table_and_plot(tmp_path: Path, heldout: Path) -> None:
    output = tmp_path / "sweep"
    killed_run = tmp_path / ".sweep.structprune-tmp-999999999-0"  # above Linux's largest pid: a dead process
    (killed_run / "checkpoints").mkdir(parents=True)
    args = ["sweep", DEMO_MODEL, "--ratios", "0.1,0.3", "--importance", "l2,random", "--ppl", heldout, "-o", output]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no staging, checkpoint or leftover
    expected_files = {".structprune-output", "sweep.csv", "sweep.json", "sweep.md"}
    try:
        import matplotlib  # noqa: F401

        expected_files.add("sweep.png")
    except ImportError:
        pass
    assert {p.name for p in output.iterdir()} == expected_files
    if "sweep.png" in expected_files:
        assert (output / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = read_csv(output / "sweep.csv")
    assert [(r["importance"], float(r["target_ratio"])) for r in rows] == [
        ("dense", 0.0), ("l2", 0.1), ("l2", 0.3), ("random", 0.1), ("random", 0.3)
    ]
    dense = rows[0]
    assert int(dense["parameters"]) == 3_148_224 and float(dense["removed_fraction"]) == 0
    assert float(dense["perplexity@128"]) == pytest.approx(direct_perplexity(DEMO_MODEL, heldout, 128), rel=1e-5)
    for low, high in ((rows[1], rows[2]), (rows[3], rows[4])):
        assert 0 < float(low["removed_fraction"]) < float(high["removed_fraction"])
        assert int(high["macs_per_token"]) < int(low["macs_per_token"]) < int(dense["macs_per_token"])
    document = json.loads((output / "sweep.json").read_text())
    assert document["options"]["ratios"] == [0.1, 0.3] and len(document["rows"]) == 5
    assert document["rows"][1]["perplexity"]["128"] == pytest.approx(float(rows[1]["perplexity@128"]), rel=1e-6)
    assert result.stdout.splitlines()[0].startswith("| importance | target | removed |")

    again = invoke(*args)
    assert again.exit_code == 1 and "already exists (pass --overwrite" in again.stderr
    # An earlier sweep's directory may be replaced (a smaller sweep, to keep the test short).
    overwritten = invoke("sweep", DEMO_MODEL, "--ratios", "0.1", "--importance", "l2", "--ppl", heldout, "-o", output, "--overwrite")
    assert overwritten.exit_code == 0, overwritten.output
    assert len(read_csv(output / "sweep.csv")) == 2
    inside = invoke("sweep", DEMO_MODEL, "--ratios", "0.1", "--importance", "l2", "--ppl", heldout, "-o", DEMO_MODEL / "sweep")
    assert inside.exit_code == 1 and "outside the model directory" in inside.stderr
    bad = invoke("sweep", DEMO_MODEL, "--ratios", "0.1,1.5", "--importance", "l2", "--ppl", heldout, "-o", tmp_path / "bad")
    assert bad.exit_code == 2 and "strictly between 0 and 1" in bad.stderr


def test_sweep_with_global_planning_measures_non_uniform_checkpoints(tmp_path: Path, heldout: Path) -> None:
    output = tmp_path / "global"
    result = invoke("sweep", DEMO_MODEL, "--ratios", "0.2", "--importance", "l2", "--global", "--ppl", heldout, "-o", output)
    assert result.exit_code == 0, result.output
    rows = read_csv(output / "sweep.csv")
    assert [r["importance"] for r in rows] == ["dense", "l2"]
    assert 0.17 < float(rows[1]["removed_fraction"]) < 0.23
    assert json.loads((output / "sweep.json").read_text())["options"]["pruning"]["planning"] == "global"
