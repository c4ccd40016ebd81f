//! Index-level propagation rules: walk the traced graph once, in order, and for every op couple the
//! spaces of its inputs' and outputs' dimensions (see `spaces.rs`). Ops without a rule pin every
//! dimension they touch, naming the op and node, so a structure is either right or not offered.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use super::ir::{as_node, node_refs, Graph, Node};
use super::spaces::{Refinement, SpaceId, Spaces, Tag};
use crate::error::{Error, Result};

type Dims = Vec<SpaceId>;

#[derive(Debug, Clone)]
enum Val {
    Tensor(Dims),
    Tuple(Vec<Option<Dims>>),
    Other,
}

const ELEMENTWISE: &[&str] = &[
    "add",
    "sub",
    "rsub",
    "mul",
    "div",
    "neg",
    "pow",
    "rsqrt",
    "sqrt",
    "silu",
    "gelu",
    "relu",
    "tanh",
    "sigmoid",
    "exp",
    "log",
    "erf",
    "abs",
    "clone",
    "contiguous",
    "alias",
    "to",
    "_to_copy",
    "type_as",
    "dropout",
    "where",
    "masked_fill",
    "clamp",
    "clamp_min",
    "clamp_max",
    "minimum",
    "maximum",
    "square",
    "reciprocal",
    "softplus",
    "sin",
    "cos",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "__and__",
    "__or__",
    "bitwise_and",
    "bitwise_or",
    "bitwise_not",
    "logical_not",
    "logical_and",
    "logical_or",
    "detach",
    "lift_fresh_copy",
    "fill",
    "mish",
    "hardtanh",
    "leaky_relu",
    "elu",
    "gelu_tanh",
    "isinf",
    "isnan",
    "sign",
    "floor",
    "ceil",
    "round",
    "trunc",
    "log1p",
    "expm1",
    "float",
    "double",
    "half",
    "bfloat16",
    "_autocast_to_reduced_precision",
];
const CREATION: &[&str] = &[
    "arange",
    "full",
    "zeros",
    "ones",
    "empty",
    "scalar_tensor",
    "new_ones",
    "new_zeros",
    "new_full",
    "new_empty",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "rand",
    "randn",
    "tensor",
    "linspace",
];
const RESHAPES: &[&str] = &["view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"];
const REDUCTIONS: &[&str] =
    &["mean", "sum", "amax", "amin", "var", "std", "max", "min", "prod", "norm", "linalg_vector_norm", "logsumexp", "all", "any"];
const PER_DIM_SCANS: &[&str] = &["cumsum", "cumprod", "diff", "flip", "roll"];
const IGNORED: &[&str] =
    &["_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "sym_stride", "sym_constrain_range_for_size", "_assert_async"];

/// The result of propagation: the spaces and, per parameter, the space of each dimension.
pub struct Propagation {
    pub spaces: Spaces,
    pub param_dims: BTreeMap<String, Dims>,
    /// (query-heads-within-group space, KV-group space) pairs found at GQA attention ops.
    pub nested: Vec<(SpaceId, SpaceId)>,
}

pub fn propagate(graph: &Graph) -> Result<Propagation> {
    let mut p = Propagator {
        scalar_buffers: HashMap::new(),
        score_origin: HashMap::new(),
        probabilities: HashSet::new(),
        routers: routing_softmaxes(graph),
        index_values: HashMap::new(),
        pending_router_pins: Vec::new(),
        spaces: Spaces::default(),
        values: Vec::with_capacity(graph.nodes.len()),
        param_dims: BTreeMap::new(),
        nested: Vec::new(),
    };
    for (id, node) in graph.nodes.iter().enumerate() {
        let value = p.run(id, node)?;
        p.values.push(value);
        p.track_eager_attention(id, node);
        p.track_index_values(id, node);
    }
    p.resolve_router_softmaxes();
    for &out in &graph.outputs {
        let dims = p.all_dims(&p.values[out].clone());
        for d in dims {
            p.spaces.pin_deep(d, "model output");
        }
    }
    Ok(Propagation { spaces: p.spaces, param_dims: p.param_dims, nested: p.nested })
}

struct Propagator {
    /// 0-d buffers by node (Gemma's √hidden_size embedding scale is one).
    scalar_buffers: HashMap<usize, String>,
    /// Eager attention: node → (contracted head_dim space, heads space) of a `q @ kᵀ` product,
    /// followed through elementwise ops until a softmax shows it was attention scores.
    score_origin: HashMap<usize, (SpaceId, SpaceId)>,
    /// Softmax outputs (attention probabilities), followed through elementwise ops.
    probabilities: HashSet<usize>,
    /// Softmax nodes whose output a `topk` searches along the normalised dimension: a router's
    /// probabilities, when the top-k indices then pick experts (`routing_softmaxes`).
    routers: HashSet<usize>,
    /// Node → the space its integer *values* index into (`topk` indices and reshapes of them).
    index_values: HashMap<usize, SpaceId>,
    /// Router softmaxes' normalised spaces and the pin reason they get unless experts are found.
    pending_router_pins: Vec<(SpaceId, String)>,
    spaces: Spaces,
    values: Vec<Val>,
    param_dims: BTreeMap<String, Dims>,
    nested: Vec<(SpaceId, SpaceId)>,
}

/// Ops through which an index tensor keeps its values (`top_k_index.reshape(-1)`, a dtype cast, the
/// clamp expert parallelism adds).
const INDEX_PRESERVING: &[&str] = &["to", "_to_copy", "clone", "contiguous", "alias", "detach", "clamp", "clamp_min", "clamp_max"];

/// The softmax nodes a `topk` reads (through casts) along the softmax's own dimension: candidate
/// routers. Found before propagation because the softmax comes first and would otherwise pin the
/// expert dimension before the gathers that reveal it are seen.
fn routing_softmaxes(graph: &Graph) -> HashSet<usize> {
    let mut routers = HashSet::new();
    for node in graph.nodes.iter().filter(|n| n.base_op() == "topk") {
        let topk_dim = node.args.get(2).or_else(|| node.kwargs.get("dim")).and_then(Value::as_i64).unwrap_or(-1);
        let mut source = node.args.first().and_then(as_node);
        while let Some(id) = source {
            let input = &graph.nodes[id];
            match input.base_op() {
                "to" | "_to_copy" | "clone" | "contiguous" => source = input.args.first().and_then(as_node),
                "softmax" | "_softmax" => {
                    let rank = input.shape.as_ref().map_or(0, Vec::len) as i64;
                    let softmax_dim = input.args.get(1).and_then(Value::as_i64).unwrap_or(-1);
                    let normalise = |d: i64| if d < 0 { d + rank } else { d };
                    if normalise(softmax_dim) == normalise(topk_dim) {
                        routers.insert(id);
                    }
                    break;
                }
                _ => break,
            }
        }
    }
    routers
}

impl Propagator {
    /// Follows integer tensors whose values are indices into a known space: `topk`'s indices, then
    /// reshapes and casts of them.
    fn track_index_values(&mut self, id: usize, node: &Node) {
        let op = node.base_op();
        let source = node.args.first().and_then(as_node);
        let space = match op {
            "getitem" if node.args.get(1).and_then(Value::as_u64) == Some(1) => source.and_then(|s| self.index_values.get(&s)),
            _ if RESHAPES.contains(&op) || INDEX_PRESERVING.contains(&op) => source.and_then(|s| self.index_values.get(&s)),
            _ => None,
        };
        if let Some(&space) = space {
            self.index_values.insert(id, space);
        }
    }

    /// A router softmax whose dimension turned out to pick experts is not pinned: removing experts
    /// removes their router rows, and the softmax then renormalises over the experts that stay.
    /// Any other softmax pins its dimension as usual.
    fn resolve_router_softmaxes(&mut self) {
        for (space, reason) in std::mem::take(&mut self.pending_router_pins) {
            if self.spaces.tags(space).contains(&Tag::Experts) {
                self.spaces.note(
                    space,
                    format!(
                        "{reason}: removing experts removes their router rows, and the softmax renormalises over the experts that stay"
                    ),
                );
            } else {
                self.spaces.pin_deep(space, &reason);
            }
        }
    }

    /// Eager attention has no attention op: `softmax(q @ kᵀ · scale) @ v`. A dimension contracted by
    /// a product whose result a softmax normalises is a head_dim (its size sets the temperature), and
    /// the batch dimension before the sequence is the heads; the value side's last dimension is the
    /// config's single head_dim too.
    fn track_eager_attention(&mut self, id: usize, node: &Node) {
        let op = node.base_op();
        let inputs: Vec<usize> = node.args.iter().filter_map(as_node).collect();
        match op {
            "matmul" | "bmm" => {
                let (Some(a), Some(b)) = (self.tensor_arg(node, 0), self.tensor_arg(node, 1)) else { return };
                if inputs.first().is_some_and(|i| self.probabilities.contains(i)) {
                    if let Some(&value_dim) = b.last() {
                        self.spaces.pin_deep(value_dim, "head_dim: the config's single head_dim");
                    }
                } else if a.len() == 4 && b.len() == 4 {
                    if let Val::Tensor(out) = &self.values[id] {
                        self.score_origin.insert(id, (a[3], out[1]));
                    }
                }
            }
            "softmax" | "_softmax" => {
                if let Some(&(contracted, heads)) = inputs.first().and_then(|i| self.score_origin.get(i)) {
                    self.spaces.pin_deep(contracted, "head_dim: sets the attention softmax temperature (scale 1/sqrt(head_dim))");
                    self.tag_heads(heads);
                    self.probabilities.insert(id);
                }
            }
            _ if ELEMENTWISE.contains(&op) => {
                let tensors: Vec<usize> = inputs.into_iter().filter(|&i| matches!(self.values[i], Val::Tensor(_))).collect();
                let origins: Vec<(SpaceId, SpaceId)> = tensors.iter().filter_map(|i| self.score_origin.get(i).copied()).collect();
                if origins.len() == 1 {
                    self.score_origin.insert(id, origins[0]);
                }
                if tensors.iter().filter(|i| self.probabilities.contains(i)).count() == 1 {
                    self.probabilities.insert(id);
                }
            }
            _ => {}
        }
    }

    fn run(&mut self, id: usize, node: &Node) -> Result<Val> {
        let op = node.base_op();
        let context = match &node.name {
            Some(name) => format!("{} at node {id} ({name})", node.op),
            None => format!("{} at node {id}", node.op),
        };
        let out_shape = node.shape.clone();
        let result = match op {
            "param" => {
                let name = node.name.clone().ok_or_else(|| Error::Graph { node: Some(id), reason: "param node without a name".into() })?;
                let dims = self.fresh_dims(node, id)?;
                self.param_dims.insert(name, dims.clone());
                Some(Val::Tensor(dims))
            }
            "buffer" | "constant" => {
                let dims = self.fresh_dims(node, id)?;
                let what = node.name.clone().unwrap_or_default();
                if dims.is_empty() {
                    self.scalar_buffers.insert(id, what.clone());
                }
                for &d in &dims {
                    self.spaces.pin(d, &format!("{op} '{what}' is computed from the config, not a weight that can be cut"));
                }
                Some(Val::Tensor(dims))
            }
            "input" => {
                let dims = self.fresh_dims(node, id)?;
                for &d in &dims {
                    self.spaces.pin(d, "model input (batch, sequence)");
                }
                Some(Val::Tensor(dims))
            }
            "getitem" => Some(self.getitem(node)),
            _ if IGNORED.contains(&op) => Some(Val::Other),
            _ if ELEMENTWISE.contains(&op) => self.elementwise(node, &context),
            _ if CREATION.contains(&op) => {
                let dims = self.fresh_dims(node, id)?;
                for &d in &dims {
                    self.spaces.pin(d, &format!("created by {context}"));
                }
                Some(Val::Tensor(dims))
            }
            _ if RESHAPES.contains(&op) => {
                self.tensor_arg(node, 0).and_then(|x| Some(Val::Tensor(self.reshape(&x, out_shape.as_ref()?, &context))))
            }
            _ if REDUCTIONS.contains(&op) => self.reduction(node, &context),
            _ if PER_DIM_SCANS.contains(&op) => self.scan(node, &context),
            "linear" => self.linear(node, &context),
            "addmm" => self.addmm(node, &context),
            "mm" | "bmm" | "matmul" => self.matmul(node, 0, &context),
            "baddbmm" => self.matmul(node, 1, &context).inspect(|v| {
                if let (Val::Tensor(out), Some(input)) = (v, self.tensor_arg(node, 0)) {
                    self.broadcast_into(&input, out, &context);
                }
            }),
            "embedding" => self.embedding(node),
            "transpose" | "t" | "permute" | "swapaxes" | "movedim" => self.permute(node),
            "expand" | "expand_as" => self.expand(node),
            "repeat" => self.repeat(node),
            "repeat_interleave" => self.repeat_interleave(node, &context),
            "slice" | "narrow" => self.slice(node, &context),
            "select" => self.select(node),
            "split" | "split_with_sizes" | "chunk" | "unbind" | "tensor_split" => self.split(node, &context),
            "cat" | "concat" | "concatenate" => self.cat(node, &context),
            "stack" => self.stack(node, &context),
            "scaled_dot_product_attention" => self.attention(node, &context),
            "softmax" | "_softmax" | "log_softmax" | "_log_softmax" => self.softmax(id, node, &context),
            "topk" => self.topk(id, node, &context),
            "index" => self.index(node, &context),
            "layer_norm" | "native_layer_norm" | "rms_norm" | "_fused_rms_norm" => self.norm(node, &context),
            "tril" | "triu" => self.elementwise(node, &context).inspect(|v| {
                if let Val::Tensor(dims) = v {
                    for &d in dims.iter().rev().take(2) {
                        self.spaces.pin(d, &format!("masked by {context}"));
                    }
                }
            }),
            _ => None,
        };
        Ok(match result {
            Some(value) => value,
            None => self.unsupported(node, &context),
        })
    }

    fn fresh_dims(&mut self, node: &Node, id: usize) -> Result<Dims> {
        let shape = node.shape.as_ref().ok_or_else(|| Error::Graph { node: Some(id), reason: format!("{} has no shape", node.op) })?;
        Ok(shape.iter().map(|&s| self.spaces.fresh(s)).collect())
    }

    fn fresh_from(&mut self, shape: &[u64]) -> Dims {
        shape.iter().map(|&s| self.spaces.fresh(s)).collect()
    }

    /// Pins everything an op without a rule touches, and gives its outputs pinned spaces.
    fn unsupported(&mut self, node: &Node, context: &str) -> Val {
        let reason = format!("{context} has no propagation rule");
        let inputs: Vec<usize> = node.args.iter().chain(node.kwargs.values()).flat_map(node_refs).collect();
        for input in inputs {
            for d in self.all_dims(&self.values[input].clone()) {
                self.spaces.pin_deep(d, &reason);
            }
        }
        let pinned_fresh = |shape: &[u64], spaces: &mut Spaces| -> Dims {
            shape
                .iter()
                .map(|&s| {
                    let d = spaces.fresh(s);
                    spaces.pin(d, &reason);
                    d
                })
                .collect()
        };
        if let Some(shape) = &node.shape {
            return Val::Tensor(pinned_fresh(shape, &mut self.spaces));
        }
        if let Some(shapes) = &node.shapes {
            return Val::Tuple(shapes.iter().map(|s| s.as_ref().map(|s| pinned_fresh(s, &mut self.spaces))).collect());
        }
        Val::Other
    }

    fn all_dims(&self, value: &Val) -> Dims {
        match value {
            Val::Tensor(d) => d.clone(),
            Val::Tuple(items) => items.iter().flatten().flatten().copied().collect(),
            Val::Other => Vec::new(),
        }
    }

    fn tensor(&self, value: &Value) -> Option<Dims> {
        match &self.values[as_node(value)?] {
            Val::Tensor(d) => Some(d.clone()),
            _ => None,
        }
    }

    fn arg<'n>(&self, node: &'n Node, index: usize, name: &str) -> Option<&'n Value> {
        node.args.get(index).or_else(|| node.kwargs.get(name))
    }

    fn tensor_arg(&self, node: &Node, index: usize) -> Option<Dims> {
        self.tensor(node.args.get(index)?)
    }

    fn int_arg(&self, node: &Node, index: usize, name: &str) -> Option<i64> {
        self.arg(node, index, name).and_then(Value::as_i64)
    }

    /// Sizes never change under union, so any id's own record is exact.
    fn size(&self, d: SpaceId) -> u64 {
        self.spaces.size(d)
    }

    /// Unifies `input` into `out` aligned from the right, skipping broadcast dimensions.
    fn broadcast_into(&mut self, input: &Dims, out: &Dims, context: &str) {
        for (i, o) in input.iter().rev().zip(out.iter().rev()) {
            if self.size(*i) == self.size(*o) && self.size(*i) > 1 {
                self.spaces.unify(*i, *o, context);
            }
        }
    }

    fn elementwise(&mut self, node: &Node, context: &str) -> Option<Val> {
        let shape = node.shape.clone()?;
        let scalar_buffers: Vec<String> =
            node.args.iter().filter_map(as_node).filter_map(|i| self.scalar_buffers.get(&i).cloned()).collect();
        let inputs: Vec<Dims> = node.args.iter().chain(node.kwargs.values()).filter_map(|a| self.tensor(a)).collect();
        let mut out: Vec<Option<SpaceId>> = vec![None; shape.len()];
        for input in &inputs {
            for (k, &d) in input.iter().rev().enumerate() {
                let Some(slot) = out.len().checked_sub(k + 1) else { continue };
                if self.size(d) != shape[slot] || shape[slot] <= 1 {
                    continue;
                }
                match out[slot] {
                    Some(existing) => {
                        self.spaces.unify(existing, d, context);
                    }
                    None => out[slot] = Some(d),
                }
            }
        }
        let out: Dims = out.into_iter().zip(&shape).map(|(d, &s)| d.unwrap_or_else(|| self.spaces.fresh(s))).collect();
        for name in scalar_buffers {
            for &d in &out {
                self.spaces
                    .note(d, format!("scaled by buffer '{name}', which the model derives from its config (it may depend on this width)"));
            }
        }
        Some(Val::Tensor(out))
    }

    fn getitem(&mut self, node: &Node) -> Val {
        let source = node.args.first().and_then(as_node);
        let index = node.args.get(1).and_then(Value::as_u64);
        match (source.map(|s| &self.values[s]), index) {
            (Some(Val::Tuple(items)), Some(i)) => match items.get(i as usize) {
                Some(Some(dims)) => Val::Tensor(dims.clone()),
                _ => Val::Other,
            },
            _ => Val::Other,
        }
    }

    /// Reshapes keep positions: the output dimensions are products of the input's factors.
    fn reshape(&mut self, input: &Dims, out_shape: &[u64], context: &str) -> Dims {
        let mut queue: Vec<SpaceId> = input.iter().rev().copied().filter(|&d| self.size(d) != 1).collect();
        let mut out = Vec::with_capacity(out_shape.len());
        for &size in out_shape {
            if size == 1 {
                out.push(self.spaces.fresh(1));
                continue;
            }
            let mut parts = Vec::new();
            let mut have = 1u64;
            while have < size {
                let Some(next) = queue.pop() else { return self.reshape_failed(input, out_shape, context) };
                let next_size = self.size(next);
                if have * next_size <= size {
                    if size % (have * next_size) != 0 {
                        return self.reshape_failed(input, out_shape, context);
                    }
                    parts.push(next);
                    have *= next_size;
                } else {
                    let wanted = size / have;
                    match self.spaces.split_front(next, wanted, true) {
                        Some((head, tail)) if size % have == 0 => {
                            parts.push(head);
                            queue.push(tail);
                            have = size;
                        }
                        _ => return self.reshape_failed(input, out_shape, context),
                    }
                }
            }
            out.push(if parts.len() == 1 { parts[0] } else { self.spaces.fresh_refined(Refinement::Product(parts)) });
        }
        if !queue.is_empty() {
            return self.reshape_failed(input, out_shape, context);
        }
        out
    }

    fn reshape_failed(&mut self, input: &Dims, out_shape: &[u64], context: &str) -> Dims {
        let reason = format!("{context} regroups dimensions in a way that cannot be cut");
        for &d in input {
            self.spaces.pin_deep(d, &reason);
        }
        let out = self.fresh_from(out_shape);
        for &d in &out {
            self.spaces.pin(d, &reason);
        }
        out
    }

    fn linear(&mut self, node: &Node, context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let w = self.tensor_arg(node, 1)?;
        if w.len() != 2 || x.is_empty() {
            return None;
        }
        self.spaces.unify(*x.last()?, w[1], context);
        if let Some(b) = self.arg(node, 2, "bias").and_then(|v| self.tensor(v)) {
            self.spaces.unify(b[0], w[0], context);
        }
        let mut out = x[..x.len() - 1].to_vec();
        out.push(w[0]);
        Some(Val::Tensor(out))
    }

    fn addmm(&mut self, node: &Node, context: &str) -> Option<Val> {
        let bias = self.tensor_arg(node, 0)?;
        let (a, b) = (self.tensor_arg(node, 1)?, self.tensor_arg(node, 2)?);
        if a.len() != 2 || b.len() != 2 {
            return None;
        }
        self.spaces.unify(a[1], b[0], context);
        let out = vec![a[0], b[1]];
        self.broadcast_into(&bias, &out, context);
        Some(Val::Tensor(out))
    }

    fn matmul(&mut self, node: &Node, first: usize, context: &str) -> Option<Val> {
        let (a, b) = (self.tensor_arg(node, first)?, self.tensor_arg(node, first + 1)?);
        if a.len() < 2 || b.len() < 2 {
            return None;
        }
        self.spaces.unify(a[a.len() - 1], b[b.len() - 2], context);
        let (batch_a, batch_b) = (&a[..a.len() - 2], &b[..b.len() - 2]);
        let batch = if batch_a.len() >= batch_b.len() { batch_a.to_vec() } else { batch_b.to_vec() };
        let shorter = if batch_a.len() >= batch_b.len() { batch_b.to_vec() } else { batch_a.to_vec() };
        self.broadcast_into(&shorter, &batch, context);
        let mut out = batch;
        out.push(a[a.len() - 2]);
        out.push(b[b.len() - 1]);
        Some(Val::Tensor(out))
    }

    fn embedding(&mut self, node: &Node) -> Option<Val> {
        let (w, ids) = (self.tensor_arg(node, 0)?, self.tensor_arg(node, 1)?);
        if w.len() != 2 {
            return None;
        }
        self.spaces.pin(w[0], "embedding rows are looked up by token or position id");
        self.spaces.tag(w[1], Tag::Hidden);
        let mut out = ids;
        out.push(w[1]);
        Some(Val::Tensor(out))
    }

    fn normalize_dim(dim: i64, rank: usize) -> Option<usize> {
        let d = if dim < 0 { dim + rank as i64 } else { dim };
        (0..rank as i64).contains(&d).then_some(d as usize)
    }

    fn permute(&mut self, node: &Node) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let rank = x.len();
        let mut out = x.clone();
        match node.base_op() {
            "t" => out.reverse(),
            "permute" => {
                let order = self.arg(node, 1, "dims")?.as_array()?;
                out =
                    order.iter().map(|v| v.as_i64().and_then(|d| Self::normalize_dim(d, rank)).map(|d| x[d])).collect::<Option<Dims>>()?;
            }
            "movedim" => {
                let from = Self::normalize_dim(self.int_arg(node, 1, "source")?, rank)?;
                let to = Self::normalize_dim(self.int_arg(node, 2, "destination")?, rank)?;
                let d = out.remove(from);
                out.insert(to, d);
            }
            _ => {
                let a = Self::normalize_dim(self.int_arg(node, 1, "dim0")?, rank)?;
                let b = Self::normalize_dim(self.int_arg(node, 2, "dim1")?, rank)?;
                out.swap(a, b);
            }
        }
        Some(Val::Tensor(out))
    }

    fn expand(&mut self, node: &Node) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let shape = node.shape.clone()?;
        let lead = shape.len().checked_sub(x.len())?;
        let mut out = Vec::with_capacity(shape.len());
        for (k, &size) in shape.iter().enumerate() {
            let source = k.checked_sub(lead).map(|i| x[i]);
            match source {
                Some(d) if self.size(d) == size => out.push(d),
                _ => {
                    let d = self.spaces.fresh(size);
                    self.spaces.tag(d, Tag::Broadcast);
                    out.push(d);
                }
            }
        }
        Some(Val::Tensor(out))
    }

    fn repeat(&mut self, node: &Node) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let repeats: Vec<u64> = self.arg(node, 1, "repeats")?.as_array()?.iter().map(Value::as_u64).collect::<Option<_>>()?;
        let lead = repeats.len().checked_sub(x.len())?;
        let mut out = Vec::with_capacity(repeats.len());
        for (k, &r) in repeats.iter().enumerate() {
            let copies = self.spaces.fresh(r);
            self.spaces.tag(copies, Tag::Broadcast);
            out.push(match k.checked_sub(lead).map(|i| x[i]) {
                None => copies,
                Some(d) if r == 1 => d,
                Some(d) => self.spaces.fresh_refined(Refinement::Product(vec![copies, d])),
            });
        }
        Some(Val::Tensor(out))
    }

    fn repeat_interleave(&mut self, node: &Node, _context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let repeats = self.arg(node, 1, "repeats")?.as_u64()?;
        let dim = Self::normalize_dim(self.int_arg(node, 2, "dim")?, x.len())?;
        let copies = self.spaces.fresh(repeats);
        self.spaces.tag(copies, Tag::Broadcast);
        let mut out = x.clone();
        out[dim] = self.spaces.fresh_refined(Refinement::Product(vec![x[dim], copies]));
        Some(Val::Tensor(out))
    }

    fn slice(&mut self, node: &Node, context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let dim = Self::normalize_dim(self.int_arg(node, 1, "dim").unwrap_or(0), x.len())?;
        let size = self.size(x[dim]) as i64;
        let clamp = |v: i64| -> u64 { (if v < 0 { v + size } else { v }).clamp(0, size) as u64 };
        let (start, end) = if node.base_op() == "narrow" {
            let start = clamp(self.int_arg(node, 2, "start")?);
            (start, start + self.int_arg(node, 3, "length")? as u64)
        } else {
            let start = self.arg(node, 2, "start").and_then(Value::as_i64).map_or(0, clamp);
            let end = self.arg(node, 3, "end").and_then(Value::as_i64).map_or(size as u64, clamp);
            (start, end.max(start))
        };
        let step = self.arg(node, 4, "step").and_then(Value::as_i64).unwrap_or(1);
        let mut out = x.clone();
        if start == end {
            // An empty slice (partial rotary with nothing left over) selects nothing to couple.
            out[dim] = self.spaces.fresh(0);
            return Some(Val::Tensor(out));
        }
        out[dim] = match (step, self.spaces.segment(x[dim], start, end)) {
            (1, Some(segment)) => segment,
            _ => {
                let reason = format!("{context} takes a strided or misaligned slice");
                self.spaces.pin_deep(x[dim], &reason);
                let d = self.spaces.fresh(end - start);
                self.spaces.pin(d, &reason);
                d
            }
        };
        Some(Val::Tensor(out))
    }

    fn select(&mut self, node: &Node) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let dim = Self::normalize_dim(self.int_arg(node, 1, "dim")?, x.len())?;
        self.spaces.pin_deep(x[dim], "a single index is selected from this dimension");
        let mut out = x.clone();
        out.remove(dim);
        Some(Val::Tensor(out))
    }

    fn split(&mut self, node: &Node, context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let shapes = node.shapes.clone()?;
        let dim_index = if node.base_op() == "unbind" { 1 } else { 2 };
        let dim = Self::normalize_dim(self.int_arg(node, dim_index, "dim").unwrap_or(0), x.len())?;
        if node.base_op() == "unbind" {
            self.spaces.pin_deep(x[dim], &format!("{context} takes single indices"));
            let mut pieces = Vec::new();
            for _ in &shapes {
                let mut dims = x.clone();
                dims.remove(dim);
                pieces.push(Some(dims));
            }
            return Some(Val::Tuple(pieces));
        }
        let mut start = 0;
        let mut pieces = Vec::with_capacity(shapes.len());
        for shape in &shapes {
            let len = shape.as_ref()?.get(dim).copied()?;
            let mut dims = x.clone();
            dims[dim] = match self.spaces.segment(x[dim], start, start + len) {
                Some(segment) => segment,
                None => {
                    let reason = format!("{context} splits across an inner factor");
                    self.spaces.pin_deep(x[dim], &reason);
                    self.spaces.fresh(len)
                }
            };
            start += len;
            pieces.push(Some(dims));
        }
        Some(Val::Tuple(pieces))
    }

    fn tensor_list(&self, node: &Node) -> Option<Vec<Dims>> {
        node.args.first()?.as_array()?.iter().map(|v| self.tensor(v)).collect()
    }

    fn cat(&mut self, node: &Node, context: &str) -> Option<Val> {
        let inputs: Vec<Dims> =
            self.tensor_list(node)?.into_iter().filter(|d| !d.iter().any(|&s| self.size(s) == 0) || d.len() > 1).collect();
        let shape = node.shape.clone()?;
        let dim = Self::normalize_dim(self.int_arg(node, 1, "dim").unwrap_or(0), shape.len())?;
        let first = inputs.first()?.clone();
        if inputs.iter().any(|d| d.len() != shape.len()) {
            return None;
        }
        for other in &inputs[1..] {
            for k in (0..shape.len()).filter(|&k| k != dim) {
                if self.size(first[k]) == self.size(other[k]) && self.size(first[k]) > 1 {
                    self.spaces.unify(first[k], other[k], context);
                }
            }
        }
        let parts: Vec<SpaceId> = inputs.iter().map(|d| d[dim]).filter(|&s| self.size(s) > 0).collect();
        let mut out = first;
        out[dim] = if parts.len() == 1 { parts[0] } else { self.spaces.fresh_refined(Refinement::Concat(parts)) };
        Some(Val::Tensor(out))
    }

    fn stack(&mut self, node: &Node, context: &str) -> Option<Val> {
        let inputs = self.tensor_list(node)?;
        let shape = node.shape.clone()?;
        let dim = Self::normalize_dim(self.int_arg(node, 1, "dim").unwrap_or(0), shape.len())?;
        let first = inputs.first()?.clone();
        for other in &inputs[1..] {
            for (a, b) in first.iter().zip(other) {
                self.spaces.unify(*a, *b, context);
            }
        }
        let stacked = self.spaces.fresh(inputs.len() as u64);
        self.spaces.pin(stacked, &format!("{context} stacks separate tensors"));
        let mut out = first;
        out.insert(dim, stacked);
        Some(Val::Tensor(out))
    }

    fn attention(&mut self, node: &Node, context: &str) -> Option<Val> {
        let (q, k, v) = (self.tensor_arg(node, 0)?, self.tensor_arg(node, 1)?, self.tensor_arg(node, 2)?);
        if q.len() != 4 || k.len() != 4 || v.len() != 4 {
            return None;
        }
        for (a, b) in [(q[0], k[0]), (k[0], v[0]), (k[1], v[1]), (k[2], v[2]), (q[3], k[3])] {
            if self.size(a) == self.size(b) && self.size(a) > 1 {
                self.spaces.unify(a, b, context);
            }
        }
        self.spaces.pin_deep(q[3], "head_dim: the attention scale 1/sqrt(head_dim) and the config's single head_dim");
        self.spaces.pin_deep(v[3], "head_dim: the config's single head_dim");
        let (heads, kv_heads) = (self.size(q[1]), self.size(k[1]));
        if heads != kv_heads {
            if kv_heads == 0 || heads % kv_heads != 0 {
                return None;
            }
            let repeats = self.spaces.fresh(heads / kv_heads);
            self.spaces.tag(repeats, Tag::Broadcast);
            let grouped = self.spaces.fresh_refined(Refinement::Product(vec![k[1], repeats]));
            self.spaces.unify(q[1], grouped, context);
        } else {
            self.spaces.unify(q[1], k[1], context);
        }
        self.tag_heads(q[1]);
        if let Some(mask) = self.arg(node, 3, "attn_mask").and_then(|m| self.tensor(m)) {
            let scores = vec![q[0], q[1], q[2], k[2]];
            self.broadcast_into(&mask, &scores, context);
        }
        Some(Val::Tensor(vec![q[0], q[1], q[2], v[3]]))
    }

    /// Tags the leaves of a query-head space: leaves made by a broadcast are query heads within
    /// a KV group; the others are KV groups (or, without GQA, heads shared by q, k and v).
    fn tag_heads(&mut self, heads: SpaceId) {
        let leaves = self.spaces.occurrences(heads);
        let groups: Vec<SpaceId> = leaves.iter().map(|o| o.root).filter(|&r| !self.spaces.tags(r).contains(&Tag::Broadcast)).collect();
        for leaf in &leaves {
            if self.spaces.tags(leaf.root).contains(&Tag::Broadcast) {
                self.spaces.tag(leaf.root, Tag::QueryHeads);
                if let Some(&group) = groups.first() {
                    self.nested.push((leaf.root, group));
                }
            } else {
                self.spaces.tag(leaf.root, Tag::KvHeads);
                if leaves.len() == 1 {
                    self.spaces.tag(leaf.root, Tag::QueryHeads);
                }
            }
        }
    }

    fn softmax(&mut self, id: usize, node: &Node, context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let dim = Self::normalize_dim(self.int_arg(node, 1, "dim")?, x.len())?;
        let reason = format!("normalised by {context}");
        if self.routers.contains(&id) {
            self.pending_router_pins.push((x[dim], reason));
        } else {
            self.spaces.pin_deep(x[dim], &reason);
        }
        Some(Val::Tensor(x))
    }

    /// `topk(x, k, dim)`: values and indices share x's other dimensions and a new k-dimension; the
    /// indices' values point into x's searched dimension (a router's experts).
    fn topk(&mut self, id: usize, node: &Node, context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let k = self.arg(node, 1, "k")?.as_u64()?;
        let dim = Self::normalize_dim(self.arg(node, 2, "dim").and_then(Value::as_i64).unwrap_or(-1), x.len())?;
        let searched = x[dim];
        self.spaces.note(searched, format!("top-{k} chosen by {context}: at least {k} must stay"));
        let mut out = x;
        out[dim] = self.spaces.fresh(k);
        self.index_values.insert(id, searched);
        Some(Val::Tuple(vec![Some(out.clone()), Some(out)]))
    }

    /// `x[..., idx, ...]` (`aten.index.Tensor`, adjacent index tensors). An index tensor whose values
    /// are known to point into a space (the experts `topk` chose) couples the indexed dimension
    /// with that space: `gate_up_proj[top_k_index]` makes the expert dimension of the stacked
    /// weights the router's rows. Any other gather pins the dimension it gathers along; the other
    /// dimensions pass through (gathering hidden states by token keeps the hidden channels).
    fn index(&mut self, node: &Node, context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let shape = node.shape.clone()?;
        let list = self.arg(node, 1, "indices")?.as_array()?;
        let positions: Vec<(usize, usize)> = list.iter().enumerate().filter_map(|(d, v)| as_node(v).map(|i| (d, i))).collect();
        let (first, last) = (positions.first()?.0, positions.last()?.0);
        if last + 1 - first != positions.len() || last >= x.len() {
            return None;
        }
        let index_dims: Vec<Dims> = positions
            .iter()
            .map(|&(_, i)| match &self.values[i] {
                Val::Tensor(dims) => Some(dims.clone()),
                _ => None,
            })
            .collect::<Option<_>>()?;
        for &(d, i) in &positions {
            match self.index_values.get(&i).copied() {
                Some(space) if self.size(space) == self.size(x[d]) => {
                    self.spaces.unify(x[d], space, context);
                    self.spaces.tag(space, Tag::Experts);
                }
                _ => self.spaces.pin_deep(x[d], &format!("{context} gathers along this dimension by computed indices")),
            }
        }
        let rank = index_dims.iter().map(Vec::len).max()?;
        let gathered = if index_dims.len() == 1 {
            index_dims[0].clone()
        } else {
            let out = self.fresh_from(shape.get(first..first + rank)?);
            for dims in &index_dims {
                self.broadcast_into(dims, &out, context);
            }
            out
        };
        let mut out = x[..first].to_vec();
        out.extend(gathered);
        out.extend_from_slice(&x[last + 1..]);
        (out.len() == shape.len()).then_some(Val::Tensor(out))
    }

    fn reduction(&mut self, node: &Node, context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let shape = node.shape.clone()?;
        let reduced: Vec<usize> = match self.arg(node, 1, "dim") {
            Some(Value::Array(dims)) if !dims.is_empty() => {
                dims.iter().map(|d| d.as_i64().and_then(|d| Self::normalize_dim(d, x.len()))).collect::<Option<_>>()?
            }
            Some(Value::Number(n)) => vec![Self::normalize_dim(n.as_i64()?, x.len())?],
            _ => (0..x.len()).collect(),
        };
        for &d in &reduced {
            self.spaces.note(x[d], format!("reduced by {context}: cutting channels changes that statistic"));
        }
        let keepdim = shape.len() == x.len();
        let mut out = Vec::with_capacity(shape.len());
        for (k, &d) in x.iter().enumerate() {
            if reduced.contains(&k) {
                if keepdim {
                    out.push(self.spaces.fresh(1));
                }
            } else {
                out.push(d);
            }
        }
        (out.len() == shape.len()).then_some(Val::Tensor(out))
    }

    fn scan(&mut self, node: &Node, context: &str) -> Option<Val> {
        let out = self.elementwise(node, context)?;
        let dim_arg = self.arg(node, 1, "dim").and_then(Value::as_i64).unwrap_or(-1);
        if let Val::Tensor(dims) = &out {
            if let Some(d) = Self::normalize_dim(dim_arg, dims.len()) {
                self.spaces.pin_deep(dims[d], &format!("mixed along this dimension by {context}"));
            }
        }
        Some(out)
    }

    fn norm(&mut self, node: &Node, context: &str) -> Option<Val> {
        let x = self.tensor_arg(node, 0)?;
        let normalized: Vec<u64> = self.arg(node, 1, "normalized_shape")?.as_array()?.iter().map(Value::as_u64).collect::<Option<_>>()?;
        let tail = x.len().checked_sub(normalized.len())?;
        for &d in &x[tail..] {
            self.spaces.note(d, format!("normalised by {context}: cutting channels changes that statistic"));
        }
        for (index, name) in [(2, "weight"), (3, "bias")] {
            if let Some(p) = self.arg(node, index, name).and_then(|v| self.tensor(v)) {
                self.broadcast_into(&p, &x, context);
            }
        }
        if node.base_op() == "native_layer_norm" {
            let shapes = node.shapes.clone()?;
            let stats: Vec<Option<Dims>> = shapes[1..].iter().map(|s| s.as_ref().map(|s| self.fresh_from(s))).collect();
            let mut items = vec![Some(x)];
            items.extend(stats);
            return Some(Val::Tuple(items));
        }
        Some(Val::Tensor(x))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::graph::spaces::Occurrence;
    use crate::graph::test_ir::{attention, embed, lm_head, n, routed_experts, swiglu, Ir, SEQ};

    impl Propagation {
        fn root(&mut self, param: &str, dim: usize) -> SpaceId {
            let space = self.param_dims[param][dim];
            self.spaces.find(space)
        }

        fn coupled(&mut self, a: (&str, usize), b: (&str, usize)) -> bool {
            self.root(a.0, a.1) == self.root(b.0, b.1)
        }

        /// Same leaves at the same positions: the dimensions are cut together even where a
        /// reshape made them distinct spaces of the same factors.
        fn same_units(&mut self, a: (&str, usize), b: (&str, usize)) -> bool {
            self.leaves(a.0, a.1) == self.leaves(b.0, b.1)
        }

        fn pinned_reason(&mut self, param: &str, dim: usize) -> Option<String> {
            let space = self.param_dims[param][dim];
            self.spaces.pinned(space)
        }

        fn leaves(&mut self, param: &str, dim: usize) -> Vec<Occurrence> {
            let space = self.param_dims[param][dim];
            self.spaces.occurrences(space)
        }
    }

    fn run(ir: &Ir, outputs: &[usize]) -> Propagation {
        propagate(&ir.graph(outputs)).expect("the test graph propagates")
    }

    /// `embedding → linear(w1, b1) → <op> → linear(w2)`, the op given as (name, extra args, output
    /// shape), the last linear's output the model's.
    fn between_two_linears(op: Option<(&str, Value, &[u64])>) -> (Ir, usize) {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let w1 = ir.param("w1", &[12, 8]);
        let b1 = ir.param("b1", &[12]);
        let w2 = ir.param("w2", &[8, 12]);
        let mut h = ir.op("linear.default", json!([n(x), n(w1), n(b1)]), &[1, SEQ, 12]);
        if let Some((op, extra, shape)) = op {
            let mut args = vec![n(h)];
            args.extend(extra.as_array().cloned().unwrap_or_default());
            h = ir.op(op, json!(args), shape);
        }
        let out = ir.op("linear.default", json!([n(h), n(w2)]), &[1, SEQ, 8]);
        (ir, out)
    }

    #[test]
    fn linear_couples_input_channels_with_weight_columns_and_bias_with_rows() {
        let (ir, out) = between_two_linears(None);
        let mut p = run(&ir, &[out]);
        assert!(p.coupled(("model.embed.weight", 1), ("w1", 1)));
        assert!(p.coupled(("w1", 0), ("b1", 0)));
        assert!(p.coupled(("w1", 0), ("w2", 1)));
        assert!(!p.coupled(("w1", 0), ("w1", 1)));
        assert_eq!(p.pinned_reason("w1", 0), None);
        assert_eq!(p.pinned_reason("w2", 0).as_deref(), Some("model output"));
    }

    #[test]
    fn embedding_rows_are_pinned_and_its_columns_are_the_hidden_stream() {
        let (ir, out) = between_two_linears(None);
        let mut p = run(&ir, &[out]);
        assert_eq!(p.pinned_reason("model.embed.weight", 0).as_deref(), Some("embedding rows are looked up by token or position id"));
        let hidden = p.root("model.embed.weight", 1);
        assert!(p.spaces.tags(hidden).contains(&Tag::Hidden));
        assert_eq!(p.pinned_reason("model.embed.weight", 1), None);
    }

    #[test]
    fn an_elementwise_product_couples_gate_and_up_rows_with_down_columns() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let y = swiglu(&mut ir, x, "mlp", 8, 12);
        let out = lm_head(&mut ir, y, 16, 8);
        let mut p = run(&ir, &[out]);
        assert!(p.coupled(("mlp.gate.weight", 0), ("mlp.up.weight", 0)));
        assert!(p.coupled(("mlp.up.weight", 0), ("mlp.down.weight", 1)));
        // The residual add puts the MLP's output rows on the hidden stream.
        assert!(p.coupled(("mlp.down.weight", 0), ("model.embed.weight", 1)));
        assert!(p.coupled(("mlp.gate.weight", 1), ("lm_head.weight", 1)));
    }

    #[test]
    fn an_op_without_a_rule_pins_what_it_touches_naming_the_op_and_node() {
        let (ir, out) = between_two_linears(Some(("fancy.default", json!([]), &[1, SEQ, 12])));
        let mut p = run(&ir, &[out]);
        let reason = "aten.fancy.default at node 7 has no propagation rule";
        assert_eq!(p.pinned_reason("w1", 0).as_deref(), Some(reason));
        assert_eq!(p.pinned_reason("w2", 1).as_deref(), Some(reason));
        assert!(!p.coupled(("w1", 0), ("w2", 1)));
    }

    #[test]
    fn a_softmax_pins_the_dimension_it_normalises() {
        let (ir, out) = between_two_linears(Some(("_softmax.default", json!([-1, false]), &[1, SEQ, 12])));
        let mut p = run(&ir, &[out]);
        assert_eq!(p.pinned_reason("w2", 1).as_deref(), Some("normalised by aten._softmax.default at node 7"));
    }

    #[test]
    fn selecting_one_index_pins_the_dimension() {
        let (ir, out) = between_two_linears(Some(("select.int", json!([2, 0]), &[1, SEQ])));
        let mut p = run(&ir, &[out]);
        assert_eq!(p.pinned_reason("w1", 0).as_deref(), Some("a single index is selected from this dimension"));
    }

    #[test]
    fn a_strided_slice_pins_the_sliced_dimension() {
        let (ir, out) = between_two_linears(Some(("slice.Tensor", json!([2, 0, 12, 2]), &[1, SEQ, 6])));
        let mut p = run(&ir, &[out]);
        let reason = p.pinned_reason("w1", 0).expect("the sliced rows are pinned");
        assert_eq!(reason, "aten.slice.Tensor at node 7 takes a strided or misaligned slice");
    }

    #[test]
    fn a_reduction_notes_that_a_cut_changes_the_statistic() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let w1 = ir.param("w1", &[12, 8]);
        let h = ir.op("linear.default", json!([n(x), n(w1)]), &[1, SEQ, 12]);
        let mean = ir.op("mean.dim", json!([n(h), [-1], true]), &[1, SEQ, 1]);
        let scaled = ir.op("mul.Tensor", json!([n(h), n(mean)]), &[1, SEQ, 12]);
        let w2 = ir.param("w2", &[8, 12]);
        let out = ir.op("linear.default", json!([n(scaled), n(w2)]), &[1, SEQ, 8]);
        let mut p = run(&ir, &[out]);
        let rows = p.root("w1", 0);
        let notes = p.spaces.notes(rows);
        assert_eq!(notes.into_iter().collect::<Vec<_>>(), ["reduced by aten.mean.dim at node 5: cutting channels changes that statistic"]);
        assert!(p.coupled(("w1", 0), ("w2", 1)));
        assert_eq!(p.pinned_reason("w1", 0), None);
    }

    #[test]
    fn a_transpose_moves_dimensions_and_moving_them_back_keeps_the_coupling() {
        let (mut ir, _) = between_two_linears(None);
        let h = 6;
        let t = ir.op("transpose.int", json!([n(h), 1, 2]), &[1, 12, SEQ]);
        let back = ir.op("transpose.int", json!([n(t), -1, -2]), &[1, SEQ, 12]);
        let w3 = ir.param("w3", &[8, 12]);
        let out = ir.op("linear.default", json!([n(back), n(w3)]), &[1, SEQ, 8]);
        let mut p = run(&ir, &[out]);
        assert!(p.coupled(("w1", 0), ("w3", 1)));
        assert_eq!(p.pinned_reason("w3", 1), None);
    }

    #[test]
    fn a_reshape_into_heads_refines_rows_into_head_and_within_head_factors() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let q = ir.param("q", &[8, 8]);
        let rows = ir.op("linear.default", json!([n(x), n(q)]), &[1, SEQ, 8]);
        let heads = ir.op("view.default", json!([n(rows), [1, SEQ, 4, 2]]), &[1, SEQ, 4, 2]);
        let merged = ir.op("view.default", json!([n(heads), [1, SEQ, 8]]), &[1, SEQ, 8]);
        let o = ir.param("o", &[8, 8]);
        let out = ir.op("linear.default", json!([n(merged), n(o)]), &[1, SEQ, 8]);
        let mut p = run(&ir, &[out]);
        let leaves = p.leaves("q", 0);
        // Row r = 2·head + d: a head is rows {2h, 2h+1}, a within-head index d is rows {d, d+2, d+4, d+6}.
        assert_eq!((leaves[0].offset, leaves[0].stride, leaves[0].free.as_slice()), (0, 2, [(2, 1)].as_slice()));
        assert_eq!((leaves[1].offset, leaves[1].stride, leaves[1].free.as_slice()), (0, 1, [(4, 2)].as_slice()));
        assert_eq!(leaves.len(), 2);
        assert!(p.same_units(("q", 0), ("o", 1)));
    }

    #[test]
    fn gqa_attention_nests_query_heads_in_kv_groups_and_pins_head_dim() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let y = attention(&mut ir, x, "attn", 4, 2, 2);
        let out = lm_head(&mut ir, y, 16, 8);
        let mut p = run(&ir, &[out]);
        let q = p.leaves("attn.q.weight", 0);
        let k = p.leaves("attn.k.weight", 0);
        assert_eq!((q.len(), k.len()), (3, 2), "q rows: group × slot × head_dim; k rows: group × head_dim");
        let (group, slot, head_dim) = (q[0].root, q[1].root, q[2].root);
        assert_eq!(k[0].root, group);
        assert_eq!(p.nested, [(slot, group)]);
        assert_eq!(p.spaces.tags(group).into_iter().collect::<Vec<_>>(), [Tag::KvHeads]);
        assert_eq!(p.spaces.tags(slot).into_iter().collect::<Vec<_>>(), [Tag::QueryHeads, Tag::Broadcast]);
        // Query head h = 2·group + slot, row = 2·h + d.
        assert_eq!((q[0].offset, q[0].stride, q[0].free.clone()), (0, 4, vec![(2, 1), (2, 2)]));
        assert_eq!((q[1].offset, q[1].stride, q[1].free.clone()), (0, 2, vec![(2, 1), (2, 4)]));
        assert!(p.spaces.pinned(head_dim).is_some_and(|r| r.starts_with("head_dim")));
        assert_eq!(p.spaces.pinned(group), None);
        // o's columns hold the same group and slot units; their head_dim is v's (pinned too).
        let o = p.leaves("attn.o.weight", 1);
        assert_eq!(o[..2], q[..2]);
        assert!(p.spaces.pinned(o[2].root).is_some_and(|r| r.starts_with("head_dim")));
        assert_eq!(p.leaves("attn.v.weight", 0)[0], k[0]);
    }

    #[test]
    fn a_fused_projection_chunked_in_two_is_two_segments_of_its_rows() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let gate_up = ir.param("gate_up", &[24, 8]);
        let rows = ir.op("linear.default", json!([n(x), n(gate_up)]), &[1, SEQ, 24]);
        let halves = ir.op_tuple("chunk.default", json!([n(rows), 2, -1]), &[&[1, SEQ, 12], &[1, SEQ, 12]]);
        let product = ir.op("mul.Tensor", json!([n(halves[0]), n(halves[1])]), &[1, SEQ, 12]);
        let down = ir.param("down", &[8, 12]);
        let out = ir.op("linear.default", json!([n(product), n(down)]), &[1, SEQ, 8]);
        let mut p = run(&ir, &[out]);
        let leaves = p.leaves("gate_up", 0);
        let down_columns = p.root("down", 1);
        assert_eq!(leaves.iter().map(|o| (o.root, o.offset, o.stride)).collect::<Vec<_>>(), [(down_columns, 0, 1), (down_columns, 12, 1)]);
    }

    #[test]
    fn concatenated_projections_are_segments_of_the_consumer_columns() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let a = ir.param("a", &[4, 8]);
        let b = ir.param("b", &[6, 8]);
        let ya = ir.op("linear.default", json!([n(x), n(a)]), &[1, SEQ, 4]);
        let yb = ir.op("linear.default", json!([n(x), n(b)]), &[1, SEQ, 6]);
        let cat = ir.op("cat.default", json!([[n(ya), n(yb)], -1]), &[1, SEQ, 10]);
        let c = ir.param("c", &[8, 10]);
        let out = ir.op("linear.default", json!([n(cat), n(c)]), &[1, SEQ, 8]);
        let mut p = run(&ir, &[out]);
        let (a_rows, b_rows) = (p.root("a", 0), p.root("b", 0));
        let leaves = p.leaves("c", 1);
        assert_eq!(leaves.iter().map(|o| (o.root, o.offset)).collect::<Vec<_>>(), [(a_rows, 0), (b_rows, 4)]);
    }

    #[test]
    fn top_k_indices_gathering_stacked_weights_couple_their_expert_dimension_with_the_router_rows() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let y = routed_experts(&mut ir, x, "moe", 8, 4, 6, 2);
        let out = lm_head(&mut ir, y, 16, 8);
        let mut p = run(&ir, &[out]);
        assert!(p.coupled(("moe.gate.weight", 0), ("moe.experts.gate_up_proj", 0)));
        assert!(p.coupled(("moe.gate.weight", 0), ("moe.experts.down_proj", 0)));
        let experts = p.root("moe.gate.weight", 0);
        assert!(p.spaces.tags(experts).contains(&Tag::Experts));
        assert_eq!(p.pinned_reason("moe.gate.weight", 0), None, "the router softmax does not pin the experts");
        let notes: Vec<String> = p.spaces.notes(experts).into_iter().collect();
        assert!(notes.iter().any(|n| n.contains("the softmax renormalises over the experts that stay")), "{notes:?}");
        assert!(
            notes.iter().any(|n| n.starts_with("top-2 chosen by aten.topk.default") && n.ends_with("at least 2 must stay")),
            "{notes:?}"
        );
        // Inside each expert: gate and up halves of the fused rows are the down projection's columns.
        let down_columns = p.root("moe.experts.down_proj", 2);
        let halves: Vec<(SpaceId, u64)> = p.leaves("moe.experts.gate_up_proj", 1).iter().map(|o| (o.root, o.offset)).collect();
        assert_eq!(halves, [(down_columns, 0), (down_columns, 6)]);
        // The gathers keep the hidden stream: gathered rows by token, expert weights by expert.
        for (param, dim) in [("moe.experts.gate_up_proj", 2), ("moe.experts.down_proj", 1), ("moe.gate.weight", 1)] {
            assert!(p.coupled((param, dim), ("model.embed.weight", 1)), "{param} dim {dim}");
            assert_eq!(p.pinned_reason(param, dim), None);
        }
    }

    #[test]
    fn a_softmax_searched_by_top_k_whose_indices_pick_nothing_is_pinned() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let w = ir.param("w", &[4, 8]);
        let logits = ir.op("linear.default", json!([n(x), n(w)]), &[1, SEQ, 4]);
        let probabilities = ir.op("softmax.int", json!([n(logits), -1]), &[1, SEQ, 4]);
        let top = ir.op_tuple("topk.default", json!([n(probabilities), 2]), &[&[1, SEQ, 2], &[1, SEQ, 2]]);
        let mut p = run(&ir, &[top[0]]);
        assert_eq!(p.pinned_reason("w", 0).as_deref(), Some("normalised by aten.softmax.int at node 5"));
    }

    #[test]
    fn a_gather_by_computed_indices_pins_the_gathered_dimension_only() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let flat = ir.op("view.default", json!([n(x), [-1, 8]]), &[SEQ, 8]);
        let positions = ir.op("arange.default", json!([SEQ]), &[SEQ]);
        let gathered = ir.op("index.Tensor", json!([n(flat), [n(positions)]]), &[SEQ, 8]);
        let table = ir.param("table", &[5, 8]);
        let rows = ir.op("index.Tensor", json!([n(table), [n(positions)]]), &[SEQ, 8]);
        let sum = ir.op("add.Tensor", json!([n(gathered), n(rows)]), &[SEQ, 8]);
        let mut p = run(&ir, &[sum]);
        assert!(p.pinned_reason("table", 0).is_some_and(|r| r.ends_with("gathers along this dimension by computed indices")));
        assert!(p.coupled(("table", 1), ("model.embed.weight", 1)));
    }

    #[test]
    fn a_leaf_without_a_shape_is_a_graph_error_naming_the_node() {
        let text = r#"{"format": "structprune.traced-graph", "version": 1, "params": [],
                       "nodes": [{"op": "input", "name": "input_ids"}], "outputs": [0]}"#;
        let graph = Graph::from_json(text).expect("the IR itself is well formed");
        let err = propagate(&graph).err().expect("a shapeless input cannot be propagated");
        assert!(matches!(&err, Error::Graph { node: Some(0), reason } if reason == "input has no shape"), "{err}");
    }
}
