"""Shared fixtures for the structprune test suite.

The checkpoint reading/writing helpers live in `ckpt.py` next to this file (so test modules can
import them by name); this conftest makes that import work under any pytest import mode and
provides the fixtures built on top of them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

from ckpt import BASE_CONFIG, TOKENIZER_BYTES, CheckpointFactory, TensorLike, write_checkpoint  # noqa: E402

# The property tests do real file I/O per example and wall time varies with disk speed, so no
# per-example deadline. Example counts are set per test (scaled by STRUCTPRUNE_EXAMPLE_SCALE for
# a longer soak run, see ckpt.examples).
settings.register_profile(
    "structprune",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("structprune")


@pytest.fixture
def small_tensors() -> dict[str, np.ndarray]:
    """A handful of small tensors with distinct dtypes and ranks."""
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.standard_normal((10, 8)).astype(np.float32),
        "layers.0.up.weight": rng.standard_normal((6, 8)).astype(np.float32),
        "layers.0.down.weight": rng.standard_normal((8, 6)).astype(np.float16),
        "layers.0.norm.weight": np.ones(8, dtype=np.float32),
        "layers.1.up.weight": rng.integers(-100, 100, (6, 8), dtype=np.int32),
        "step": np.array(7, dtype=np.int64),
    }


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> CheckpointFactory:
    """Factory writing a checkpoint dir (config.json + tokenizer.json included by default)."""

    def factory(
        tensors: Mapping[str, TensorLike],
        name: str = "model",
        *,
        config: Mapping[str, Any] | None = BASE_CONFIG,
        extra_files: Mapping[str, bytes] | None = None,
        **kwargs: Any,
    ) -> Path:
        extras = {"tokenizer.json": TOKENIZER_BYTES} if extra_files is None else extra_files
        return write_checkpoint(tmp_path / name, tensors, config=config, extra_files=extras, **kwargs)

    return factory


DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo" / "model"


@pytest.fixture(autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own $XDG_CACHE_HOME: `inspect` caches traces and `--resume` keeps state
    there, and a test must neither read nor write the user's cache."""
    cache_home = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home


@pytest.fixture(scope="session")
def demo_graph() -> Any:
    """The bundled demo model's structure graph (traced on the meta device, no weights read)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import structprune

    return structprune.trace(DEMO_MODEL)


@pytest.fixture(scope="session")
def demo_weights() -> Any:
    """The bundled demo model's tensors by checkpoint name (torch tensors)."""
    pytest.importorskip("torch")
    from safetensors.torch import load_file

    return load_file(DEMO_MODEL / "model.safetensors")
