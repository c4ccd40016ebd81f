"""Bad options are refused before any work, the same way by every command: exit status 2, one
error line naming the option, no traceback, and nothing written."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from structprune.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "demo" / "model")
CALIB = str(ROOT / "demo" / "text" / "calib.txt")
HELDOUT = str(ROOT / "demo" / "text" / "heldout.txt")
PLAN = str(ROOT / "demo" / "example-plan.json")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")

PRUNE = ["prune", DEMO, "--ratio", "0.2", "--calib", CALIB]
SWEEP = ["sweep", DEMO, "--ppl", HELDOUT, "--calib", CALIB]
RECOVER = ["recover", DEMO, "--data", CALIB]

CASES = [
    # (arguments before -o OUTPUT, the option the error must name)
    pytest.param(["info", DEMO, "--jsn"], "--jsn", id="info-unknown-option"),
    pytest.param(["inspect", DEMO, "--traced-layers", "0"], "--traced-layers", id="inspect-range"),
    pytest.param([*PRUNE, "--importance", "nope"], "--importance", id="prune-importance"),
    pytest.param([*PRUNE, "--structures", "heads,foo"], "--structures", id="prune-structures"),
    pytest.param([*PRUNE, "--ratio", "1.5"], "--ratio", id="prune-ratio"),
    pytest.param([*PRUNE, "--dtype", "int8"], "--dtype", id="prune-dtype"),
    pytest.param([*PRUNE, "--device", "tpu"], "--device", id="prune-device-name"),
    pytest.param([*PRUNE, "--device", "cuda"], "--device", id="prune-device-cuda", marks=NO_CUDA),
    pytest.param([*PRUNE, "--blocks", "2"], "--blocks", id="prune-blocks-without-blocks"),
    pytest.param([*PRUNE, "--structures", "heads,hidden", "--bias-compensation", "--importance", "flap"], "--bias-compensation", id="prune-combination"),
    pytest.param(["prune", DEMO, "--ratio", "0.2", "--importance", "taylor"], "--calib", id="prune-needs-calib"),
    pytest.param([*PRUNE, "--protect", "1"], "--protect", id="prune-protect"),
    pytest.param([*PRUNE, "--importance", "lora-grad", "--structures", "heads,hidden"], "--structures", id="prune-lora-grad-hidden"),
    pytest.param(["apply", DEMO, PLAN, "--memory-budget", "2TiB"], "--memory-budget", id="apply-budget"),
    pytest.param(["apply", DEMO, PLAN, "--threads", "0"], "--threads", id="apply-threads"),
    pytest.param(["apply", DEMO, PLAN, "--max-shard-size", "lots"], "--max-shard-size", id="apply-size"),
    pytest.param([*RECOVER, "--rank", "0"], "--rank", id="recover-rank"),
    pytest.param([*RECOVER, "--mixed-precision", "bf16"], "--mixed-precision", id="recover-mixed-precision-on-cpu", marks=NO_CUDA),
    pytest.param([*RECOVER, "--temperature", "2"], "--temperature", id="recover-distillation-without-teacher"),
    pytest.param(["eval", DEMO, "--ppl", HELDOUT, "--device", "cuda:7"], "--device", id="eval-device", marks=NO_CUDA),
    pytest.param(["eval", DEMO, "--ppl", HELDOUT, "--batch-sizes", "1,x"], "--batch-sizes", id="eval-batch-sizes"),
    pytest.param([*SWEEP, "--ratios", "0.1,1.5"], "--ratios", id="sweep-ratios"),
    pytest.param([*SWEEP, "--importance", "l2,nope"], "--importance", id="sweep-importance"),
    pytest.param([*SWEEP, "--structures", "wings"], "--structures", id="sweep-structures"),
    pytest.param([*SWEEP, "--device", "cuda"], "--device", id="sweep-device", marks=NO_CUDA),
]


def error_lines(output: str) -> List[str]:
    return [line for line in output.splitlines() if line.lower().startswith("error")]


@pytest.mark.parametrize(("arguments", "option"), CASES)
def test_a_bad_option_is_one_error_line_naming_it(tmp_path: Path, arguments: Sequence[str], option: str) -> None:
    output = tmp_path / "out"
    needs_output = arguments[0] in {"prune", "apply", "recover", "sweep"}
    result = CliRunner().invoke(main, [*arguments, *(["-o", str(output)] if needs_output else [])])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output  # no exception escaped
    lines = error_lines(result.output)
    assert len(lines) == 1 and option in lines[0], result.output
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staged or work directory beside it
