"""Plans are read strictly, once, by the engine's parser (issue 21, items 5 and 6).

The CLI (`structprune apply PLAN.json`), `CutPlan.load`/`from_json`/`from_dict` and `apply_plan`
all go through the Rust reader: no coercion (`"drop": "no"` is not a drop, `1.9` is not an index),
no unknown keys, no key twice, canonical dimensions; every refusal is a `PlanError` naming the JSON
path of the field, never a traceback. A plan writes no code but structprune's own DeciLM model
code, and sets no `auto_map` but the DeciLM format's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest
from ckpt import CheckpointFactory, tree_bytes
from click.testing import CliRunner
from structprune import CutPlan, apply_plan
from structprune.models import formats
from structprune.cli import main
from structprune.errors import PlanError

UP = "model.layers.0.mlp.up_proj.weight"
TENSORS: Dict[str, np.ndarray] = {
    "model.embed_tokens.weight": np.arange(40, dtype=np.float32).reshape(10, 4),
    UP: np.arange(24, dtype=np.float16).reshape(6, 4),
}
HEAD = '{"format": "structprune.cut-plan", "version": 1'
HOSTILE = "import os\nos.system('touch /tmp/structprune-pwned')\n"


def entry(text: str) -> str:
    return f'{HEAD}, "tensors": {{"{UP}": {text}}}}}'


def at(suffix: str) -> str:
    return f'tensors["{UP}"]{suffix}'


# (plan text, JSON path named, words of the reason)
MALFORMED = [
    (entry('{"drop": "no"}'), at(".drop"), 'expected true or false, got the string "no"'),
    (entry('{"keep": {"0": [1.9]}}'), at('.keep["0"][0]'), "non-negative integer"),
    (entry('{"keep": {"0": ["1"]}}'), at('.keep["0"][0]'), 'got the string "1"'),
    (entry('{"keep": {"0": [true]}}'), at('.keep["0"][0]'), "got true"),
    (entry('{"keep": {"0": [0, 2.0]}}'), at('.keep["0"][1]'), "non-negative integer"),
    (entry('{"keep": {"0": ["a", "b"]}}'), at('.keep["0"][0]'), "non-negative integer"),
    (entry('{"keep": {"0": [null]}}'), at('.keep["0"][0]'), "got null"),
    (entry('{"keep": {"00": [1]}}'), at('.keep["00"]'), "without sign or leading zeros"),
    (entry('{"keep": {"+1": [1]}}'), at('.keep["+1"]'), "without sign or leading zeros"),
    (entry('{"keep": {"-0": [1]}}'), at('.keep["-0"]'), "without sign or leading zeros"),
    (entry('{"keep": [[0]]}'), at(".keep"), "expected an object, got a list"),
    (entry('{"keep": {"0": {"a": 1}}}'), at('.keep["0"]'), "expected a list of indices or an index set name"),
    (entry('{"rename": 3}'), at(".rename"), "expected a string"),
    (entry('{"add": {"dtype": "F32", "shape": ["2"], "fill": 0}}'), at(".add.shape[0]"), "non-negative integer"),
    (entry('{"replace": {"values": [1, "2"]}}'), at(".replace.values[1]"), "expected a number"),
    (entry('"drop"'), at(""), "expected an object"),
    (entry('{"keep": {"0": [0], "0": [1]}}'), None, "duplicate key '0' at " + at('.keep["0"]')),
    (f'{HEAD}, "tensor": {{"{UP}": {{"drop": true}}}}}}', "tensor", "unknown field"),
    (f'{HEAD}, "tensors": [], "config": {{}}}}', "tensors", "expected an object, got a list"),
    (f'{HEAD}, "tensors": "{UP}"}}', "tensors", "expected an object"),
    (f'{HEAD}, "config": "hidden_size=2"}}', "config", "expected an object (a merge patch)"),
    (f'{HEAD}, "index_sets": {{"h": 7}}}}', "index_sets.h", "expected a list"),
    (f'{HEAD}, "index_sets": {{"h": [1, 1]}}}}', "index_sets.h[1]", "strictly increasing"),
    (f'{HEAD}, "files": ["README.md"]}}', "files", "expected an object"),
    (f'{HEAD}, "files": {{"README.md": 1}}}}', 'files["README.md"]', "expected a string"),
    (f'{HEAD}, "metadata": "taylor"}}', "metadata", "expected an object"),
    ('{"format": "structprune.cut-plan", "version": 1.0}', "version", "not supported"),
    ('{"format": "structprune.cut-plan", "version": "1"}', "version", "not supported"),
    ('{"version": 1}', "format", "missing"),
    ('["structprune.cut-plan"]', "the top level", "expected an object"),
    (f'{HEAD}, "metadata": {{"a": {"[" * 5000}', None, "recursion limit"),
    (f'{HEAD}, "metadata": {{"a": 1e999}}}}', None, "not valid JSON"),
    (f'{HEAD}, "metadata": {{"a": NaN}}}}', None, "not valid JSON"),
]


@pytest.fixture
def model_dir(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint(TENSORS, config={"model_type": "llama", "hidden_size": 4})


def check_refusal(err: PlanError, field: Optional[str], words: str) -> None:
    assert err.field == field, str(err)
    assert words in str(err)
    if field is not None:
        assert f"at {field}:" in str(err)


@pytest.mark.parametrize(("text", "field", "words"), MALFORMED)
def test_malformed_plans_are_refused_naming_the_field(tmp_path: Path, model_dir: Path, text: str, field: Optional[str], words: str) -> None:
    with pytest.raises(PlanError) as raised:
        CutPlan.from_json(text)
    check_refusal(raised.value, field, words)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(text)
    with pytest.raises(PlanError) as raised:
        CutPlan.load(plan_file)
    check_refusal(raised.value, field, words)
    assert str(raised.value).startswith(f"{plan_file}: invalid cut plan")
    assert raised.value.path == str(plan_file)
    # The CLI: one error line and exit status 1, never a traceback (catch_exceptions=False would raise it).
    result = CliRunner().invoke(main, ["apply", str(model_dir), str(plan_file), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert words in result.stderr and (field is None or field in result.stderr), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "field", "words"), [case for case in MALFORMED if case[1] is not None])
def test_plan_data_is_read_by_the_same_rules(model_dir: Path, tmp_path: Path, text: str, field: str, words: str) -> None:
    data = json.loads(text)
    readers = [CutPlan.from_dict]
    if isinstance(data, dict):  # apply_plan takes a string or path as a plan file's name
        readers.append(lambda d: apply_plan(model_dir, d, tmp_path / "out"))
    for read in readers:
        with pytest.raises(PlanError) as raised:
            read(data)
        check_refusal(raised.value, field, words)
    assert not (tmp_path / "out").exists()


def test_plan_that_is_not_utf8_is_a_plan_error(tmp_path: Path, model_dir: Path) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_bytes(f'{HEAD}, "metadata": {{"note": "'.encode() + b"\xff\xfe" + b'"}}')
    with pytest.raises(PlanError, match="not valid JSON") as raised:
        CutPlan.load(plan_file)
    assert raised.value.path == str(plan_file)
    result = CliRunner().invoke(main, ["apply", str(model_dir), str(plan_file), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 1 and "not valid JSON" in result.stderr, result.stderr


def test_python_values_that_are_not_json_are_plan_errors() -> None:
    base: Dict[str, Any] = {"format": "structprune.cut-plan", "version": 1}
    nested: Dict[str, Any] = {}
    for _ in range(100_000):
        nested = {"a": nested}
    for data in ({**base, "metadata": {"x": float("inf")}}, {**base, "metadata": {(1, 2): 3}}, {**base, "metadata": nested}, ["not", "a", "mapping"]):
        with pytest.raises(PlanError):
            CutPlan.from_dict(data)  # type: ignore[arg-type]


def test_well_formed_plans_read_the_same_from_text_data_and_file(tmp_path: Path) -> None:
    text = entry('{"keep": {"1": [0, 3], "0": "rows"}, "replace": {"fill": 0}}').replace(HEAD, HEAD + ', "index_sets": {"rows": [0, 2, 5]}')
    plan = CutPlan.from_json(text)
    assert plan.tensors[UP].keep == {0: "rows", 1: [0, 3]}
    assert plan.tensors[UP].replace is not None and plan.tensors[UP].replace.fill == 0.0
    assert CutPlan.from_dict(json.loads(text)) == plan == CutPlan.from_json(plan.to_json())
    (tmp_path / "p.json").write_text(text)
    assert CutPlan.load(tmp_path / "p.json") == plan


# --- code and auto_map (item 5) ---------------------------------------------------------------

DECILM_AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig", "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}


def code_plan(files: Dict[str, str], config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {"format": "structprune.cut-plan", "version": 1, "files": files, "config": config or {}}


@pytest.mark.parametrize(
    ("files", "config", "field", "words"),
    [
        ({"modeling_x.py": HOSTILE}, None, 'files["modeling_x.py"]', "'.py' files are code"),
        ({"modeling_decilm.py": formats.decilm_files()["modeling_decilm.py"] + HOSTILE}, None, 'files["modeling_decilm.py"]', "differs from the DeciLM model code"),
        ({"configuration_decilm.py": HOSTILE}, None, 'files["configuration_decilm.py"]', "differs from the DeciLM model code"),
        ({"tokenizer_config.json": json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}})}, None, 'files["tokenizer_config.json"]', "'auto_map'"),
        ({}, {"auto_map": {"AutoModelForCausalLM": "modeling_x.Hostile"}}, "config.auto_map", "may only be deleted"),
        ({}, {"auto_map": {**DECILM_AUTO_MAP, "AutoModel": "modeling_x.Hostile"}}, "config.auto_map", "may only be deleted"),
        ({}, {"auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig", "AutoModelForCausalLM": "someone/repo--modeling_decilm.DeciLMForCausalLM"}}, "config.auto_map", "may only be deleted"),
    ],
)
def test_plans_write_no_code_and_no_auto_map_of_their_own(
    model_dir: Path, tmp_path: Path, files: Dict[str, str], config: Optional[Dict[str, Any]], field: str, words: str
) -> None:
    plan = code_plan(files, config)
    for read in (CutPlan.from_dict, lambda d: apply_plan(model_dir, d, tmp_path / "out")):
        with pytest.raises(PlanError) as raised:
            read(plan)
        check_refusal(raised.value, field, words)
    assert not (tmp_path / "out").exists()
    write_plan = tmp_path / "plan.json"
    write_plan.write_text(json.dumps(plan))
    result = CliRunner().invoke(main, ["apply", str(model_dir), str(write_plan), "-o", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 1 and field in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_the_decilm_format_still_writes_its_code_and_auto_map(model_dir: Path, tmp_path: Path) -> None:
    plan = CutPlan.from_dict(code_plan(formats.decilm_files(), {"auto_map": DECILM_AUTO_MAP, "model_type": "nemotron-nas"}))
    apply_plan(model_dir, plan, tmp_path / "out")
    root = Path(formats.__file__).parent / "decilm"
    for name in formats.DECILM_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (root / name).read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"] == DECILM_AUTO_MAP
    # Deleting an auto_map is no code: allowed.
    apply_plan(model_dir, code_plan({}, {"auto_map": None}), tmp_path / "deleted")
    assert "auto_map" not in json.loads((tmp_path / "deleted" / "config.json").read_text())
    assert tree_bytes(tmp_path / "deleted")
