//! Tensors whose contents a plan takes from another safetensors file (`replace`/`add` with
//! `file` + `tensor`): copied byte for byte whatever the buffer size, checked before writing.

use std::fs;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde_json::{json, Map};
use structprune_core::dtype::Dtype;
use structprune_core::header::{read_header, serialize_header, TensorEntry};
use structprune_core::plan::CutPlan;
use structprune_core::rewrite::{apply_plan, ApplyOptions, Progress};
use structprune_core::Error;

fn write_file(path: &Path, tensors: &[(&str, Dtype, Vec<u64>, Vec<u8>)]) {
    let mut offset = 0;
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let entry =
                TensorEntry { name: (*name).into(), dtype: *dtype, shape: shape.clone(), begin: offset, end: offset + data.len() as u64 };
            offset = entry.end;
            entry
        })
        .collect();
    let mut bytes = serialize_header(&entries, &Map::new());
    for (_, _, _, data) in tensors {
        bytes.extend_from_slice(data);
    }
    fs::write(path, bytes).unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Bytes of tensor `name` in the safetensors file `path`.
fn tensor_bytes(path: &Path, name: &str) -> Vec<u8> {
    let header = read_header(path).unwrap();
    let entry = header.tensors.iter().find(|e| e.name == name).unwrap();
    let bytes = fs::read(path).unwrap();
    bytes[(header.data_start + entry.begin) as usize..(header.data_start + entry.end) as usize].to_vec()
}

fn setup(dir: &Path) {
    fs::create_dir_all(dir.join("model")).unwrap();
    // 3 MiB of F32: large enough for the file-to-file copy path, several buffers at a small budget.
    write_file(
        &dir.join("model/model.safetensors"),
        &[("w", Dtype::F32, vec![768, 1024], pattern(768 * 1024 * 4, 1)), ("b", Dtype::BF16, vec![5], pattern(10, 2))],
    );
    fs::write(dir.join("model/config.json"), "{}").unwrap();
    write_file(
        &dir.join("new.safetensors"),
        &[
            ("other", Dtype::F32, vec![2], pattern(8, 3)),
            ("w", Dtype::F32, vec![768, 512], pattern(768 * 512 * 4, 4)),
            ("extra", Dtype::BF16, vec![3], pattern(6, 5)),
        ],
    );
}

fn plan(dir: &Path, tensor: &str) -> CutPlan {
    let file = dir.join("new.safetensors");
    let keep: Vec<u64> = (0..512).map(|i| 2 * i).collect();
    CutPlan::from_json(
        &json!({
            "format": "structprune.cut-plan", "version": 1,
            "tensors": {
                "w": {"keep": {"1": keep}, "replace": {"file": file, "tensor": tensor}},
                "c": {"add": {"dtype": "BF16", "shape": [3], "file": file, "tensor": "extra"}}
            }
        })
        .to_string(),
    )
    .unwrap()
}

#[test]
fn contents_from_a_file_are_copied_byte_for_byte_whatever_the_buffer() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    for (run, budget) in [(0, 64u64 << 20), (1, 16 << 10)] {
        let out = tmp.path().join(format!("out{run}"));
        let options = ApplyOptions { threads: 3, memory_budget: budget, max_shard_size: 1 << 40, ..ApplyOptions::default() };
        let progress = Progress { cancel: AtomicBool::new(false), ..Progress::default() };
        apply_plan(&tmp.path().join("model"), &plan(tmp.path(), "w"), &out, &options, &progress).unwrap();
        let written = out.join("model.safetensors");
        assert_eq!(tensor_bytes(&written, "w"), tensor_bytes(&tmp.path().join("new.safetensors"), "w"));
        assert_eq!(tensor_bytes(&written, "c"), tensor_bytes(&tmp.path().join("new.safetensors"), "extra"));
        assert_eq!(tensor_bytes(&written, "b"), tensor_bytes(&tmp.path().join("model/model.safetensors"), "b"));
    }
}

#[test]
fn a_file_tensor_of_another_shape_or_dtype_or_missing_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let run = |plan: CutPlan| {
        let out = tmp.path().join("out");
        let result = apply_plan(&tmp.path().join("model"), &plan, &out, &ApplyOptions::default(), &Progress::default());
        assert!(!out.exists());
        result
    };
    match run(plan(tmp.path(), "other")) {
        Err(Error::Plan { tensor: Some(t), reason, .. }) => {
            assert_eq!(t, "w");
            assert!(reason.contains("F32 [2]") && reason.contains("F32 [768, 512]"), "{reason}");
        }
        other => panic!("expected a plan error, got {other:?}"),
    }
    match run(plan(tmp.path(), "nope")) {
        Err(Error::Plan { reason, .. }) => assert!(reason.contains("has no tensor 'nope'"), "{reason}"),
        other => panic!("expected a plan error, got {other:?}"),
    }
    fs::write(tmp.path().join("new.safetensors"), b"not a safetensors file").unwrap();
    match run(plan(tmp.path(), "w")) {
        Err(Error::Header { path, .. }) => assert!(path.ends_with("new.safetensors")),
        other => panic!("expected a header error naming the file, got {other:?}"),
    }
    fs::remove_file(tmp.path().join("new.safetensors")).unwrap();
    assert!(matches!(run(plan(tmp.path(), "w")), Err(Error::Io { .. })));
}
