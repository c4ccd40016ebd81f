//! Hand-built traced graphs for the rules' unit tests: a few nodes each, so a test reads as the
//! model code it stands for.

use serde_json::{json, Value};

use super::ir::Graph;

#[derive(Default)]
pub struct Ir {
    params: Vec<Value>,
    nodes: Vec<Value>,
    layers: Option<Value>,
}

/// A reference to node `id` as an argument.
pub fn n(id: usize) -> Value {
    json!({ "node": id })
}

impl Ir {
    fn push(&mut self, node: Value) -> usize {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub fn param(&mut self, name: &str, shape: &[u64]) -> usize {
        self.params.push(json!({ "name": name, "shape": shape }));
        self.push(json!({ "op": "param", "name": name, "shape": shape }))
    }

    pub fn input(&mut self, shape: &[u64]) -> usize {
        self.push(json!({ "op": "input", "name": "input_ids", "shape": shape }))
    }

    /// An ATen op (`"linear.default"`) with one tensor output.
    pub fn op(&mut self, op: &str, args: Value, shape: &[u64]) -> usize {
        self.push(json!({ "op": format!("aten.{op}"), "args": args, "shape": shape }))
    }

    /// An ATen op with a tuple output, and a `getitem` node per element.
    pub fn op_tuple(&mut self, op: &str, args: Value, shapes: &[&[u64]]) -> Vec<usize> {
        let tuple = self.push(json!({ "op": format!("aten.{op}"), "args": args, "shapes": shapes }));
        (0..shapes.len()).map(|i| self.push(json!({ "op": "getitem", "args": [n(tuple), i], "shape": shapes[i] }))).collect()
    }

    pub fn layers(&mut self, prefix: &str, traced: usize, total: usize) {
        self.layers = Some(json!({ "prefix": prefix, "traced": traced, "total": total }));
    }

    pub fn json(&self, outputs: &[usize]) -> String {
        json!({
            "format": "structprune.traced-graph",
            "version": 1,
            "layers": self.layers,
            "params": self.params,
            "nodes": self.nodes,
            "outputs": outputs,
        })
        .to_string()
    }

    pub fn graph(&self, outputs: &[usize]) -> Graph {
        Graph::from_json(&self.json(outputs)).expect("a well-formed test graph")
    }
}

/// Batch and sequence of every activation (a prime, as the tracer's, so it matches no width).
pub const SEQ: u64 = 7;

/// `embedding(model.embed.weight, input_ids)`: `[1, SEQ, hidden]`.
pub fn embed(ir: &mut Ir, vocab: u64, hidden: u64) -> usize {
    let weight = ir.param("model.embed.weight", &[vocab, hidden]);
    let ids = ir.input(&[1, SEQ]);
    ir.op("embedding.default", json!([n(weight), n(ids)]), &[1, SEQ, hidden])
}

/// The logits `linear(x, lm_head.weight)`.
pub fn lm_head(ir: &mut Ir, x: usize, vocab: u64, hidden: u64) -> usize {
    let weight = ir.param("lm_head.weight", &[vocab, hidden]);
    ir.op("linear.default", json!([n(x), n(weight)]), &[1, SEQ, vocab])
}

/// `x + down(silu(gate(x)) * up(x))` with parameters `{prefix}.gate.weight`, `.up`, `.down`.
pub fn swiglu(ir: &mut Ir, x: usize, prefix: &str, hidden: u64, width: u64) -> usize {
    let gate = ir.param(&format!("{prefix}.gate.weight"), &[width, hidden]);
    let up = ir.param(&format!("{prefix}.up.weight"), &[width, hidden]);
    let down = ir.param(&format!("{prefix}.down.weight"), &[hidden, width]);
    let g = ir.op("linear.default", json!([n(x), n(gate)]), &[1, SEQ, width]);
    let u = ir.op("linear.default", json!([n(x), n(up)]), &[1, SEQ, width]);
    let s = ir.op("silu.default", json!([n(g)]), &[1, SEQ, width]);
    let m = ir.op("mul.Tensor", json!([n(s), n(u)]), &[1, SEQ, width]);
    let d = ir.op("linear.default", json!([n(m), n(down)]), &[1, SEQ, hidden]);
    ir.op("add.Tensor", json!([n(x), n(d)]), &[1, SEQ, hidden])
}

/// `x + o(sdpa(q(x), k(x), v(x)))` with `heads` query heads over `kv_heads` KV heads (sdpa's
/// `enable_gqa` form: k and v are not repeated in the graph), parameters `{prefix}.q.weight`, ….
pub fn attention(ir: &mut Ir, x: usize, prefix: &str, heads: u64, kv_heads: u64, head_dim: u64) -> usize {
    let hidden = heads * head_dim;
    let project = |ir: &mut Ir, name: &str, count: u64| {
        let weight = ir.param(&format!("{prefix}.{name}.weight"), &[count * head_dim, hidden]);
        let rows = ir.op("linear.default", json!([n(x), n(weight)]), &[1, SEQ, count * head_dim]);
        let split = ir.op("view.default", json!([n(rows), [1, SEQ, -1, head_dim]]), &[1, SEQ, count, head_dim]);
        ir.op("transpose.int", json!([n(split), 1, 2]), &[1, count, SEQ, head_dim])
    };
    let q = project(ir, "q", heads);
    let k = project(ir, "k", kv_heads);
    let v = project(ir, "v", kv_heads);
    let a = ir.op("scaled_dot_product_attention.default", json!([n(q), n(k), n(v)]), &[1, heads, SEQ, head_dim]);
    let t = ir.op("transpose.int", json!([n(a), 1, 2]), &[1, SEQ, heads, head_dim]);
    let merged = ir.op("reshape.default", json!([n(t), [1, SEQ, -1]]), &[1, SEQ, hidden]);
    let o = ir.param(&format!("{prefix}.o.weight"), &[hidden, hidden]);
    let out = ir.op("linear.default", json!([n(merged), n(o)]), &[1, SEQ, hidden]);
    ir.op("add.Tensor", json!([n(x), n(out)]), &[1, SEQ, hidden])
}

/// A routed-expert layer as transformers' `batched_mm` experts trace: `softmax(router(x))`, its
/// top-`k` indices gathering the stacked `{prefix}.experts.gate_up_proj` `[experts, 2·width,
/// hidden]` and `down_proj` `[experts, hidden, width]`, batched products, the outputs weighted by
/// the top-k probabilities and summed per token, added to `x`.
pub fn routed_experts(ir: &mut Ir, x: usize, prefix: &str, hidden: u64, experts: u64, width: u64, k: u64) -> usize {
    let router = ir.param(&format!("{prefix}.gate.weight"), &[experts, hidden]);
    let gate_up = ir.param(&format!("{prefix}.experts.gate_up_proj"), &[experts, 2 * width, hidden]);
    let down = ir.param(&format!("{prefix}.experts.down_proj"), &[experts, hidden, width]);
    let pairs = SEQ * k;
    let flat = ir.op("view.default", json!([n(x), [-1, hidden]]), &[SEQ, hidden]);
    let logits = ir.op("linear.default", json!([n(flat), n(router)]), &[SEQ, experts]);
    let probabilities = ir.op("softmax.int", json!([n(logits), -1]), &[SEQ, experts]);
    let top = ir.op_tuple("topk.default", json!([n(probabilities), k]), &[&[SEQ, k], &[SEQ, k]]);
    let weights = ir.op("reshape.default", json!([n(top[0]), [-1]]), &[pairs]);
    let ids = ir.op("reshape.default", json!([n(top[1]), [-1]]), &[pairs]);
    let repeated = ir.op("repeat_interleave.self_int", json!([n(flat), k, 0]), &[pairs, hidden]);
    let selected = ir.op("index.Tensor", json!([n(gate_up), [n(ids)]]), &[pairs, 2 * width, hidden]);
    let column = ir.op("unsqueeze.default", json!([n(repeated), -1]), &[pairs, hidden, 1]);
    let projected = ir.op("bmm.default", json!([n(selected), n(column)]), &[pairs, 2 * width, 1]);
    let projected = ir.op("squeeze.dim", json!([n(projected), -1]), &[pairs, 2 * width]);
    let halves = ir.op_tuple("chunk.default", json!([n(projected), 2, -1]), &[&[pairs, width], &[pairs, width]]);
    let activated = ir.op("silu.default", json!([n(halves[0])]), &[pairs, width]);
    let product = ir.op("mul.Tensor", json!([n(activated), n(halves[1])]), &[pairs, width]);
    let selected = ir.op("index.Tensor", json!([n(down), [n(ids)]]), &[pairs, hidden, width]);
    let column = ir.op("unsqueeze.default", json!([n(product), -1]), &[pairs, width, 1]);
    let out = ir.op("bmm.default", json!([n(selected), n(column)]), &[pairs, hidden, 1]);
    let out = ir.op("squeeze.dim", json!([n(out), -1]), &[pairs, hidden]);
    let weights = ir.op("unsqueeze.default", json!([n(weights), -1]), &[pairs, 1]);
    let weighted = ir.op("mul.Tensor", json!([n(out), n(weights)]), &[pairs, hidden]);
    let per_token = ir.op("view.default", json!([n(weighted), [SEQ, k, hidden]]), &[SEQ, k, hidden]);
    let summed = ir.op("sum.dim_IntList", json!([n(per_token), [1]]), &[SEQ, hidden]);
    let back = ir.op("reshape.default", json!([n(summed), [1, SEQ, hidden]]), &[1, SEQ, hidden]);
    ir.op("add.Tensor", json!([n(x), n(back)]), &[1, SEQ, hidden])
}
