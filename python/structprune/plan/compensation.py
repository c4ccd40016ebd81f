"""FLAP's bias compensation: a removed input channel of a linear layer is replaced by its mean over
the calibration tokens, a constant that the layer's bias absorbs.

For a layer ``y = W x + b`` whose input channels ``R`` are removed (o_proj: the channels of the
removed attention heads; down_proj: the removed MLP channels),
``b' = b + Σ_{j∈R} W[:, j] · mean(x_j)`` makes the pruned layer compute exactly what the dense layer
computes with ``x_j`` held at its mean (An et al., 2024). The plan carries the new biases:

* a layer that has a bias gets new values for it (``replace``: GPT-2, OPT, GPT-NeoX…);
* a layer without one gets it added (``add``), together with the config switch that makes the
  stock model class build it (``attention_bias``, ``mlp_bias``) and zero biases for every other
  projection the switch gives one (q/k/v, gate/up), so the output stays a stock checkpoint;
* a model whose stock config cannot give the layer a bias (Mistral, Qwen2's o_proj…) is refused,
  naming the model type and the tensor.

Removed hidden channels are not compensated: they also pass through normalisations, where a
constant does not stand in for them. The DeciLM layout is refused (use ``--format layers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Union

import numpy as np
import torch

from structprune.io.checkpoint import Checkpoint, read_checkpoint, read_config
from structprune.io.dtypes import SAFETENSORS_DTYPES
from structprune.models.meta import meta_model_of
from structprune.plan.cuts import Selection, merge_patch, output_name, removed_indices, verify_config
from structprune.errors import PlanError
from structprune.tracing.graph import StructureGraph
from structprune.plan.cut_plan import AddedTensor, CutPlan, Indices, TensorCut, Values
from structprune.score.scorer import InputMean
from structprune.tracing.export import checkpoint_name_map

# Config keys known to do nothing but give projections a bias (Llama, Qwen3, Gemma, Granite…).
BIAS_SWITCHES = ("attention_bias", "mlp_bias")
# The dtypes a plan can give values in.
VALUE_DTYPES = ("F16", "BF16", "F32", "F64")
HIDDEN_REFUSAL = (
    "bias compensation replaces removed attention heads and MLP channels by their means; removed hidden "
    "channels also pass through normalisations, where a constant does not stand in for them: leave 'hidden' "
    "out of the structures"
)
DECILM_REFUSAL = "structprune does not write biases in the DeciLM layout: use --format layers (or stock) with bias compensation"


@dataclass(frozen=True)
class _Correction:
    """What compensating one layer adds to its bias, over the layer's kept outputs."""

    bias: str
    """Model name of the layer's bias (in the input model)."""
    delta: np.ndarray


def compensate_biases(
    model_dir: Union[str, "PathLike[str]"],
    graph: StructureGraph,
    selection: Selection,
    plan: CutPlan,
    means: Mapping[str, InputMean],
) -> None:
    """Adds to ``plan`` (``checkpoint_cut_plan`` of ``selection``) the biases that replace every
    removed input channel of a linear layer by its mean in ``means`` (``Scores.input_means``), and
    the config switches they need; the edited plan is verified like any cut."""
    model_dir = Path(model_dir)
    config = read_config(model_dir) or {}
    _refuse_unexpressible(graph, selection, plan, means)
    checkpoint = read_checkpoint(model_dir)
    to_model = checkpoint_name_map(model_dir, list(checkpoint.tensors))
    stored = {model: name for name, model in to_model.items()}
    dropped = set(selection.blocks)
    corrections = _corrections(checkpoint, graph, selection, plan, means, stored)
    missing: Dict[str, _Correction] = {}
    for correction in corrections:
        bias = stored.get(correction.bias)
        if bias is None:
            missing[output_name(graph, correction.bias, dropped)] = correction
        else:
            _replace_bias(checkpoint, plan, bias, correction.delta)
    added = _add_biases(checkpoint, graph, plan, config, to_model, missing, dropped) if missing else {}
    verify_config(graph, config, plan, {**to_model, **added}, dropped)
    plan.metadata["bias_compensation"] = {
        "layers": len(corrections),
        "added_tensors": len(added),
        "config": sorted(k for k in BIAS_SWITCHES if k in plan.config),
    }


def _refuse_unexpressible(graph: StructureGraph, selection: Selection, plan: CutPlan, means: Mapping[str, InputMean]) -> None:
    if plan.metadata.get("format") == "decilm":
        raise PlanError(DECILM_REFUSAL)
    if any(selection.units.get(s.id) for s in graph.by_kind("hidden")):
        raise PlanError(HIDDEN_REFUSAL)
    if not means:
        raise PlanError("bias compensation needs the mean inputs of the layers, recorded while scoring (score(..., record_means=True))")


def _corrections(
    checkpoint: Checkpoint,
    graph: StructureGraph,
    selection: Selection,
    plan: CutPlan,
    means: Mapping[str, InputMean],
    stored: Mapping[str, str],
) -> List[_Correction]:
    """One correction per layer of a kept block whose recorded inputs lose channels."""
    corrections = []
    removed = removed_indices(graph, selection)
    for param, dims in sorted(removed.items()):
        mean = means.get(param)
        if mean is None or mean.input_dim not in dims:
            continue  # not the consuming side of a linear layer (q/k/v, gate/up, norms, biases)
        weight = stored.get(param)
        if weight is None:
            raise PlanError(f"the checkpoint has no tensor for the weight '{param}' whose inputs are compensated")
        if plan.tensors.get(weight, TensorCut()).drop:
            continue
        if not param.endswith(".weight"):
            raise PlanError(f"cannot name the bias of '{param}': bias compensation needs a linear layer's '.weight'")
        gone = np.array(sorted(dims[mean.input_dim]), dtype=np.int64)
        # Only the removed columns go to float64: a whole 70B down_proj would be 1.9 GB there.
        removed_columns = _read(checkpoint, weight).index_select(mean.input_dim, torch.from_numpy(gone)).double()
        # Over the output dimension (the one that is not the input's): Σ_j W[:, j] · mean_j.
        delta = torch.tensordot(torch.from_numpy(mean.mean[gone]).double(), removed_columns, dims=([0], [mean.input_dim])).numpy()
        kept = _kept(plan, weight, 1 - mean.input_dim)
        corrections.append(_Correction(param[: -len("weight")] + "bias", delta if kept is None else delta[kept]))
    if removed and not corrections:
        raise PlanError("bias compensation found no linear layer with recorded input means among those that lose input channels")
    return corrections


def _replace_bias(checkpoint: Checkpoint, plan: CutPlan, bias: str, delta: np.ndarray) -> None:
    """The stored bias plus the correction, over its kept entries, as its new values."""
    kept = _kept(plan, bias, 0)
    current = _read(checkpoint, bias).double().numpy()
    current = current if kept is None else current[kept]
    if current.shape != delta.shape:
        raise PlanError(f"bias '{bias}' keeps {current.shape[0]} entries, its layer {delta.shape[0]} outputs")
    cut = plan.tensors.setdefault(bias, TensorCut())
    cut.replace = Values.of(_in_dtype(current + delta, checkpoint.tensors[bias].dtype, bias))


def _add_biases(
    checkpoint: Checkpoint,
    graph: StructureGraph,
    plan: CutPlan,
    config: Mapping[str, Any],
    to_model: Mapping[str, str],
    missing: Mapping[str, _Correction],
    dropped: Set[int],
) -> Dict[str, str]:
    """Turns on the config switches that give the layers in ``missing`` (output model name of the
    bias → its correction) a bias, and adds every bias the switches create: the corrections, zero
    elsewhere. Returns the added tensors' checkpoint names → model names."""
    model_type = config.get("model_type")
    base = merge_patch(dict(config), plan.config)
    before = set(_shapes(base))
    created: Set[str] = set()
    for key in BIAS_SWITCHES:
        # A config class without the key keeps it as a plain attribute, so nothing new is built.
        new = set(_shapes({**base, key: True})) - before
        if new & missing.keys():
            plan.config[key] = True
            created |= new
    uncovered = sorted(missing.keys() - created)
    if uncovered:
        raise PlanError(
            f"bias compensation needs a bias '{uncovered[0]}', which the stock {model_type} config cannot give "
            f"(none of {', '.join(BIAS_SWITCHES)} builds it)"
        )
    outputs = _output_weights(graph, plan, to_model, dropped)
    shapes = _shapes(merge_patch(dict(config), plan.config))
    added: Dict[str, str] = {}
    for model_name in sorted(set(shapes) - before):
        weight = outputs.get(model_name[: -len("bias")] + "weight") if model_name.endswith(".bias") else None
        if weight is None:
            raise PlanError(f"turning on {', '.join(k for k in BIAS_SWITCHES if k in plan.config)} also builds '{model_name}', which is no bias of a weight the output has")
        source, output = weight
        name = output[: -len("weight")] + "bias"
        dtype = checkpoint.tensors[source].dtype
        correction = missing.get(model_name)
        if correction is None:
            contents = Values(fill=0.0)
        elif correction.delta.shape != shapes[model_name]:
            raise PlanError(f"bias '{name}' is built with shape {list(shapes[model_name])}, its layer has {correction.delta.shape[0]} outputs")
        else:
            contents = Values.of(_in_dtype(correction.delta, dtype, name))
        plan.tensors[name] = TensorCut(add=AddedTensor(dtype=dtype, shape=shapes[model_name], contents=contents))
        added[name] = model_name
    return added


def _output_weights(graph: StructureGraph, plan: CutPlan, to_model: Mapping[str, str], dropped: Set[int]) -> Dict[str, Tuple[str, str]]:
    """Output model name of every tensor the plan keeps → (its checkpoint name, its output name)."""
    outputs = {}
    for name, model_name in to_model.items():
        cut = plan.tensors.get(name, TensorCut())
        if not cut.drop:
            outputs[output_name(graph, model_name, dropped)] = (name, cut.rename or name)
    return outputs


def _shapes(config: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in meta_model_of(config).state_dict().items()}


def _kept(plan: CutPlan, tensor: str, dim: int) -> Optional[np.ndarray]:
    """The indices the plan keeps along ``dim`` of ``tensor``, or ``None`` when it keeps them all."""
    indices: Optional[Indices] = plan.tensors.get(tensor, TensorCut()).keep.get(dim)
    if indices is None:
        return None
    return np.asarray(plan.index_sets[indices] if isinstance(indices, str) else indices, dtype=np.int64)


def _read(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(checkpoint.path / checkpoint.tensors[name].file, framework="pt") as shard:
        return shard.get_tensor(name)


def _in_dtype(values: np.ndarray, dtype: str, tensor: str) -> List[float]:
    """``values`` rounded once to ``dtype``, as the floats the engine writes back exactly."""
    if dtype not in VALUE_DTYPES:
        raise PlanError(f"cannot write bias '{tensor}' in {dtype}: plans give values in {', '.join(VALUE_DTYPES)}")
    return torch.from_numpy(np.ascontiguousarray(values)).to(SAFETENSORS_DTYPES[dtype]).double().tolist()
