//! Reading and writing safetensors headers.
//!
//! The reference `safetensors` crate validates a header only together with the whole buffer, which
//! means mapping or reading the whole file; here a header is validated against the file's length
//! alone, so a shard is never read just to be checked. The rules are the reference parser's: header
//! length bounds, UTF-8 JSON object, known dtypes, `shape × itemsize == end − begin`, offsets that
//! tile the data exactly, and a file that ends at the last tensor.

use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value};

use crate::checkpoint::open_regular;
use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Largest header the reference implementation accepts.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
const LENGTH_PREFIX_BYTES: u64 = 8;
const METADATA_KEY: &str = "__metadata__";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Offsets relative to the start of the data section.
    pub begin: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn nbytes(&self) -> u64 {
        self.end - self.begin
    }
}

#[derive(Debug, Clone)]
pub struct Header {
    /// Absolute file offset of the data section (8 + header length).
    pub data_start: u64,
    /// Tensors ordered by their position in the file.
    pub tensors: Vec<TensorEntry>,
    pub metadata: Option<Map<String, Value>>,
}

impl Header {
    pub fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.end)
    }
}

/// Reads and validates the header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    // Not `File::open`: a plan may name any path as a tensor's source, a FIFO included.
    let mut file = open_regular(path).map_err(Error::io(path))?;
    let file_len = file.metadata().map_err(Error::io(path))?.len();
    let invalid = |reason: String| Error::Header { path: path.to_owned(), tensor: None, reason };
    if file_len < LENGTH_PREFIX_BYTES {
        return Err(invalid(format!("file is {file_len} bytes, too short for the 8-byte header length")));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(Error::io(path))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES {
        return Err(invalid(format!("header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")));
    }
    if LENGTH_PREFIX_BYTES + header_len > file_len {
        return Err(invalid(format!("header length {header_len} runs past the end of the {file_len}-byte file")));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(Error::io(path))?;
    parse_header(&json, file_len, path)
}

/// Validates header JSON bytes for a file of `file_len` bytes; `path` is only used in messages.
pub fn parse_header(json: &[u8], file_len: u64, path: &Path) -> Result<Header> {
    let invalid = |tensor: Option<&str>, reason: String| Error::Header { path: path.to_owned(), tensor: tensor.map(str::to_owned), reason };
    let text = std::str::from_utf8(json).map_err(|e| invalid(None, format!("header is not UTF-8: {e}")))?;
    if !text.starts_with('{') {
        return Err(invalid(None, "header does not start with '{'".into()));
    }
    // Duplicate keys are refused as the reference parser refuses them: a tensor listed twice
    // would otherwise be whichever entry a reader happens to keep.
    let root = match crate::json::from_str(text) {
        Ok(Value::Object(root)) => root,
        Ok(_) => return Err(invalid(None, "header is not a JSON object".into())),
        Err(e) => return Err(invalid(None, format!("header is not a JSON object: {e}"))),
    };

    let mut metadata = None;
    let mut tensors = Vec::with_capacity(root.len());
    for (name, value) in root {
        if name == METADATA_KEY {
            // `"__metadata__": null` is no metadata, as the reference parser reads it.
            metadata = parse_metadata(value).map_err(|r| invalid(None, r))?;
            continue;
        }
        let entry = parse_entry(&name, &value).map_err(|r| invalid(Some(&name), r))?;
        tensors.push(entry);
    }
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));

    let mut expected = 0u64;
    for t in &tensors {
        if t.begin > expected {
            return Err(invalid(Some(&t.name), format!("gap: data starts at {} but the previous tensor ends at {expected}", t.begin)));
        }
        if t.begin < expected {
            return Err(invalid(
                Some(&t.name),
                format!("overlap: data starts at {} before the previous tensor ends at {expected}", t.begin),
            ));
        }
        expected = t.end;
    }
    let data_start = LENGTH_PREFIX_BYTES + json.len() as u64;
    let data_len =
        file_len.checked_sub(data_start).ok_or_else(|| invalid(None, format!("header runs past the end of the {file_len}-byte file")))?;
    if data_len != expected {
        let how = if data_len < expected { "truncated" } else { "trailing bytes" };
        return Err(invalid(None, format!("{how}: tensors end at data offset {expected} but the file holds {data_len} data bytes")));
    }
    Ok(Header { data_start, tensors, metadata })
}

fn parse_metadata(value: Value) -> std::result::Result<Option<Map<String, Value>>, String> {
    let map = match value {
        Value::Null => return Ok(None),
        Value::Object(map) => map,
        _ => return Err("__metadata__ is not an object (or null)".into()),
    };
    if let Some((key, _)) = map.iter().find(|(_, v)| !v.is_string()) {
        return Err(format!("__metadata__ value of '{key}' is not a string"));
    }
    Ok(Some(map))
}

fn parse_entry(name: &str, value: &Value) -> std::result::Result<TensorEntry, String> {
    let obj = value.as_object().ok_or("entry is not an object")?;
    let dtype_name = obj.get("dtype").and_then(Value::as_str).ok_or("missing string 'dtype'")?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| format!("unknown dtype '{dtype_name}'"))?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("missing array 'shape'")?
        .iter()
        .map(|d| d.as_u64().ok_or_else(|| format!("shape entry {d} is not a non-negative integer")))
        .collect::<std::result::Result<Vec<u64>, String>>()?;
    let offsets =
        obj.get("data_offsets").and_then(Value::as_array).filter(|a| a.len() == 2).ok_or("'data_offsets' is not a [begin, end] pair")?;
    let (begin, end) = match (offsets[0].as_u64(), offsets[1].as_u64()) {
        (Some(b), Some(e)) if b <= e => (b, e),
        _ => return Err(format!("data_offsets {offsets:?} are not integers with begin <= end")),
    };
    let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or("shape's element count overflows")?;
    let span = dtype.span_bytes(numel).ok_or_else(|| format!("{numel} elements of {dtype} are not a whole number of bytes"))?;
    if span != end - begin {
        return Err(format!("shape {shape:?} of {dtype} needs {span} bytes but data_offsets span {}", end - begin));
    }
    Ok(TensorEntry { name: name.to_owned(), dtype, shape, begin, end })
}

/// Serialises a header the way the reference writer does: `__metadata__` first, tensors in the
/// given order, JSON padded with spaces so the data section starts on an 8-byte boundary.
/// Returns the complete prefix (length + JSON) to write at offset 0.
pub fn serialize_header(tensors: &[TensorEntry], metadata: &Map<String, Value>) -> Vec<u8> {
    let mut root = Map::new();
    if !metadata.is_empty() {
        root.insert(METADATA_KEY.into(), Value::Object(metadata.clone()));
    }
    for t in tensors {
        let mut entry = Map::new();
        entry.insert("dtype".into(), Value::from(t.dtype.name()));
        entry.insert("shape".into(), Value::from(t.shape.clone()));
        entry.insert("data_offsets".into(), Value::from(vec![t.begin, t.end]));
        root.insert(t.name.clone(), Value::Object(entry));
    }
    let mut json = serde_json::to_vec(&Value::Object(root)).expect("a JSON map always serialises");
    let padded = json.len().div_ceil(8) * 8;
    json.resize(padded, b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file_with(json: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        parse_header(&bytes[8..8 + n], bytes.len() as u64, Path::new("x.safetensors"))
    }

    fn reason(result: Result<Header>) -> String {
        match result {
            Err(Error::Header { reason, .. }) => reason,
            other => panic!("expected a header error, got {other:?}"),
        }
    }

    #[test]
    fn valid_header_round_trips() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[4,16]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"z":{"dtype":"I8","shape":[0],"data_offsets":[16,16]}}"#;
        let header = parse(&file_with(json, 16)).unwrap();
        let names: Vec<_> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "z"]);
        assert_eq!(header.data_len(), 16);
        let prefix = serialize_header(&header.tensors, header.metadata.as_ref().unwrap());
        assert_eq!(prefix.len() % 8, 0);
        let mut again = prefix.clone();
        again.resize(prefix.len() + 16, 0);
        assert_eq!(parse(&again).unwrap().tensors, header.tensors);
    }

    #[test]
    fn rejects_gaps_overlaps_spans_and_lengths() {
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(reason(parse(&file_with(gap, 8))).starts_with("gap"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(reason(parse(&file_with(overlap, 8))).starts_with("overlap"));
        let span = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(reason(parse(&file_with(span, 8))).contains("needs 12 bytes"));
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(reason(parse(&file_with(ok, 7))).starts_with("truncated"));
        assert!(reason(parse(&file_with(ok, 9))).starts_with("trailing"));
        let dtype = r#"{"a":{"dtype":"F128","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(reason(parse(&file_with(dtype, 8))).contains("unknown dtype"));
        assert!(reason(parse(&file_with("[1, 2]", 0))).contains("start with"));
        assert!(reason(parse(&file_with("{\"a\": 1", 0))).contains("not a JSON object"));
    }

    #[test]
    fn duplicate_keys_are_refused_and_null_metadata_accepted() {
        let twice = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(reason(parse(&file_with(twice, 8))).contains("duplicate key 'a'"));
        let nested = r#"{"a":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(reason(parse(&file_with(nested, 4))).contains("duplicate key 'dtype'"));
        let metadata_twice = r#"{"__metadata__":{"k":"v"},"__metadata__":{"k":"w"}}"#;
        assert!(reason(parse(&file_with(metadata_twice, 0))).contains("duplicate key '__metadata__'"));
        let null = r#"{"__metadata__":null,"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let header = parse(&file_with(null, 4)).unwrap();
        assert_eq!((header.metadata, header.tensors.len()), (None, 1));
        assert!(reason(parse(&file_with(r#"{"__metadata__":5}"#, 0))).contains("not an object"));
    }

    #[test]
    fn error_names_file_and_tensor() {
        let span = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let message = parse(&file_with(span, 8)).unwrap_err().to_string();
        assert!(message.contains("x.safetensors"), "{message}");
        assert!(message.contains("tensor 'w'"), "{message}");
    }

    #[test]
    fn read_header_checks_length_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, [1u8, 2, 3]).unwrap();
        assert!(reason(read_header(&path)).contains("too short"));
        let mut past_end = 1000u64.to_le_bytes().to_vec();
        past_end.extend_from_slice(b"{}");
        std::fs::write(&path, &past_end).unwrap();
        assert!(reason(read_header(&path)).contains("past the end"));
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        assert!(reason(read_header(&path)).contains("exceeds"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes never panic the parser: they parse or give a header error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), extra in 0u64..64) {
            let result = parse_header(&bytes, bytes.len() as u64 + 8 + extra, Path::new("f"));
            if let Err(err) = result {
                let is_header_error = matches!(err, Error::Header { .. });
                prop_assert!(is_header_error, "unexpected error kind: {:?}", err);
            }
        }

        /// Structurally plausible JSON with arbitrary numbers never panics either.
        #[test]
        fn arbitrary_entries_never_panic(
            dtype in prop::sample::select(vec!["F32", "BF16", "F4", "BOOL", "X"]),
            shape in proptest::collection::vec(any::<u64>(), 0..4),
            begin in any::<u64>(), end in any::<u64>(), file_len in any::<u64>(),
        ) {
            let json = format!(r#"{{"t":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{begin},{end}]}}}}"#);
            let file_len = file_len.max(8 + json.len() as u64);
            let _ = parse_header(json.as_bytes(), file_len, Path::new("f"));
        }
    }
}
