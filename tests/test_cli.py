"""The click CLI: `structprune info` and `structprune apply`."""

from __future__ import annotations

import json
import subprocess
import sys
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


def last_stderr_line(result: Result) -> str:
    """The error line: a progress bar may have been drawn on stderr before it."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


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
    summary = json.loads(result.stdout)
    assert summary["tensors"] == len(TENSORS)
    assert summary["shards"] == [SINGLE_FILE]
    assert summary["total_bytes"] == TOTAL_BYTES
    assert summary["bytes_by_dtype"] == {"F16": 96, "F32": 160}
    assert summary["parameters"] == sum(a.size for a in TENSORS.values())
    assert summary["architectures"] == ["ToyForCausalLM"]
    assert Path(summary["path"]).resolve() == model_dir.resolve()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (b'{"architectures": 5}', "'architectures' must be a list of class names"),
        (b'{"architectures": ["A", 1]}', "'architectures' must be a list"),
        (b'{"model_type": {"x": 1}}', "'model_type' must be a string"),
        (b'{"model_type": "llama", "name": "\xff\xfe"}', "not UTF-8"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested 100001 levels deep"),
        (b'{"hidden_size": 4, "hidden_size": 8}', "duplicate key 'hidden_size'"),
        (b"[1, 2]", "not a JSON object"),
    ],
    ids=["architectures-number", "architectures-mixed", "model_type", "not-utf8", "deep", "duplicate", "not-object"],
)
def test_info_refuses_a_malformed_config_with_a_typed_error(config: bytes, expected: str, model_dir: Path) -> None:
    """A config.json that is not UTF-8, nested too deep or of the wrong field types used to end in
    UnicodeDecodeError, RecursionError or TypeError tracebacks."""
    (model_dir / "config.json").write_bytes(config)
    result = CliRunner().invoke(main, ["info", str(model_dir)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "config.json" in last_stderr_line(result) and expected in last_stderr_line(result), result.stderr


def test_config_past_the_size_limit_is_refused(model_dir: Path) -> None:
    from structprune.io.checkpoint import MAX_CONFIG_BYTES, read_config
    from structprune.errors import ConfigError

    with open(model_dir / "config.json", "r+b") as config:
        config.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ConfigError, match="limit"):
        read_config(model_dir)


def test_info_json_matches_read_checkpoint(model_dir: Path) -> None:
    import structprune

    ckpt = structprune.read_checkpoint(model_dir)
    summary = json.loads(invoke("info", str(model_dir), "--json").stdout)
    assert summary["tensors"] == len(ckpt.tensors)
    assert summary["shards"] == ckpt.shards
    assert summary["total_bytes"] == ckpt.total_bytes == sum(t.nbytes for t in ckpt.tensors.values())


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


@pytest.mark.parametrize("budget", ["100TB", "9" * 40 + "TB"])
def test_apply_memory_budget_past_the_cap_is_refused_naming_the_flag(budget: str, model_dir: Path, tmp_path: Path) -> None:
    """100 TB used to abort the process in an allocation failure (SIGABRT, staging left behind), a
    huge number to end in an OverflowError traceback: now a usage error naming the flag and the cap,
    before any work."""
    plan = write_plan(tmp_path / "plan.json", plan_dict())
    out = tmp_path / "out"
    result = invoke("apply", str(model_dir), str(plan), "-o", str(out), "--memory-budget", budget)
    assert result.exit_code == 2, result.output
    assert "--memory-budget" in result.stderr and "1.0 TiB" in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model_dir.name, "plan.json"])


def test_apply_sharded_output(model_dir: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", plan_dict())
    result = invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"), "--max-shard-size", "100", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet: no progress bar, no summary
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
    assert result.stderr.startswith("error: ")  # validation fails before any progress bar
    assert "no.such.tensor" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_apply_existing_output_error(model_dir: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.json", plan_dict())
    (tmp_path / "out").mkdir()
    result = invoke("apply", str(model_dir), str(plan), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert last_stderr_line(result).startswith("error: ")
    assert "out" in last_stderr_line(result)
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
    assert SINGLE_FILE in result.stdout  # it describes the output it would write
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


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "structprune", *args], capture_output=True, text=True, timeout=120)


def test_python_dash_m(model_dir: Path, tmp_path: Path) -> None:
    """`python -m structprune` is the same CLI, with real exit codes and streams."""
    ok = run_module("info", str(model_dir), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["total_bytes"] == TOTAL_BYTES
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / SINGLE_FILE).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    bad = run_module("info", str(broken))
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ")
    assert SINGLE_FILE in bad.stderr
    assert "Traceback" not in bad.stderr


def test_missing_model_dir_is_reported(tmp_path: Path) -> None:
    """A missing MODEL is refused with a message naming it and no traceback (click reports
    argument problems as usage errors, exit status 2)."""
    missing = tmp_path / "no-such-model"
    result = run_module("info", str(missing))
    assert result.returncode in (1, 2)
    assert "no-such-model" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_does_not_import_torch() -> None:
    """`structprune info` and `apply` run in a few MB of Python: importing the CLI must not pull in
    torch (hundreds of MB of resident memory, which the engine's memory budget would not cover).
    `apply` imports it only for its shape check (tests/test_shape_check.py checks when)."""
    import subprocess
    import sys

    code = "import sys, structprune.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_prune_summary_names_widths_as_the_flags_do_original_to_new() -> None:
    """Issue 20: under GQA the graph counts query heads per KV group; the summary says heads per
    layer (6 -> 4 on the demo model's 2 groups of 3), and `mlp` where the flag says mlp."""
    from structprune.cli import width_lines

    original = {"channels": [512] * 6, "kv_groups": [2] * 6, "query_heads": [3] * 6}
    uniform = width_lines(original, {"channels": [328] * 5, "kv_groups": [2] * 5, "query_heads": [2] * 5})
    assert uniform == [
        "  mlp    512 -> 328 channels per layer",
        "  heads  6 -> 4 query heads per layer (KV groups 2, query heads per group 3 -> 2)",
    ]
    per_layer = width_lines(original, {"channels": [512, 448, 384, 384, 448, 512], "kv_groups": [1] * 6, "query_heads": [3] * 6})
    assert per_layer == [
        "  mlp    512 -> 512, 448, 384, 384, 448, 512 channels per layer",
        "  heads  6 -> 3 query heads per layer (KV groups 2 -> 1, query heads per group 3)",
    ]
