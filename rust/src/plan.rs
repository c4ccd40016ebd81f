//! The cut plan (`docs/plan-format.md`): parsing, and validation against a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::checkpoint::{Checkpoint, TensorRef};
use crate::dtype::Dtype;
use crate::error::{Error, Result};

pub const FORMAT: &str = "structprune.cut-plan";
pub const VERSION: u64 = 1;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    format: String,
    version: u64,
    #[serde(default)]
    index_sets: BTreeMap<String, Vec<u64>>,
    #[serde(default)]
    tensors: BTreeMap<String, RawCut>,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    files: BTreeMap<String, String>,
    /// Provenance for people and tools; the engine has no use for it.
    #[serde(default, rename = "metadata")]
    _metadata: serde::de::IgnoredAny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCut {
    #[serde(default)]
    keep: BTreeMap<String, Value>,
    #[serde(default)]
    drop: bool,
    #[serde(default)]
    rename: Option<String>,
    /// Parsed on its own (`RawAdd`), so that its errors can name the tensor.
    #[serde(default)]
    add: Option<Value>,
    /// Parsed on its own (`RawValues`), so that its errors can name the tensor.
    #[serde(default)]
    replace: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdd {
    dtype: String,
    shape: Vec<u64>,
    #[serde(default)]
    values: Option<Vec<f64>>,
    #[serde(default)]
    fill: Option<f64>,
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    tensor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValues {
    #[serde(default)]
    values: Option<Vec<f64>>,
    #[serde(default)]
    fill: Option<f64>,
    /// A safetensors file holding the contents as `tensor` (weights a reconstruction computed:
    /// far too many numbers for JSON).
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    tensor: Option<String>,
}

/// Kept indices along one dimension; shared between tensors that use the same index set.
pub type KeepList = Arc<Vec<u64>>;

/// Contents a plan gives a tensor: every element in row-major order, or one value for all (both
/// rounded to the tensor's dtype when the output is laid out), or a tensor of a safetensors file,
/// copied byte for byte (it must have the output's dtype and shape).
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    Each(Arc<Vec<f64>>),
    Fill(f64),
    File { path: PathBuf, tensor: String },
}

/// A tensor the checkpoint does not have, written with the plan's values.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedTensor {
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub values: Values,
}

#[derive(Debug, Clone, Default)]
pub struct TensorCut {
    /// `(dim, kept indices)`, sorted by dim.
    pub keep: Vec<(usize, KeepList)>,
    pub drop: bool,
    pub rename: Option<String>,
    /// Set for a tensor the plan creates; then nothing else is.
    pub add: Option<AddedTensor>,
    /// New contents of a stored tensor (of its output shape, in its own dtype).
    pub replace: Option<Values>,
}

#[derive(Debug, Clone, Default)]
pub struct CutPlan {
    pub tensors: BTreeMap<String, TensorCut>,
    /// RFC 7386 merge patch for config.json.
    pub config_patch: Option<Value>,
    /// Text files written into the output (file name → content), replacing input files of the same name.
    pub files: BTreeMap<String, String>,
}

impl CutPlan {
    pub fn from_json(text: &str) -> Result<CutPlan> {
        let plain = |reason: String| Error::Plan { tensor: None, reason };
        let raw: RawPlan = serde_json::from_str(text).map_err(|e| plain(format!("not a valid plan: {e}")))?;
        if raw.format != FORMAT {
            return Err(plain(format!("format is '{}', expected '{FORMAT}'", raw.format)));
        }
        if raw.version != VERSION {
            return Err(plain(format!("version {} is not supported (this build reads version {VERSION})", raw.version)));
        }
        let sets: HashMap<String, KeepList> =
            raw.index_sets.into_iter().map(|(name, list)| (name, Arc::new(list))).collect();
        for (name, list) in &sets {
            check_increasing(list).map_err(|r| plain(format!("index set '{name}': {r}")))?;
        }
        let mut tensors = BTreeMap::new();
        for (name, raw_cut) in raw.tensors {
            let cut = resolve_cut(&name, raw_cut, &sets)?;
            tensors.insert(name, cut);
        }
        // An empty merge patch changes nothing, so it needs no config.json either.
        let config_patch = raw.config.filter(|patch| !patch.is_null() && patch.as_object().is_none_or(|o| !o.is_empty()));
        if let Some(patch) = &config_patch {
            if !patch.is_object() {
                return Err(plain("'config' must be a JSON object (a merge patch)".into()));
            }
        }
        for name in raw.files.keys() {
            check_file_name(name).map_err(|r| plain(format!("file '{name}': {r}")))?;
        }
        Ok(CutPlan { tensors, config_patch, files: raw.files })
    }
}

fn resolve_cut(name: &str, raw: RawCut, sets: &HashMap<String, KeepList>) -> Result<TensorCut> {
    if raw.drop && (!raw.keep.is_empty() || raw.rename.is_some() || raw.replace.is_some()) {
        return Err(Error::plan(name, "'drop' cannot be combined with 'keep', 'rename' or 'replace'"));
    }
    if let Some(new_name) = &raw.rename {
        check_output_name(new_name).map_err(|r| Error::plan(name, format!("'rename': {r}")))?;
    }
    if let Some(add) = raw.add {
        check_output_name(name).map_err(|r| Error::plan(name, format!("'add': {r}")))?;
        if raw.drop || !raw.keep.is_empty() || raw.rename.is_some() || raw.replace.is_some() {
            return Err(Error::plan(name, "'add' creates a tensor and cannot be combined with another action"));
        }
        return Ok(TensorCut { add: Some(resolve_add(name, add)?), ..TensorCut::default() });
    }
    let replace = raw.replace.map(|value| resolve_replace(name, value)).transpose()?;
    let mut keep = Vec::with_capacity(raw.keep.len());
    for (dim_text, indices) in raw.keep {
        let dim: usize = dim_text
            .parse()
            .map_err(|_| Error::plan(name, format!("keep dimension '{dim_text}' is not a non-negative integer")))?;
        let list = match indices {
            Value::String(set) => sets
                .get(&set)
                .cloned()
                .ok_or_else(|| Error::plan(name, format!("dim {dim}: unknown index set '{set}'")))?,
            Value::Array(items) => {
                let list = items
                    .iter()
                    .map(|v| v.as_u64().ok_or_else(|| Error::plan(name, format!("dim {dim}: index {v} is not a non-negative integer"))))
                    .collect::<Result<Vec<u64>>>()?;
                check_increasing(&list).map_err(|r| Error::plan(name, format!("dim {dim}: {r}")))?;
                Arc::new(list)
            }
            other => {
                return Err(Error::plan(name, format!("dim {dim}: expected a list of indices or an index set name, got {other}")))
            }
        };
        keep.push((dim, list));
    }
    keep.sort_by_key(|(dim, _)| *dim);
    Ok(TensorCut { keep, drop: raw.drop, rename: raw.rename, add: None, replace })
}

fn resolve_add(name: &str, raw: Value) -> Result<AddedTensor> {
    let raw: RawAdd = serde_json::from_value(raw).map_err(|e| Error::plan(name, format!("'add': {e}")))?;
    let dtype = Dtype::parse(&raw.dtype)
        .ok_or_else(|| Error::plan(name, format!("'add': unknown safetensors dtype '{}'", raw.dtype)))?;
    let values = one_of(name, "add", RawValues { values: raw.values, fill: raw.fill, file: raw.file, tensor: raw.tensor })?;
    Ok(AddedTensor { dtype, shape: raw.shape, values })
}

fn resolve_replace(name: &str, raw: Value) -> Result<Values> {
    let raw: RawValues = serde_json::from_value(raw).map_err(|e| Error::plan(name, format!("'replace': {e}")))?;
    one_of(name, "replace", raw)
}

fn one_of(name: &str, action: &str, raw: RawValues) -> Result<Values> {
    match (raw.values, raw.fill, raw.file, raw.tensor) {
        (Some(values), None, None, None) => Ok(Values::Each(Arc::new(values))),
        (None, Some(fill), None, None) => Ok(Values::Fill(fill)),
        (None, None, Some(path), Some(tensor)) => Ok(Values::File { path, tensor }),
        (None, None, Some(_), None) | (None, None, None, Some(_)) => {
            Err(Error::plan(name, format!("'{action}' from a file needs both 'file' and 'tensor'")))
        }
        _ => Err(Error::plan(
            name,
            format!("'{action}' needs exactly one of 'values' (every element), 'fill' (one value for all) and 'file' + 'tensor'"),
        )),
    }
}

/// Output tensor names a safetensors header can hold: not empty, not the metadata key.
fn check_output_name(name: &str) -> std::result::Result<(), String> {
    match name {
        "" => Err("an empty tensor name cannot be written".into()),
        "__metadata__" => Err("'__metadata__' is the safetensors header's metadata key, not a tensor name".into()),
        _ => Ok(()),
    }
}

/// Extensions of files that load by unpickling (running code): a plan never writes one.
const PICKLE_EXTENSIONS: [&str; 9] = ["bin", "pt", "pth", "pkl", "pickle", "ckpt", "joblib", "npy", "npz"];

/// A plan's extra file must be a plain file name the engine does not write itself.
fn check_file_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        return Err("must be a plain file name (no directories, not hidden)".into());
    }
    let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    if PICKLE_EXTENSIONS.contains(&extension.as_str()) {
        return Err(format!("'.{extension}' files load by unpickling, which runs code: a plan does not write them"));
    }
    if name == crate::checkpoint::CONFIG_FILE || name == crate::checkpoint::INDEX_FILE || name.ends_with(".safetensors") {
        return Err("the engine writes this file itself (use 'config' for config.json edits)".into());
    }
    Ok(())
}

fn check_increasing(list: &[u64]) -> std::result::Result<(), String> {
    match list.windows(2).find(|w| w[0] >= w[1]) {
        Some(w) => Err(format!("indices must be strictly increasing, found {} then {}", w[0], w[1])),
        None => Ok(()),
    }
}

/// Where an output tensor's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// A checkpoint tensor, cut by `OutputTensor::keep`.
    Stored(TensorRef),
    /// The plan's values, encoded in the output dtype.
    Given(Arc<Vec<u8>>),
    /// One element's bytes, repeated (a fill: generated while writing, never held whole).
    Repeated(Vec<u8>),
    /// A whole tensor of another safetensors file: its bytes start at `offset` of `path`.
    External { path: Arc<PathBuf>, offset: u64 },
}

/// One tensor of the output checkpoint and where its bytes come from.
#[derive(Debug, Clone)]
pub struct OutputTensor {
    pub name: String,
    pub data: Data,
    pub dtype: Dtype,
    /// The stored tensor's shape (the output shape when the data is not stored).
    pub source_shape: Vec<u64>,
    pub shape: Vec<u64>,
    /// Per source dimension: `Some(kept indices)` where the plan cuts it.
    pub keep: Vec<Option<KeepList>>,
    pub nbytes: u64,
}

impl OutputTensor {
    pub fn is_cut(&self) -> bool {
        self.keep.iter().any(Option::is_some)
    }

    /// Bits in one output row (one index along dimension 0, every index of the others); `None` for a
    /// 0-d tensor or one without rows. Not always a whole number of bytes: an F4 `[1000, 3]` row is
    /// 12 bits.
    pub fn row_bits(&self) -> Option<u64> {
        let rows = *self.shape.first()?;
        // nbytes × 8 is exactly rows × row bits, so the division is exact.
        (rows > 0).then(|| (u128::from(self.nbytes) * 8 / u128::from(rows)) as u64)
    }

    /// The output bytes of rows `rows` (along dimension 0) as (offset, length) relative to the
    /// tensor's first byte; the whole tensor for a 0-d one. Exact when both ends of `rows` fall on
    /// byte boundaries (the engine's work items always do: see [`OutputTensor::rows_per_byte`]).
    pub fn row_span(&self, rows: &std::ops::Range<u64>) -> (u64, u64) {
        match self.row_bits() {
            None if self.shape.is_empty() => (0, self.nbytes),
            None => (0, 0),
            Some(bits) => {
                let at = |row: u64| (u128::from(row) * u128::from(bits) / 8) as u64;
                (at(rows.start), at(rows.end) - at(rows.start))
            }
        }
    }

    /// The fewest rows whose bits are a whole number of bytes (1 for byte-sized elements; up to 8
    /// for packed sub-byte ones): ranges of rows start and end on multiples of it.
    pub fn rows_per_byte(&self) -> u64 {
        match self.row_bits() {
            Some(bits) if bits > 0 => 8 / gcd(bits, 8),
            _ => 1,
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Checks the plan against the checkpoint and lists the output tensors in storage order: stored
/// tensors in input order, each added tensor right after the last one of its module (see `place_added`).
pub fn output_tensors(plan: &CutPlan, checkpoint: &Checkpoint) -> Result<Vec<OutputTensor>> {
    for (name, cut) in &plan.tensors {
        match (cut.add.is_some(), checkpoint.get(name).is_some()) {
            (false, false) => return Err(Error::plan(name, "the checkpoint has no tensor of this name")),
            (true, true) => {
                return Err(Error::plan(
                    name,
                    "'add' names a tensor the checkpoint already has (use 'replace' to give it new values)",
                ))
            }
            _ => {}
        }
    }
    let mut outputs = Vec::with_capacity(checkpoint.len());
    let mut claimed: HashMap<String, String> = HashMap::new();
    for (source, entry) in checkpoint.tensors() {
        let cut = plan.tensors.get(&entry.name);
        if cut.is_some_and(|c| c.drop) {
            continue;
        }
        let mut keep: Vec<Option<KeepList>> = vec![None; entry.shape.len()];
        let mut shape = entry.shape.clone();
        for (dim, list) in cut.map_or(&[][..], |c| &c.keep[..]) {
            let (dim, list) = (*dim, list);
            if dim >= entry.shape.len() {
                return Err(Error::plan(&entry.name, format!("dim {dim} is out of range for shape {:?}", entry.shape)));
            }
            if let Some(&last) = list.last() {
                if last >= entry.shape[dim] {
                    return Err(Error::plan(
                        &entry.name,
                        format!("dim {dim}: index {last} is out of range for size {}", entry.shape[dim]),
                    ));
                }
            }
            check_whole_byte_slices(&entry.name, entry.dtype, &entry.shape, dim)?;
            shape[dim] = list.len() as u64;
            keep[dim] = Some(list.clone());
        }
        let name = cut.and_then(|c| c.rename.clone()).unwrap_or_else(|| entry.name.clone());
        if let Some(previous) = claimed.insert(name.clone(), entry.name.clone()) {
            return Err(Error::plan(
                &entry.name,
                format!("output name '{name}' is also produced by tensor '{previous}'"),
            ));
        }
        let numel = shape.iter().product::<u64>();
        let nbytes = entry.dtype.span_bytes(numel).expect("a sub-tensor of a valid tensor has a valid span");
        let output = match cut.and_then(|c| c.replace.as_ref()) {
            Some(values) => given(name, entry.dtype, shape, values)?,
            None => OutputTensor { name, data: Data::Stored(source), dtype: entry.dtype, source_shape: entry.shape.clone(), shape, keep, nbytes },
        };
        outputs.push(output);
    }
    let mut added = Vec::new();
    for (name, cut) in &plan.tensors {
        let Some(add) = &cut.add else { continue };
        if let Some(previous) = claimed.get(name) {
            return Err(Error::plan(name, format!("'add' names the output of tensor '{previous}'")));
        }
        added.push(given(name.clone(), add.dtype, add.shape.clone(), &add.values)?);
    }
    Ok(place_added(outputs, added))
}

/// A cut along `dim` copies whole slices (one index of `dim`, every index of the dimensions after
/// it); of a packed sub-byte dtype (F4, F6) that works only where such a slice is a whole number of
/// bytes, as its elements have no byte address of their own.
fn check_whole_byte_slices(name: &str, dtype: Dtype, shape: &[u64], dim: usize) -> Result<()> {
    if dtype.item_bytes().is_some() {
        return Ok(());
    }
    let slice = shape[dim + 1..].iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    if slice.and_then(|n| dtype.span_bytes(n)).is_some() {
        return Ok(());
    }
    let bits = slice.map_or_else(|| "too many".to_owned(), |n| (u128::from(n) * u128::from(dtype.bits())).to_string());
    Err(Error::plan(
        name,
        format!(
            "dim {dim}: {dtype} packs several elements per byte and a slice of shape {shape:?} along dim {dim} is {bits} bits, \
             not a whole number of bytes, so it cannot be cut there (only along dimensions whose slices are whole bytes)"
        ),
    ))
}

/// An output tensor holding the plan's `values`, checked against its dtype and shape.
fn given(name: String, dtype: Dtype, shape: Vec<u64>, values: &Values) -> Result<OutputTensor> {
    let numel = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| dtype.span_bytes(n).is_some())
        .ok_or_else(|| Error::plan(&name, format!("shape {shape:?} of {dtype} is too large")))?;
    let encode = |value: f64| dtype.encode_float(value).map_err(|reason| Error::plan(&name, reason));
    let data = match values {
        Values::Fill(value) => Data::Repeated(encode(*value)?),
        Values::Each(values) => {
            if values.len() as u64 != numel {
                return Err(Error::plan(
                    &name,
                    format!("{} values given for shape {shape:?}, which has {numel} elements", values.len()),
                ));
            }
            let mut bytes = Vec::with_capacity(values.len() * dtype.item_bytes().unwrap_or(0) as usize);
            for &value in values.iter() {
                bytes.extend(encode(value)?);
            }
            Data::Given(Arc::new(bytes))
        }
        Values::File { path, tensor } => external(&name, dtype, &shape, path, tensor)?,
    };
    let nbytes = dtype.span_bytes(numel).expect("checked above");
    Ok(OutputTensor { name, data, dtype, source_shape: shape.clone(), keep: vec![None; shape.len()], shape, nbytes })
}

/// The bytes of `tensor` in the safetensors file `path`, which must have the output's dtype and shape.
fn external(name: &str, dtype: Dtype, shape: &[u64], path: &std::path::Path, tensor: &str) -> Result<Data> {
    let header = crate::header::read_header(path)?;
    let entry = header
        .tensors
        .iter()
        .find(|e| e.name == tensor)
        .ok_or_else(|| Error::plan(name, format!("{} has no tensor '{tensor}'", path.display())))?;
    if entry.dtype != dtype || entry.shape != shape {
        return Err(Error::plan(
            name,
            format!(
                "tensor '{tensor}' of {} is {} {:?}, the output needs {dtype} {shape:?}",
                path.display(),
                entry.dtype,
                entry.shape
            ),
        ));
    }
    Ok(Data::External { path: Arc::new(path.to_path_buf()), offset: header.data_start + entry.begin })
}

/// Puts each added tensor right after the last stored output tensor of its module (the name up to
/// its last '.': `a.q_proj.bias` follows `a.q_proj.weight`), added tensors of one module in name
/// order, and those whose module has no stored tensor at the end in name order. The order follows
/// from the names alone, so the output stays byte-reproducible.
fn place_added(stored: Vec<OutputTensor>, added: Vec<OutputTensor>) -> Vec<OutputTensor> {
    fn module(name: &str) -> &str {
        name.rsplit_once('.').map_or("", |(module, _)| module)
    }
    let mut last_of_module: HashMap<&str, usize> = HashMap::new();
    for (i, tensor) in stored.iter().enumerate() {
        last_of_module.insert(module(&tensor.name), i);
    }
    let mut after: BTreeMap<usize, Vec<OutputTensor>> = BTreeMap::new();
    let mut trailing = Vec::new();
    for tensor in added {
        match last_of_module.get(module(&tensor.name)) {
            Some(&anchor) => after.entry(anchor).or_default().push(tensor),
            None => trailing.push(tensor),
        }
    }
    let mut outputs = Vec::with_capacity(stored.len() + after.values().map(Vec::len).sum::<usize>() + trailing.len());
    for (i, tensor) in stored.into_iter().enumerate() {
        outputs.push(tensor);
        outputs.extend(after.remove(&i).unwrap_or_default());
    }
    outputs.extend(trailing);
    outputs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: &str) -> Result<CutPlan> {
        CutPlan::from_json(json)
    }

    fn plan_reason(result: Result<CutPlan>) -> String {
        match result {
            Err(Error::Plan { reason, .. }) => reason,
            other => panic!("expected a plan error, got {other:?}"),
        }
    }

    #[test]
    fn parses_sets_and_inline_lists() {
        let p = plan(r#"{"format":"structprune.cut-plan","version":1,"index_sets":{"h":[0,2]},
            "tensors":{"a":{"keep":{"1":"h","0":[1]}},"b":{"drop":true},"c":{"rename":"d"}},
            "config":{"hidden_size":2}}"#)
        .unwrap();
        let a = &p.tensors["a"];
        assert_eq!(a.keep.iter().map(|(d, l)| (*d, l.to_vec())).collect::<Vec<_>>(), vec![(0, vec![1]), (1, vec![0, 2])]);
        assert!(p.tensors["b"].drop);
        assert_eq!(p.tensors["c"].rename.as_deref(), Some("d"));
        assert!(p.config_patch.is_some());
    }

    #[test]
    fn parses_added_tensors_and_replaced_values() {
        let p = plan(r#"{"format":"structprune.cut-plan","version":1,"tensors":{
            "a.bias":{"add":{"dtype":"BF16","shape":[3],"values":[0.5,-1,2e-3]}},
            "b.bias":{"add":{"dtype":"F32","shape":[2,2],"fill":0}},
            "c.bias":{"keep":{"0":[1]},"replace":{"values":[1.25]}}}}"#)
        .unwrap();
        let added = p.tensors["a.bias"].add.as_ref().unwrap();
        assert_eq!((added.dtype, added.shape.clone()), (Dtype::BF16, vec![3]));
        assert_eq!(added.values, Values::Each(Arc::new(vec![0.5, -1.0, 2e-3])));
        assert_eq!(p.tensors["b.bias"].add.as_ref().unwrap().values, Values::Fill(0.0));
        assert_eq!(p.tensors["c.bias"].replace, Some(Values::Each(Arc::new(vec![1.25]))));
        let from_file = plan(r#"{"format":"structprune.cut-plan","version":1,"tensors":{
            "w":{"keep":{"1":[0]},"replace":{"file":"/tmp/r.safetensors","tensor":"w"}}}}"#)
        .unwrap();
        assert_eq!(from_file.tensors["w"].replace, Some(Values::File { path: "/tmp/r.safetensors".into(), tensor: "w".into() }));
    }

    #[test]
    fn rejects_malformed_added_tensors_naming_them() {
        let with = |entry: &str| plan(&format!(r#"{{"format":"structprune.cut-plan","version":1,"tensors":{{"x.bias":{entry}}}}}"#));
        let rejected = |entry: &str, expected: &str| match with(entry) {
            Err(Error::Plan { tensor: Some(tensor), reason }) => {
                assert_eq!(tensor, "x.bias");
                assert!(reason.contains(expected), "{entry}: {reason}");
            }
            other => panic!("{entry}: expected a plan error naming the tensor, got {other:?}"),
        };
        rejected(r#"{"add":{"dtype":"F33","shape":[1],"fill":0}}"#, "unknown safetensors dtype 'F33'");
        rejected(r#"{"add":{"dtype":"F32","shape":[1]}}"#, "exactly one of 'values'");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"fill":0,"values":[0]}}"#, "exactly one of 'values'");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"values":["0"]}}"#, "'add': invalid type");
        rejected(r#"{"add":{"dtype":"F32","shape":[-1],"fill":0}}"#, "'add': invalid value");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"fill":0,"colour":1}}"#, "unknown field `colour`");
        rejected(r#"{"add":{"shape":[1],"fill":0}}"#, "missing field `dtype`");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"fill":0},"rename":"y"}"#, "cannot be combined");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"fill":0},"drop":true}"#, "cannot be combined");
        rejected(r#"{"replace":{}}"#, "'replace' needs exactly one");
        rejected(r#"{"replace":{"file":"a.safetensors"}}"#, "needs both 'file' and 'tensor'");
        rejected(r#"{"replace":{"file":"a.safetensors","tensor":"t","fill":0}}"#, "'replace' needs exactly one");
        rejected(r#"{"replace":{"values":[1],"dtype":"F32"}}"#, "unknown field `dtype`");
    }

    #[test]
    fn plan_files_must_be_plain_names_the_engine_does_not_write() {
        let with_file = |name: &str| {
            plan(&format!(r#"{{"format":"structprune.cut-plan","version":1,"files":{{{}:"x"}}}}"#, serde_json::to_string(name).unwrap()))
        };
        assert_eq!(with_file("modeling_decilm.py").unwrap().files["modeling_decilm.py"], "x");
        for bad in [
            "",
            ".hidden",
            "a/b.py",
            "..",
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "pytorch_model.bin",
            "training_args.PT",
            "x.pth",
            "x.pkl",
            "optimizer.pickle",
            "x.ckpt",
            "x.npy",
        ] {
            assert!(plan_reason(with_file(bad)).starts_with(&format!("file '{bad}'")), "{bad}");
        }
    }

    #[test]
    fn output_names_must_be_tensor_names() {
        for bad in ["", "__metadata__"] {
            let renamed = plan(&format!(r#"{{"format":"structprune.cut-plan","version":1,"tensors":{{"a":{{"rename":{bad:?}}}}}}}"#));
            match renamed {
                Err(Error::Plan { tensor: Some(t), reason }) => {
                    assert_eq!(t, "a");
                    assert!(reason.starts_with("'rename'"), "{reason}");
                }
                other => panic!("{bad:?}: expected a plan error, got {other:?}"),
            }
            let added = plan(&format!(
                r#"{{"format":"structprune.cut-plan","version":1,"tensors":{{{bad:?}:{{"add":{{"dtype":"F32","shape":[1],"fill":0}}}}}}}}"#
            ));
            assert!(plan_reason(added).starts_with("'add'"), "{bad:?}");
        }
    }

    #[test]
    fn rejects_malformed_plans() {
        let base = |tensors: &str| format!(r#"{{"format":"structprune.cut-plan","version":1,"tensors":{tensors}}}"#);
        assert!(plan_reason(plan(&base(r#"{"a":{"keep":{"0":[2,1]}}}"#))).contains("strictly increasing"));
        assert!(plan_reason(plan(&base(r#"{"a":{"keep":{"0":[1,1]}}}"#))).contains("strictly increasing"));
        assert!(plan_reason(plan(&base(r#"{"a":{"keep":{"x":[1]}}}"#))).contains("not a non-negative integer"));
        assert!(plan_reason(plan(&base(r#"{"a":{"keep":{"0":"nope"}}}"#))).contains("unknown index set"));
        assert!(plan_reason(plan(&base(r#"{"a":{"keep":{"0":[-1, 0]}}}"#))).contains("not a non-negative integer"));
        assert!(plan_reason(plan(&base(r#"{"a":{"drop":true,"rename":"b"}}"#))).contains("cannot be combined"));
        assert!(plan_reason(plan(&base(r#"{"a":{"kep":{}}}"#))).contains("unknown field"));
        assert!(plan_reason(plan(&base(r#"{"a":{"drop":true,"replace":{"fill":0}}}"#))).contains("cannot be combined"));
        assert!(plan_reason(plan(r#"{"format":"x","version":1}"#)).contains("expected"));
        assert!(plan_reason(plan(r#"{"format":"structprune.cut-plan","version":7}"#)).contains("not supported"));
    }
}
