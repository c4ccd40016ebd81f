//! The cut plan (`docs/plan-format.md`): parsing, and validation against a checkpoint.

use std::collections::{BTreeMap, HashMap};
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
}

/// Kept indices along one dimension; shared between tensors that use the same index set.
pub type KeepList = Arc<Vec<u64>>;

#[derive(Debug, Clone, Default)]
pub struct TensorCut {
    /// `(dim, kept indices)`, sorted by dim.
    pub keep: Vec<(usize, KeepList)>,
    pub drop: bool,
    pub rename: Option<String>,
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
    if raw.drop && (!raw.keep.is_empty() || raw.rename.is_some()) {
        return Err(Error::plan(name, "'drop' cannot be combined with 'keep' or 'rename'"));
    }
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
    Ok(TensorCut { keep, drop: raw.drop, rename: raw.rename })
}

/// A plan's extra file must be a plain file name the engine does not write itself.
fn check_file_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        return Err("must be a plain file name (no directories, not hidden)".into());
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

/// One tensor of the output checkpoint and where its bytes come from.
#[derive(Debug, Clone)]
pub struct OutputTensor {
    pub name: String,
    pub source: TensorRef,
    pub dtype: Dtype,
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
}

/// Checks the plan against the checkpoint and lists the output tensors in storage order.
pub fn output_tensors(plan: &CutPlan, checkpoint: &Checkpoint) -> Result<Vec<OutputTensor>> {
    if let Some(unknown) = plan.tensors.keys().find(|name| checkpoint.get(name).is_none()) {
        return Err(Error::plan(unknown, "the checkpoint has no tensor of this name"));
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
            if entry.dtype.item_bytes().is_none() {
                return Err(Error::plan(
                    &entry.name,
                    format!("{} packs several elements per byte, so it cannot be cut", entry.dtype),
                ));
            }
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
        outputs.push(OutputTensor {
            name,
            source,
            dtype: entry.dtype,
            source_shape: entry.shape.clone(),
            shape,
            keep,
            nbytes,
        });
    }
    Ok(outputs)
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
    fn plan_files_must_be_plain_names_the_engine_does_not_write() {
        let with_file = |name: &str| {
            plan(&format!(r#"{{"format":"structprune.cut-plan","version":1,"files":{{{}:"x"}}}}"#, serde_json::to_string(name).unwrap()))
        };
        assert_eq!(with_file("modeling_decilm.py").unwrap().files["modeling_decilm.py"], "x");
        for bad in ["", ".hidden", "a/b.py", "..", "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"] {
            assert!(plan_reason(with_file(bad)).starts_with(&format!("file '{bad}'")), "{bad}");
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
        assert!(plan_reason(plan(r#"{"format":"x","version":1}"#)).contains("expected"));
        assert!(plan_reason(plan(r#"{"format":"structprune.cut-plan","version":7}"#)).contains("not supported"));
    }
}
