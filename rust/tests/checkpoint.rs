//! The checkpoint readers take every input field strictly: a partial or empty shard index, a
//! directory holding two checkpoints, an index or config.json past its size limit, not UTF-8,
//! nested past the limit or with a key twice are refused with the file named, before any work.

use std::fs;
use std::path::Path;

use serde_json::{json, Map, Value};
use structprune_core::checkpoint::{Checkpoint, MAX_CONFIG_BYTES, MAX_INDEX_BYTES};
use structprune_core::dtype::Dtype;
use structprune_core::header::{serialize_header, TensorEntry};
use structprune_core::plan::CutPlan;
use structprune_core::rewrite::{apply_plan, ApplyOptions, Progress};
use structprune_core::Error;

fn write_shard(path: &Path, names: &[&str]) {
    let entries: Vec<TensorEntry> = names
        .iter()
        .enumerate()
        .map(|(i, name)| TensorEntry {
            name: (*name).into(),
            dtype: Dtype::F32,
            shape: vec![1],
            begin: 4 * i as u64,
            end: 4 * i as u64 + 4,
        })
        .collect();
    let mut bytes = serialize_header(&entries, &Map::new());
    bytes.resize(bytes.len() + 4 * names.len(), 0);
    fs::write(path, bytes).unwrap();
}

/// Three shards of one tensor each, `a`, `b`, `c`, and an index listing `listed` of them.
fn sharded(dir: &Path, listed: &[usize]) {
    let names = ["a", "b", "c"];
    let mut weight_map = Map::new();
    for (i, name) in names.into_iter().enumerate() {
        let file = format!("model-{:05}-of-00003.safetensors", i + 1);
        write_shard(&dir.join(&file), &[name]);
        if listed.contains(&i) {
            weight_map.insert(name.into(), Value::from(file));
        }
    }
    let index = json!({"metadata": {"total_size": 12}, "weight_map": weight_map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn shard_index_reason(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Err(Error::ShardIndex { reason, .. }) => reason,
        other => panic!("expected a shard index error, got {other:?}"),
    }
}

#[test]
fn a_partial_or_empty_index_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    sharded(dir, &[0, 1, 2]);
    assert_eq!(Checkpoint::open(dir).unwrap().len(), 3);

    sharded(dir, &[0, 2]);
    let reason = shard_index_reason(dir);
    assert!(reason.contains("model-00002-of-00003.safetensors is in the directory") && reason.contains("partial"), "{reason}");

    fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    let reason = shard_index_reason(dir);
    assert!(reason.contains("model-00002-of-00003.safetensors is missing"), "{reason}");

    sharded(dir, &[0, 1, 2]);
    write_shard(&dir.join("model-00004-of-00004.safetensors"), &["d"]);
    let reason = shard_index_reason(dir);
    assert!(reason.contains("model-00004-of-00004.safetensors is in the directory"), "{reason}");
    fs::remove_file(dir.join("model-00004-of-00004.safetensors")).unwrap();

    fs::write(dir.join("model.safetensors.index.json"), r#"{"metadata": {}, "weight_map": {}}"#).unwrap();
    assert!(shard_index_reason(dir).contains("lists no tensors"));
    fs::write(dir.join("model.safetensors.index.json"), r"[1]").unwrap();
    assert!(shard_index_reason(dir).contains("not a JSON object"));
    let twice = r#"{"weight_map": {"a": "model-00001-of-00003.safetensors", "a": "model-00002-of-00003.safetensors"}}"#;
    fs::write(dir.join("model.safetensors.index.json"), twice).unwrap();
    assert!(shard_index_reason(dir).contains("duplicate key 'a'"));
}

#[test]
fn a_directory_with_two_checkpoints_is_refused() {
    let root = tempfile::tempdir().unwrap();
    sharded(root.path(), &[0, 1, 2]);
    write_shard(&root.path().join("model.safetensors"), &["x"]);
    assert!(shard_index_reason(root.path()).contains("both model.safetensors and model.safetensors.index.json"));
}

#[test]
fn an_index_past_its_size_limit_is_refused_unread() {
    let root = tempfile::tempdir().unwrap();
    sharded(root.path(), &[0, 1, 2]);
    let index = fs::File::options().write(true).open(root.path().join("model.safetensors.index.json")).unwrap();
    index.set_len(MAX_INDEX_BYTES + 1).unwrap(); // sparse: nothing is written, and nothing must be read
    assert!(shard_index_reason(root.path()).contains("limit"));
}

#[test]
fn config_json_is_read_strictly_when_the_plan_edits_it() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    fs::create_dir(&input).unwrap();
    write_shard(&input.join("model.safetensors"), &["a"]);
    let plan = CutPlan::from_json(r#"{"format": "structprune.cut-plan", "version": 1, "config": {"hidden_size": 2}}"#).unwrap();
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"name\": \"\xff\xfe\"}".to_vec(), "not UTF-8"),
        (format!(r#"{{"a": {deep}}}"#).into_bytes(), "recursion limit"),
        (br#"{"hidden_size": 4, "hidden_size": 8}"#.to_vec(), "duplicate key 'hidden_size'"),
    ];
    for (text, expected) in cases {
        fs::write(input.join("config.json"), &text).unwrap();
        let output = root.path().join("out");
        match apply_plan(&input, &plan, &output, &ApplyOptions::default(), &Progress::default()) {
            Err(err @ Error::Config { .. }) => assert!(err.to_string().contains(expected), "{err}"),
            other => panic!("{expected}: expected a config error, got {other:?}"),
        }
        assert!(!output.exists());
    }
    let config = fs::File::options().write(true).truncate(true).open(input.join("config.json")).unwrap();
    config.set_len(MAX_CONFIG_BYTES + 1).unwrap();
    match apply_plan(&input, &plan, &root.path().join("out"), &ApplyOptions::default(), &Progress::default()) {
        Err(err @ Error::Config { .. }) => assert!(err.to_string().contains("limit"), "{err}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}
