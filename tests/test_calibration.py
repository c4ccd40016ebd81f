"""Calibration text: file formats, error messages, the token stream and the seeded windows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List

import pytest
import torch

from structprune.score.calibration import (
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    CalibrationSummary,
    batch_sha256,
    calibration_batch,
    load_calibration,
    load_texts,
    sample_windows,
    split_documents,
    token_stream,
)
from structprune.errors import CalibrationError, StructpruneError, StructpruneIOError

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "model"
DEMO_CALIB = REPO / "demo" / "text" / "calib.txt"
SEP = "\n<|endoftext|>\n"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: List[Any]) -> Path:
    return write(path, "".join(json.dumps(record) + "\n" for record in records))


# ------------------------------------------------------------------------------ .txt


def test_txt_documents_split_at_separator_lines(tmp_path: Path) -> None:
    text = "first doc\nline two\n" + SEP + "second <|endoftext|> inline\n\n" + SEP + "third\n"
    path = write(tmp_path / "docs.txt", text)
    assert load_texts(path) == ["first doc\nline two\n", "second <|endoftext|> inline\n\n", "third\n"]
    # The separator takes the line breaks around it, so joining gives the file back exactly.
    assert SEP.join(load_texts(path)) == text


def test_txt_without_separator_is_one_document(tmp_path: Path) -> None:
    text = "just one document\nwith <|endoftext|> not alone on its line\n"
    assert load_texts(write(tmp_path / "one.txt", text)) == [text]


def test_txt_separator_edge_cases() -> None:
    # First and last lines, CRLF line ends, blank documents between separators.
    assert split_documents("<|endoftext|>\nA\n<|endoftext|>") == ["", "A", ""]
    assert split_documents("A\r\n<|endoftext|>\r\nB") == ["A", "B"]
    # Only lines that are exactly the marker separate documents.
    assert split_documents("A\n <|endoftext|>\nB") == ["A\n <|endoftext|>\nB"]


def test_txt_blank_documents_are_dropped(tmp_path: Path) -> None:
    path = write(tmp_path / "blanks.txt", "<|endoftext|>\nA\n<|endoftext|>\n  \n<|endoftext|>\nB\n")
    assert load_texts(path) == ["A", "B\n"]


def test_bundled_calibration_file_round_trips() -> None:
    texts = load_texts(DEMO_CALIB)
    assert len(texts) == 40  # demo/README.md: 40 training documents
    assert SEP.join(texts) == DEMO_CALIB.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ .jsonl


def test_jsonl_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha", "id": 1}, {"text": "beta\ngamma"}])
    assert load_texts(path) == ["alpha", "beta\ngamma"]


def test_jsonl_custom_field_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"body": "one"}\n\n   \n{"body": "two"}\n\n')
    assert load_texts(path, text_field="body") == ["one", "two"]


def test_jsonl_alpaca_records(tmp_path: Path) -> None:
    records = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet.", "input": "", "output": "Hello."},
        {"instruction": "Count {braces}.", "output": "{0}"},
    ]
    texts = load_texts(write_jsonl(tmp_path / "alpaca.jsonl", records))
    assert texts[0] == ALPACA_TEMPLATE.format(instruction="Add.", input="2 and 3", output="5")
    assert texts[0].endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5")
    assert texts[1] == ALPACA_TEMPLATE_NO_INPUT.format(instruction="Greet.", output="Hello.")
    assert "### Input:" not in texts[1]
    # Braces in the values are data, not template fields.
    assert texts[2].endswith("### Instruction:\nCount {braces}.\n\n### Response:\n{0}")


def test_jsonl_text_field_wins_over_alpaca(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain", "instruction": "x", "output": "y"}])
    assert load_texts(path) == ["plain"]


# ------------------------------------------------------------------------------ errors


def test_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n\n{"content": "no text here"}\n')
    with pytest.raises(CalibrationError) as info:
        load_texts(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert "'text'" in message and "'content'" in message
    assert info.value.line == 3 and info.value.path == str(path)
    assert isinstance(info.value, (StructpruneError, ValueError))


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": "broken\n')
    with pytest.raises(CalibrationError, match=rf"{path}:2: invalid JSON") as info:
        load_texts(path)
    assert info.value.line == 2


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('["text"]', "expected a JSON object, got list"),
        ('{"text": 7}', "field 'text' is int, not a string"),
        ('{"instruction": "x", "output": null}', "field 'output' is NoneType, not a string"),
    ],
)
def test_bad_records_name_the_line(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n' + line + "\n")
    with pytest.raises(CalibrationError, match=rf"{path}:2: {expected}"):
        load_texts(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.txt", ""), ("w.txt", " \n\n\t\n"), ("s.txt", "<|endoftext|>\n<|endoftext|>\n"), ("e.jsonl", ""), ("b.jsonl", "\n \n")],
)
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(CalibrationError, match=rf"{path}: empty"):
        load_texts(path)


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    with pytest.raises(CalibrationError, match=rf"{path}:3: not UTF-8"):
        load_texts(path)


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(StructpruneIOError, match="no such file"):
        load_texts(tmp_path / "absent.txt")
    with pytest.raises(CalibrationError, match=r"unsupported calibration file type '\.csv'"):
        load_texts(write(tmp_path / "d.csv", "text\nx\n"))


def test_plain_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not a Hugging Face dataset saved with save_to_disk"):
        load_texts(tmp_path)


def test_dataset_directory_without_datasets_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CalibrationError, match="pip install datasets"):
        load_texts(tmp_path)


def test_dataset_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    import pyarrow as pa  # a dependency of datasets

    def dataset(columns: Any) -> Any:
        # An explicit fingerprint skips datasets' dill hashing of the table, which is not under
        # test and breaks with some datasets/pyarrow/dill combinations.
        return datasets.Dataset(pa.table(columns), fingerprint="structprune-test")

    dataset({"text": ["one", "", "two"]}).save_to_disk(str(tmp_path / "plain"))
    assert load_texts(tmp_path / "plain") == ["one", "two"]
    alpaca = {"instruction": ["Greet."], "input": [""], "output": ["Hello."]}
    datasets.DatasetDict({"train": dataset(alpaca)}).save_to_disk(str(tmp_path / "dict"))
    assert load_texts(tmp_path / "dict") == [ALPACA_TEMPLATE_NO_INPUT.format(instruction="Greet.", output="Hello.")]
    dataset({"body": ["x"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(CalibrationError, match="row 0: no 'text' field") as info:
        load_texts(tmp_path / "bad")
    assert info.value.line == 0
    two = datasets.DatasetDict({"a": dataset({"text": ["x"]}), "b": dataset({"text": ["y"]})})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(CalibrationError, match=r"splits \['a', 'b'\] and no 'train' split"):
        load_texts(tmp_path / "two")


# ------------------------------------------------------------------------------ token stream


def test_stream_joins_documents_with_eos(tokenizer: Any) -> None:
    def ids(text: str) -> List[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    stream = token_stream(["alpha beta", "gamma", "delta"], tokenizer)
    assert stream.dtype == torch.int64 and stream.dim() == 1
    assert stream.tolist() == ids("alpha beta\n") + [eos] + ids("\ngamma\n") + [eos] + ids("\ndelta")
    assert token_stream(["solo"], tokenizer).tolist() == ids("solo")


def test_stream_equals_file_tokenized_as_one_string(tokenizer: Any) -> None:
    # The reference perplexities tokenized each text file as one string; the stream must be that.
    text = DEMO_CALIB.read_text(encoding="utf-8")
    whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert token_stream(load_texts(DEMO_CALIB), tokenizer).tolist() == whole


def test_stream_needs_documents_and_eos(tokenizer: Any) -> None:
    with pytest.raises(CalibrationError, match="no documents"):
        token_stream([], tokenizer)

    class NoEos:
        eos_token_id = None

    with pytest.raises(CalibrationError, match="no eos token"):
        token_stream(["x"], NoEos())  # type: ignore[arg-type]


def test_long_documents_do_not_warn(tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert tokenizer.model_max_length == 256  # the demo tokenizer's limit, far below a document
    with caplog.at_level("WARNING"):
        stream = token_stream(load_texts(DEMO_CALIB), tokenizer)
    assert stream.numel() > 10 * tokenizer.model_max_length
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]


# ------------------------------------------------------------------------------ windows


@pytest.fixture(scope="module")
def calib_texts() -> List[str]:
    return load_texts(DEMO_CALIB)


def test_defaults() -> None:
    """One default calibration size everywhere: the library, prune, sweep and the CLI's flags."""
    from structprune.cli import prune as prune_command
    from structprune.cli import sweep as sweep_command
    from structprune.prune import PruneOptions

    assert (DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, DEFAULT_SEED) == (128, 128, 0)
    assert PruneOptions(ratio=0.1).samples == DEFAULT_SAMPLES  # a sweep's runs are PruneOptions too
    for command in (prune_command, sweep_command):
        assert next(p.default for p in command.params if p.name == "samples") == DEFAULT_SAMPLES


def test_batch_shape_and_windows_come_from_the_stream(tokenizer: Any, calib_texts: List[str]) -> None:
    stream = token_stream(calib_texts, tokenizer)
    batch = calibration_batch(calib_texts, tokenizer, samples=16, seq_len=64, seed=3)
    assert batch.shape == (16, 64) and batch.dtype == torch.int64 and batch.is_contiguous()
    all_windows = stream.unfold(0, 64, 1)  # [len - 63, 64]: every window of the stream
    for row in batch:
        assert (all_windows == row).all(dim=1).any()
    assert calibration_batch(calib_texts, tokenizer).shape == (DEFAULT_SAMPLES, DEFAULT_SEQ_LEN)


def test_same_seed_same_batch_different_seed_different_batch(tokenizer: Any, calib_texts: List[str]) -> None:
    first = calibration_batch(calib_texts, tokenizer, samples=8, seq_len=32, seed=5)
    again = calibration_batch(calib_texts, tokenizer, samples=8, seq_len=32, seed=5)
    other = calibration_batch(calib_texts, tokenizer, samples=8, seq_len=32, seed=6)
    assert torch.equal(first, again)
    assert batch_sha256(first) == batch_sha256(again)
    assert not torch.equal(first, other)
    assert batch_sha256(first) != batch_sha256(other)


def test_windows_are_seeded_numpy_offsets() -> None:
    import numpy as np

    stream = torch.arange(1000)
    batch = sample_windows(stream, samples=5, seq_len=10, seed=42)
    starts = np.random.default_rng(42).integers(0, 990, size=5)
    assert batch.tolist() == [list(range(s, s + 10)) for s in starts]


def test_too_short_stream() -> None:
    with pytest.raises(CalibrationError, match="has 8 tokens; 8-token windows need at least 9"):
        sample_windows(torch.arange(8), samples=2, seq_len=8, seed=0)
    # seq_len + 1 tokens is enough: the only start drawn is 0.
    assert sample_windows(torch.arange(9), samples=3, seq_len=8, seed=0).tolist() == [list(range(8))] * 3


def test_too_short_text(tokenizer: Any) -> None:
    with pytest.raises(CalibrationError, match="128-token windows need at least 129"):
        calibration_batch(["a few words"], tokenizer, samples=4, seq_len=128, seed=0)


@pytest.mark.parametrize("kwargs", [{"samples": 0}, {"seq_len": 0}, {"samples": 2.5}, {"seed": -1}])
def test_bad_sizes(kwargs: Any) -> None:
    with pytest.raises(CalibrationError):
        sample_windows(torch.arange(100), **{"samples": 2, "seq_len": 8, "seed": 0, **kwargs})


# ------------------------------------------------------------------------------ summary


def test_load_calibration_and_summary(tokenizer: Any, calib_texts: List[str]) -> None:
    batch, summary = load_calibration(DEMO_CALIB, tokenizer, samples=4, seq_len=16, seed=1)
    assert torch.equal(batch, calibration_batch(calib_texts, tokenizer, samples=4, seq_len=16, seed=1))
    assert summary == CalibrationSummary(
        source=str(DEMO_CALIB),
        samples=4,
        seq_len=16,
        seed=1,
        stream_tokens=token_stream(calib_texts, tokenizer).numel(),
        sha256=batch_sha256(batch),
    )
    data = json.loads(json.dumps(summary.to_dict()))
    assert CalibrationSummary.from_dict(data) == summary


def test_batch_hash_depends_on_values_only() -> None:
    batch = torch.arange(12).view(3, 4)
    assert batch_sha256(batch) == batch_sha256(batch.to(torch.int32)) == batch_sha256(batch.t().contiguous().t())
    assert len(batch_sha256(batch)) == 64
    assert batch_sha256(batch) != batch_sha256(batch.view(4, 3).t())
