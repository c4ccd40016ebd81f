//! End-to-end checks of writing caller-held tensors as a checkpoint.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde_json::{json, Map, Value};
use structprune_core::checkpoint::Checkpoint;
use structprune_core::dtype::Dtype;
use structprune_core::header::{serialize_header, TensorEntry};
use structprune_core::rewrite::Progress;
use structprune_core::write::{CheckpointWriter, Extras, Include, TensorSpec, WriteOptions};
use structprune_core::Error;

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("model.embed_tokens.weight", Dtype::F32, vec![8, 4]).unwrap(),
        TensorSpec::new("model.layers.0.mlp.up_proj.weight", Dtype::BF16, vec![6, 4]).unwrap(),
        TensorSpec::new("model.norm.weight", Dtype::F32, vec![4]).unwrap(),
        TensorSpec::new("step", Dtype::I64, vec![]).unwrap(),
    ]
}

/// Bytes of tensor `index` that say which tensor and which byte they are.
fn data(index: usize, spec: &TensorSpec) -> Vec<u8> {
    let numel: u64 = spec.shape.iter().product();
    let len = numel as usize * spec.dtype.item_bytes().unwrap() as usize;
    (0..len).map(|i| (index * 64 + i) as u8).collect()
}

/// A single-file source checkpoint with a config, a tokenizer and a stale weight file.
fn source_checkpoint(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let entry = TensorEntry { name: "old".into(), dtype: Dtype::F32, shape: vec![2], begin: 0, end: 8 };
    let mut bytes = serialize_header(&[entry], &Map::new());
    bytes.extend_from_slice(&[0; 8]);
    fs::write(dir.join("model.safetensors"), bytes).unwrap();
    fs::write(dir.join("config.json"), r#"{"hidden_size": 4}"#).unwrap();
    fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    fs::write(dir.join("pytorch_model.bin"), "stale").unwrap();
}

fn adapter_dir(dir: &Path) -> PathBuf {
    let adapter = dir.join("adapter-work");
    fs::create_dir_all(adapter.join("nested")).unwrap();
    fs::write(adapter.join("adapter_config.json"), r#"{"r": 4}"#).unwrap();
    fs::write(adapter.join("nested").join("note.txt"), "n").unwrap();
    adapter
}

fn write(output: &Path, source: &Path, adapter: &Path, max_shard_size: u64, order: &[usize]) -> Result<(), Error> {
    let extras = Extras {
        source: Some(source.to_owned()),
        includes: vec![Include { from: adapter.to_owned(), to: "adapter".into() }],
        config: None,
    };
    let progress = Progress::default();
    let options = WriteOptions { max_shard_size, overwrite: true };
    let mut writer = CheckpointWriter::create(output, specs(), extras, &options, &progress)?;
    for &index in order {
        let bytes = data(index, &writer.tensors()[index]);
        writer.write_tensor(index, &bytes, &progress)?;
    }
    writer.finish(&progress)?;
    Ok(())
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                found.push((relative, fs::read(&path).unwrap()));
            }
        }
    }
    found.sort();
    found
}

#[test]
fn writes_shards_index_and_copies_byte_identically_in_any_order() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("pruned");
    source_checkpoint(&source);
    let adapter = adapter_dir(root.path());
    let first = root.path().join("first");
    let second = root.path().join("second");
    // 128 bytes per shard: the 128-byte embedding alone, then the rest.
    write(&first, &source, &adapter, 128, &[0, 1, 2, 3]).unwrap();
    write(&second, &source, &adapter, 128, &[3, 1, 0, 2]).unwrap();
    assert_eq!(files(&first), files(&second), "output bytes do not depend on the write order");

    let names: Vec<String> = files(&first).into_iter().map(|(name, _)| name).collect();
    assert_eq!(
        names,
        [
            ".structprune-output",
            "adapter/adapter_config.json",
            "adapter/nested/note.txt",
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ]
    );
    assert_eq!(fs::read_to_string(first.join("config.json")).unwrap(), r#"{"hidden_size": 4}"#);

    let checkpoint = Checkpoint::open(&first).unwrap();
    for (index, spec) in specs().iter().enumerate() {
        let found = checkpoint.get(&spec.name).unwrap();
        let entry = checkpoint.entry(found);
        assert_eq!((entry.dtype, &entry.shape), (spec.dtype, &spec.shape));
        let shard = &checkpoint.shards[found.shard];
        let bytes = fs::read(&shard.path).unwrap();
        let start = (shard.header.data_start + entry.begin) as usize;
        assert_eq!(&bytes[start..start + entry.nbytes() as usize], &data(index, spec)[..]);
        assert_eq!(shard.header.metadata.as_ref().unwrap()["format"], json!("pt"));
    }
    let index: Value = serde_json::from_slice(&fs::read(first.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], json!(128 + 48 + 16 + 8));
}

#[test]
fn one_shard_and_a_replacement_config() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("pruned");
    source_checkpoint(&source);
    let output = root.path().join("out");
    let extras = Extras { source: Some(source), includes: vec![], config: Some(b"{\"patched\": true}\n".to_vec()) };
    let progress = Progress::default();
    let options = WriteOptions { max_shard_size: 1 << 30, overwrite: false };
    let mut writer = CheckpointWriter::create(&output, specs(), extras, &options, &progress).unwrap();
    for index in 0..4 {
        let bytes = data(index, &writer.tensors()[index]);
        writer.write_tensor(index, &bytes, &progress).unwrap();
    }
    let report = writer.finish(&progress).unwrap();
    assert_eq!(report.shards, ["model.safetensors"]);
    assert_eq!(report.skipped_files, ["pytorch_model.bin"], "stale weights of the source are reported");
    assert_eq!(fs::read(output.join("config.json")).unwrap(), b"{\"patched\": true}\n");
    assert_eq!(Checkpoint::open(&output).unwrap().len(), 4);
    assert_eq!(progress.done.load(Ordering::Relaxed), progress.total.load(Ordering::Relaxed));
}

#[test]
fn incomplete_or_wrong_data_leaves_no_output() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("pruned");
    source_checkpoint(&source);
    let output = root.path().join("out");
    let progress = Progress::default();
    let options = WriteOptions { max_shard_size: 1 << 30, overwrite: false };
    let extras = || Extras { source: Some(source.clone()), ..Extras::default() };

    let mut writer = CheckpointWriter::create(&output, specs(), extras(), &options, &progress).unwrap();
    let err = writer.write_tensor(0, &[0; 3], &progress).unwrap_err();
    assert!(err.to_string().contains("model.embed_tokens.weight") && err.to_string().contains("needs 128 bytes, got 3"), "{err}");
    writer.write_tensor(0, &[0; 128], &progress).unwrap();
    assert!(writer.write_tensor(0, &[0; 128], &progress).unwrap_err().to_string().contains("written twice"));
    let err = writer.finish(&progress).unwrap_err();
    assert!(err.to_string().contains("'model.layers.0.mlp.up_proj.weight' was never written"), "{err}");

    let writer = CheckpointWriter::create(&output, specs(), extras(), &options, &progress).unwrap();
    drop(writer);
    let left: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["pruned"], "nothing but the source remains");
}

#[test]
fn refuses_bad_requests_before_writing() {
    let root = tempfile::tempdir().unwrap();
    let source = root.path().join("pruned");
    source_checkpoint(&source);
    let progress = Progress::default();
    let options = WriteOptions { max_shard_size: 1 << 30, overwrite: false };
    let create = |output: &Path, tensors: Vec<TensorSpec>, extras: Extras| {
        CheckpointWriter::create(output, tensors, extras, &options, &progress).map(|_| ())
    };
    let with_source = Extras { source: Some(source.clone()), ..Extras::default() };

    let inside = create(&source.join("merged"), specs(), with_source.clone()).unwrap_err();
    assert!(matches!(inside, Error::Output { .. }), "{inside}");

    let mut twice = specs();
    twice.push(specs()[0].clone());
    let err = create(&root.path().join("a"), twice, Extras::default()).unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");

    let clash = Extras { includes: vec![Include { from: source.join("tokenizer.json"), to: "config.json".into() }], ..with_source.clone() };
    let err = create(&root.path().join("b"), specs(), clash).unwrap_err();
    assert!(err.to_string().contains("two files would be written to 'config.json'"), "{err}");

    let escaping = Extras { includes: vec![Include { from: source.join("tokenizer.json"), to: "../x".into() }], ..Extras::default() };
    assert!(create(&root.path().join("c"), specs(), escaping).is_err());

    fs::create_dir(root.path().join("taken")).unwrap();
    assert!(matches!(create(&root.path().join("taken"), specs(), Extras::default()), Err(Error::OutputExists { .. })));
    let mut left: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["pruned", "taken"], "refused requests leave nothing behind");
}
