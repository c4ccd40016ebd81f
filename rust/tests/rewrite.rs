//! End-to-end checks of the rewrite engine on checkpoints written here byte by byte.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde_json::{json, Map, Value};
use structprune_core::dtype::Dtype;
use structprune_core::header::{read_header, serialize_header, TensorEntry};
use structprune_core::plan::CutPlan;
use structprune_core::rewrite::{apply_plan, ApplyOptions, Progress};
use structprune_core::Error;

/// A tensor of 2-byte elements whose element i holds the value i, so every byte tells its origin.
fn tensor(name: &str, shape: &[u64]) -> (TensorEntry, Vec<u8>) {
    let numel: u64 = shape.iter().product();
    let data: Vec<u8> = (0..numel as u16).flat_map(u16::to_le_bytes).collect();
    let entry = TensorEntry { name: name.into(), dtype: Dtype::I16, shape: shape.to_vec(), begin: 0, end: 0 };
    (entry, data)
}

fn write_shard(path: &Path, tensors: &[(TensorEntry, Vec<u8>)]) {
    let mut offset = 0;
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|(e, data)| {
            let entry = TensorEntry { begin: offset, end: offset + data.len() as u64, ..e.clone() };
            offset = entry.end;
            entry
        })
        .collect();
    let mut bytes = serialize_header(&entries, &Map::new());
    for (_, data) in tensors {
        bytes.extend_from_slice(data);
    }
    fs::write(path, bytes).unwrap();
}

fn sharded_checkpoint(dir: &Path) {
    let first = vec![tensor("embed", &[10, 6]), tensor("layers.0.up", &[8, 6])];
    let second = vec![tensor("layers.0.down", &[6, 8]), tensor("layers.1.up", &[8, 6]), tensor("scalar", &[])];
    write_shard(&dir.join("a.safetensors"), &first);
    write_shard(&dir.join("b.safetensors"), &second);
    let weight_map: Map<String, Value> = first
        .iter()
        .map(|(e, _)| (e.name.clone(), json!("a.safetensors")))
        .chain(second.iter().map(|(e, _)| (e.name.clone(), json!("b.safetensors"))))
        .collect();
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    fs::write(dir.join("config.json"), r#"{"hidden_size": 6, "intermediate_size": 8, "keep_me": {"a": 1, "b": 2}}"#).unwrap();
    fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    fs::write(dir.join("pytorch_model.bin"), "stale").unwrap();
}

fn plan() -> CutPlan {
    CutPlan::from_json(
        &json!({
            "format": "structprune.cut-plan", "version": 1,
            "index_sets": {"hidden": [0, 2, 3, 5], "mlp": [1, 2, 6]},
            "tensors": {
                "embed": {"keep": {"1": "hidden"}},
                "layers.0.up": {"keep": {"0": "mlp", "1": "hidden"}},
                "layers.0.down": {"keep": {"0": "hidden", "1": "mlp"}},
                "layers.1.up": {"drop": true},
                "scalar": {"rename": "renamed"}
            },
            "config": {"hidden_size": 4, "intermediate_size": 3, "keep_me": {"b": null}}
        })
        .to_string(),
    )
    .unwrap()
}

fn options(threads: usize, memory_budget: u64, max_shard_size: u64) -> ApplyOptions {
    ApplyOptions { threads, memory_budget, max_shard_size, overwrite: false, folders: Vec::new() }
}

/// Element values of a tensor in an output shard, as written by `tensor` (value = source index).
fn values(path: &Path, name: &str) -> (Vec<u64>, Vec<u16>) {
    let header = read_header(path).unwrap();
    let entry = header.tensors.iter().find(|t| t.name == name).unwrap();
    let bytes = fs::read(path).unwrap();
    let data = &bytes[(header.data_start + entry.begin) as usize..(header.data_start + entry.end) as usize];
    (entry.shape.clone(), data.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}

/// The input checkpoint directory `<root>/in`, filled by `write`.
fn input_checkpoint(root: &Path, write: fn(&Path)) -> PathBuf {
    let input = root.join("in");
    fs::create_dir(&input).unwrap();
    write(&input);
    input
}

fn flat(rows: &[u16], cols: &[u16], width: u16) -> Vec<u16> {
    rows.iter().flat_map(|r| cols.iter().map(move |c| r * width + c)).collect()
}

#[test]
fn cuts_renames_drops_and_patches_config() {
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), sharded_checkpoint);
    let output = root.path().join("out");
    let report = apply_plan(&input, &plan(), &output, &options(2, 1 << 20, 1 << 30), &Progress::default()).unwrap();
    assert_eq!(report.shards, ["model.safetensors"]);
    assert_eq!(report.copied_files, ["tokenizer.json"]);
    assert_eq!(report.skipped_files, ["pytorch_model.bin"]);
    let shard = output.join("model.safetensors");
    let names: Vec<String> = read_header(&shard).unwrap().tensors.into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["embed", "layers.0.up", "layers.0.down", "renamed"]);
    let all_rows: Vec<u16> = (0..10).collect();
    assert_eq!(values(&shard, "embed"), (vec![10, 4], flat(&all_rows, &[0, 2, 3, 5], 6)));
    assert_eq!(values(&shard, "layers.0.up"), (vec![3, 4], flat(&[1, 2, 6], &[0, 2, 3, 5], 6)));
    assert_eq!(values(&shard, "layers.0.down"), (vec![4, 3], flat(&[0, 2, 3, 5], &[1, 2, 6], 8)));
    assert_eq!(values(&shard, "renamed"), (vec![], vec![0]));
    let config: Value = serde_json::from_slice(&fs::read(output.join("config.json")).unwrap()).unwrap();
    assert_eq!(config, json!({"hidden_size": 4, "intermediate_size": 3, "keep_me": {"a": 1}}));
}

#[test]
fn writes_the_plans_files_in_place_of_input_files() {
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), sharded_checkpoint);
    let mut with_files = plan();
    with_files.files.insert("tokenizer.json".into(), "{\"from\": \"plan\"}".into());
    with_files.files.insert("modeling_x.py".into(), "X = 1\n".into());
    let output = root.path().join("out");
    let report = apply_plan(&input, &with_files, &output, &options(2, 1 << 20, 1 << 30), &Progress::default()).unwrap();
    assert_eq!(report.copied_files, ["modeling_x.py", "tokenizer.json"]);
    assert_eq!(fs::read_to_string(output.join("tokenizer.json")).unwrap(), "{\"from\": \"plan\"}");
    assert_eq!(fs::read_to_string(output.join("modeling_x.py")).unwrap(), "X = 1\n");
    assert_eq!(fs::read_to_string(input.join("tokenizer.json")).unwrap(), "{}");
}

#[test]
fn output_bytes_do_not_depend_on_threads_buffers_or_input_sharding() {
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), sharded_checkpoint);
    let read_all = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let mut outputs = Vec::new();
    for (i, (threads, budget)) in [(1, 1 << 20), (3, 64), (4, 4096)].into_iter().enumerate() {
        let output = root.path().join(format!("out{i}"));
        apply_plan(&input, &plan(), &output, &options(threads, budget, 100), &Progress::default()).unwrap();
        outputs.push(read_all(&output));
    }
    assert!(outputs[0].len() > 3, "a 100-byte shard limit gives several shards");
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);
    let index: Value = serde_json::from_slice(&outputs[0].iter().find(|(n, _)| n == "model.safetensors.index.json").unwrap().1).unwrap();
    assert_eq!(index["metadata"]["total_size"], json!(2 * (40 + 12 + 12 + 1)));
}

#[test]
fn cancellation_and_errors_leave_no_output() {
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), sharded_checkpoint);
    let output = root.path().join("out");
    let cancelled = Progress::default();
    cancelled.cancel.store(true, Ordering::Relaxed);
    let result = apply_plan(&input, &plan(), &output, &options(2, 1 << 20, 1 << 30), &cancelled);
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    fs::remove_file(input.join("b.safetensors")).unwrap();
    let result = apply_plan(&input, &plan(), &output, &options(2, 1 << 20, 1 << 30), &Progress::default());
    assert!(matches!(result, Err(Error::ShardIndex { .. })), "{result:?}");
    let left: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["in"]);
}

#[test]
fn refuses_outputs_that_would_touch_the_input() {
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), sharded_checkpoint);
    for output in [input.clone(), input.join("nested"), root.path().to_owned()] {
        let mut opts = options(1, 1 << 20, 1 << 30);
        opts.overwrite = true;
        let result = apply_plan(&input, &plan(), &output, &opts, &Progress::default());
        assert!(matches!(result, Err(Error::Output { .. })), "{output:?}: {result:?}");
    }
}

/// Only the checkpoint's own regular files are copied: a directory (a link to one outside above all)
/// is not entered, unknown files are left out, both reported; a FIFO is refused, never opened.
#[test]
fn copies_only_the_checkpoints_own_files() {
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), sharded_checkpoint);
    let outside = root.path().join("credentials");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("token.json"), "secret").unwrap();
    std::os::unix::fs::symlink(&outside, input.join("linked")).unwrap();
    fs::create_dir(input.join("sub")).unwrap();
    fs::write(input.join("sub/notes.json"), "{}").unwrap();
    fs::write(input.join("scratch.bak"), "x").unwrap();
    std::os::unix::fs::symlink(input.join("tokenizer.json"), input.join("vocab.json")).unwrap();
    let output = root.path().join("out");
    let report = apply_plan(&input, &plan(), &output, &options(1, 1 << 20, 1 << 30), &Progress::default()).unwrap();
    assert_eq!(report.copied_files, ["tokenizer.json", "vocab.json"]);
    assert_eq!(report.skipped_files, ["linked/", "pytorch_model.bin", "scratch.bak", "sub/"]);
    assert!(!output.join("linked").exists() && !output.join("sub").exists());

    let status = std::process::Command::new("mkfifo").arg(input.join("pipe")).status().unwrap();
    assert!(status.success());
    let err = apply_plan(&input, &plan(), &root.path().join("out2"), &options(1, 1 << 20, 1 << 30), &Progress::default()).unwrap_err();
    assert!(matches!(err, Error::ShardIndex { .. }) && err.to_string().contains("pipe") && err.to_string().contains("FIFO"), "{err}");
    assert!(!root.path().join("out2").exists());
}

/// Ranges of a megabyte and more go file to file in the kernel; the bytes must be the same.
#[test]
fn large_ranges_copied_in_the_kernel_are_exact() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("in");
    fs::create_dir(&input).unwrap();
    let (rows, cols) = (1536u64, 1024u64); // 3 MiB of I16
    let numel = rows * cols;
    let data: Vec<u8> = (0..numel).flat_map(|i| (i as u16).to_le_bytes()).collect();
    let entry = TensorEntry { name: "big".into(), dtype: Dtype::I16, shape: vec![rows, cols], begin: 0, end: 0 };
    write_shard(&input.join("model.safetensors"), &[(entry.clone(), data.clone()), (TensorEntry { name: "whole".into(), ..entry }, data)]);
    let kept: Vec<u64> = (0..rows).filter(|r| !(700..710).contains(r)).collect();
    let plan =
        CutPlan::from_json(&json!({"format": "structprune.cut-plan", "version": 1, "tensors": {"big": {"keep": {"0": kept}}}}).to_string())
            .unwrap();
    let output = root.path().join("out");
    apply_plan(&input, &plan, &output, &options(2, 1 << 20, 1 << 30), &Progress::default()).unwrap();
    let shard = output.join("model.safetensors");
    let (shape, cut) = values(&shard, "big");
    assert_eq!(shape, vec![rows - 10, cols]);
    let expected: Vec<u16> = kept.iter().flat_map(|r| (0..cols).map(move |c| (r * cols + c) as u16)).collect();
    assert!(cut == expected, "row-cut tensor differs");
    let (_, whole) = values(&shard, "whole");
    assert!(whole.iter().enumerate().all(|(i, &v)| v == i as u16), "uncut tensor differs");
}

/// Where the kernel cannot copy file to file (here: from tmpfs to another file system, EXDEV), the
/// engine falls back to reads and writes, with the same bytes.
#[test]
fn copies_between_file_systems_fall_back_to_reads_and_writes() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let (rows, cols) = (600u64, 1024u64);
    let data: Vec<u8> = (0..rows * cols).flat_map(|i| (i as u16).to_le_bytes()).collect();
    let entry = |name: &str| TensorEntry { name: name.into(), dtype: Dtype::I16, shape: vec![rows, cols], begin: 0, end: 0 };
    let tensors = [(entry("rows"), data.clone()), (entry("cols"), data.clone()), (entry("whole"), data)];
    let kept_rows: Vec<u64> = (0..rows).filter(|r| r % 7 != 3).collect();
    let kept_cols: Vec<u64> = (0..cols).filter(|c| c % 5 != 0).collect();
    let plan = CutPlan::from_json(
        &json!({"format": "structprune.cut-plan", "version": 1,
                "tensors": {"rows": {"keep": {"0": kept_rows}}, "cols": {"keep": {"1": kept_cols}}}})
        .to_string(),
    )
    .unwrap();
    let here = tempfile::tempdir().unwrap();
    let there = tempfile::Builder::new().tempdir_in(shm).unwrap();
    let mut outputs = Vec::new();
    for (n, root) in [here.path(), there.path()].into_iter().enumerate() {
        let input = root.join("in");
        fs::create_dir(&input).unwrap();
        write_shard(&input.join("model.safetensors"), &tensors);
        let output = here.path().join(format!("out-{n}"));
        apply_plan(&input, &plan, &output, &options(2, 1 << 20, 1 << 30), &Progress::default()).unwrap();
        outputs.push(fs::read(output.join("model.safetensors")).unwrap());
    }
    assert!(outputs[0] == outputs[1], "the output differs when the kernel cannot copy");
    let shard = here.path().join("out-1/model.safetensors");
    let (_, cut) = values(&shard, "rows");
    let expected: Vec<u16> = kept_rows.iter().flat_map(|r| (0..cols).map(move |c| (r * cols + c) as u16)).collect();
    assert!(cut == expected, "row-cut tensor differs");
}

/// `layers.0.up.weight` (I16 [4, 3]), `layers.0.down.weight` (F32 [2, 4]), `layers.0.down.bias`
/// (BF16 [2]), `head.weight` (I16 [2, 2]) in one file.
fn checkpoint_with_biases(dir: &Path) {
    let float = |name: &str, dtype: Dtype, shape: &[u64], bytes: Vec<u8>| {
        (TensorEntry { name: name.into(), dtype, shape: shape.to_vec(), begin: 0, end: 0 }, bytes)
    };
    let down: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let bias: Vec<u8> = [0x3f80u16, 0x4000].iter().flat_map(|b| b.to_le_bytes()).collect(); // 1.0, 2.0
    let tensors = vec![
        tensor("layers.0.up.weight", &[4, 3]),
        float("layers.0.down.weight", Dtype::F32, &[2, 4], down),
        float("layers.0.down.bias", Dtype::BF16, &[2], bias),
        tensor("head.weight", &[2, 2]),
    ];
    write_shard(&dir.join("model.safetensors"), &tensors);
}

fn bias_plan(tensors: Value) -> CutPlan {
    CutPlan::from_json(&json!({"format": "structprune.cut-plan", "version": 1, "tensors": tensors}).to_string()).unwrap()
}

fn raw_bytes(path: &Path, name: &str) -> (Dtype, Vec<u64>, Vec<u8>) {
    let header = read_header(path).unwrap();
    let entry = header.tensors.iter().find(|t| t.name == name).unwrap();
    let bytes = fs::read(path).unwrap();
    (entry.dtype, entry.shape.clone(), bytes[(header.data_start + entry.begin) as usize..(header.data_start + entry.end) as usize].to_vec())
}

#[test]
fn added_and_replaced_tensors_hold_the_plans_values_in_a_fixed_place() {
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), checkpoint_with_biases);
    let plan = bias_plan(json!({
        "layers.0.up.weight": {"keep": {"0": [0, 2]}},
        "layers.0.up.bias": {"add": {"dtype": "F16", "shape": [2], "values": [0.5, -65504]}},
        "layers.0.down.bias": {"replace": {"values": [0.333333333, 3]}},
        "layers.0.extra.scale": {"add": {"dtype": "BF16", "shape": [1, 3000], "fill": 0.5}},
        "a.first": {"add": {"dtype": "F64", "shape": [], "values": [0.1]}},
        "head.bias": {"add": {"dtype": "F32", "shape": [2], "fill": 0}}
    }));
    let mut outputs = Vec::new();
    for (i, (threads, budget)) in [(1, 1 << 20), (3, 64)].into_iter().enumerate() {
        let output = root.path().join(format!("out{i}"));
        apply_plan(&input, &plan, &output, &options(threads, budget, 1 << 30), &Progress::default()).unwrap();
        outputs.push(fs::read(output.join("model.safetensors")).unwrap());
    }
    assert!(outputs[0] == outputs[1], "the output depends on threads or buffers");
    let shard = root.path().join("out0").join("model.safetensors");
    let names: Vec<String> = read_header(&shard).unwrap().tensors.into_iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "layers.0.up.weight",
            "layers.0.up.bias",
            "layers.0.down.weight",
            "layers.0.down.bias",
            "head.weight",
            "head.bias",
            "a.first",
            "layers.0.extra.scale"
        ],
        "added tensors follow the last tensor of their module, the others come last in name order"
    );
    let half = |bits: &[u16]| bits.iter().flat_map(|b| b.to_le_bytes()).collect::<Vec<u8>>();
    assert_eq!(raw_bytes(&shard, "layers.0.up.bias"), (Dtype::F16, vec![2], half(&[0x3800, 0xfbff])));
    assert_eq!(raw_bytes(&shard, "layers.0.down.bias"), (Dtype::BF16, vec![2], half(&[0x3eab, 0x4040])), "rounded to BF16");
    assert_eq!(raw_bytes(&shard, "layers.0.extra.scale"), (Dtype::BF16, vec![1, 3000], half(&[0x3f00; 3000])));
    assert_eq!(raw_bytes(&shard, "a.first"), (Dtype::F64, vec![], 0.1f64.to_le_bytes().to_vec()));
    assert_eq!(raw_bytes(&shard, "head.bias"), (Dtype::F32, vec![2], vec![0; 8]));
}

#[test]
fn bad_added_and_replaced_tensors_are_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), checkpoint_with_biases);
    let cases = [
        (json!({"layers.0.down.bias": {"add": {"dtype": "F32", "shape": [2], "fill": 0}}}), "layers.0.down.bias", "already has"),
        (
            json!({"head.weight": {"rename": "head.w"}, "head.w": {"add": {"dtype": "F32", "shape": [2], "fill": 0}}}),
            "head.w",
            "output of tensor 'head.weight'",
        ),
        (json!({"x.bias": {"add": {"dtype": "F32", "shape": [2, 2], "values": [1, 2, 3]}}}), "x.bias", "3 values given for shape [2, 2]"),
        (json!({"x.bias": {"add": {"dtype": "I16", "shape": [1], "fill": 1}}}), "x.bias", "not I16"),
        (json!({"x.bias": {"add": {"dtype": "F16", "shape": [1], "values": [1e6]}}}), "x.bias", "out of range for F16"),
        (json!({"x.bias": {"add": {"dtype": "F32", "shape": [4294967296u64, 4294967296u64], "fill": 0}}}), "x.bias", "too large"),
        (
            json!({"layers.0.down.bias": {"keep": {"0": [1]}, "replace": {"values": [1, 2]}}}),
            "layers.0.down.bias",
            "2 values given for shape [1]",
        ),
        (json!({"head.weight": {"replace": {"fill": 1}}}), "head.weight", "not I16"),
        (json!({"nope": {"replace": {"fill": 1}}}), "nope", "has no tensor"),
    ];
    let output = root.path().join("out");
    for (tensors, tensor, reason) in cases {
        let result = apply_plan(&input, &bias_plan(tensors.clone()), &output, &options(2, 1 << 20, 1 << 30), &Progress::default());
        match result {
            Err(Error::Plan { tensor: Some(t), reason: r, .. }) => {
                assert_eq!(t, tensor, "{tensors}");
                assert!(r.contains(reason), "{tensors}: {r}");
            }
            other => panic!("{tensors}: expected a plan error, got {other:?}"),
        }
    }
    let left: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["in"]);
}

/// A memory budget past the cap is refused before anything is written (100 TB used to abort the
/// process in an allocation failure, leaving its staging directory); one at the cap works on a small
/// model, whose buffers never exceed its largest tensor.
#[test]
fn memory_budget_is_capped_and_never_allocated_past_the_largest_tensor() {
    use structprune_core::rewrite::MAX_MEMORY_BUDGET;
    let root = tempfile::tempdir().unwrap();
    let input = input_checkpoint(root.path(), sharded_checkpoint);
    let output = root.path().join("out");
    let result = apply_plan(&input, &plan(), &output, &options(2, 100_000_000_000_000, 1 << 30), &Progress::default());
    match result {
        Err(err @ Error::Setting { .. }) => {
            let message = err.to_string();
            assert!(message.contains("--memory-budget") && message.contains("1 TiB"), "{message}");
        }
        other => panic!("expected a setting error, got {other:?}"),
    }
    let left: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["in"], "nothing staged");
    apply_plan(&input, &plan(), &output, &options(1, MAX_MEMORY_BUDGET, 1 << 30), &Progress::default()).unwrap();
    assert_eq!(values(&output.join("model.safetensors"), "renamed"), (vec![], vec![0]));
}
