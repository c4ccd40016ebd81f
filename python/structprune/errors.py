"""The exception hierarchy. The Rust core raises these same classes (it looks them up here), so
``except StructpruneError`` catches every failure structprune reports on purpose.

Each exception carries ``path`` (the file or directory at fault) and ``tensor`` (the tensor's name)
when they apply, else ``None``.
"""

from __future__ import annotations

from typing import Optional


class StructpruneError(Exception):
    """Base class of every error structprune raises on purpose."""

    path: Optional[str] = None
    tensor: Optional[str] = None


class CheckpointError(StructpruneError, ValueError):
    """The input checkpoint is malformed."""


class HeaderError(CheckpointError):
    """A safetensors file's header is invalid or does not match the file."""


class ShardIndexError(CheckpointError):
    """The shard index and the shards disagree, or a shard is missing."""


class PlanError(StructpruneError, ValueError):
    """A cut plan is malformed or does not fit the checkpoint. ``field`` is the JSON path of the
    plan field at fault (``tensors["model.layers.0.mlp.up_proj.weight"].keep["00"]``) for errors
    found while reading the plan, else ``None``."""

    field: Optional[str] = None


class ConfigError(StructpruneError, ValueError):
    """config.json is missing or cannot be edited as the plan asks."""


class OutputError(StructpruneError):
    """The output path cannot be used."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and overwriting was not asked for."""


class SettingError(StructpruneError, ValueError):
    """An option's value is out of its range, unknown, or does not go with another option (a memory
    budget past the cap, an unknown estimator, CUDA asked for where there is none); the message names
    the option as the API and the command line spell it, and ``option`` holds the command line's
    spelling (``--importance``) when there is one. The CLI exits with status 2 for it, as for any
    other usage error, before any work is done."""

    option: Optional[str] = None

    def __init__(self, message: str, *, option: Optional[str] = None) -> None:
        super().__init__(message)
        self.option = option


class GraphError(StructpruneError, ValueError):
    """A traced graph is malformed, or a model cannot be traced."""


class TraceError(StructpruneError, RuntimeError):
    """The model could not be traced or its graph cannot be written as the IR."""


class StreamingError(StructpruneError, RuntimeError):
    """The model cannot be run block by block."""


class StructpruneIOError(StructpruneError, OSError):
    """Reading or writing a file failed."""


class CalibrationError(StructpruneError, ValueError):
    """Calibration or evaluation text is malformed, empty, or too short for the windows asked for.

    ``line`` is the 1-based line (JSON Lines) or the 0-based row index (datasets) at fault, when
    there is one.
    """

    line: Optional[int] = None


class ModelLoadError(StructpruneError, ValueError):
    """A directory cannot be loaded as a model (no config or weights, weights missing or of the
    wrong shape), or not onto the device or in the dtype asked for."""


class MissingDependencyError(StructpruneError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


class EvaluationError(StructpruneError, ValueError):
    """An evaluation cannot run as asked (e.g. an unknown zero-shot task or its data not local)."""


class RecoveryError(StructpruneError, ValueError):
    """LoRA recovery cannot run as asked: an option value, the device, or a saved state to resume
    that belongs to another run."""


class DistributedError(StructpruneError, RuntimeError):
    """Scoring cannot be split over the processes torchrun started (environment, devices, samples)."""


class ResumeError(StructpruneError, ValueError):
    """A resume directory holds state of a different scoring run, or state that cannot be read."""


__all__ = [
    "StructpruneError",
    "CheckpointError",
    "HeaderError",
    "ShardIndexError",
    "PlanError",
    "ConfigError",
    "OutputError",
    "OutputExistsError",
    "GraphError",
    "TraceError",
    "StreamingError",
    "SettingError",
    "StructpruneIOError",
    "CalibrationError",
    "ModelLoadError",
    "MissingDependencyError",
    "EvaluationError",
    "RecoveryError",
    "DistributedError",
    "ResumeError",
]
