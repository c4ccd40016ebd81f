"""`apply` checks, before writing, that the output's tensor shapes agree with the model its
config.json builds (issues 20 and 21): a plan whose output would not load is refused, naming the
plan file and the first tensor that disagrees; `--no-shape-check` writes it anyway; and `apply`
imports torch only when the check runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import structprune  # noqa: E402
from structprune.plan.cuts import Selection, checkpoint_cut_plan  # noqa: E402
from structprune.errors import PlanError  # noqa: E402
from structprune.models.loading import load_pruned  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "model"
HEAD_DIM, LAYERS = 32, 6


def no_heads_in_layer_0() -> Dict[str, Any]:
    """Every attention head of layer 0 removed, the config left as it is (issue 21's example)."""
    attention = "model.layers.0.self_attn"
    return {
        "format": "structprune.cut-plan",
        "version": 1,
        "tensors": {
            f"{attention}.q_proj.weight": {"keep": {"0": []}},
            f"{attention}.k_proj.weight": {"keep": {"0": []}},
            f"{attention}.v_proj.weight": {"keep": {"0": []}},
            f"{attention}.o_proj.weight": {"keep": {"1": []}},
        },
    }


def halved_mlp(layers: range, config: Dict[str, Any]) -> structprune.CutPlan:
    tensors = {
        f"model.layers.{i}.mlp.{proj}.weight": structprune.TensorCut(keep={dim: "mlp"})
        for i in layers
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))
    }
    return structprune.CutPlan(index_sets={"mlp": list(range(0, 512, 2))}, tensors=tensors, config=config)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "structprune", *args], capture_output=True, text=True, timeout=180)


def test_one_layer_cut_without_config_patch_is_refused_before_writing(tmp_path: Path) -> None:
    """The README's old example: layer 0's MLP cut to 256, config still 512."""
    with pytest.raises(PlanError) as caught:
        structprune.apply_plan(DEMO, halved_mlp(range(1), {}), tmp_path / "out")
    assert caught.value.tensor == "model.layers.0.mlp.down_proj.weight"
    assert "[192, 256]" in str(caught.value) and "[192, 512]" in str(caught.value) and "--no-shape-check" in str(caught.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_consistent_plan_is_checked_and_loads(tmp_path: Path) -> None:
    report = structprune.apply_plan(DEMO, halved_mlp(range(LAYERS), {"intermediate_size": 256}), tmp_path / "out")
    assert report.shape_check.checked and report.shape_check.model == "LlamaForCausalLM"
    assert load_pruned(report.output_dir).model.layers[5].mlp.up_proj.weight.shape == (256, 192)


def test_cli_refuses_a_plan_removing_every_head_naming_plan_and_tensor(tmp_path: Path) -> None:
    plan = tmp_path / "no-heads.json"
    plan.write_text(json.dumps(no_heads_in_layer_0()))
    refused = run_cli("apply", str(DEMO), str(plan), "-o", str(tmp_path / "out"))
    assert refused.returncode == 1, refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {plan}: the output would not load: tensor 'model.layers.0.self_attn.")
    assert "--no-shape-check" in error and "Traceback" not in refused.stderr
    assert not (tmp_path / "out").exists()
    dry = run_cli("apply", str(DEMO), str(plan), "-o", str(tmp_path / "out"), "--dry-run")
    assert dry.returncode == 1 and "the output would not load" in dry.stderr
    forced = run_cli("apply", str(DEMO), str(plan), "-o", str(tmp_path / "out"), "--no-shape-check")
    assert forced.returncode == 0, forced.stderr
    assert "shapes not checked: not asked" in forced.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_engine_plan_errors_name_the_plan_file_and_the_tensor(tmp_path: Path) -> None:
    """An index past the tensor's end is found by the engine, from the plan's JSON text: the
    message still names the file it came from."""
    plan = tmp_path / "out-of-range.json"
    tensor = "model.layers.0.mlp.up_proj.weight"
    plan.write_text(json.dumps({"format": "structprune.cut-plan", "version": 1, "tensors": {tensor: {"keep": {"0": [0, 600]}}}}))
    for extra in ((), ("--dry-run",)):
        result = run_cli("apply", str(DEMO), str(plan), "-o", str(tmp_path / "out"), *extra)
        assert result.returncode == 1
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: {plan}: ") and tensor in error, error
    with pytest.raises(PlanError) as caught:
        structprune.apply_plan(DEMO, plan, tmp_path / "out")
    assert caught.value.path == str(plan) and caught.value.tensor == tensor


@pytest.mark.parametrize("layout", ["decilm", "layers"])
def test_per_layer_formats_are_checked_against_what_load_pruned_builds(layout: str, tmp_path: Path, demo_graph: structprune.StructureGraph) -> None:
    channels = demo_graph.by_kind("channels")
    plan = checkpoint_cut_plan(DEMO, demo_graph, Selection(units={channels[2].id: list(range(256))}), layout=layout)
    report = structprune.apply_plan(DEMO, plan, tmp_path / "good")
    assert report.shape_check.checked
    assert report.shape_check.model == ("DeciLMForCausalLM" if layout == "decilm" else "LlamaForCausalLM")
    assert (structprune.models.formats.LAYERS_KEY in report.shape_check.note) == (layout == "layers")
    # The same cut, but the config no longer says layer 2 is narrower.
    if layout == "decilm":
        plan.config["block_configs"][2]["ffn"]["intermediate_size"] = 512
    else:
        plan.config[structprune.models.formats.LAYERS_KEY]["layers"][2] = {}
    with pytest.raises(PlanError) as caught:
        structprune.apply_plan(DEMO, plan, tmp_path / "bad")
    assert caught.value.tensor is not None and caught.value.tensor.startswith("model.layers.2.mlp.")


def test_a_weight_the_plan_drops_is_missing_from_the_output(tmp_path: Path) -> None:
    plan = {"format": "structprune.cut-plan", "version": 1, "tensors": {"model.layers.3.input_layernorm.weight": {"drop": True}}}
    with pytest.raises(PlanError, match="lacks tensor 'model.layers.3.input_layernorm.weight'"):
        structprune.apply_plan(DEMO, plan, tmp_path / "out")


def torch_imported_by_apply(model: Path, plan: Path, out: Path, *flags: str) -> bool:
    code = (
        "import sys\n"
        "from structprune.cli import main\n"
        f"main(['apply', {str(model)!r}, {str(plan)!r}, '-o', {str(out)!r}, '-q', *{list(flags)!r}], standalone_mode=False)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


def test_apply_imports_torch_only_when_the_check_runs(tmp_path: Path) -> None:
    """The trade-off of the check: `apply` of an architecture transformers knows imports torch
    (seconds, a few hundred MB, whatever the checkpoint's size); with --no-shape-check, or for an
    architecture transformers does not know (the check is skipped, saying why), it does not."""
    plan = tmp_path / "plan.json"
    plan.write_text(halved_mlp(range(LAYERS), {"intermediate_size": 256}).to_json())
    assert torch_imported_by_apply(DEMO, plan, tmp_path / "checked")
    assert not torch_imported_by_apply(DEMO, plan, tmp_path / "unchecked", "--no-shape-check")
    unknown = tmp_path / "unknown-model"
    shutil.copytree(DEMO, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config.update(model_type="no-such-architecture", architectures=["NoSuchForCausalLM"])
    (unknown / "config.json").write_text(json.dumps(config))
    assert not torch_imported_by_apply(unknown, plan, tmp_path / "unknown")
    shown = run_cli("apply", str(unknown), str(plan), "-o", str(tmp_path / "unknown-shown"))
    assert "shapes not checked: the installed transformers does not know model_type 'no-such-architecture'" in shown.stdout
