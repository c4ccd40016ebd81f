"""Start-up: the trace cache (`structprune inspect` of a config seen before reads its structures
back without tracing) and the commands that must not import torch or transformers (seconds and
hundreds of MB before the first line of output)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from click.testing import CliRunner
from conftest import DEMO_MODEL
from structprune.cli import main
from structprune.tracing import cache as trace_cache
from structprune.tracing.graph import StructureGraph, read_cached_trace, trace

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The demo model's config alone (tracing reads nothing else)."""
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(DEMO_MODEL / "config.json", directory / "config.json")
    return directory


def entries(cache_home: Path) -> List[Path]:
    return sorted((cache_home / "structprune" / "traces").glob("*.json"))


def same_graph(a: StructureGraph, b: StructureGraph) -> bool:
    return (a.structures, a.pinned, a.blocks, a.params, a.model, a.tied) == (b.structures, b.pinned, b.blocks, b.params, b.model, b.tied)


def test_a_cached_trace_is_the_traced_graph(model: Path, private_cache_home: Path) -> None:
    assert read_cached_trace(model) is None
    traced = trace(model, cache=True)
    assert len(entries(private_cache_home)) == 1
    cached = read_cached_trace(model)
    assert cached is not None and same_graph(cached, traced)
    assert same_graph(trace(model / "config.json", cache=True), traced)
    assert len(entries(private_cache_home)) == 1


def test_without_cache_nothing_is_written(model: Path, private_cache_home: Path) -> None:
    trace(model)
    assert entries(private_cache_home) == []


def test_an_entry_is_never_used_for_another_config_depth_or_version(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace(model, cache=True)
    assert read_cached_trace(model, traced_layers=3) is None
    monkeypatch.setattr(trace_cache, "_installed_version", lambda distribution: "0.0-other")
    assert read_cached_trace(model) is None
    monkeypatch.undo()
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] // 2
    (model / "config.json").write_text(json.dumps(config))
    assert read_cached_trace(model) is None
    assert trace(model, cache=True).params != trace(DEMO_MODEL).params


def test_a_corrupt_entry_is_ignored_and_rewritten(model: Path, private_cache_home: Path) -> None:
    traced = trace(model, cache=True)
    (entry,) = entries(private_cache_home)
    entry.write_text(entry.read_text()[:1000])
    assert read_cached_trace(model) is None
    assert same_graph(trace(model, cache=True), traced)
    cached = read_cached_trace(model)
    assert cached is not None and same_graph(cached, traced)


def test_inspect_prints_the_same_from_the_cache(model: Path, private_cache_home: Path) -> None:
    def inspected(*flags: str) -> List[str]:
        result = CliRunner().invoke(main, ["inspect", str(model), *flags], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output.splitlines()

    first = inspected()
    assert " traced in " in first[0]
    again = inspected()
    assert " read from the trace cache in " in again[0]
    assert again[1:] == first[1:]
    assert inspected("--json") == inspected("--json", "--no-cache")


def test_inspect_no_cache_writes_nothing(model: Path, private_cache_home: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(model), "--no-cache"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert entries(private_cache_home) == []


def heavy_modules_imported_by(*args: str) -> List[str]:
    """Runs ``structprune ARGS`` in a fresh interpreter; which of torch and transformers it imported."""
    code = (
        "import sys\n"
        "from structprune.cli import main\n"
        "try:\n"
        f"    main({list(args)!r})\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print([name for name in ('torch', 'transformers') if name in sys.modules], file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stderr.strip().splitlines()[-1].replace("'", '"'))


def test_commands_that_need_no_model_code_import_neither_torch_nor_transformers(model: Path, tmp_path: Path) -> None:
    """--help, --version, info and inspect of a cached config (apply without its shape check is
    guarded in tests/test_shape_check.py)."""
    assert heavy_modules_imported_by("inspect", str(model)) == ["torch", "transformers"]  # traced: fills the cache
    assert heavy_modules_imported_by("inspect", str(model)) == []
    assert heavy_modules_imported_by("inspect", str(model), "--json") == []
    assert heavy_modules_imported_by("--help") == []
    assert heavy_modules_imported_by("--version") == []
    assert heavy_modules_imported_by("inspect", "--help") == []
    assert heavy_modules_imported_by("info", str(DEMO_MODEL)) == []
