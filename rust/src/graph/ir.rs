//! The traced-graph IR written by `structprune.trace` (docs/traced-graph.md).

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

pub const FORMAT: &str = "structprune.traced-graph";
/// More layers than any model has: the structure set holds every layer's parameters, so a
/// `layers.total` past this is refused rather than expanded.
pub const MAX_LAYERS: usize = 100_000;

#[derive(Debug, Clone, Deserialize)]
pub struct Graph {
    pub format: String,
    pub version: u64,
    #[serde(default)]
    pub model: Value,
    #[serde(default)]
    pub layers: Option<Layers>,
    pub params: Vec<Param>,
    #[serde(default)]
    pub tied: std::collections::BTreeMap<String, String>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Layers {
    pub prefix: String,
    pub traced: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Param {
    pub name: String,
    pub shape: Vec<u64>,
    #[serde(default)]
    pub dtype: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    pub op: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub args: Vec<Value>,
    #[serde(default)]
    pub kwargs: serde_json::Map<String, Value>,
    #[serde(default)]
    pub shape: Option<Vec<u64>>,
    #[serde(default)]
    pub shapes: Option<Vec<Option<Vec<u64>>>>,
    #[serde(default)]
    pub dtype: Option<String>,
}

impl Node {
    /// `aten.linear.default` → `linear`; `getitem` stays `getitem`.
    pub fn base_op(&self) -> &str {
        let op = self.op.strip_prefix("aten.").unwrap_or(&self.op);
        op.split('.').next().unwrap_or(op)
    }
}

impl Graph {
    pub fn from_json(text: &str) -> Result<Graph> {
        let invalid = |reason: String| Error::Graph { node: None, reason };
        let graph: Graph = serde_json::from_str(text).map_err(|e| invalid(format!("not a valid traced graph: {e}")))?;
        if graph.format != FORMAT || graph.version != 1 {
            return Err(invalid(format!("format '{}' version {} is not '{FORMAT}' version 1", graph.format, graph.version)));
        }
        for (i, node) in graph.nodes.iter().enumerate() {
            for arg in node.args.iter().chain(node.kwargs.values()) {
                if let Some(bad) = node_refs(arg).into_iter().find(|&r| r >= i) {
                    return Err(Error::Graph {
                        node: Some(i),
                        reason: format!("{} refers to node {bad}, which does not come before it", node.op),
                    });
                }
            }
        }
        if let Some(&bad) = graph.outputs.iter().find(|&&o| o >= graph.nodes.len()) {
            return Err(invalid(format!("output refers to node {bad}, past the last node")));
        }
        graph.check_params()?;
        graph.check_param_nodes()?;
        Ok(graph)
    }

    /// Layer counts that can be expanded, parameter shapes whose element counts fit in 64 bits.
    fn check_params(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::Graph { node: None, reason });
        if let Some(layers) = &self.layers {
            let untraced = layers.traced == 0 && layers.total > 0;
            if untraced || layers.traced > layers.total || layers.total > MAX_LAYERS {
                return invalid(format!(
                    "layers: {} traced of {} in all (traced must be at least 1 and at most total, total at most {MAX_LAYERS})",
                    layers.traced, layers.total
                ));
            }
        }
        match self.params.iter().find(|p| p.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).is_none()) {
            Some(param) => invalid(format!("param '{}' of shape {:?} has more than 2^64 elements", param.name, param.shape)),
            None => Ok(()),
        }
    }

    /// Every `param` node names a declared parameter, with its declared shape: the structures are
    /// built from the nodes and their sizes read from the declarations.
    fn check_param_nodes(&self) -> Result<()> {
        let declared: std::collections::HashMap<&str, &[u64]> = self.params.iter().map(|p| (p.name.as_str(), p.shape.as_slice())).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            let (Some(name), "param") = (&node.name, node.base_op()) else { continue };
            let reason = match (declared.get(name.as_str()), &node.shape) {
                (None, _) => format!("param '{name}' is not among the graph's params"),
                (Some(shape), Some(here)) if here.as_slice() != *shape => {
                    format!("param '{name}' has shape {here:?} here but {shape:?} among the params")
                }
                _ => continue,
            };
            return Err(Error::Graph { node: Some(i), reason });
        }
        Ok(())
    }
}

/// Node ids referenced anywhere inside an argument.
pub fn node_refs(value: &Value) -> Vec<usize> {
    match value {
        Value::Object(map) => match map.get("node").and_then(Value::as_u64) {
            Some(id) => vec![id as usize],
            None => map.values().flat_map(node_refs).collect(),
        },
        Value::Array(items) => items.iter().flat_map(node_refs).collect(),
        _ => Vec::new(),
    }
}

/// The node id when the argument is a single tensor reference.
pub fn as_node(value: &Value) -> Option<usize> {
    value.as_object().filter(|m| m.len() == 1).and_then(|m| m.get("node")).and_then(Value::as_u64).map(|v| v as usize)
}
