//! The graph rules on golden traced graphs: the IR the tracer gives for tiny configs of five
//! architectures (rust/tests/data/graphs/*.ir.json, written by tests/golden_graphs.py, which
//! tests/test_golden_graphs.py keeps current), so that the rules are tested here without Python.
//!
//! Each graph's structures are compared whole with `<name>.structures.json`; after an intended
//! change, `STRUCTPRUNE_BLESS=1 cargo test --test graph` rewrites those files (review the diff: a
//! changed structure is a changed pruning result). The tests below them assert by hand what each
//! architecture's structures must be, so a blessed regression still fails.

use std::fs;
use std::path::PathBuf;

use serde_json::Value;
use structprune_core::graph::structures::{PinnedDim, FORMAT, VERSION};
use structprune_core::graph::{self, Kind, Member, Structure, StructureSet};

fn data(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/graphs").join(file)
}

fn build(name: &str) -> StructureSet {
    let ir = fs::read_to_string(data(&format!("{name}.ir.json"))).expect("the golden IR exists");
    graph::build_structures(&ir).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Pretty JSON with every value that fits in `WIDTH` columns on one line (a member, a pinned
/// dimension), so that a diff of the goldens reads one change per line.
fn pretty(value: &Value, indent: usize, out: &mut String) {
    const WIDTH: usize = 120;
    let compact = value.to_string();
    let pad = "  ".repeat(indent + 1);
    match value {
        Value::Object(map) if indent * 2 + compact.len() > WIDTH => {
            out.push_str("{\n");
            for (i, (key, item)) in map.iter().enumerate() {
                out.push_str(&format!("{pad}{}: ", Value::from(key.as_str())));
                pretty(item, indent + 1, out);
                out.push_str(if i + 1 < map.len() { ",\n" } else { "\n" });
            }
            out.push_str(&format!("{}}}", "  ".repeat(indent)));
        }
        Value::Array(items) if indent * 2 + compact.len() > WIDTH => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&pad);
                pretty(item, indent + 1, out);
                out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
            }
            out.push_str(&format!("{}]", "  ".repeat(indent)));
        }
        _ => out.push_str(&compact),
    }
}

fn check_golden(name: &str) {
    let actual: Value = serde_json::from_str(&build(name).to_json()).expect("structures are JSON");
    let path = data(&format!("{name}.structures.json"));
    if std::env::var_os("STRUCTPRUNE_BLESS").is_some() {
        let mut text = String::new();
        pretty(&actual, 0, &mut text);
        fs::write(&path, text + "\n").expect("the golden is writable");
        return;
    }
    let expected: Value = serde_json::from_str(&fs::read_to_string(&path).expect("the golden structures exist")).expect("JSON");
    assert!(
        actual == expected,
        "{name}: the structures differ from {}; if the change is intended, rerun with STRUCTPRUNE_BLESS=1 and review the diff",
        path.display()
    );
}

#[test]
fn structures_are_the_golden_ones() {
    for name in ["llama", "gpt2", "gpt_neox", "opt", "mixtral"] {
        check_golden(name);
    }
}

fn member(param: &str, dim: usize, offset: u64, stride: u64, free: &[(u64, u64)]) -> Member {
    Member { param: param.into(), dim, offset, stride, free: free.to_vec() }
}

fn only(set: &StructureSet, kind: Kind, layer: Option<usize>) -> &Structure {
    let found: Vec<&Structure> = set.structures.iter().filter(|s| s.kind == kind && s.layer == layer).collect();
    assert_eq!(found.len(), 1, "one {kind:?} structure in layer {layer:?}");
    found[0]
}

fn kinds_in(set: &StructureSet, layer: Option<usize>) -> Vec<Kind> {
    let mut kinds: Vec<Kind> = set.structures.iter().filter(|s| s.layer == layer).map(|s| s.kind).collect();
    kinds.sort();
    kinds
}

fn has_member(structure: &Structure, param: &str, dim: usize) -> bool {
    structure.members.iter().any(|m| m.param == param && m.dim == dim)
}

fn pinned_for<'a>(set: &'a StructureSet, param: &str) -> Vec<(usize, &'a str)> {
    set.pinned.iter().filter(|p| p.param == param).map(|p| (p.dim, p.reason.as_str())).collect()
}

const EMBEDDING_ROWS: &str = "embedding rows are looked up by token or position id";
const HEAD_DIM_SCALE: &str = "head_dim: the attention scale 1/sqrt(head_dim) and the config's single head_dim";
const HEAD_DIM: &str = "head_dim: the config's single head_dim";

#[test]
fn structures_are_tagged_with_their_format() {
    let document: Value = serde_json::from_str(&build("opt").to_json()).expect("JSON");
    assert_eq!((document["format"].as_str(), document["version"].as_u64()), (Some(FORMAT), Some(VERSION)));
}

#[test]
fn every_op_of_the_golden_graphs_has_a_rule_and_only_embeddings_heads_dims_and_outputs_are_pinned() {
    for name in ["llama", "gpt2", "gpt_neox", "opt", "mixtral"] {
        let set = build(name);
        let unexpected: Vec<&PinnedDim> = set
            .pinned
            .iter()
            .filter(|p| ![EMBEDDING_ROWS, HEAD_DIM_SCALE, HEAD_DIM, "model output"].contains(&p.reason.as_str()))
            .collect();
        assert!(unexpected.is_empty(), "{name}: {unexpected:?}");
    }
}

#[test]
fn llama_gqa_has_kv_groups_with_nested_query_head_slots_in_every_layer() {
    let set = build("llama");
    for layer in 0..3 {
        assert_eq!(kinds_in(&set, Some(layer)), [Kind::KvGroups, Kind::QueryHeads, Kind::Channels], "layer {layer}");
        let groups = only(&set, Kind::KvGroups, Some(layer));
        let slots = only(&set, Kind::QueryHeads, Some(layer));
        assert_eq!((groups.units, slots.units, slots.nested_in), (2, 2, Some(groups.id)));
    }
    let attn = |p: &str| format!("model.layers.0.self_attn.{p}_proj.weight");
    // head_dim 6, two query heads per group: a group is 12 rows of q (and columns of o), 6 of k and v.
    let groups = only(&set, Kind::KvGroups, Some(0));
    assert_eq!(
        groups.members,
        [
            member(&attn("k"), 0, 0, 6, &[(6, 1)]),
            member(&attn("o"), 1, 0, 12, &[(6, 1), (2, 6)]),
            member(&attn("q"), 0, 0, 12, &[(6, 1), (2, 6)]),
            member(&attn("v"), 0, 0, 6, &[(6, 1)]),
        ]
    );
    assert_eq!(groups.unit_params, (12 + 6 + 6) * 16 + 12 * 16);
    // A slot is the same query head of each group: rows 6·slot + 12·group + d.
    let slots = only(&set, Kind::QueryHeads, Some(0));
    assert_eq!(slots.members, [member(&attn("o"), 1, 0, 6, &[(6, 1), (2, 12)]), member(&attn("q"), 0, 0, 6, &[(6, 1), (2, 12)])]);
    assert_eq!(slots.unit_params, 2 * 12 * 16);
    let mlp = only(&set, Kind::Channels, Some(2));
    let names: Vec<&str> = mlp.members.iter().map(|m| m.param.as_str()).collect();
    assert_eq!(names, ["model.layers.2.mlp.down_proj.weight", "model.layers.2.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"]);
    assert_eq!((mlp.units, mlp.unit_params), (40, 3 * 16));
}

#[test]
fn llama_hidden_stream_spans_every_layer_and_the_tied_embedding() {
    let set = build("llama");
    let hidden = only(&set, Kind::Hidden, None);
    assert_eq!(hidden.units, 16);
    for layer in 0..3 {
        assert!(has_member(hidden, &format!("model.layers.{layer}.mlp.down_proj.weight"), 0), "layer {layer}");
        assert!(has_member(hidden, &format!("model.layers.{layer}.input_layernorm.weight"), 0), "layer {layer}");
    }
    assert!(has_member(hidden, "model.embed_tokens.weight", 1) && has_member(hidden, "model.norm.weight", 0));
    assert!(!set.params.contains_key("lm_head.weight"), "the tied head is the embedding, not a parameter of its own");
    // Per layer two norm weights, columns of q, k, v, gate, up and rows of o and down; then the
    // embedding's column and the final norm.
    assert_eq!(hidden.unit_params, 3 * (2 + 24 + 12 + 12 + 24 + 3 * 40) + 32 + 1);
    assert!(!hidden.notes.is_empty() && hidden.notes.iter().all(|n| n.starts_with("reduced by aten.mean.dim")), "{:?}", hidden.notes);
    assert_eq!(pinned_for(&set, "model.embed_tokens.weight"), [(0, EMBEDDING_ROWS)]);
    for layer in 0..3 {
        let attn = |p: &str| format!("model.layers.{layer}.self_attn.{p}_proj.weight");
        assert_eq!(pinned_for(&set, &attn("q")), [(0, HEAD_DIM_SCALE)]);
        assert_eq!(pinned_for(&set, &attn("v")), [(0, HEAD_DIM)]);
    }
    let blocks = set.blocks.as_ref().expect("a layer stack");
    assert_eq!((blocks.prefix.as_str(), blocks.count, blocks.unit_params), ("model.layers", 3, 3104));
    assert_eq!(set.params.len(), 1 + 3 * 9 + 1);
}

#[test]
fn gpt2_fused_c_attn_columns_are_three_segments_of_heads() {
    let set = build("gpt2");
    for layer in 0..3 {
        assert_eq!(kinds_in(&set, Some(layer)), [Kind::Heads, Kind::Channels], "layer {layer}");
    }
    let h = |p: &str| format!("transformer.h.0.{p}");
    let heads = only(&set, Kind::Heads, Some(0));
    // Conv1D stores [in, out]: c_attn's output columns are Q | K | V of 16 each, a head 4 of them.
    let segments = |p: &str, dim| [0, 16, 32].map(|offset| member(&h(p), dim, offset, 4, &[(4, 1)]));
    let mut expected = segments("attn.c_attn.bias", 0).to_vec();
    expected.extend(segments("attn.c_attn.weight", 1));
    expected.push(member(&h("attn.c_proj.weight"), 0, 0, 4, &[(4, 1)]));
    assert_eq!((heads.units, &heads.members), (4, &expected));
    assert_eq!(heads.unit_params, 3 * 4 * 16 + 3 * 4 + 4 * 16);
    let mlp = only(&set, Kind::Channels, Some(0));
    assert_eq!(
        mlp.members,
        [
            member(&h("mlp.c_fc.bias"), 0, 0, 1, &[]),
            member(&h("mlp.c_fc.weight"), 1, 0, 1, &[]),
            member(&h("mlp.c_proj.weight"), 0, 0, 1, &[])
        ]
    );
    assert_eq!((mlp.units, mlp.unit_params), (64, 16 + 1 + 16));
    let hidden = only(&set, Kind::Hidden, None);
    assert!(has_member(hidden, &h("attn.c_attn.weight"), 0) && has_member(hidden, &h("mlp.c_proj.weight"), 1));
    assert!(has_member(hidden, "transformer.wte.weight", 1) && has_member(hidden, "transformer.wpe.weight", 1));
    assert_eq!(pinned_for(&set, "transformer.wpe.weight"), [(0, EMBEDDING_ROWS)]);
}

#[test]
fn gpt_neox_interleaved_qkv_heads_are_runs_of_three_head_dims() {
    let set = build("gpt_neox");
    let l = |p: &str| format!("gpt_neox.layers.0.{p}");
    let heads = only(&set, Kind::Heads, Some(0));
    // Rows of query_key_value are [q_h | k_h | v_h] per head: a head is 24 consecutive rows; partial
    // rotary slices inside a head and pins nothing more.
    assert_eq!(
        heads.members,
        [
            member(&l("attention.dense.weight"), 1, 0, 8, &[(8, 1)]),
            member(&l("attention.query_key_value.bias"), 0, 0, 24, &[(24, 1)]),
            member(&l("attention.query_key_value.weight"), 0, 0, 24, &[(24, 1)]),
        ]
    );
    assert_eq!((heads.units, heads.unit_params), (4, 24 * 32 + 24 + 8 * 32));
    // Parallel residual: both norms read the block input, which is on the hidden stream.
    let hidden = only(&set, Kind::Hidden, None);
    assert!(has_member(hidden, &l("input_layernorm.weight"), 0) && has_member(hidden, &l("post_attention_layernorm.weight"), 0));
    assert!(has_member(hidden, "gpt_neox.embed_in.weight", 1) && has_member(hidden, "lm_head.weight", 1));
    assert_eq!(pinned_for(&set, "gpt_neox.embed_in.weight"), [(0, EMBEDDING_ROWS)]);
    assert_eq!(pinned_for(&set, "lm_head.weight"), [(0, "model output")]);
    assert_eq!(only(&set, Kind::Channels, Some(1)).units, 48);
}

#[test]
fn opt_heads_mlp_and_hidden_survive_the_flattened_mlp() {
    let set = build("opt");
    let l = |p: &str| format!("model.decoder.layers.0.{p}");
    let heads = only(&set, Kind::Heads, Some(0));
    let head = |p: &str, dim| member(&l(p), dim, 0, 4, &[(4, 1)]);
    assert_eq!(
        heads.members,
        [
            head("self_attn.k_proj.bias", 0),
            head("self_attn.k_proj.weight", 0),
            head("self_attn.out_proj.weight", 1),
            head("self_attn.q_proj.bias", 0),
            head("self_attn.q_proj.weight", 0),
            head("self_attn.v_proj.bias", 0),
            head("self_attn.v_proj.weight", 0),
        ]
    );
    assert_eq!(heads.unit_params, 3 * (4 * 16 + 4) + 4 * 16);
    let mlp = only(&set, Kind::Channels, Some(0));
    assert_eq!(
        mlp.members,
        [member(&l("fc1.bias"), 0, 0, 1, &[]), member(&l("fc1.weight"), 0, 0, 1, &[]), member(&l("fc2.weight"), 1, 0, 1, &[])]
    );
    // The MLP runs on [seq, hidden] (flattened from [1, seq, hidden]) and still couples with the stream.
    let hidden = only(&set, Kind::Hidden, None);
    assert!(has_member(hidden, &l("fc1.weight"), 1) && has_member(hidden, &l("fc2.weight"), 0));
    assert!(has_member(hidden, "model.decoder.embed_positions.weight", 1));
    assert_eq!(pinned_for(&set, "model.decoder.embed_positions.weight"), [(0, EMBEDDING_ROWS)]);
}

#[test]
fn mixtral_routed_experts_and_their_channels_are_structures_and_keep_heads_and_hidden() {
    let set = build("mixtral");
    for layer in 0..3 {
        assert_eq!(kinds_in(&set, Some(layer)), [Kind::KvGroups, Kind::QueryHeads, Kind::Experts, Kind::ExpertChannels], "layer {layer}");
    }
    let l = |p: &str| format!("model.layers.2.mlp.{p}");
    let experts = only(&set, Kind::Experts, Some(2));
    assert_eq!(experts.units, 4);
    assert_eq!(
        experts.members,
        [
            member(&l("experts.down_proj"), 0, 0, 1, &[]),
            member(&l("experts.gate_up_proj"), 0, 0, 1, &[]),
            member(&l("gate.weight"), 0, 0, 1, &[])
        ]
    );
    assert_eq!(experts.unit_params, 48 * 16 + 16 * 24 + 16);
    assert!(experts.notes.iter().any(|n| n.ends_with("the softmax renormalises over the experts that stay")), "{:?}", experts.notes);
    let channels = only(&set, Kind::ExpertChannels, Some(2));
    assert_eq!(
        channels.members,
        [
            member(&l("experts.down_proj"), 2, 0, 1, &[]),
            member(&l("experts.gate_up_proj"), 1, 0, 1, &[]),
            member(&l("experts.gate_up_proj"), 1, 24, 1, &[])
        ]
    );
    let hidden = only(&set, Kind::Hidden, None);
    for (param, dim) in [("experts.gate_up_proj", 2), ("experts.down_proj", 1), ("gate.weight", 1)] {
        assert!(has_member(hidden, &l(param), dim), "{param} dim {dim}");
    }
}
