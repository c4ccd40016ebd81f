"""structprune: structured pruning of LLM checkpoints into smaller standard checkpoints.

Importing the package stays light (no torch): the shard engine and the CLI's ``info``/``apply`` run
in a few megabytes of Python (``apply``'s shape check imports torch when it runs; see
``structprune.models.shape_check``).
"""

from typing import Any

from structprune._core import __version__
from structprune.apply import ApplyReport, PlannedOutput, apply_plan, check_output, plan_output
from structprune.io.checkpoint import Checkpoint, TensorInfo, read_checkpoint
from structprune.errors import (
    CheckpointError,
    ConfigError,
    GraphError,
    HeaderError,
    OutputError,
    OutputExistsError,
    PlanError,
    SettingError,
    ShardIndexError,
    StructpruneError,
    StructpruneIOError,
)
from structprune.tracing.graph import StructureGraph, trace
from structprune.plan.cut_plan import CutPlan, TensorCut


def __getattr__(name: str) -> Any:
    # These need torch and transformers: imported on first use, so `import structprune` stays light.
    if name == "load_pruned":
        from structprune.models.loading import load_pruned

        return load_pruned
    if name in ("sparsify", "SparsifyOptions"):
        from structprune.plan import sparsify

        return getattr(sparsify, name)
    raise AttributeError(f"module 'structprune' has no attribute {name!r}")


__all__ = [
    "__version__",
    "ApplyReport",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "GraphError",
    "CutPlan",
    "HeaderError",
    "OutputError",
    "OutputExistsError",
    "PlanError",
    "PlannedOutput",
    "SettingError",
    "SparsifyOptions",
    "ShardIndexError",
    "StructureGraph",
    "StructpruneError",
    "StructpruneIOError",
    "TensorCut",
    "TensorInfo",
    "apply_plan",
    "check_output",
    "load_pruned",
    "plan_output",
    "read_checkpoint",
    "sparsify",
    "trace",
]
