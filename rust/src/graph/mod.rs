//! The dependency graph: which weight rows and columns must be removed together.
//!
//! `ir` reads the traced graph, `spaces` is the index-space algebra, `propagate` applies one rule
//! per op, `structures` turns the result into prunable structures with per-parameter index maps.

pub mod ir;
pub mod propagate;
pub mod spaces;
pub mod structures;
#[cfg(test)]
mod test_ir;

use crate::error::Result;

pub use structures::{Kind, Member, Structure, StructureSet};

/// Traced-graph JSON in, prunable structures out.
pub fn build_structures(ir_json: &str) -> Result<StructureSet> {
    let graph = ir::Graph::from_json(ir_json)?;
    let propagation = propagate::propagate(&graph)?;
    Ok(structures::extract(&graph, propagation))
}
