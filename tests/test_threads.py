"""torch's thread count: OMP_NUM_THREADS when the user set it, else the usable CPUs, whatever the
load (the count changes the output's bytes); `--threads` of the model-running commands overrides both."""

from __future__ import annotations

from typing import Iterator

import pytest
from click.testing import CliRunner
from conftest import DEMO_MODEL
from structprune.cli import main
from structprune.io import threads

torch = pytest.importorskip("torch")


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 4)


@pytest.fixture
def restored_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("load", [0.0, 1.2, 12.0])
def test_the_default_does_not_follow_the_load(four_cpus: None, monkeypatch: pytest.MonkeyPatch, load: float) -> None:
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    assert threads.default_torch_threads() == 4


def test_omp_num_threads_is_the_users_word(four_cpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_torch_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a count: ignored
    assert threads.default_torch_threads() == 4


def test_threads_option_sets_torch_threads(restored_torch_threads: None) -> None:
    torch.set_num_threads(2)
    result = CliRunner().invoke(main, ["eval", str(DEMO_MODEL), "--no-timing", "--threads", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
