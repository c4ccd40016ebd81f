"""Does the output of a plan load? The check ``apply`` makes before any byte is written: the model
that the output's ``config.json`` (the input's, merged with the plan's patch) describes is built on
the meta device (no weights, no memory) and every tensor the plan writes must have the shape that
model gives it, and every weight the model needs must be written.

torch and transformers are imported only when the check runs, and only for a ``model_type`` that
the installed transformers (or structprune's own DeciLM classes) can build: ``apply`` with the
check off, or of an architecture transformers does not know, stays a few megabytes of Python.
The price is the import of torch and transformers (seconds, a few hundred MB of resident memory,
whatever the checkpoint's size) when the check runs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Sequence, Set, Tuple, Union

from structprune.models import formats
from structprune.io.checkpoint import TensorInfo, read_checkpoint, read_config
from structprune.errors import PlanError

PLAN_WITHOUT_FILE = "the plan"
"""How messages name a plan given as data rather than as a file."""
SKIP_HINT = "--no-shape-check (apply_plan(check_shapes=False)) writes it anyway"


@dataclass(frozen=True)
class ShapeCheck:
    """What the check found: ``checked`` is whether the output's shapes were compared with the
    model its config builds (``model`` names that class); ``note`` says what was compared, or why
    the check was skipped."""

    checked: bool
    note: str
    model: Optional[str] = None


def skipped(reason: str) -> ShapeCheck:
    return ShapeCheck(checked=False, note=f"shapes not checked: {reason}")


def check_output_shapes(model_dir: Path, plan_config: Mapping[str, Any], tensors: Sequence[TensorInfo], *, plan_name: str) -> ShapeCheck:
    """Compares the tensors a plan writes (``apply.plan_output``) with the model the output's
    config builds. Raises :class:`PlanError` (``path``: the plan file when there is one,
    ``tensor``: the first tensor that disagrees, in output order) when they disagree or the edited
    config builds no model; returns a skipped :class:`ShapeCheck` with the reason where the check
    cannot be made (no config, an architecture transformers does not know)."""
    source = read_config(Path(model_dir))
    if source is None:
        return skipped(f"{model_dir} has no config.json")
    from structprune.plan.cuts import merge_patch  # numpy only; torch comes with the model below

    edited = merge_patch(dict(source), plan_config)
    model_type = edited.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return skipped("the output's config.json names no model_type")
    unknown = _unbuildable(model_type)
    if unknown is not None:
        return skipped(unknown)
    model = _build(edited, source, plan_name)
    if isinstance(model, ShapeCheck):
        return model
    class_name = type(model).__name__
    layout = f" with per-layer widths ({formats.LAYERS_KEY})" if edited.get(formats.LAYERS_KEY) is not None else ""
    expected, aliases = _expected_shapes(model)
    from structprune.errors import TraceError
    from structprune.tracing.export import name_layout

    try:
        names_on_load = name_layout(model, [t.name for t in tensors])
        had_layout = name_layout(model, list(read_checkpoint(model_dir).tensors))
    except TraceError as err:
        return skipped(str(err))
    written: Set[str] = set()
    experts_written: Dict[Tuple[str, int], Set[int]] = {}
    for tensor in tensors:
        piece = names_on_load.experts.get(tensor.name)
        name = piece.param if piece is not None else names_on_load.renamed[tensor.name]
        written.add(name)
        want = expected.get(name)
        if piece is not None and want is not None:
            # One expert's slice of the stacked parameter; an expert number past the config's
            # count would be left out on load.
            if piece.expert >= want[0]:
                _refuse(plan_name, tensor.name, f"tensor '{tensor.name}' is expert {piece.expert}, but the output's config.json builds {want[0]} experts ({class_name})")
            want = (want[1] // piece.segments, *want[2:])
            experts_written.setdefault((name, piece.segment), set()).add(piece.expert)
        if want is not None and tuple(want) != tuple(tensor.shape):
            _refuse(
                plan_name, tensor.name,
                f"tensor '{tensor.name}' would be {list(tensor.shape)} but the output's config.json builds it as {list(want)} "
                f"({class_name}, model_type {model_type!r})",
            )
    for (name, segment), experts in sorted(experts_written.items()):
        count = expected[name][0]
        missing = sorted(set(range(count)) - experts)
        if missing:
            _refuse(plan_name, name, f"the output lacks expert {missing[0]} of '{name}' (part {segment + 1}), which its config.json's {count} experts need ({class_name})")
    # A weight the input lacks already is no fault of the plan (transformers reports it on load).
    had = set(had_layout.renamed.values()) | {piece.param for piece in had_layout.experts.values()}
    for name in aliases:
        if name in had and name not in written and not (aliases[name] & written):
            _refuse(plan_name, name, f"the output lacks tensor '{name}', which its config.json needs ({class_name}, model_type {model_type!r})")
    return ShapeCheck(checked=True, note=f"shapes agree with the output's config.json ({class_name}{layout})", model=class_name)


def _unbuildable(model_type: str) -> Optional[str]:
    """Why no model can be built for ``model_type`` without importing torch, or ``None``. Checked
    by looking for transformers' module of that model type on disk, so an architecture it does not
    know costs no torch import."""
    if model_type == formats.DECILM_MODEL_TYPE:
        return None  # structprune's own classes, what load_pruned builds
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return "transformers is not installed"
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "models" / model_type.replace("-", "_")).is_dir():
        return f"the installed transformers does not know model_type {model_type!r}"
    return None


def _build(edited: Dict[str, Any], source: Mapping[str, Any], plan_name: str) -> Union[Any, ShapeCheck]:
    """The model of the edited config on the meta device, a skipped check where transformers cannot
    build even the input's config (the check cannot be made), or a refusal where only the edited
    config fails to build."""
    from structprune.models.meta import meta_model_of

    try:
        return meta_model_of(edited)
    except Exception as err:  # noqa: BLE001 - config classes and model constructors raise many kinds
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
    try:
        meta_model_of(dict(source))
    except Exception as err:  # noqa: BLE001 - as above
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
        return skipped(f"transformers cannot build the input's own config: {first}")
    _refuse(plan_name, None, f"the output's config.json (the input's with the plan's config patch) builds no model: {reason}")


def _expected_shapes(model: Any) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Set[str]]]:
    """State-dict name → shape of every tensor the model loads (persistent buffers included), and
    for every parameter the other names of the same tensor (a tied head is stored once), empty
    for an untied one."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    by_tensor: Dict[int, List[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(parameter), []).append(name)
    aliases: Dict[str, Set[str]] = {}
    for names in by_tensor.values():
        for name in names:
            aliases[name] = set(names) - {name}
    return expected, aliases


def _refuse(plan_name: str, tensor: Optional[str], message: str) -> NoReturn:
    located = plan_name != PLAN_WITHOUT_FILE
    err = PlanError(f"{plan_name + ': ' if located else ''}the output would not load: {message}; {SKIP_HINT}")
    err.path = plan_name if located else None
    err.tensor = tensor
    raise err
