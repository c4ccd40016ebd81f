//! From propagated spaces to prunable structures: every unpinned leaf space that reaches a
//! parameter is a structure whose units can be removed together, with, for each parameter it
//! touches, the index expression of a unit along that parameter's dimension.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::ir::{Graph, Layers};
use super::propagate::Propagation;
use super::spaces::{SpaceId, Tag};

/// Tags the JSON that `StructureSet::to_json` hands to Python (docs/structures-format.md), so that
/// an extension built from other sources than the Python reading it fails loudly instead of being
/// misread. Bump `VERSION` on any change a reader could notice.
pub const FORMAT: &str = "structprune.structures";
pub const VERSION: u64 = 2;

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
    /// Mixture of experts: a unit is one routed expert, its router row and its slice of every
    /// stacked expert weight.
    Experts,
    /// Mixture of experts: a unit is one intermediate channel, in every expert of the layer at once
    /// (stacked expert weights hold one width for all experts).
    ExpertChannels,
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

impl StructureSet {
    /// The set as the tagged JSON document of docs/structures-format.md.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Document<'a> {
            format: &'static str,
            version: u64,
            #[serde(flatten)]
            set: &'a StructureSet,
        }
        serde_json::to_string(&Document { format: FORMAT, version: VERSION, set: self }).expect("structures always serialise")
    }
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

    let expert_params = stacked_expert_params(&propagation.param_dims, spaces);
    let layer_of = |name: &str| graph.layers.as_ref().and_then(|l| layer_index(&l.prefix, name));
    let mut structures = Vec::new();
    let mut id_of_root = BTreeMap::new();
    for (root, mut members) in by_root {
        members.sort();
        let tags = spaces.tags(root);
        let kind = if tags.contains(&Tag::Hidden) {
            Kind::Hidden
        } else if tags.contains(&Tag::Experts) {
            Kind::Experts
        } else if tags.contains(&Tag::KvHeads) && tags.contains(&Tag::QueryHeads) {
            Kind::Heads
        } else if tags.contains(&Tag::KvHeads) {
            Kind::KvGroups
        } else if tags.contains(&Tag::QueryHeads) {
            Kind::QueryHeads
        } else if members.iter().all(|m| expert_params.contains(&m.param)) {
            Kind::ExpertChannels
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

/// Parameters with an experts dimension (stacked expert weights, routers): a channel space found
/// only in them is a width inside the experts.
fn stacked_expert_params(param_dims: &BTreeMap<String, Vec<SpaceId>>, spaces: &mut super::spaces::Spaces) -> BTreeSet<String> {
    param_dims
        .iter()
        .filter(|(_, dims)| dims.iter().any(|&d| spaces.tags(d).contains(&Tag::Experts)))
        .map(|(name, _)| name.clone())
        .collect()
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
    let template_params: Vec<(String, Vec<u64>)> =
        set.params.iter().filter(|(name, _)| layer_index(&prefix, name) == Some(template)).map(|(n, s)| (n.clone(), s.clone())).collect();
    for &layer in &extra {
        for (name, shape) in &template_params {
            set.params.insert(rename_layer(&prefix, name, template, layer), shape.clone());
        }
    }
    let pinned_template: Vec<PinnedDim> = set.pinned.iter().filter(|p| layer_index(&prefix, &p.param) == Some(template)).cloned().collect();
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
    let block_params: u64 =
        set.params.iter().filter(|(name, _)| layer_index(&prefix, name) == Some(template)).map(|(_, s)| s.iter().product::<u64>()).sum();
    set.blocks = Some(Blocks { prefix, count: layers.total, unit_params: block_params });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::test_ir::{attention, embed, lm_head, n, routed_experts, swiglu, Ir, SEQ};

    /// The structures of `ir` with `x` fed to a 16-word head as the model output.
    fn with_head(mut ir: Ir, x: usize) -> StructureSet {
        let logits = lm_head(&mut ir, x, 16, 8);
        crate::graph::build_structures(&ir.json(&[logits])).expect("the test graph builds")
    }

    fn member(param: &str, dim: usize, stride: u64, free: &[(u64, u64)]) -> Member {
        Member { param: param.into(), dim, offset: 0, stride, free: free.to_vec() }
    }

    fn pinned(set: &StructureSet) -> Vec<(&str, usize, &str)> {
        set.pinned.iter().map(|p| (p.param.as_str(), p.dim, p.reason.as_str())).collect()
    }

    #[test]
    fn mlp_channels_and_the_hidden_stream_are_structures_with_their_unit_costs() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let y = swiglu(&mut ir, x, "mlp", 8, 12);
        let set = with_head(ir, y);
        assert_eq!(set.structures.len(), 2);
        let of_kind = |kind| set.structures.iter().find(|s| s.kind == kind).expect("a structure of each kind");
        let channels = of_kind(Kind::Channels);
        assert_eq!((channels.kind, channels.units, channels.layer, channels.nested_in), (Kind::Channels, 12, None, None));
        assert_eq!(
            channels.members,
            [member("mlp.down.weight", 1, 1, &[]), member("mlp.gate.weight", 0, 1, &[]), member("mlp.up.weight", 0, 1, &[])]
        );
        assert_eq!(channels.unit_params, 3 * 8);
        let hidden = of_kind(Kind::Hidden);
        assert_eq!((hidden.units, hidden.layer), (8, None));
        let params: Vec<(&str, usize)> = hidden.members.iter().map(|m| (m.param.as_str(), m.dim)).collect();
        assert_eq!(
            params,
            [("lm_head.weight", 1), ("mlp.down.weight", 0), ("mlp.gate.weight", 1), ("mlp.up.weight", 1), ("model.embed.weight", 1)]
        );
        assert_eq!(hidden.unit_params, 16 + 3 * 12 + 16);
        assert_eq!(
            pinned(&set),
            [("lm_head.weight", 0, "model output"), ("model.embed.weight", 0, "embedding rows are looked up by token or position id")]
        );
        assert!(set.blocks.is_none());
    }

    #[test]
    fn a_square_weight_on_both_sides_of_a_unit_loses_one_shared_element() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let square = ir.param("square", &[8, 8]);
        let y = ir.op("linear.default", serde_json::json!([n(x), n(square)]), &[1, SEQ, 8]);
        let sum = ir.op("add.Tensor", serde_json::json!([n(x), n(y)]), &[1, SEQ, 8]);
        let set = with_head(ir, sum);
        assert_eq!(set.structures.len(), 1);
        let hidden = &set.structures[0];
        assert_eq!(
            hidden.members,
            [
                member("lm_head.weight", 1, 1, &[]),
                member("model.embed.weight", 1, 1, &[]),
                member("square", 0, 1, &[]),
                member("square", 1, 1, &[])
            ]
        );
        // A hidden channel is a column of the embedding and the head, and a row and a column of
        // the square weight, which share one element.
        assert_eq!(hidden.unit_params, 16 + 16 + (8 + 8 - 1));
    }

    #[test]
    fn attention_without_gqa_has_heads_shared_by_q_k_and_v() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let y = attention(&mut ir, x, "attn", 4, 4, 2);
        let set = with_head(ir, y);
        let heads: Vec<&Structure> = set.structures.iter().filter(|s| s.kind == Kind::Heads).collect();
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].units, 4);
        let head = [(2, 1)];
        let expected: Vec<Member> = ["attn.k.weight", "attn.o.weight", "attn.q.weight", "attn.v.weight"]
            .iter()
            .map(|p| member(p, usize::from(*p == "attn.o.weight"), 2, &head))
            .collect();
        assert_eq!(heads[0].members, expected);
        assert_eq!(heads[0].unit_params, 4 * 2 * 8);
        assert!(set.structures.iter().all(|s| s.kind != Kind::KvGroups && s.kind != Kind::QueryHeads));
    }

    #[test]
    fn gqa_gives_kv_groups_with_query_head_slots_nested_in_them() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let y = attention(&mut ir, x, "attn", 4, 2, 2);
        let set = with_head(ir, y);
        let of_kind = |kind| set.structures.iter().find(|s| s.kind == kind).expect("a structure of each GQA kind");
        let (groups, slots) = (of_kind(Kind::KvGroups), of_kind(Kind::QueryHeads));
        assert_eq!((groups.units, groups.nested_in), (2, None));
        assert_eq!((slots.units, slots.nested_in), (2, Some(groups.id)));
        // Query head h = 2·group + slot and row = 2·h + d, so a group is 4 rows of q, 2 of k and v.
        assert_eq!(
            groups.members,
            [
                member("attn.k.weight", 0, 2, &[(2, 1)]),
                member("attn.o.weight", 1, 4, &[(2, 1), (2, 2)]),
                member("attn.q.weight", 0, 4, &[(2, 1), (2, 2)]),
                member("attn.v.weight", 0, 2, &[(2, 1)]),
            ]
        );
        assert_eq!(slots.members, [member("attn.o.weight", 1, 2, &[(2, 1), (2, 4)]), member("attn.q.weight", 0, 2, &[(2, 1), (2, 4)])]);
        assert_eq!((groups.unit_params, slots.unit_params), (4 * 8 + 2 * 8 + 2 * 8 + 4 * 8, 4 * 8 + 4 * 8));
        let head_dim: Vec<(&str, usize)> =
            set.pinned.iter().filter(|p| p.reason.starts_with("head_dim")).map(|p| (p.param.as_str(), p.dim)).collect();
        assert_eq!(head_dim, [("attn.k.weight", 0), ("attn.o.weight", 1), ("attn.q.weight", 0), ("attn.v.weight", 0)]);
    }

    /// Two traced blocks `layers.{0,1}` (GQA attention and a SwiGLU MLP each) of `total`.
    fn stacked(total: usize) -> StructureSet {
        let mut ir = Ir::default();
        ir.layers("layers", 2, total);
        let mut x = embed(&mut ir, 16, 8);
        for layer in 0..2 {
            x = attention(&mut ir, x, &format!("layers.{layer}.attn"), 4, 2, 2);
            x = swiglu(&mut ir, x, &format!("layers.{layer}.mlp"), 8, 12);
        }
        with_head(ir, x)
    }

    #[test]
    fn untraced_blocks_get_copies_of_the_last_traced_blocks_structures() {
        let traced = stacked(2);
        let set = stacked(4);
        let per_layer = |set: &StructureSet, layer| set.structures.iter().filter(|s| s.layer == Some(layer)).count();
        assert_eq!((per_layer(&traced, 1), per_layer(&set, 2), per_layer(&set, 3)), (3, 3, 3));
        for copy in set.structures.iter().filter(|s| s.layer == Some(3)) {
            let original = set.structures.iter().find(|s| s.layer == Some(1) && s.kind == copy.kind).expect("an original");
            let renamed: Vec<String> = original.members.iter().map(|m| m.param.replace("layers.1.", "layers.3.")).collect();
            assert_eq!(copy.members.iter().map(|m| m.param.clone()).collect::<Vec<_>>(), renamed);
            assert_eq!((copy.units, copy.unit_params), (original.units, original.unit_params));
        }
        let block_params: u64 =
            traced.params.iter().filter(|(name, _)| name.starts_with("layers.1.")).map(|(_, s)| s.iter().product::<u64>()).sum();
        let blocks = set.blocks.as_ref().expect("a layer stack");
        assert_eq!((blocks.prefix.as_str(), blocks.count, blocks.unit_params), ("layers", 4, block_params));
        assert_eq!(set.params["layers.3.mlp.down.weight"], [8, 12]);
        assert_eq!(set.params.len(), traced.params.len() + 2 * 7);
        let pinned_in = |layer: &str| set.pinned.iter().filter(|p| p.param.starts_with(layer)).count();
        assert_eq!(pinned_in("layers.3."), pinned_in("layers.1."));
    }

    #[test]
    fn the_hidden_stream_reaches_every_untraced_block_and_copied_slots_nest_in_copied_groups() {
        let (traced, set) = (stacked(2), stacked(4));
        let hidden = |set: &StructureSet| set.structures.iter().find(|s| s.kind == Kind::Hidden).cloned().expect("a hidden structure");
        let (before, after) = (hidden(&traced), hidden(&set));
        assert_eq!(after.layer, None);
        assert_eq!(after.members.len(), before.members.len() + 2 * 7);
        assert!(after.members.iter().any(|m| m.param == "layers.2.mlp.up.weight" && m.dim == 1));
        let per_block = (after.unit_params - before.unit_params) / 2;
        // Columns of q (8 rows), k and v (4 rows each), a row of o, columns of gate and up, a row of down.
        assert_eq!(per_block, 8 + 4 + 4 + 8 + 3 * 12);
        for slots in set.structures.iter().filter(|s| s.kind == Kind::QueryHeads) {
            let groups = &set.structures[slots.nested_in.expect("slots nest in groups")];
            assert_eq!((groups.kind, groups.layer), (Kind::KvGroups, slots.layer));
        }
    }

    #[test]
    fn routed_experts_give_expert_and_expert_channel_structures() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let y = routed_experts(&mut ir, x, "moe", 8, 4, 6, 2);
        let set = with_head(ir, y);
        let of_kind = |kind| set.structures.iter().find(|s| s.kind == kind).expect("a structure of each MoE kind");
        let experts = of_kind(Kind::Experts);
        assert_eq!(experts.units, 4);
        assert_eq!(
            experts.members,
            [
                member("moe.experts.down_proj", 0, 1, &[]),
                member("moe.experts.gate_up_proj", 0, 1, &[]),
                member("moe.gate.weight", 0, 1, &[])
            ]
        );
        // An expert: its [12, 8] fused gate/up rows, its [8, 6] down projection, its router row.
        assert_eq!(experts.unit_params, 12 * 8 + 8 * 6 + 8);
        let channels = of_kind(Kind::ExpertChannels);
        assert_eq!(channels.units, 6);
        let up_half = Member { offset: 6, ..member("moe.experts.gate_up_proj", 1, 1, &[]) };
        assert_eq!(channels.members, [member("moe.experts.down_proj", 2, 1, &[]), member("moe.experts.gate_up_proj", 1, 1, &[]), up_half]);
        // A channel: two rows and a column in each of the 4 experts.
        assert_eq!(channels.unit_params, 4 * (2 * 8 + 8));
        assert!(set.structures.iter().all(|s| s.kind != Kind::Channels));
    }

    #[test]
    fn layer_index_reads_the_block_number_after_the_prefix() {
        assert_eq!(layer_index("model.layers", "model.layers.3.mlp.up_proj.weight"), Some(3));
        assert_eq!(layer_index("model.layers", "model.layers_extra.3.weight"), None);
        assert_eq!(layer_index("model.layers", "model.norm.weight"), None);
    }

    #[test]
    fn the_json_for_python_starts_with_its_format_and_version() {
        let mut ir = Ir::default();
        let x = embed(&mut ir, 16, 8);
        let set = with_head(ir, x);
        let document: serde_json::Value = serde_json::from_str(&set.to_json()).expect("JSON");
        let keys: Vec<&str> = document.as_object().expect("an object").keys().map(String::as_str).collect();
        assert_eq!(keys, ["format", "version", "structures", "pinned", "blocks", "params"]);
        assert_eq!((document["format"].as_str(), document["version"].as_u64()), (Some(FORMAT), Some(VERSION)));
    }
}
