//! Never-panic fuzzing of every reader of user data besides safetensors headers (which
//! `header.rs` fuzzes): cut plans (`CutPlan::from_json`, then validation against a real checkpoint),
//! the shard index, `config.json` under a plan's merge patch, and the traced-graph IR
//! (`build_structures`). Each gets arbitrary text and mutations of a real document (the demo
//! model's plan, index and graph); every outcome must be `Ok` or an error of the kind that reader
//! reports, never a panic.
//!
//! CI runs the case counts below; `STRUCTPRUNE_EXAMPLE_SCALE` multiplies them for a long run (as it
//! does the Python property tests' examples; docs/benchmarks.md has the figures).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};
use structprune_core::checkpoint::Checkpoint;
use structprune_core::dtype::Dtype;
use structprune_core::header::{serialize_header, TensorEntry};
use structprune_core::plan::CutPlan;
use structprune_core::rewrite::{apply_plan, layout, ApplyOptions, Progress};
use structprune_core::{graph, Error};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn demo_model() -> PathBuf {
    repo().join("demo/model")
}

fn demo_checkpoint() -> &'static Checkpoint {
    static CHECKPOINT: OnceLock<Checkpoint> = OnceLock::new();
    CHECKPOINT.get_or_init(|| Checkpoint::open(&demo_model()).expect("the demo model is a valid checkpoint"))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn demo_plan() -> &'static Value {
    static PLAN: OnceLock<Value> = OnceLock::new();
    PLAN.get_or_init(|| read_json(&repo().join("demo/example-plan.json")))
}

fn demo_graph() -> &'static Value {
    static GRAPH: OnceLock<Value> = OnceLock::new();
    GRAPH.get_or_init(|| read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/demo-graph.json")))
}

/// `default` cases (what CI runs), times `STRUCTPRUNE_EXAMPLE_SCALE` when set.
fn cases(default: u32) -> ProptestConfig {
    let scale: f64 = std::env::var("STRUCTPRUNE_EXAMPLE_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    ProptestConfig { cases: (f64::from(default) * scale).ceil() as u32, ..ProptestConfig::default() }
}

/// Words the readers give meaning to, so that mutations reach past the first type check.
const WORDS: &[&str] = &[
    "format",
    "version",
    "index_sets",
    "tensors",
    "config",
    "files",
    "metadata",
    "keep",
    "drop",
    "rename",
    "add",
    "replace",
    "dtype",
    "shape",
    "values",
    "fill",
    "file",
    "tensor",
    "weight_map",
    "total_size",
    "op",
    "args",
    "kwargs",
    "shapes",
    "name",
    "params",
    "nodes",
    "outputs",
    "layers",
    "prefix",
    "traced",
    "total",
    "tied",
    "node",
    "model",
    "structprune.cut-plan",
    "structprune.traced-graph",
    "F32",
    "BF16",
    "F16",
    "F4",
    "I64",
    "BOOL",
    "X",
    "mlp",
    "hidden",
    "keep0",
    "model.safetensors",
    "model.layers.0.mlp.up_proj.weight",
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.norm.weight",
    "../x",
    "",
    "/",
    ".",
    "Cargo.toml",
    "/dev/null",
    "aten.linear.default",
    "aten.view.default",
    "aten.reshape.default",
    "aten.expand.default",
    "aten.slice.Tensor",
    "aten.cat.default",
    "aten.transpose.int",
    "aten.scaled_dot_product_attention.default",
    "aten.embedding.default",
    "aten.mul.Tensor",
    "aten.add.Tensor",
    "getitem",
    "param",
    "input",
    "buffer",
    "a.json",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..1100).prop_map(Value::from),
        prop::sample::select(vec![u64::MAX, u64::MAX / 2, 1 << 53, (1 << 53) + 1, 1 << 32, 1 << 40, 4_000_000_000]).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![0.5, -0.0, 1e308, -1e308, 3.4e38, 7e38, 65504.0, 65520.0, 1e-320]).prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
        "[a-z0-9._/]{0,10}".prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..4).prop_map(|entries| Value::Object(entries.into_iter().collect())),
            // A reference to an earlier (or later, or absent) graph node.
            (0u64..260).prop_map(|id| json!({ "node": id })),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(WORDS).prop_map(str::to_owned), "[a-z0-9._]{0,8}"]
}

/// One edit of a JSON document, at node `at` in pre-order.
#[derive(Debug, Clone)]
enum Edit {
    Replace(Index, Value),
    Remove(Index),
    /// A member into an object (an element onto an array; a leaf is replaced).
    Insert(Index, String, Value),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        3 => (any::<Index>(), value()).prop_map(|(at, v)| Edit::Replace(at, v)),
        2 => any::<Index>().prop_map(Edit::Remove),
        2 => (any::<Index>(), key(), value()).prop_map(|(at, k, v)| Edit::Insert(at, k, v)),
    ];
    prop::collection::vec(edit, 1..5)
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(count).sum(),
        Value::Object(map) => map.values().map(count).sum(),
        _ => 0,
    }
}

fn mutated(document: &Value, edits: &[Edit]) -> Value {
    let mut doc = document.clone();
    for edit in edits {
        let at = match edit {
            Edit::Replace(at, _) | Edit::Remove(at) | Edit::Insert(at, _, _) => at.index(count(&doc)),
        };
        let mut left = at;
        apply(&mut doc, &mut left, edit);
    }
    doc
}

/// Applies `edit` to node number `*left` of `v` (counting down in pre-order); true once done.
fn apply(v: &mut Value, left: &mut usize, edit: &Edit) -> bool {
    if *left == 0 {
        match (edit, &mut *v) {
            (Edit::Insert(_, key, new), Value::Object(map)) => {
                map.insert(key.clone(), new.clone());
            }
            (Edit::Insert(_, _, new), Value::Array(items)) => items.push(new.clone()),
            (Edit::Replace(_, new) | Edit::Insert(_, _, new), _) => *v = new.clone(),
            (Edit::Remove(_), _) => *v = Value::Null, // the root: nothing holds it
        }
        return true;
    }
    *left -= 1;
    match v {
        Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if *left == 0 && matches!(edit, Edit::Remove(_)) {
                    map.shift_remove(&key);
                    return true;
                }
                if apply(map.get_mut(&key).expect("listed"), left, edit) {
                    return true;
                }
            }
        }
        Value::Array(items) => {
            for i in 0..items.len() {
                if *left == 0 && matches!(edit, Edit::Remove(_)) {
                    items.remove(i);
                    return true;
                }
                if apply(&mut items[i], left, edit) {
                    return true;
                }
            }
        }
        _ => {}
    }
    false
}

/// A plan either parses and validates against the demo checkpoint or fails as a plan, header
/// (a tensor taken from a file that is not safetensors) or I/O error (a file that cannot be read).
fn check_plan(text: &str) -> Result<(), TestCaseError> {
    match CutPlan::from_json(text) {
        Err(err) => prop_assert!(matches!(err, Error::Plan { .. }), "from_json: {err:?}"),
        Ok(plan) => {
            if let Err(err) = layout(demo_checkpoint(), &plan, 1 << 20) {
                prop_assert!(matches!(err, Error::Plan { .. } | Error::Header { .. } | Error::Io { .. }), "layout: {err:?}");
            }
        }
    }
    Ok(())
}

fn check_graph(text: &str) -> Result<(), TestCaseError> {
    if let Err(err) = graph::build_structures(text) {
        prop_assert!(matches!(err, Error::Graph { .. }), "build_structures: {err:?}");
    }
    Ok(())
}

/// A two-shard checkpoint to read with fuzzed indexes: `a.safetensors` holds x and y, `b` holds z.
fn sharded_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        for (file, names) in [("a.safetensors", &["x", "y"][..]), ("b.safetensors", &["z"][..])] {
            let entries: Vec<TensorEntry> = names
                .iter()
                .enumerate()
                .map(|(i, name)| TensorEntry {
                    name: (*name).into(),
                    dtype: Dtype::F32,
                    shape: vec![2],
                    begin: 8 * i as u64,
                    end: 8 * (i as u64 + 1),
                })
                .collect();
            let mut bytes = serialize_header(&entries, &Map::new());
            bytes.resize(bytes.len() + 8 * names.len(), 0);
            fs::write(dir.path().join(file), bytes).unwrap();
        }
        fs::write(dir.path().join("config.json"), r#"{"hidden_size": 2, "nested": {"a": [1, 2]}}"#).unwrap();
        dir
    })
    .path()
}

fn index() -> Value {
    json!({"metadata": {"total_size": 24}, "weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}})
}

/// Each case writes its own index into its own copy of the shards' directory (cases run in one
/// thread, but a fresh directory keeps them independent).
fn check_index(text: &str) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    for file in ["a.safetensors", "b.safetensors"] {
        fs::hard_link(sharded_dir().join(file), dir.path().join(file)).unwrap();
    }
    fs::write(dir.path().join("model.safetensors.index.json"), text).unwrap();
    if let Err(err) = Checkpoint::open(dir.path()) {
        prop_assert!(matches!(err, Error::ShardIndex { .. } | Error::Header { .. }), "Checkpoint::open: {err:?}");
    }
    Ok(())
}

/// config.json and the plan's merge patch both fuzzed, through the whole engine: the output is
/// written, or the error is the config's (or, for a patch that is not JSON-mergeable, the plan's).
fn check_config(config: &str, patch: &Value) -> Result<(), TestCaseError> {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    fs::create_dir(&input).unwrap();
    for file in ["a.safetensors", "b.safetensors"] {
        fs::hard_link(sharded_dir().join(file), input.join(file)).unwrap();
    }
    fs::write(input.join("model.safetensors.index.json"), index().to_string()).unwrap();
    fs::write(input.join("config.json"), config).unwrap();
    let plan = json!({"format": "structprune.cut-plan", "version": 1, "config": patch}).to_string();
    let options = ApplyOptions { threads: 1, ..ApplyOptions::default() };
    match CutPlan::from_json(&plan) {
        Err(err) => prop_assert!(matches!(err, Error::Plan { .. }), "from_json: {err:?}"),
        Ok(plan) => match apply_plan(&input, &plan, &root.path().join("out"), &options, &Progress::default()) {
            // Without a patch config.json is copied as it is, valid or not.
            Ok(_) if plan.config_patch.is_none() => {}
            Ok(_) => {
                let written: Value = serde_json::from_str(&fs::read_to_string(root.path().join("out/config.json")).unwrap()).unwrap();
                prop_assert!(written.is_object(), "patched config is not an object: {written}");
            }
            Err(err) => prop_assert!(matches!(err, Error::Config { .. }), "apply_plan: {err:?}"),
        },
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn plan_text_never_panics(text in "\\PC{0,200}") {
        check_plan(&text)?;
    }

    #[test]
    fn mutated_plans_never_panic(edits in edits()) {
        check_plan(&mutated(demo_plan(), &edits).to_string())?;
    }

    #[test]
    fn graph_text_never_panics(text in "\\PC{0,200}") {
        check_graph(&text)?;
    }

    #[test]
    fn mutated_graphs_never_panic(edits in edits()) {
        check_graph(&mutated(demo_graph(), &edits).to_string())?;
    }
}

proptest! {
    // Each case creates a directory (and, for the config, writes a checkpoint): fewer in CI.
    #![proptest_config(cases(64))]

    #[test]
    fn index_text_never_panics(text in "\\PC{0,120}") {
        check_index(&text)?;
    }

    #[test]
    fn mutated_indexes_never_panic(edits in edits()) {
        check_index(&mutated(&index(), &edits).to_string())?;
    }

    #[test]
    fn configs_and_patches_never_panic(config_edits in edits(), patch in value(), text in prop::option::weighted(0.2, "\\PC{0,60}")) {
        let base = json!({"hidden_size": 2, "nested": {"a": [1, 2]}, "architectures": ["X"]});
        let config = text.unwrap_or_else(|| mutated(&base, &config_edits).to_string());
        check_config(&config, &patch)?;
    }
}

/// Crashes the fuzzing found, kept as plain regressions.
#[test]
fn crashes_found_by_fuzzing_are_graph_errors() {
    let mut huge = demo_graph().clone();
    huge["layers"]["total"] = json!(1u64 << 40); // was: an 8 TB allocation while expanding layers
    let mut undeclared = demo_graph().clone();
    undeclared["params"].as_array_mut().unwrap().remove(1); // was: a panic in unit_params
    let mut overflowing = demo_graph().clone();
    overflowing["params"][0]["shape"] = json!([u64::MAX, 2]);
    for graph in [huge, undeclared, overflowing] {
        let err = graph::build_structures(&graph.to_string()).unwrap_err();
        assert!(matches!(err, Error::Graph { .. }), "{err:?}");
    }
}
