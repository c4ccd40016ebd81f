//! From propagated spaces to prunable structures: every unpinned leaf space that reaches a
//! parameter is a structure whose units can be removed together, with, for each parameter it
//! touches, the index expression of a unit along that parameter's dimension.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::ir::{Graph, Layers};
use super::propagate::Propagation;
use super::spaces::{SpaceId, Tag};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Attention heads shared by q, k and v (no GQA): a unit is one head everywhere.
    Heads,
    /// GQA: a unit is one KV head with all the query heads that read it.
    KvGroups,
    /// GQA: a unit is the same query-head slot inside every KV group.
    QueryHeads,
    /// The residual stream: a unit is one hidden channel, network-wide.
    Hidden,
    /// Any other channel space, e.g. MLP intermediate channels.
    Channels,
}

/// Indices of unit `u` along `dim` of `param`: `offset + u·stride + Σ j_k·free_k.1`, `j_k < free_k.0`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Member {
    pub param: String,
    pub dim: usize,
    pub offset: u64,
    pub stride: u64,
    pub free: Vec<(u64, u64)>,
}

impl Member {
    /// How many indices of the dimension one unit covers.
    pub fn width(&self) -> u64 {
        self.free.iter().map(|(count, _)| count).product()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Structure {
    pub id: usize,
    pub kind: Kind,
    pub units: u64,
    /// The repeated block all members belong to, if any.
    pub layer: Option<usize>,
    /// Parameters removed with one unit.
    pub unit_params: u64,
    pub members: Vec<Member>,
    /// For `QueryHeads`: the `KvGroups` structure whose every group holds these slots.
    pub nested_in: Option<usize>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PinnedDim {
    pub param: String,
    pub dim: usize,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Blocks {
    pub prefix: String,
    pub count: usize,
    /// Parameters of one block.
    pub unit_params: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StructureSet {
    pub structures: Vec<Structure>,
    pub pinned: Vec<PinnedDim>,
    pub blocks: Option<Blocks>,
    pub params: BTreeMap<String, Vec<u64>>,
}

pub fn extract(graph: &Graph, mut propagation: Propagation) -> StructureSet {
    let shapes: BTreeMap<String, Vec<u64>> = graph.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect();
    let mut by_root: BTreeMap<SpaceId, Vec<Member>> = BTreeMap::new();
    let mut pinned = Vec::new();
    let spaces = &mut propagation.spaces;
    for (param, dims) in &propagation.param_dims {
        for (dim, &space) in dims.iter().enumerate() {
            for o in spaces.occurrences(space) {
                if spaces.size(o.root) <= 1 {
                    continue;
                }
                if let Some(reason) = o.pinned_by_parent.clone().or_else(|| spaces.pinned(o.root)) {
                    pinned.push(PinnedDim { param: param.clone(), dim, reason });
                    continue;
                }
                by_root.entry(o.root).or_default().push(Member {
                    param: param.clone(),
                    dim,
                    offset: o.offset,
                    stride: o.stride,
                    free: o.free,
                });
            }
        }
    }
    pinned.sort_by(|a, b| (&a.param, a.dim, &a.reason).cmp(&(&b.param, b.dim, &b.reason)));
    pinned.dedup_by(|a, b| a.param == b.param && a.dim == b.dim && a.reason == b.reason);

    let layer_of = |name: &str| graph.layers.as_ref().and_then(|l| layer_index(&l.prefix, name));
    let mut structures = Vec::new();
    let mut id_of_root = BTreeMap::new();
    for (root, mut members) in by_root {
        members.sort();
        let tags = spaces.tags(root);
        let kind = if tags.contains(&Tag::Hidden) {
            Kind::Hidden
        } else if tags.contains(&Tag::KvHeads) && tags.contains(&Tag::QueryHeads) {
            Kind::Heads
        } else if tags.contains(&Tag::KvHeads) {
            Kind::KvGroups
        } else if tags.contains(&Tag::QueryHeads) {
            Kind::QueryHeads
        } else {
            Kind::Channels
        };
        let layers: BTreeSet<Option<usize>> = members.iter().map(|m| layer_of(&m.param)).collect();
        let layer = if layers.len() == 1 { layers.into_iter().next().flatten() } else { None };
        id_of_root.insert(root, structures.len());
        structures.push(Structure {
            id: structures.len(),
            kind,
            units: spaces.size(root),
            layer,
            unit_params: unit_params(&members, &shapes),
            members,
            nested_in: None,
            notes: spaces.notes(root).into_iter().collect(),
        });
    }
    for (inner, outer) in &propagation.nested {
        let (inner, outer) = (spaces.find(*inner), spaces.find(*outer));
        if let (Some(&i), Some(&o)) = (id_of_root.get(&inner), id_of_root.get(&outer)) {
            structures[i].nested_in = Some(o);
        }
    }
    let mut set = StructureSet { structures, pinned, blocks: None, params: shapes };
    if let Some(layers) = &graph.layers {
        expand_layers(&mut set, layers);
    }
    set
}

/// Parameters removed with one unit: per parameter, everything outside the surviving sub-block (a
/// square hidden×hidden weight loses a row and a column, 2n − 1 elements, not 2n).
fn unit_params(members: &[Member], shapes: &BTreeMap<String, Vec<u64>>) -> u64 {
    let mut widths: BTreeMap<&str, BTreeMap<usize, u64>> = BTreeMap::new();
    for m in members {
        *widths.entry(&m.param).or_default().entry(m.dim).or_default() += m.width();
    }
    widths
        .into_iter()
        .map(|(param, dims)| {
            let shape = &shapes[param];
            let numel: u64 = shape.iter().product();
            let kept: u64 = shape.iter().enumerate().map(|(d, &size)| size - dims.get(&d).copied().unwrap_or(0).min(size)).product();
            numel - kept
        })
        .sum()
}

/// `model.layers.3.mlp.up_proj.weight` with prefix `model.layers` → 3.
pub fn layer_index(prefix: &str, name: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('.')?;
    rest.split('.').next()?.parse().ok()
}

fn rename_layer(prefix: &str, name: &str, from: usize, to: usize) -> String {
    let old = format!("{prefix}.{from}.");
    match name.strip_prefix(&old) {
        Some(rest) => format!("{prefix}.{to}.{rest}"),
        None => name.to_owned(),
    }
}

/// Only the first `traced` blocks were traced; the others are copies of the last traced one.
fn expand_layers(set: &mut StructureSet, layers: &Layers) {
    let template = layers.traced.saturating_sub(1);
    let extra: Vec<usize> = (layers.traced..layers.total).collect();
    let prefix = layers.prefix.clone();
    let template_params: Vec<(String, Vec<u64>)> = set
        .params
        .iter()
        .filter(|(name, _)| layer_index(&prefix, name) == Some(template))
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    for &layer in &extra {
        for (name, shape) in &template_params {
            set.params.insert(rename_layer(&prefix, name, template, layer), shape.clone());
        }
    }
    let pinned_template: Vec<PinnedDim> =
        set.pinned.iter().filter(|p| layer_index(&prefix, &p.param) == Some(template)).cloned().collect();
    for &layer in &extra {
        for p in &pinned_template {
            set.pinned.push(PinnedDim { param: rename_layer(&prefix, &p.param, template, layer), ..p.clone() });
        }
    }
    let originals = set.structures.len();
    let mut copy_of: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for index in 0..originals {
        let structure = set.structures[index].clone();
        if structure.layer == Some(template) {
            for &layer in &extra {
                let id = set.structures.len();
                let mut copy = structure.clone();
                copy.id = id;
                copy.layer = Some(layer);
                for m in &mut copy.members {
                    m.param = rename_layer(&prefix, &m.param, template, layer);
                }
                copy_of.insert((index, layer), id);
                set.structures.push(copy);
            }
        } else if structure.layer.is_none() {
            let prefix = &prefix;
            let copies: Vec<Member> = structure
                .members
                .iter()
                .filter(|m| layer_index(prefix, &m.param) == Some(template))
                .flat_map(|m| {
                    extra.iter().map(move |&layer| Member { param: rename_layer(prefix, &m.param, template, layer), ..m.clone() })
                })
                .collect();
            let target = &mut set.structures[index];
            target.members.extend(copies);
            target.members.sort();
            target.unit_params = unit_params(&target.members, &set.params);
        }
    }
    // A copied query-head structure nests in the copy of its KV-group structure.
    for index in originals..set.structures.len() {
        let (Some(outer), Some(layer)) = (set.structures[index].nested_in, set.structures[index].layer) else { continue };
        set.structures[index].nested_in = copy_of.get(&(outer, layer)).copied();
    }
    set.pinned.sort_by(|a, b| (&a.param, a.dim).cmp(&(&b.param, b.dim)));
    let block_params: u64 = set
        .params
        .iter()
        .filter(|(name, _)| layer_index(&prefix, name) == Some(template))
        .map(|(_, s)| s.iter().product::<u64>())
        .sum();
    set.blocks = Some(Blocks { prefix, count: layers.total, unit_params: block_params });
}
