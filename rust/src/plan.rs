//! The cut plan (`docs/plan-format.md`): parsing, and validation against a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, TensorRef};
use crate::dtype::Dtype;
use crate::error::{Error, Result};

pub const FORMAT: &str = "structprune.cut-plan";
pub const VERSION: u64 = 1;

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
    /// Parses and checks a plan's text (see [`CutPlan::from_slice`]).
    pub fn from_json(text: &str) -> Result<CutPlan> {
        CutPlan::from_slice(text.as_bytes())
    }

    /// Parses and checks a plan, strictly: UTF-8 JSON with no key twice in an object, every field
    /// known and of its type (no number for a string, no `1.0` or `"1"` for an index, no `"no"` for
    /// `false`), dimensions written canonically (`"1"`, not `"01"` or `"+1"`). Every error names the
    /// JSON path of the field at fault.
    pub fn from_slice(bytes: &[u8]) -> Result<CutPlan> {
        parse_document(bytes).and_then(|document| CutPlan::from_value(&document))
    }

    /// Checks an already parsed plan document (see [`CutPlan::from_slice`]).
    pub fn from_value(document: &Value) -> Result<CutPlan> {
        let root = At::root();
        let fields = object(document, &root)?;
        known_fields(fields, &root, &["format", "version", "index_sets", "tensors", "config", "files", "metadata"])?;
        let format = required(fields, &root, "format")?;
        if format.as_str() != Some(FORMAT) {
            return Err(root.field("format").error(format!("is {format}, expected \"{FORMAT}\"")));
        }
        let version = required(fields, &root, "version")?;
        if version.as_u64() != Some(VERSION) {
            return Err(root.field("version").error(format!(
                "version {version} is not supported (this build reads version {VERSION}, written as the integer {VERSION})"
            )));
        }
        let mut sets: HashMap<String, KeepList> = HashMap::new();
        if let Some(value) = fields.get("index_sets") {
            let at = root.field("index_sets");
            for (name, list) in object(value, &at)? {
                sets.insert(name.clone(), Arc::new(indices(list, &at.key(name))?));
            }
        }
        let mut tensors = BTreeMap::new();
        if let Some(value) = fields.get("tensors") {
            let at = root.field("tensors");
            for (name, entry) in object(value, &at)? {
                let at = At { path: at.key(name).path, tensor: Some(name) };
                tensors.insert(name.clone(), tensor_cut(name, entry, &at, &sets)?);
            }
        }
        let config_patch = match fields.get("config") {
            None | Some(Value::Null) => None,
            Some(patch @ Value::Object(map)) => {
                check_auto_map(map, &root.field("config"))?;
                // An empty merge patch changes nothing, so it needs no config.json either.
                (!map.is_empty()).then(|| patch.clone())
            }
            Some(other) => return Err(root.field("config").error(format!("expected an object (a merge patch), got {}", kind(other)))),
        };
        let mut files = BTreeMap::new();
        if let Some(value) = fields.get("files") {
            let at = root.field("files");
            for (name, text) in object(value, &at)? {
                let at = at.key(name);
                let text = string(text, &at)?;
                check_file(name, text).map_err(|reason| at.error(reason))?;
                files.insert(name.clone(), text.to_owned());
            }
        }
        if let Some(metadata) = fields.get("metadata") {
            object(metadata, &root.field("metadata"))?;
        }
        Ok(CutPlan { tensors, config_patch, files })
    }
}

/// The plan's text as a JSON document (strict: see [`crate::json`]).
pub fn parse_document(bytes: &[u8]) -> Result<Value> {
    crate::json::from_slice(bytes).map_err(|e| Error::Plan { tensor: None, field: None, reason: format!("not valid JSON: {e}") })
}

/// A place in the plan document: its JSON path, and the tensor entry it belongs to.
struct At<'a> {
    path: String,
    tensor: Option<&'a str>,
}

impl<'a> At<'a> {
    fn root() -> At<'a> {
        At { path: String::new(), tensor: None }
    }

    /// A field of a fixed name (`.keep`) or a key of a map (`["model.w"]`); see [`crate::json::push_key`].
    fn key(&self, key: &str) -> At<'a> {
        let mut path = self.path.clone();
        crate::json::push_key(&mut path, key);
        At { path, tensor: self.tensor }
    }

    fn field(&self, name: &str) -> At<'a> {
        self.key(name)
    }

    fn index(&self, index: usize) -> At<'a> {
        At { path: format!("{}[{index}]", self.path), tensor: self.tensor }
    }

    fn error(&self, reason: impl Into<String>) -> Error {
        let field = if self.path.is_empty() { "the top level".to_owned() } else { self.path.clone() };
        Error::plan_at(self.tensor, field, reason)
    }
}

fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {}", Value::String(s.chars().take(64).collect())),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn object<'v>(value: &'v Value, at: &At<'_>) -> Result<&'v Map<String, Value>> {
    value.as_object().ok_or_else(|| at.error(format!("expected an object, got {}", kind(value))))
}

fn known_fields(fields: &Map<String, Value>, at: &At<'_>, known: &[&str]) -> Result<()> {
    match fields.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => Err(at.key(key).error(format!("unknown field (expected one of {})", known.join(", ")))),
        None => Ok(()),
    }
}

fn required<'v>(fields: &'v Map<String, Value>, at: &At<'_>, name: &str) -> Result<&'v Value> {
    fields.get(name).ok_or_else(|| at.field(name).error("missing (a required field)"))
}

fn string<'v>(value: &'v Value, at: &At<'_>) -> Result<&'v str> {
    value.as_str().ok_or_else(|| at.error(format!("expected a string, got {}", kind(value))))
}

fn boolean(value: &Value, at: &At<'_>) -> Result<bool> {
    value.as_bool().ok_or_else(|| at.error(format!("expected true or false, got {}", kind(value))))
}

fn number(value: &Value, at: &At<'_>) -> Result<f64> {
    // serde_json refuses NaN, infinities and numbers out of f64's range while parsing.
    value.as_f64().ok_or_else(|| at.error(format!("expected a number, got {}", kind(value))))
}

fn list<'v>(value: &'v Value, at: &At<'_>) -> Result<&'v Vec<Value>> {
    value.as_array().ok_or_else(|| at.error(format!("expected a list, got {}", kind(value))))
}

/// A non-negative integer written as one (`3`, not `3.0`, `3e0` or `"3"`).
fn natural(value: &Value, at: &At<'_>) -> Result<u64> {
    value
        .as_u64()
        .ok_or_else(|| at.error(format!("expected a non-negative integer (no fraction, exponent or quotes), got {}", kind(value))))
}

/// A list of kept indices: non-negative integers, strictly increasing.
fn indices(value: &Value, at: &At<'_>) -> Result<Vec<u64>> {
    let items = list(value, at)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let index = natural(item, &at.index(i))?;
        if let Some(&previous) = out.last() {
            if index <= previous {
                return Err(at.index(i).error(format!("indices must be strictly increasing, found {previous} then {index}")));
            }
        }
        out.push(index);
    }
    Ok(out)
}

fn numbers(value: &Value, at: &At<'_>) -> Result<Vec<f64>> {
    let items = list(value, at)?;
    items.iter().enumerate().map(|(i, item)| number(item, &at.index(i))).collect()
}

fn tensor_cut(name: &str, entry: &Value, at: &At<'_>, sets: &HashMap<String, KeepList>) -> Result<TensorCut> {
    let fields = object(entry, at)?;
    known_fields(fields, at, &["keep", "drop", "rename", "add", "replace"])?;
    let drop = fields.get("drop").map(|v| boolean(v, &at.field("drop"))).transpose()?.unwrap_or(false);
    let rename = fields.get("rename").map(|v| string(v, &at.field("rename"))).transpose()?;
    if let Some(new_name) = rename {
        check_output_name(new_name).map_err(|r| at.field("rename").error(r))?;
    }
    let keep_fields = fields.get("keep").map(|v| object(v, &at.field("keep"))).transpose()?;
    if let Some(add) = fields.get("add") {
        check_output_name(name).map_err(|r| at.error(format!("'add': {r}")))?;
        if fields.len() > 1 {
            return Err(at.error("'add' creates a tensor and cannot be combined with another action"));
        }
        return Ok(TensorCut { add: Some(added(add, &at.field("add"))?), ..TensorCut::default() });
    }
    if drop && (keep_fields.is_some_and(|k| !k.is_empty()) || rename.is_some() || fields.contains_key("replace")) {
        return Err(at.error("'drop' cannot be combined with 'keep', 'rename' or 'replace'"));
    }
    let replace = fields.get("replace").map(|v| values(v, &at.field("replace"), &[])).transpose()?;
    let mut keep = Vec::new();
    for (dim_text, list) in keep_fields.into_iter().flatten() {
        let at = at.field("keep").key(dim_text);
        let dim = dim_text
            .parse::<usize>()
            .ok()
            .filter(|dim| dim.to_string() == *dim_text)
            .ok_or_else(|| at.error("a dimension is written as a decimal integer without sign or leading zeros (\"0\", \"1\", …)"))?;
        let kept = match list {
            Value::String(set) => sets.get(set).cloned().ok_or_else(|| at.error(format!("unknown index set '{set}'")))?,
            Value::Array(_) => Arc::new(indices(list, &at)?),
            other => return Err(at.error(format!("expected a list of indices or an index set name, got {}", kind(other)))),
        };
        keep.push((dim, kept));
    }
    keep.sort_by_key(|(dim, _)| *dim);
    Ok(TensorCut { keep, drop, rename: rename.map(str::to_owned), add: None, replace })
}

fn added(value: &Value, at: &At<'_>) -> Result<AddedTensor> {
    let fields = object(value, at)?;
    let dtype_text = string(required(fields, at, "dtype")?, &at.field("dtype"))?;
    let dtype = Dtype::parse(dtype_text).ok_or_else(|| at.field("dtype").error(format!("unknown safetensors dtype '{dtype_text}'")))?;
    let shape_at = at.field("shape");
    let shape = list(required(fields, at, "shape")?, &shape_at)?
        .iter()
        .enumerate()
        .map(|(i, d)| natural(d, &shape_at.index(i)))
        .collect::<Result<Vec<u64>>>()?;
    Ok(AddedTensor { dtype, shape, values: values(value, at, &["dtype", "shape"])? })
}

/// The contents of an `add` or a `replace`: exactly one of `values`, `fill` and `file` + `tensor`
/// (besides the `other` fields the action has).
fn values(value: &Value, at: &At<'_>, other: &[&str]) -> Result<Values> {
    let fields = object(value, at)?;
    let known: Vec<&str> = other.iter().copied().chain(["values", "fill", "file", "tensor"]).collect();
    known_fields(fields, at, &known)?;
    let get = |name: &str| fields.get(name).map(|v| (v, at.field(name)));
    match (get("values"), get("fill"), get("file"), get("tensor")) {
        (Some((v, a)), None, None, None) => Ok(Values::Each(Arc::new(numbers(v, &a)?))),
        (None, Some((v, a)), None, None) => Ok(Values::Fill(number(v, &a)?)),
        (None, None, Some((file, file_at)), Some((tensor, tensor_at))) => {
            Ok(Values::File { path: PathBuf::from(string(file, &file_at)?), tensor: string(tensor, &tensor_at)?.to_owned() })
        }
        (None, None, Some(_), None) | (None, None, None, Some(_)) => Err(at.error("contents from a file need both 'file' and 'tensor'")),
        _ => Err(at.error("needs exactly one of 'values' (every element), 'fill' (one value for all) and 'file' + 'tensor'")),
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

/// Extensions of files that are code (Python modules transformers imports through `auto_map`,
/// compiled extensions, scripts): a plan writes none, except structprune's own DeciLM model code.
const CODE_EXTENSIONS: [&str; 13] = ["py", "pyc", "pyo", "pyw", "pyd", "pyx", "so", "dylib", "dll", "exe", "sh", "bat", "cmd"];

/// The model code the DeciLM output format writes beside the weights (`structprune.models.formats`): the
/// only code a plan may write, byte for byte. Embedded from `python/structprune/models/decilm/`, the one
/// copy in the source tree (which the Python package and the sdist both carry).
pub const DECILM_FILES: [(&str, &str); 2] = [
    ("configuration_decilm.py", include_str!("../../python/structprune/models/decilm/configuration_decilm.py")),
    ("modeling_decilm.py", include_str!("../../python/structprune/models/decilm/modeling_decilm.py")),
];

/// The `auto_map` the DeciLM format's config patch sets (`structprune.models.formats.decilm_patch`): the
/// only one a plan may set.
pub const DECILM_AUTO_MAP: [(&str, &str); 2] =
    [("AutoConfig", "configuration_decilm.DeciLMConfig"), ("AutoModelForCausalLM", "modeling_decilm.DeciLMForCausalLM")];

fn decilm_auto_map() -> Value {
    Value::Object(DECILM_AUTO_MAP.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect())
}

/// `auto_map` in a config makes transformers import the named code; a patch may only delete it or
/// set the DeciLM format's own.
fn check_auto_map(patch: &Map<String, Value>, at: &At<'_>) -> Result<()> {
    match patch.get("auto_map") {
        None | Some(Value::Null) => Ok(()),
        Some(value) if *value == decilm_auto_map() => Ok(()),
        Some(_) => Err(at.field("auto_map").error(format!(
            "a plan does not point transformers at model code: 'auto_map' may only be deleted (null) or set to the DeciLM \
             format's own, {}",
            decilm_auto_map()
        ))),
    }
}

/// A plan's extra file must be a plain file name the engine does not write itself, not a file
/// that loads by unpickling, and not code other than structprune's own DeciLM model code.
fn check_file(name: &str, text: &str) -> std::result::Result<(), String> {
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
    if CODE_EXTENSIONS.contains(&extension.as_str()) {
        return match DECILM_FILES.iter().find(|(decilm, _)| *decilm == name) {
            Some((_, source)) if *source == text => Ok(()),
            Some(_) => Err(format!(
                "differs from the DeciLM model code of this build of structprune ({} {}), the only code a plan may write",
                env!("CARGO_PKG_NAME"),
                env!("CARGO_PKG_VERSION")
            )),
            None => Err(format!(
                "'.{extension}' files are code: a plan writes none but structprune's own DeciLM model code ({})",
                DECILM_FILES.map(|(n, _)| n).join(", ")
            )),
        };
    }
    if extension == "json" {
        // tokenizer_config.json and friends can name code to import through their own auto_map.
        if let Ok(Value::Object(document)) = crate::json::from_str(text) {
            if document.get("auto_map").is_some_and(|v| !v.is_null()) {
                return Err("sets 'auto_map', which points transformers at model code: a plan does not write one".into());
            }
        }
    }
    Ok(())
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
                return Err(Error::plan(name, "'add' names a tensor the checkpoint already has (use 'replace' to give it new values)"))
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
                    return Err(Error::plan(&entry.name, format!("dim {dim}: index {last} is out of range for size {}", entry.shape[dim])));
                }
            }
            check_whole_byte_slices(&entry.name, entry.dtype, &entry.shape, dim)?;
            shape[dim] = list.len() as u64;
            keep[dim] = Some(list.clone());
        }
        let name = cut.and_then(|c| c.rename.clone()).unwrap_or_else(|| entry.name.clone());
        if let Some(previous) = claimed.insert(name.clone(), entry.name.clone()) {
            return Err(Error::plan(&entry.name, format!("output name '{name}' is also produced by tensor '{previous}'")));
        }
        let numel = shape.iter().product::<u64>();
        let nbytes = entry.dtype.span_bytes(numel).expect("a sub-tensor of a valid tensor has a valid span");
        let output = match cut.and_then(|c| c.replace.as_ref()) {
            Some(values) => given(name, entry.dtype, shape, values)?,
            None => OutputTensor {
                name,
                data: Data::Stored(source),
                dtype: entry.dtype,
                source_shape: entry.shape.clone(),
                shape,
                keep,
                nbytes,
            },
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
                return Err(Error::plan(&name, format!("{} values given for shape {shape:?}, which has {numel} elements", values.len())));
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
            format!("tensor '{tensor}' of {} is {} {:?}, the output needs {dtype} {shape:?}", path.display(), entry.dtype, entry.shape),
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
        let p = plan(
            r#"{"format":"structprune.cut-plan","version":1,"index_sets":{"h":[0,2]},
            "tensors":{"a":{"keep":{"1":"h","0":[1]}},"b":{"drop":true},"c":{"rename":"d"}},
            "config":{"hidden_size":2}}"#,
        )
        .unwrap();
        let a = &p.tensors["a"];
        assert_eq!(a.keep.iter().map(|(d, l)| (*d, l.to_vec())).collect::<Vec<_>>(), vec![(0, vec![1]), (1, vec![0, 2])]);
        assert!(p.tensors["b"].drop);
        assert_eq!(p.tensors["c"].rename.as_deref(), Some("d"));
        assert!(p.config_patch.is_some());
    }

    #[test]
    fn parses_added_tensors_and_replaced_values() {
        let p = plan(
            r#"{"format":"structprune.cut-plan","version":1,"tensors":{
            "a.bias":{"add":{"dtype":"BF16","shape":[3],"values":[0.5,-1,2e-3]}},
            "b.bias":{"add":{"dtype":"F32","shape":[2,2],"fill":0}},
            "c.bias":{"keep":{"0":[1]},"replace":{"values":[1.25]}}}}"#,
        )
        .unwrap();
        let added = p.tensors["a.bias"].add.as_ref().unwrap();
        assert_eq!((added.dtype, added.shape.clone()), (Dtype::BF16, vec![3]));
        assert_eq!(added.values, Values::Each(Arc::new(vec![0.5, -1.0, 2e-3])));
        assert_eq!(p.tensors["b.bias"].add.as_ref().unwrap().values, Values::Fill(0.0));
        assert_eq!(p.tensors["c.bias"].replace, Some(Values::Each(Arc::new(vec![1.25]))));
        let from_file = plan(
            r#"{"format":"structprune.cut-plan","version":1,"tensors":{
            "w":{"keep":{"1":[0]},"replace":{"file":"/tmp/r.safetensors","tensor":"w"}}}}"#,
        )
        .unwrap();
        assert_eq!(from_file.tensors["w"].replace, Some(Values::File { path: "/tmp/r.safetensors".into(), tensor: "w".into() }));
    }

    /// The error's JSON path and reason, for a plan error found while reading the plan.
    fn field_and_reason(result: Result<CutPlan>) -> (String, String) {
        match result {
            Err(Error::Plan { field: Some(field), reason, .. }) => (field, reason),
            other => panic!("expected a plan error naming a field, got {other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_added_tensors_naming_them() {
        let with = |entry: &str| plan(&format!(r#"{{"format":"structprune.cut-plan","version":1,"tensors":{{"x.bias":{entry}}}}}"#));
        let rejected = |entry: &str, path: &str, expected: &str| match with(entry) {
            Err(Error::Plan { tensor: Some(tensor), field: Some(field), reason }) => {
                assert_eq!(tensor, "x.bias");
                assert_eq!(field, format!(r#"tensors["x.bias"]{path}"#), "{entry}");
                assert!(reason.contains(expected), "{entry}: {reason}");
            }
            other => panic!("{entry}: expected a plan error naming the tensor, got {other:?}"),
        };
        rejected(r#"{"add":{"dtype":"F33","shape":[1],"fill":0}}"#, ".add.dtype", "unknown safetensors dtype 'F33'");
        rejected(r#"{"add":{"dtype":"F32","shape":[1]}}"#, ".add", "exactly one of 'values'");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"fill":0,"values":[0]}}"#, ".add", "exactly one of 'values'");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"values":[0,"0"]}}"#, ".add.values[1]", "expected a number, got the string \"0\"");
        rejected(r#"{"add":{"dtype":"F32","shape":[-1],"fill":0}}"#, ".add.shape[0]", "non-negative integer");
        rejected(r#"{"add":{"dtype":"F32","shape":[1.0],"fill":0}}"#, ".add.shape[0]", "non-negative integer");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"fill":0,"colour":1}}"#, ".add.colour", "unknown field");
        rejected(r#"{"add":{"shape":[1],"fill":0}}"#, ".add.dtype", "missing");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"fill":0},"rename":"y"}"#, "", "cannot be combined");
        rejected(r#"{"add":{"dtype":"F32","shape":[1],"fill":0},"drop":true}"#, "", "cannot be combined");
        rejected(r#"{"replace":{}}"#, ".replace", "needs exactly one");
        rejected(r#"{"replace":{"file":"a.safetensors"}}"#, ".replace", "need both 'file' and 'tensor'");
        rejected(r#"{"replace":{"file":"a.safetensors","tensor":"t","fill":0}}"#, ".replace", "needs exactly one");
        rejected(r#"{"replace":{"values":[1],"dtype":"F32"}}"#, ".replace.dtype", "unknown field");
        rejected(r#"{"replace":{"fill":"0"}}"#, ".replace.fill", "expected a number");
        rejected(r#"{"replace":{"file":3,"tensor":"t"}}"#, ".replace.file", "expected a string");
    }

    #[test]
    fn plans_are_read_strictly_naming_the_field() {
        let with_tensor =
            |entry: &str| plan(&format!(r#"{{"format":"structprune.cut-plan","version":1,"tensors":{{"model.up.weight":{entry}}}}}"#));
        let at = |suffix: &str| format!(r#"tensors["model.up.weight"]{suffix}"#);
        for (entry, path, expected) in [
            (r#"{"drop":"no"}"#, at(".drop"), "expected true or false, got the string \"no\""),
            (r#"{"drop":1}"#, at(".drop"), "expected true or false"),
            (r#"{"keep":{"0":[1.9]}}"#, at(r#".keep["0"][0]"#), "non-negative integer"),
            (r#"{"keep":{"0":[0,1.0]}}"#, at(r#".keep["0"][1]"#), "non-negative integer"),
            (r#"{"keep":{"0":["1"]}}"#, at(r#".keep["0"][0]"#), "got the string \"1\""),
            (r#"{"keep":{"0":[true]}}"#, at(r#".keep["0"][0]"#), "got true"),
            (r#"{"keep":{"0":["a"]}}"#, at(r#".keep["0"][0]"#), "non-negative integer"),
            (r#"{"keep":{"0":[2,1]}}"#, at(r#".keep["0"][1]"#), "strictly increasing"),
            (r#"{"keep":{"00":[1]}}"#, at(r#".keep["00"]"#), "without sign or leading zeros"),
            (r#"{"keep":{"+1":[1]}}"#, at(r#".keep["+1"]"#), "without sign or leading zeros"),
            (r#"{"keep":{" 1":[1]}}"#, at(r#".keep[" 1"]"#), "without sign or leading zeros"),
            (r#"{"keep":{"x":[1]}}"#, at(".keep.x"), "without sign or leading zeros"),
            (r#"{"keep":{"0":7}}"#, at(r#".keep["0"]"#), "expected a list of indices or an index set name"),
            (r#"{"keep":[[1]]}"#, at(".keep"), "expected an object, got a list"),
            (r#"{"rename":5}"#, at(".rename"), "expected a string"),
            (r#"{"kep":{}}"#, at(".kep"), "unknown field"),
            (r"[]", at(""), "expected an object"),
        ] {
            assert_eq!(field_and_reason(with_tensor(entry)).0, path, "{entry}");
            assert!(field_and_reason(with_tensor(entry)).1.contains(expected), "{entry}: {:?}", field_and_reason(with_tensor(entry)));
        }
        let document = |rest: &str| plan(&format!(r#"{{"format":"structprune.cut-plan","version":1{rest}}}"#));
        for (rest, path, expected) in [
            (r#","tensor":{}"#, "tensor", "unknown field"),
            (r#","tensors":[]"#, "tensors", "expected an object, got a list"),
            (r#","tensors":{"a":"drop"}"#, "tensors.a", "expected an object"),
            (r#","config":"x""#, "config", "expected an object (a merge patch)"),
            (r#","config":[1]"#, "config", "expected an object (a merge patch)"),
            (r#","files":{"a.txt":1}"#, r#"files["a.txt"]"#, "expected a string"),
            (r#","files":[]"#, "files", "expected an object"),
            (r#","metadata":3"#, "metadata", "expected an object"),
            (r#","index_sets":{"h":[0,0]}"#, "index_sets.h[1]", "strictly increasing"),
            (r#","index_sets":{"h":"0"}"#, "index_sets.h", "expected a list"),
        ] {
            let (field, reason) = field_and_reason(document(rest));
            assert_eq!(field, path, "{rest}");
            assert!(reason.contains(expected), "{rest}: {reason}");
        }
        for (text, path, expected) in [
            (r#"{"format":"structprune.cut-plan","version":1.0}"#, "version", "not supported"),
            (r#"{"format":"structprune.cut-plan","version":"1"}"#, "version", "not supported"),
            (r#"{"format":"structprune.cut-plan"}"#, "version", "missing"),
            (r#"{"format":"x","version":1}"#, "format", "expected \"structprune.cut-plan\""),
            (r"[1]", "the top level", "expected an object"),
        ] {
            let (field, reason) = field_and_reason(plan(text));
            assert_eq!(field, path, "{text}");
            assert!(reason.contains(expected), "{text}: {reason}");
        }
        let twice = r#"{"format":"structprune.cut-plan","version":1,"tensors":{"m.w":{"keep":{"0":[0],"0":[1]}}}}"#;
        assert!(plan_reason(plan(twice)).contains(r#"duplicate key '0' at tensors["m.w"].keep["0"]"#));
        assert!(plan_reason(CutPlan::from_slice(b"{\"format\":\"structprune.cut-plan\",\"version\":1,\"metadata\":{\"a\":\"\xff\"}}"))
            .contains("not valid JSON"));
        let deep = "[".repeat(100_000);
        assert!(plan_reason(plan(&format!(r#"{{"format":"structprune.cut-plan","version":1,"metadata":{{"a":{deep}}}}}"#)))
            .contains("recursion limit"));
    }

    #[test]
    fn plan_code_and_auto_map_are_only_structprunes_own_decilm() {
        let with = |files: &Value, config: &Value| {
            plan(&serde_json::json!({"format": "structprune.cut-plan", "version": 1, "files": files, "config": config}).to_string())
        };
        let decilm: Value = DECILM_FILES.iter().map(|(n, s)| ((*n).to_owned(), Value::from(*s))).collect::<Map<_, _>>().into();
        let auto_map = decilm_auto_map();
        let written = with(&decilm, &serde_json::json!({"auto_map": auto_map, "model_type": "nemotron-nas"})).unwrap();
        assert_eq!(written.files.len(), 2);
        assert!(DECILM_FILES[1].1.contains("class DeciLMForCausalLM"));
        with(&serde_json::json!({}), &serde_json::json!({"auto_map": null})).unwrap();
        let hostile = "import os\nos.system('touch /tmp/pwned')\n";
        for (files, path, expected) in [
            (serde_json::json!({"modeling_x.py": hostile}), r#"files["modeling_x.py"]"#, "'.py' files are code"),
            (serde_json::json!({"MODELING_X.PY": hostile}), r#"files["MODELING_X.PY"]"#, "'.py' files are code"),
            (serde_json::json!({"x.so": ""}), r#"files["x.so"]"#, "'.so' files are code"),
            (
                serde_json::json!({"modeling_decilm.py": format!("{}\n{hostile}", DECILM_FILES[1].1)}),
                r#"files["modeling_decilm.py"]"#,
                "differs from the DeciLM model code",
            ),
            (
                serde_json::json!({"configuration_decilm.py": DECILM_FILES[1].1}),
                r#"files["configuration_decilm.py"]"#,
                "differs from the DeciLM model code",
            ),
            (
                serde_json::json!({"tokenizer_config.json": r#"{"auto_map": {"AutoTokenizer": ["tok.T", null]}}"#}),
                r#"files["tokenizer_config.json"]"#,
                "sets 'auto_map'",
            ),
        ] {
            let (field, reason) = field_and_reason(with(&files, &Value::Null));
            assert_eq!(field, path);
            assert!(reason.contains(expected), "{path}: {reason}");
        }
        for auto_map in [
            serde_json::json!({"AutoModelForCausalLM": "modeling_x.Hostile"}),
            serde_json::json!({"AutoConfig": "configuration_decilm.DeciLMConfig", "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM", "AutoModel": "m.X"}),
            serde_json::json!({"AutoConfig": "configuration_decilm.DeciLMConfig", "AutoModelForCausalLM": "evil/repo--modeling_decilm.DeciLMForCausalLM"}),
            serde_json::json!("modeling_x.Hostile"),
        ] {
            let (field, reason) = field_and_reason(with(&decilm, &serde_json::json!({"auto_map": auto_map})));
            assert_eq!(field, "config.auto_map");
            assert!(reason.contains("may only be deleted"), "{reason}");
        }
    }

    #[test]
    fn output_names_must_be_tensor_names() {
        for bad in ["", "__metadata__"] {
            let renamed = plan(&format!(r#"{{"format":"structprune.cut-plan","version":1,"tensors":{{"a":{{"rename":{bad:?}}}}}}}"#));
            match renamed {
                Err(Error::Plan { tensor: Some(t), field: Some(field), reason }) => {
                    assert_eq!((t.as_str(), field.as_str()), ("a", "tensors.a.rename"));
                    assert!(reason.contains("tensor name"), "{reason}");
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
        assert!(plan_reason(plan(&base(r#"{"a":{"keep":{"x":[1]}}}"#))).contains("without sign or leading zeros"));
        assert!(plan_reason(plan(&base(r#"{"a":{"keep":{"0":"nope"}}}"#))).contains("unknown index set"));
        assert!(plan_reason(plan(&base(r#"{"a":{"keep":{"0":[-1, 0]}}}"#))).contains("non-negative integer"));
        assert!(plan_reason(plan(&base(r#"{"a":{"drop":true,"rename":"b"}}"#))).contains("cannot be combined"));
        assert!(plan_reason(plan(&base(r#"{"a":{"kep":{}}}"#))).contains("unknown field"));
        assert!(plan_reason(plan(&base(r#"{"a":{"drop":true,"replace":{"fill":0}}}"#))).contains("cannot be combined"));
        assert!(plan_reason(plan(r#"{"format":"x","version":1}"#)).contains("expected"));
        assert!(plan_reason(plan(r#"{"format":"structprune.cut-plan","version":7}"#)).contains("not supported"));
    }
}
