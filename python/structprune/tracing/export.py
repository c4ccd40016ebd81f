"""Trace a transformers model from its config alone and describe the traced graph as JSON data.

The model is built on the ``meta`` device (no weights are read or allocated) and exported with
``torch.export`` (non-strict, ATen "training" IR). The graph is then written as the
``structprune.traced-graph`` IR documented in ``docs/traced-graph.md``: parameters by their
state-dict names, every computation as an ATen op with its arguments and output shape, in
topological order. The Rust dependency-graph builder reads it to find which weight rows and
columns must be cut together.

Only the first ``traced_layers`` blocks of the repeated decoder/encoder stack are traced when all
blocks have the same structure; the IR records the stack's prefix and its full length so the
consumer replicates the last traced block over the rest. A 65B/70B config traces in about a second.

This module needs torch and transformers only (not the Rust core).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import operator
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from structprune.errors import TraceError
from structprune.models.meta import instantiate_on_meta, load_config, meta_model, model_class

FORMAT = "structprune.traced-graph"
VERSION = 1
SEQ_LEN = 7

# Ops that only check invariants: they have no data output and are never kept.
_ASSERT_OPS = frozenset(
    {
        "aten._assert_tensor_metadata.default",
        "aten._assert_scalar.default",
        "aten._assert_async.default",
        "aten._assert_async.msg",
        "aten.sym_constrain_range.default",
        "aten.sym_constrain_range_for_size.default",
        "aten._functional_assert_async.msg",
    }
)

# Higher-order ops that only wrap a subgraph in a context (grad mode, autocast): inlined.
_INLINED_HOPS = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast"})


@dataclass
class TracedGraph:
    """The traced graph (the IR of ``docs/traced-graph.md`` as Python data).

    ``nodes[i]`` is node ``i``; arguments refer to earlier nodes as ``{"node": i}``.
    """

    model: Dict[str, Any]
    layers: Optional[Dict[str, Any]]
    params: List[Dict[str, Any]]
    buffers: List[Dict[str, Any]]
    tied: Dict[str, str]
    nodes: List[Dict[str, Any]]
    outputs: List[int]
    version: int = VERSION
    format: str = field(default=FORMAT)

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "model": self.model,
            "layers": self.layers,
            "params": self.params,
            "buffers": self.buffers,
            "tied": self.tied,
            "nodes": self.nodes,
            "outputs": self.outputs,
        }

    def to_json(self) -> str:
        """Compact, deterministic JSON (no whitespace; the same model gives the same bytes)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False, ensure_ascii=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TracedGraph":
        if data.get("format") != FORMAT:
            raise TraceError(f"not a traced graph: format is {data.get('format')!r}")
        if data.get("version") != VERSION:
            raise TraceError(f"unsupported traced-graph version {data.get('version')!r}")
        return cls(
            model=data["model"],
            layers=data.get("layers"),
            params=data["params"],
            buffers=data.get("buffers", []),
            tied=data.get("tied", {}),
            nodes=data["nodes"],
            outputs=data["outputs"],
        )

    @classmethod
    def from_json(cls, text: str) -> "TracedGraph":
        return cls.from_dict(json.loads(text))

    # -- queries -------------------------------------------------------------------------------

    def op_counts(self) -> Dict[str, int]:
        """How many nodes of each ``op`` (``param``, ``input``, ``aten.linear.default``, ...)."""
        return dict(sorted(Counter(n["op"] for n in self.nodes).items()))

    def aten_ops(self) -> List[str]:
        """The distinct computational ops (ATen ops and ``getitem``), sorted."""
        leaf = {"param", "buffer", "input", "constant"}
        return sorted({n["op"] for n in self.nodes if n["op"] not in leaf})

    def expand_name(self, name: str) -> List[str]:
        """The full model's names that ``name`` stands for: a name in the last traced layer stands
        for itself and for the same name in every untraced layer; any other name for itself."""
        if not self.layers or self.layers["traced"] >= self.layers["total"]:
            return [name]
        prefix, last = self.layers["prefix"] + ".", self.layers["traced"] - 1
        head = f"{prefix}{last}."
        if not name.startswith(head):
            return [name]
        rest = name[len(head):]
        return [name] + [f"{prefix}{i}.{rest}" for i in range(last + 1, self.layers["total"])]

    def expanded_param_names(self) -> List[str]:
        """Every (non-alias) parameter name of the full, untruncated model."""
        return [full for p in self.params for full in self.expand_name(p["name"])]

    def expanded_tied(self) -> Dict[str, str]:
        """``tied`` for the full model."""
        out: Dict[str, str] = {}
        for alias, target in self.tied.items():
            for a, t in zip(self.expand_name(alias), self.expand_name(target)):
                out[a] = t
        return out


# ----------------------------------------------------------------------------------------------
# entry points


def trace_model(source: Any, *, traced_layers: int = 2) -> TracedGraph:
    """Trace the model described by ``source`` (a model directory or its ``config.json``, or a
    ``transformers.PretrainedConfig``) on the meta device and return its graph.

    Only the first ``traced_layers`` (>= 1) blocks of the repeated layer stack are traced when all
    blocks have identical parameter shapes; otherwise every block is traced.
    """
    import torch

    if traced_layers < 1:
        raise ValueError("traced_layers must be at least 1")
    config = load_config(source)
    model_cls = model_class(config)

    full, attn = instantiate_on_meta(model_cls, config, None)
    n_total = _num_layers(config)
    prefix = _find_layer_stack(full, n_total)
    layers: Optional[Dict[str, Any]] = None
    model = full
    if prefix is not None and n_total is not None:
        k = min(n_total, traced_layers)
        if k < n_total and _homogeneous(full, prefix, n_total):
            small_cfg = _truncated_config(config, n_total, k)
            small, attn_small = instantiate_on_meta(model_cls, small_cfg, attn)
            if _truncation_ok(full, small, prefix, n_total, k):
                model, attn = small, attn_small
            else:
                k = n_total
        else:
            k = n_total
        layers = {"prefix": prefix, "traced": k, "total": n_total}
    if model is not full:
        del full

    model.eval()
    meta = {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "attn_implementation": attn,
        "traced_dtype": "float32",
        "config_dtype": _dtype_name(_config_dtype(config)),
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": _transformers_version()},
    }
    _trace_experts_as_gathers(model)
    ep = _export(model)
    return _to_ir(ep, model, meta, layers)


def _trace_experts_as_gathers(model: Any) -> None:
    """Routed experts computed as ``gate_up_proj[top_k_index]`` and batched matrix products
    (transformers' ``batched_mm`` experts implementation) rather than by its default grouped-GEMM
    custom op: the gather by the router's top-k indices is what shows the graph builder which
    dimension of the stacked expert weights is the router's experts, and plain ATen ops have rules
    where the custom op has none. Same weights, same arithmetic; only the traced kernels differ."""
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if can_set is not None and can_set():
        model.set_experts_implementation("batched_mm")


def trace_to_file(source: Any, path: Union[str, "os.PathLike[str]"], *, traced_layers: int = 2) -> TracedGraph:
    """``trace_model`` and write its JSON to ``path`` (returns the graph)."""
    graph = trace_model(source, traced_layers=traced_layers)
    Path(path).write_text(graph.to_json(), encoding="utf-8")
    return graph


# ----------------------------------------------------------------------------------------------
# building the model


def _num_layers(config) -> Optional[int]:
    try:
        n = config.num_hidden_layers
    except AttributeError:
        return None
    return n if isinstance(n, int) and n > 0 else None


def _find_layer_stack(model, n: Optional[int]) -> Optional[str]:
    """The qualified name of the ``nn.ModuleList`` holding the ``n`` repeated blocks, if exactly
    one such list exists."""
    import torch

    if n is None:
        return None
    found = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name
        and any(True for _ in mod.parameters())
    ]
    # Nested lists (a list inside a block) are not the stack: keep the outermost ones.
    outer = [a for a in found if not any(a != b and a.startswith(b + ".") for b in found)]
    return outer[0] if len(outer) == 1 else None


def _layer_signature(block) -> Tuple[Any, ...]:
    params = tuple((name, tuple(p.shape), str(p.dtype)) for name, p in block.named_parameters(remove_duplicate=False))
    bufs = tuple((name, tuple(b.shape), str(b.dtype)) for name, b in block.named_buffers(remove_duplicate=False))
    mods = tuple((name, type(m).__name__) for name, m in block.named_modules())
    return params, bufs, mods


def _homogeneous(model, prefix: str, n: int) -> bool:
    stack = model.get_submodule(prefix)
    first = _layer_signature(stack[0])
    return all(_layer_signature(stack[i]) == first for i in range(1, n))


def _truncated_config(config, n: int, k: int):
    cfg = copy.deepcopy(config)
    for key, value in list(vars(cfg).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and not key.startswith("_") and key != "architectures":
            setattr(cfg, key, type(value)(value[:k]))
    cfg.num_hidden_layers = k
    return cfg


def _non_persistent_buffers(model) -> set:
    out = set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for buf in getattr(mod, "_non_persistent_buffers_set", ()):
            out.add(f"{mod_name}.{buf}" if mod_name else buf)
    return out


def _state_table(model) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """State-dict name -> (shape, dtype): parameters (tied aliases included) and persistent
    buffers, i.e. what a checkpoint of the model can hold."""
    out = {name: (tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters(remove_duplicate=False)}
    skip = _non_persistent_buffers(model)
    out.update(
        {name: (tuple(b.shape), str(b.dtype)) for name, b in model.named_buffers(remove_duplicate=False) if name not in skip}
    )
    return out


def _truncation_ok(full, small, prefix: str, n: int, k: int) -> bool:
    """The truncated model's state dict is the full model's minus layers k..n-1, name for name and
    shape for shape (non-persistent buffers, e.g. rotary tables, may differ: they are not weights)."""
    try:
        stack = small.get_submodule(prefix)
    except AttributeError:
        return False
    if len(stack) != k:
        return False
    ft, st = _state_table(full), _state_table(small)
    head = prefix + "."

    def outside(table):
        return {name: v for name, v in table.items() if not name.startswith(head)}

    def layer(table, i):
        h = f"{head}{i}."
        return {name[len(h):]: v for name, v in table.items() if name.startswith(h)}

    if outside(ft) != outside(st):
        return False
    return all(layer(st, i) == layer(ft, i) for i in range(k))


def _config_dtype(config):
    for key in ("dtype", "torch_dtype"):
        value = config.__dict__.get(key)
        if value is not None:
            return value
    return None


def _dtype_name(dtype) -> Optional[str]:
    if dtype is None:
        return None
    return str(dtype).replace("torch.", "")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# ----------------------------------------------------------------------------------------------
# export


def _export(model):
    import torch

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: Dict[str, Any] = {"input_ids": torch.zeros((1, SEQ_LEN), dtype=torch.long, device="meta")}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    if "return_dict" in params:
        kwargs["return_dict"] = True
    # no_grad: HF wraps rotary embeddings in torch.no_grad(), which export would otherwise record
    # as a wrap_with_set_grad_enabled higher-order op around a submodule.
    try:
        with torch.no_grad():
            return torch.export.export(model, (), kwargs, strict=False)
    except Exception as err:  # noqa: BLE001 - export raises many kinds
        raise TraceError(f"torch.export failed for {type(model).__name__}: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------------
# the IR


def _tensor_meta(val: Any) -> Optional[Tuple[List[int], Optional[str]]]:
    import torch

    if isinstance(val, torch.Tensor):
        return [int(s) for s in val.shape], _dtype_name(val.dtype)
    return None


def _small_value(t) -> Any:
    """The values of a small real (not meta/fake) tensor as nested lists, else None."""
    import torch

    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() > 64:
        return None
    try:
        data = t.detach().cpu().tolist()
    except Exception:  # noqa: BLE001 - fake or otherwise unreadable tensors
        return None

    def enc(x):
        if isinstance(x, list):
            return [enc(v) for v in x]
        return _encode_float(x) if isinstance(x, float) else x

    return enc(data)


def _encode_float(x: float) -> Any:
    if math.isfinite(x):
        return x
    return {"float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


class _Builder:
    """Turns FX graphs into IR nodes. ``env`` maps each FX node to its value: ``("ref", i)`` (IR
    node i), ``("tuple", [values])`` (the outputs of an inlined subgraph, resolved by getitem) or
    ``("py", x)`` (a Python constant, e.g. a non-tensor user input or a subgraph module)."""

    def __init__(self) -> None:
        self.nodes: List[Dict[str, Any]] = []
        self.param_index: Dict[str, int] = {}

    def emit(self, node: Dict[str, Any]) -> Tuple[str, int]:
        self.nodes.append(node)
        return ("ref", len(self.nodes) - 1)

    def encode(self, arg, env) -> Any:
        import torch
        import torch.fx

        if isinstance(arg, torch.fx.Node):
            return self.encode_value(env[arg])
        if isinstance(arg, (list, tuple)):
            return [self.encode(a, env) for a in arg]
        if isinstance(arg, dict):
            return {str(k): self.encode(v, env) for k, v in arg.items()}
        return self.encode_const(arg)

    def encode_value(self, value) -> Any:
        kind, payload = value
        if kind == "ref":
            return {"node": payload}
        if kind == "tuple":
            return [self.encode_value(v) for v in payload]
        return self.encode_const(payload)

    def encode_const(self, x) -> Any:
        import torch

        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            return _encode_float(x)
        if isinstance(x, (torch.dtype, torch.layout, torch.memory_format)):
            return str(x)
        if isinstance(x, torch.device):
            return str(x)
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise TraceError(f"symbolic value {x} in a static-shape trace")
        if isinstance(x, (list, tuple)):
            return [self.encode_const(v) for v in x]
        if isinstance(x, torch.Tensor):
            raise TraceError("an unlifted tensor constant appears as an argument")
        raise TraceError(f"cannot encode argument of type {type(x).__name__}: {x!r}")

    def with_meta(self, entry: Dict[str, Any], val) -> Dict[str, Any]:
        tm = _tensor_meta(val)
        if tm is not None:
            entry["shape"], entry["dtype"] = tm
        elif isinstance(val, (list, tuple)) and val and all(_tensor_meta(v) is not None for v in val):
            metas = [meta for meta in map(_tensor_meta, val) if meta is not None]
            entry["shapes"] = [m[0] for m in metas]
            entry["dtypes"] = [m[1] for m in metas]
        elif isinstance(val, (bool, int, float)):
            entry["value"] = _encode_float(val) if isinstance(val, float) else val
        return entry

    def run_graph(self, graph, env, inputs: Optional[List[Any]] = None):
        """Converts ``graph``'s call nodes into IR nodes (placeholders are already in ``env``, or
        bound to ``inputs`` for an inlined subgraph). Returns the output value."""
        import torch.fx

        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if inputs is not None:
            if len(inputs) != len(placeholders):
                raise TraceError("inlined subgraph arity mismatch")
            for ph, v in zip(placeholders, inputs):
                env[ph] = v
        owner = graph.owning_module
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                return self.value_of(node.args[0], env)
            if node.op == "get_attr":
                target = _resolve_attr(owner, node.target)
                if isinstance(target, torch.fx.GraphModule):
                    env[node] = ("py", target)
                else:
                    env[node] = self.emit(self.with_meta({"op": "constant", "name": str(node.target)}, node.meta.get("val")))
                continue
            if node.op != "call_function":
                raise TraceError(f"unexpected FX node {node.op} {node.target}")
            self.call(node, env)
        raise TraceError("graph without output")

    def value_of(self, arg, env):
        import torch.fx

        if isinstance(arg, torch.fx.Node):
            return env[arg]
        if isinstance(arg, (list, tuple)):
            return ("tuple", [self.value_of(a, env) for a in arg])
        return ("py", arg)

    def call(self, node, env) -> None:
        target = node.target
        op = str(target)
        if op in _ASSERT_OPS:
            return
        if target is operator.getitem:
            src, k = node.args
            value = env[src]
            if value[0] == "tuple":
                env[node] = value[1][k]
            elif value[0] == "ref":
                item = {"op": "getitem", "args": [{"node": value[1]}, int(k)]}
                env[node] = self.emit(self.with_meta(item, node.meta.get("val")))
            else:
                env[node] = ("py", value[1][k])
            return
        hop_name = getattr(target, "_name", None) if not hasattr(target, "_schema") else None
        if hop_name in _INLINED_HOPS:
            args = list(node.args)
            idx = next(
                (i for i, a in enumerate(args) if _is_graph_module_value(a, env)),
                None,
            )
            if idx is None:
                raise TraceError(f"{hop_name} without a subgraph")
            sub = env[args[idx]][1]
            inputs = [self.value_of(a, env) for a in args[idx + 1:]]
            env[node] = self.run_graph(sub.graph, env, inputs)
            return
        if not hasattr(target, "_schema"):
            raise TraceError(f"unsupported op in traced graph: {op} (node {node.name})")
        entry: Dict[str, Any] = {"op": op, "args": self.encode(list(node.args), env)}
        if node.kwargs:
            entry["kwargs"] = self.encode(dict(node.kwargs), env)
        env[node] = self.emit(self.with_meta(entry, node.meta.get("val")))
        # An in-place op (add_, index_put_, ...) writes into an input: later readers of that input
        # read this node instead, so the IR is pure data flow.
        written = _written_input(node)
        if written is not None:
            env[written] = env[node]


def _resolve_attr(owner, target: str):
    obj = owner
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_graph_module_value(arg, env) -> bool:
    import torch.fx

    return isinstance(arg, torch.fx.Node) and env.get(arg, ("", None))[0] == "py" and isinstance(
        env[arg][1], torch.fx.GraphModule
    )


def _refs(x, out: List[int]) -> None:
    if isinstance(x, dict):
        if len(x) == 1 and "node" in x and isinstance(x["node"], int):
            out.append(x["node"])
        else:
            for v in x.values():
                _refs(v, out)
    elif isinstance(x, list):
        for v in x:
            _refs(v, out)


def _renumber(x, mapping: Dict[int, int]):
    if isinstance(x, dict):
        if len(x) == 1 and "node" in x and isinstance(x["node"], int):
            return {"node": mapping[x["node"]]}
        return {k: _renumber(v, mapping) for k, v in x.items()}
    if isinstance(x, list):
        return [_renumber(v, mapping) for v in x]
    return x


def _schema_of(op: str):
    import torch

    try:
        ns, rest = op.split(".", 1)
        name, overload = rest.rsplit(".", 1)
        return getattr(getattr(getattr(torch.ops, ns), name), overload)._schema
    except (AttributeError, ValueError):
        return None


def _mutated_arg(op: str) -> bool:
    """Whether an ATen op writes into one of its inputs (an in-place/out op)."""
    schema = _schema_of(op)
    if schema is None:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _written_input(node):
    """The FX node an in-place op writes into, if any."""
    import torch.fx

    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            arg = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            return arg if isinstance(arg, torch.fx.Node) else None
    return None


def _tied_groups(model) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(name -> canonical name for every parameter, alias -> canonical for tied ones).

    The canonical name of a group of tied parameters is the one the checkpoint stores: not a key of
    transformers' tied-weights map, first in registration order otherwise."""
    by_id: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    hf_aliases = set()
    for attr in ("all_tied_weights_keys", "_tied_weights_keys"):
        tk = getattr(model, attr, None)
        if isinstance(tk, dict):
            hf_aliases |= set(tk)
            break
    canon: Dict[str, str] = {}
    tied: Dict[str, str] = {}
    for names in by_id.values():
        main = next((n for n in names if n not in hf_aliases), names[0])
        for n in names:
            canon[n] = main
            if n != main:
                tied[n] = main
    return canon, dict(sorted(tied.items()))


def _to_ir(ep, model, meta: Dict[str, Any], layers: Optional[Dict[str, Any]]) -> TracedGraph:
    from torch.export.graph_signature import InputKind

    canon, tied = _tied_groups(model)
    b = _Builder()

    params = []
    for name, p in model.named_parameters():  # unique parameters, canonical names, model order
        shape, dtype = [int(s) for s in p.shape], _dtype_name(p.dtype)
        params.append({"name": name, "shape": shape, "dtype": dtype})
        b.param_index[name] = len(b.nodes)
        b.nodes.append({"op": "param", "name": name, "shape": shape, "dtype": dtype})
    n_params = len(b.nodes)

    non_persistent = _non_persistent_buffers(model)
    buffers = [
        {"name": name, "shape": [int(s) for s in t.shape], "dtype": _dtype_name(t.dtype), "persistent": name not in non_persistent}
        for name, t in model.named_buffers()
    ]

    env: Dict[Any, Any] = {}
    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs if hasattr(spec.arg, "name")}
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = specs.get(node.name)
        if spec is None:
            raise TraceError(f"placeholder {node.name} not in the graph signature")
        val = node.meta.get("val")
        if spec.kind == InputKind.PARAMETER:
            name = canon.get(spec.target, spec.target)
            if name not in b.param_index:
                raise TraceError(f"exported parameter {spec.target} is not a model parameter")
            env[node] = ("ref", b.param_index[name])
        elif spec.kind == InputKind.BUFFER:
            env[node] = b.emit(b.with_meta({"op": "buffer", "name": spec.target}, val))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            entry = b.with_meta({"op": "constant", "name": spec.target}, val)
            known = _small_value(ep.constants.get(spec.target))
            if known is not None:
                entry["value"] = known
            env[node] = b.emit(entry)
        elif spec.kind == InputKind.USER_INPUT:
            if _tensor_meta(val) is not None:
                env[node] = b.emit(b.with_meta({"op": "input", "name": node.name}, val))
            else:
                env[node] = ("py", getattr(spec.arg, "value", None))
        else:
            raise TraceError(f"unsupported graph input kind {spec.kind} ({node.name})")

    out_value = b.run_graph(ep.graph, env)
    outputs: List[int] = []

    def collect(v):
        if v[0] == "ref":
            outputs.append(v[1])
        elif v[0] == "tuple":
            for x in v[1]:
                collect(x)

    collect(out_value)

    # Dead-code elimination: keep what the outputs depend on, every parameter, and in-place ops
    # that write into a kept tensor.
    nodes = b.nodes
    deps = []
    for n in nodes:
        r: List[int] = []
        _refs(n.get("args", []), r)
        _refs(n.get("kwargs", {}), r)
        deps.append(r)
    live = [False] * len(nodes)
    stack = list(outputs)
    mutating = [i for i, n in enumerate(nodes) if n["op"].startswith("aten.") and _mutated_arg(n["op"])]
    while True:
        while stack:
            i = stack.pop()
            if not live[i]:
                live[i] = True
                stack.extend(d for d in deps[i] if not live[d])
        added = [i for i in mutating if not live[i] and deps[i] and live[deps[i][0]]]
        if not added:
            break
        stack.extend(added)
    for i in range(n_params):
        live[i] = True
    mapping: Dict[int, int] = {}
    kept: List[Dict[str, Any]] = []
    for i, n in enumerate(nodes):
        if live[i]:
            mapping[i] = len(kept)
            kept.append(_renumber(n, mapping))
    return TracedGraph(
        model=meta,
        layers=layers,
        params=params,
        buffers=buffers,
        tied=tied,
        nodes=kept,
        outputs=[mapping[i] for i in outputs],
    )


__all__ = ["TraceError", "TracedGraph", "trace_model", "trace_to_file"]


def checkpoint_name_map(source: Any, tensor_names: List[str]) -> Dict[str, str]:
    """Checkpoint tensor name → the model's state-dict name, as transformers renames keys on load
    (GPT-NeoX's ``embed_out`` is ``lm_head``; old BERT ``gamma``/``beta``; checkpoints saved from the
    base model lack its prefix). Plans are written in checkpoint names, structures use model names.
    A tensor that transformers converts rather than renames (fused or split on load) has no model
    name of its own, so it raises ``TraceError``; :func:`checkpoint_layout` maps stacked experts."""
    return model_name_map(meta_model(source), tensor_names)


def model_name_map(model: Any, tensor_names: List[str]) -> Dict[str, str]:
    """:func:`checkpoint_name_map` for a model already built (on the meta device)."""
    layout = name_layout(model, tensor_names)
    if layout.experts:
        name, piece = next(iter(sorted(layout.experts.items())))
        raise TraceError(
            f"checkpoint tensor '{name}' is stacked into '{piece.param}' by transformers on load; "
            "this step cannot read stacked expert tensors"
        )
    return layout.renamed


@dataclass(frozen=True)
class ExpertPiece:
    """A checkpoint tensor that transformers stacks into a fused expert parameter on load: rows
    ``segment·rows … (segment+1)·rows − 1`` of expert ``expert`` of ``param`` (Mixtral's
    ``experts.3.w3.weight`` is the second of the two ``rows``-row halves of expert 3 of
    ``experts.gate_up_proj``; a ``down_proj`` piece is the whole expert, ``segments == 1``)."""

    param: str
    expert: int
    segment: int
    segments: int
    span: Tuple[int, int]
    """Where the expert index sits in the checkpoint name (renumbering experts rewrites it)."""

    def offset(self, fused_rows: int) -> int:
        """First row of this piece in dimension 1 of the fused parameter."""
        return self.segment * (fused_rows // self.segments)

    def renamed(self, name: str, expert: int) -> str:
        """``name`` (this piece's checkpoint name) for expert number ``expert``."""
        return f"{name[: self.span[0]]}{expert}{name[self.span[1]:]}"


@dataclass
class NameLayout:
    """Checkpoint names → the model's: ``renamed`` for tensors loaded as they are (under a new name
    or their own), ``experts`` for per-expert tensors stacked into one parameter on load."""

    renamed: Dict[str, str] = field(default_factory=dict)
    experts: Dict[str, ExpertPiece] = field(default_factory=dict)


def checkpoint_layout(source: Any, tensor_names: List[str]) -> NameLayout:
    """:func:`name_layout` of the model a directory or config describes."""
    return name_layout(meta_model(source), tensor_names)


def name_layout(model: Any, tensor_names: List[str]) -> NameLayout:
    """How transformers maps ``tensor_names`` onto ``model``'s state dict on load. The one
    conversion it accepts is the stacking of per-expert MoE weights (``MergeModulelist(dim=0)``,
    optionally followed by ``Concatenate(dim=1)`` of gate and up): any other converted tensor cannot
    be cut by index and raises ``TraceError`` naming it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers without load-time renaming: names are used as they are
        return NameLayout(renamed={name: name for name in tensor_names})
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    layout = NameLayout()
    for name in tensor_names:
        renamed, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if pattern is None:
            layout.renamed[name] = renamed
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        layout.experts[name] = _expert_piece(name, renamed, pattern, converter)
    return layout


def _expert_piece(name: str, param: str, pattern: str, converter: Any) -> ExpertPiece:
    """The piece of a stacked expert parameter that checkpoint tensor ``name`` is, or a
    ``TraceError`` when ``converter`` does something else than stack experts."""
    import re

    operations = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    stacks = operations in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])
    # The converter's glob: '*' stands for the expert number, the rest is a regular expression.
    match = re.search(pattern.replace("*", r"(\d+)"), name) if pattern.count("*") == 1 else None
    if not stacks or match is None:
        raise TraceError(
            f"checkpoint tensor '{name}' is converted by transformers on load (pattern {pattern!r}, "
            f"operations {[op for op, _ in operations]}); cutting converted tensors other than stacked experts is not supported"
        )
    return ExpertPiece(
        param=param,
        expert=int(match.group(1)),
        segment=converter.source_patterns.index(pattern),
        segments=len(converter.source_patterns),
        span=match.span(1),
    )
