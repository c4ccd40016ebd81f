"""The click CLI: `structprune info` and `structprune apply`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckpt import SINGLE_FILE, CheckpointFactory, plan_dict, read_checkpoint_raw, tree_bytes, tree_hashes, write_plan
from click.testing import CliRunner, Result
from structprune.cli import main

TENSORS: dict[str, np.ndarray] = {
    "model.embed_tokens.weight": np.arange(40, dtype=np.float32).reshape(10, 4),
    "model.layers.0.mlp.up_proj.weight": np.arange(24, dtype=np.float16).reshape(6, 4),
    "model.layers.0.mlp.down_proj.weight": np.arange(24, dtype=np.float16).reshape(4, 6),
}
TOTAL_BYTES = 160 + 48 + 48


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def json_values(node: Any) -> Iterator[Any]:
    """Every key and scalar in a JSON document, whatever its layout."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from json_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from json_values(value)
    else:
        yield node


def cut_plan() -> dict[str, Any]:
    return plan_dict(
        {
            "model.layers.0.mlp.up_proj.weight": {"keep": {"0": "mlp"}},
            "model.layers.0.mlp.down_proj.weight": {"keep": {"1": "mlp"}},
        },
        index_sets={"mlp": [0, 2, 5]},
        config={"intermediate_size": 3},
    )


@pytest.fixture
def model_dir(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint(TENSORS)


def test_info_text(model_dir: Path) -> None:
    result = invoke("info", str(model_dir))
    assert result.exit_code == 0, result.output
    assert SINGLE_FILE in result.output
    assert "3" in result.output  # tensor count
    assert any(dtype in result.output for dtype in ("F32", "F16"))


def test_info_json(model_dir: Path) -> None:
    result = invoke("info", str(model_dir), "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    values = list(json_values(document))
    for name in TENSORS:
        assert name in values, f"{name} missing from info --json"
    assert SINGLE_FILE in values
    assert TOTAL_BYTES in values
    assert "F16" in values and "F32" in values


def test_info_json_matches_read_checkpoint(model_dir: Path) -> None:
    import structprune

    ckpt = structprune.read_checkpoint(model_dir)
    document = json.loads(invoke("info", str(model_dir), "--json").stdout)
    values = list(json_values(document))
    for info in ckpt.tensors.values():
        assert info.nbytes in values
    assert ckpt.total_bytes in values


def test_apply_happy_path(model_dir: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", cut_plan())
    out = tmp_path / "out"
    result = invoke("apply", str(model_dir), str(plan), "-o", str(out), "--threads", "2", "--memory-budget", "1KiB")
    assert result.exit_code == 0, result.output
    tensors = read_checkpoint_raw(out).tensors
    np.testing.assert_array_equal(tensors["model.layers.0.mlp.up_proj.weight"].to_numpy(), TENSORS["model.layers.0.mlp.up_proj.weight"][[0, 2, 5]])
    np.testing.assert_array_equal(tensors["model.layers.0.mlp.down_proj.weight"].to_numpy(), TENSORS["model.layers.0.mlp.down_proj.weight"][:, [0, 2, 5]])
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 3
    assert (out / "tokenizer.json").exists()


def test_apply_sharded_output(model_dir: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", plan_dict())
    result = invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"), "--max-shard-size", "100", "--quiet")
    assert result.exit_code == 0, result.output
    assert len(read_checkpoint_raw(tmp_path / "out").shards) == 2  # 160 | 48 + 48


def test_apply_cli_matches_python_api(model_dir: Path, tmp_path: Path) -> None:
    import structprune

    plan = write_plan(tmp_path / "plan.json", cut_plan())
    invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "cli"), "--quiet")
    structprune.apply_plan(model_dir, plan, tmp_path / "api")
    assert tree_bytes(tmp_path / "cli") == tree_bytes(tmp_path / "api")


def test_apply_error_exit_code(model_dir: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", plan_dict({"no.such.tensor": {"drop": True}}))
    result = invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "no.such.tensor" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_apply_existing_output_error(model_dir: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", plan_dict())
    (tmp_path / "out").mkdir()
    result = invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert list((tmp_path / "out").iterdir()) == []
    result = invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"), "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / SINGLE_FILE).exists()


def test_info_error_exit_code(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SINGLE_FILE).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    result = invoke("info", str(broken))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert SINGLE_FILE in result.stderr


def test_dry_run_writes_nothing(model_dir: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", cut_plan())
    before = sorted(p.name for p in tmp_path.iterdir())
    input_hashes = tree_hashes(model_dir)
    result = invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert tree_hashes(model_dir) == input_hashes


def test_dry_run_still_validates(model_dir: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", plan_dict({"model.embed_tokens.weight": {"keep": {"0": [3, 1]}}}))
    result = invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"), "--dry-run")
    assert result.exit_code == 1
    assert "model.embed_tokens.weight" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [[], ["info"], ["apply"]])
def test_help(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_apply_help_lists_options() -> None:
    output = invoke("apply", "--help").output
    for option in ("--max-shard-size", "--memory-budget", "--threads", "--overwrite", "--dry-run", "--quiet", "-o"):
        assert option in output


def test_python_dash_m(model_dir: Path) -> None:
    """`python -m structprune` is the same CLI, with real exit codes and streams."""
    ok = subprocess.run([sys.executable, "-m", "structprune", "info", str(model_dir), "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "model.embed_tokens.weight" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "structprune", "info", str(model_dir / "missing")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr
