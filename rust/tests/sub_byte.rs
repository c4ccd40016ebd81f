//! Every dtype, packed sub-byte ones (F4, F6_E2M3, F6_E3M2) included, is copied byte for byte, and
//! cut exactly where a cut is possible: along dimensions whose slices are whole bytes. Rows of a
//! packed dtype need not be whole bytes (an F4 `[1000, 3]` row is 12 bits), so the engine must never
//! compute a row's size in bytes by integer division.

use std::fs;
use std::path::Path;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use structprune_core::dtype::Dtype;
use structprune_core::header::{read_header, serialize_header, TensorEntry};
use structprune_core::plan::CutPlan;
use structprune_core::rewrite::{apply_plan, ApplyOptions, Progress};
use structprune_core::Error;

const DTYPES: [&str; 20] = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
    "C64", "F64", "I64", "U64",
];

/// Bytes that differ from their neighbours and from tensor to tensor, so a byte out of place shows.
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i.wrapping_mul(131) + seed * 17 + i / 251) % 253 + 1) as u8).collect()
}

struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn tensor(name: &str, dtype: Dtype, shape: &[u64], seed: u64) -> Tensor {
    let numel: u64 = shape.iter().product();
    let len = dtype.span_bytes(numel).expect("a whole number of bytes");
    Tensor { name: name.into(), dtype, shape: shape.to_vec(), data: pattern(len, seed) }
}

fn write_model(dir: &Path, tensors: &[Tensor]) {
    fs::create_dir_all(dir).unwrap();
    let mut offset = 0;
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|t| {
            let entry = TensorEntry {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                begin: offset,
                end: offset + t.data.len() as u64,
            };
            offset = entry.end;
            entry
        })
        .collect();
    let mut bytes = serialize_header(&entries, &Map::new());
    for t in tensors {
        bytes.extend_from_slice(&t.data);
    }
    fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

/// Every tensor of the output checkpoint in `dir`: name → (dtype, shape, bytes).
fn read_model(dir: &Path) -> Vec<(String, Dtype, Vec<u64>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut shards: Vec<_> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    shards.sort();
    for shard in shards {
        let header = read_header(&shard).unwrap();
        let bytes = fs::read(&shard).unwrap();
        for t in header.tensors {
            let data = bytes[(header.data_start + t.begin) as usize..(header.data_start + t.end) as usize].to_vec();
            out.push((t.name, t.dtype, t.shape, data));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn plan(tensors: Value) -> CutPlan {
    CutPlan::from_json(&json!({"format": "structprune.cut-plan", "version": 1, "tensors": tensors}).to_string()).unwrap()
}

fn options(threads: usize, memory_budget: u64, max_shard_size: u64) -> ApplyOptions {
    ApplyOptions { threads, memory_budget, max_shard_size, overwrite: false, folders: Vec::new() }
}

fn assert_copied_exactly(input: &[Tensor], output: &Path) {
    let mut expected: Vec<_> = input.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.data.clone())).collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let got = read_model(output);
    assert_eq!(got.len(), expected.len());
    for (got, want) in got.iter().zip(&expected) {
        assert_eq!((&got.0, got.1, &got.2), (&want.0, want.1, &want.2));
        assert!(got.3 == want.3, "tensor {} ({} {:?}): bytes differ", want.0, want.1, want.2);
    }
}

/// The issue's cases: 500 of the 1,500 bytes of an F4 `[1000, 3]` were written as zeros, and an F4
/// `[4, 1]` divided by zero. With a 4 KiB buffer per worker the large ones are split into pieces.
#[test]
fn packed_tensors_with_fractional_rows_are_copied_byte_for_byte() {
    let root = tempfile::tempdir().unwrap();
    let tensors = vec![
        tensor("f4.wide", Dtype::F4, &[1000, 3], 1),
        tensor("f4.column", Dtype::F4, &[4, 1], 2),
        tensor("f4.big", Dtype::F4, &[30002, 1], 3),
        tensor("f6a.rows", Dtype::F6E2M3, &[1000, 5], 4),
        tensor("f6b.rows", Dtype::F6E3M2, &[12, 1], 5),
        tensor("f6b.big", Dtype::F6E3M2, &[20000, 3], 6),
        tensor("f4.scalar_like", Dtype::F4, &[2], 7),
    ];
    let input = root.path().join("in");
    write_model(&input, &tensors);
    for (i, (threads, budget, shard)) in [(1, 1 << 20, 1 << 30), (3, 8192, 1 << 30), (4, 0, 5000)].into_iter().enumerate() {
        let output = root.path().join(format!("out{i}"));
        apply_plan(&input, &plan(json!({})), &output, &options(threads, budget, shard), &Progress::default()).unwrap();
        assert_copied_exactly(&tensors, &output);
    }
}

/// Whole-byte slices of a packed dtype can be cut; a cut through a byte is a plan error naming the
/// tensor and the dimension, before anything is written.
#[test]
fn packed_tensors_are_cut_only_along_whole_byte_slices() {
    let root = tempfile::tempdir().unwrap();
    // F4 [4, 6, 2]: a row is 12 elements (6 bytes), a slice along dim 1 two (1 byte), along dim 2 one.
    let t = tensor("q", Dtype::F4, &[4, 6, 2], 9);
    let input = root.path().join("in");
    write_model(&input, std::slice::from_ref(&t));
    let output = root.path().join("out");
    let cut = plan(json!({"q": {"keep": {"0": [1, 3], "1": [0, 2, 5]}}}));
    apply_plan(&input, &cut, &output, &options(2, 0, 1 << 30), &Progress::default()).unwrap();
    let expected: Vec<u8> = [1usize, 3].iter().flat_map(|&r| [0usize, 2, 5].map(|c| t.data[r * 6 + c])).collect();
    let got = read_model(&output);
    assert_eq!((got[0].1, got[0].2.clone(), got[0].3.clone()), (Dtype::F4, vec![2, 3, 2], expected));

    for (name, dtype, shape, dim) in
        [("q", Dtype::F4, vec![4u64, 6, 2], 2usize), ("r", Dtype::F4, vec![1000, 3], 0), ("s", Dtype::F6E2M3, vec![4, 2], 1)]
    {
        let t = tensor(name, dtype, &shape, 3);
        let dir = root.path().join(format!("in-{name}"));
        write_model(&dir, std::slice::from_ref(&t));
        let output = root.path().join(format!("out-{name}"));
        let cut = plan(json!({name: {"keep": {dim.to_string(): [0]}}}));
        match apply_plan(&dir, &cut, &output, &options(1, 1 << 20, 1 << 30), &Progress::default()) {
            Err(Error::Plan { tensor: Some(tensor), reason, .. }) => {
                assert_eq!(tensor, name);
                assert!(reason.contains(&format!("dim {dim}")) && reason.contains("not a whole number of bytes"), "{reason}");
            }
            other => panic!("{name}: expected a plan error, got {other:?}"),
        }
        assert!(!output.exists());
    }
}

/// A shape whose element count fills whole bytes in `dtype` (what a valid safetensors file holds).
fn dtype_and_shape() -> impl Strategy<Value = (Dtype, Vec<u64>)> {
    let dims = prop_oneof![3 => 0u64..8, 1 => 8u64..40, 1 => 1000u64..9000];
    (prop::sample::select(DTYPES.to_vec()), prop::collection::vec(dims, 0..4))
        .prop_map(|(name, shape)| (Dtype::parse(name).unwrap(), shape))
        .prop_filter("at most 60,000 elements, whole bytes", |(dtype, shape)| {
            let numel = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
            numel.is_some_and(|n| n <= 60_000 && dtype.span_bytes(n).is_some())
        })
}

/// The bytes of `t` cut by `keep` (per dimension, `Some(kept indices)`), by brute force over every
/// kept position of the dimensions up to the last cut one, each a whole-byte slice.
fn reference_cut(t: &Tensor, keep: &[Option<Vec<u64>>]) -> Vec<u8> {
    let Some(last) = keep.iter().rposition(Option::is_some) else { return t.data.clone() };
    let slice_bits = |d: usize| t.shape[d + 1..].iter().product::<u64>() * u64::from(t.dtype.bits());
    let axes: Vec<Vec<u64>> = (0..=last).map(|d| keep[d].clone().unwrap_or_else(|| (0..t.shape[d]).collect())).collect();
    let block = (slice_bits(last) / 8) as usize;
    let mut out = Vec::new();
    let mut positions: Vec<u64> = vec![0];
    for (d, axis) in axes.iter().enumerate() {
        let stride = slice_bits(d) / 8;
        positions = positions.iter().flat_map(|p| axis.iter().map(move |i| p + i * stride)).collect();
    }
    for p in positions {
        out.extend_from_slice(&t.data[p as usize..p as usize + block]);
    }
    out
}

fn cases(default: u32) -> ProptestConfig {
    let scale: f64 = std::env::var("STRUCTPRUNE_EXAMPLE_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    ProptestConfig { cases: (f64::from(default) * scale).ceil() as u32, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cases(48))]

    /// For every dtype and shape, an empty plan's output is byte-identical to its input, tensor by
    /// tensor, whatever the thread count, buffer size and shard size.
    #[test]
    fn empty_plan_copies_every_dtype_and_shape_exactly(
        specs in prop::collection::vec(dtype_and_shape(), 1..5),
        threads in 1usize..4,
        budget in prop::sample::select(vec![0u64, 8192, 1 << 16, 1 << 24]),
        shard in prop::sample::select(vec![1u64, 4096, 1 << 30]),
    ) {
        let root = tempfile::tempdir().unwrap();
        let tensors: Vec<Tensor> =
            specs.iter().enumerate().map(|(i, (dtype, shape))| tensor(&format!("t{i}"), *dtype, shape, i as u64)).collect();
        let input = root.path().join("in");
        write_model(&input, &tensors);
        let output = root.path().join("out");
        apply_plan(&input, &plan(json!({})), &output, &options(threads, budget, shard), &Progress::default()).unwrap();
        assert_copied_exactly(&tensors, &output);
    }

    /// A random cut of a random tensor of any dtype is either exactly the reference bytes or, for a
    /// packed dtype cut through a byte, a plan error naming the tensor.
    #[test]
    fn cuts_of_every_dtype_are_exact_or_refused(
        (dtype, shape) in dtype_and_shape().prop_filter("rank ≥ 1", |(_, s)| !s.is_empty()),
        picks in prop::collection::vec(prop::option::weighted(0.5, prop::collection::vec(any::<bool>(), 0..9000)), 3),
        threads in 1usize..4,
        budget in prop::sample::select(vec![0u64, 1 << 16]),
    ) {
        let t = tensor("w", dtype, &shape, 5);
        let keep: Vec<Option<Vec<u64>>> = shape
            .iter()
            .zip(&picks)
            .map(|(&size, pick)| pick.as_ref().map(|bits| (0..size).filter(|&i| bits.get(i as usize).copied().unwrap_or(true)).collect()))
            .collect();
        let keep_json: Map<String, Value> =
            keep.iter().enumerate().filter_map(|(d, k)| k.as_ref().map(|k| (d.to_string(), json!(k)))).collect();
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("in");
        write_model(&input, std::slice::from_ref(&t));
        let output = root.path().join("out");
        let cut = plan(json!({"w": {"keep": keep_json}}));
        let whole_bytes = keep.iter().enumerate().filter(|(_, k)| k.is_some()).all(|(d, _)| {
            dtype.span_bytes(shape[d + 1..].iter().product()).is_some()
        });
        match apply_plan(&input, &cut, &output, &options(threads, budget, 1 << 30), &Progress::default()) {
            Ok(_) => {
                prop_assert!(whole_bytes);
                let got = read_model(&output);
                let out_shape: Vec<u64> = shape.iter().zip(&keep).map(|(&s, k)| k.as_ref().map_or(s, |k| k.len() as u64)).collect();
                prop_assert_eq!(&got[0].2, &out_shape);
                prop_assert!(got[0].3 == reference_cut(&t, &keep), "bytes differ");
            }
            Err(Error::Plan { tensor, reason, .. }) => {
                prop_assert!(!whole_bytes, "refused a whole-byte cut: {}", reason);
                prop_assert_eq!(tensor.as_deref(), Some("w"));
                prop_assert!(!output.exists());
            }
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }
}
