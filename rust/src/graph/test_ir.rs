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
