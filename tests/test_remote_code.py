"""No code from a model directory, ever (issue 21).

A model directory whose ``config.json`` has an unknown ``model_type`` and an ``auto_map`` pointing
at its own Python files makes transformers ask on stdin whether to run that code when
``trust_remote_code`` is left unset, and a "y" there runs it. Every command that reads a model
(``inspect``, ``prune``, ``eval``, ``recover``) and ``structprune.load_pruned`` must refuse such a
directory without running anything, whatever stdin answers. The hostile code writes a marker file
when imported, so "it ran" is a file on disk, not a guess.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file
from structprune.cli import main
from structprune.errors import ModelLoadError

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "demo" / "text" / "calib.txt"
ANSWERS = "y\n" * 50

HOSTILE_CODE = """\
from pathlib import Path
Path({marker!r}).write_text("the model directory's code ran")
from transformers import PretrainedConfig, PreTrainedModel


class HostileConfig(PretrainedConfig):
    model_type = "structprune_hostile"


class HostileForCausalLM(PreTrainedModel):
    config_class = HostileConfig
"""


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """(model directory, marker path): the marker exists once the directory's code has run."""
    model = tmp_path / "hostile"
    model.mkdir()
    marker = tmp_path / "code-ran"
    config = {
        "model_type": "structprune_hostile",
        "architectures": ["HostileForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_hostile.HostileConfig",
            "AutoModel": "modeling_hostile.HostileForCausalLM",
            "AutoModelForCausalLM": "modeling_hostile.HostileForCausalLM",
        },
        "num_hidden_layers": 1,
        "hidden_size": 4,
        "vocab_size": 8,
    }
    (model / "config.json").write_text(json.dumps(config))
    for name in ("configuration_hostile.py", "modeling_hostile.py"):
        (model / name).write_text(HOSTILE_CODE.format(marker=str(marker)))
    save_file({"model.embed_tokens.weight": np.zeros((8, 4), dtype=np.float32)}, str(model / "model.safetensors"))
    return model, marker


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{model}"],
        ["prune", "{model}", "--ratio", "0.2", "--calib", str(TEXT), "-o", "{out}"],
        ["eval", "{model}", "--ppl", str(TEXT), "--no-timing"],
        ["recover", "{model}", "-o", "{out}", "--data", str(TEXT), "--max-steps", "1"],
    ],
    ids=lambda c: c[0],
)
def test_commands_never_run_a_model_directorys_code(command: list[str], hostile: tuple[Path, Path], tmp_path: Path) -> None:
    model, marker = hostile
    args = [a.format(model=model, out=tmp_path / "out") for a in command]
    result = CliRunner().invoke(main, args, input=ANSWERS)
    assert not marker.exists(), "the model directory's code ran"
    assert result.exit_code != 0, result.output
    assert not (tmp_path / "out").exists()


def test_load_pruned_never_runs_a_model_directorys_code(
    hostile: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import structprune

    model, marker = hostile
    monkeypatch.setattr(sys, "stdin", io.StringIO(ANSWERS))
    with pytest.raises(ModelLoadError) as info:
        structprune.load_pruned(model)
    assert not marker.exists(), "the model directory's code ran"
    assert str(model) in str(info.value)


def test_trace_never_runs_a_model_directorys_code(hostile: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from structprune.errors import TraceError
    from structprune.tracing.export import trace_model

    model, marker = hostile
    monkeypatch.setattr(sys, "stdin", io.StringIO(ANSWERS))
    with pytest.raises(TraceError):
        trace_model(model)
    assert not marker.exists(), "the model directory's code ran"
