//! The out-of-core rewrite: a checkpoint and a cut plan in, a new checkpoint directory out.
//!
//! Every output tensor gets a fixed place (shard, offset) before any byte moves ([`crate::layout`]),
//! so the copy workers ([`crate::copy`]) can copy tensors in any order with positional reads and
//! writes, and the result is byte-identical whatever the thread count or buffer size. Each worker
//! owns its buffers, so peak memory is `memory_budget` however large the tensors and shards are.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde_json::{Map, Value};

use crate::checkpoint::{Checkpoint, CONFIG_FILE, MAX_CONFIG_BYTES};
use crate::copy::{copy_tensors, workers};
use crate::error::{Error, Result};
use crate::layout::{place, Layout};
use crate::output::{check_relative, copied_bytes, create_shards, files_under, finish, other_files, pretty_json, report, write_synced};
pub use crate::output::{ApplyReport, Progress};
use crate::plan::{output_tensors, CutPlan};
use crate::staging::Staging;

/// The largest memory budget accepted (1 TiB). The buffers are allocated before any work, and a
/// budget past what the machine has would end the process in an allocation failure.
pub const MAX_MEMORY_BUDGET: u64 = 1 << 40;
/// The most copy threads accepted: the engine is bound by the disk long before this.
pub const MAX_THREADS: usize = 256;

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub max_shard_size: u64,
    pub memory_budget: u64,
    pub threads: usize,
    pub overwrite: bool,
    /// Folders of the input (relative paths inside it) copied whole into the same place in the
    /// output, inside the same all-or-nothing commit as the weights: a sentence-transformers
    /// checkpoint's module folders (`1_Pooling`…), which say how it pools and normalises.
    pub folders: Vec<PathBuf>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions { max_shard_size: 5_000_000_000, memory_budget: 64 << 20, threads: 4, overwrite: false, folders: Vec::new() }
    }
}

impl ApplyOptions {
    /// Refuses settings out of range, naming them as the API and the command line do.
    pub fn validate(&self) -> Result<()> {
        if self.memory_budget > MAX_MEMORY_BUDGET {
            return Err(Error::Setting {
                setting: "memory_budget (--memory-budget)".into(),
                reason: format!(
                    "{} bytes is above the cap of {MAX_MEMORY_BUDGET} bytes (1 TiB); the budget is buffer memory, \
                     allocated up front, and 64 MiB already keeps a disk busy",
                    self.memory_budget
                ),
            });
        }
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(Error::Setting {
                setting: "threads (--threads)".into(),
                reason: format!("{} is not between 1 and {MAX_THREADS}", self.threads),
            });
        }
        if self.max_shard_size == 0 {
            return Err(Error::Setting { setting: "max_shard_size (--max-shard-size)".into(), reason: "must be at least 1 byte".into() });
        }
        Ok(())
    }
}

/// Validates `plan` against `checkpoint` and places every output tensor.
pub fn layout(checkpoint: &Checkpoint, plan: &CutPlan, max_shard_size: u64) -> Result<Layout> {
    Ok(place(output_tensors(plan, checkpoint)?, max_shard_size))
}

/// Writes the pruned checkpoint of `input` under `plan` to `output`, atomically.
pub fn apply_plan(input: &Path, plan: &CutPlan, output: &Path, options: &ApplyOptions, progress: &Progress) -> Result<ApplyReport> {
    options.validate()?;
    let checkpoint = Checkpoint::open(input)?;
    let layout = layout(&checkpoint, plan, options.max_shard_size)?;
    let config = patched_config(input, plan)?;
    let (mut to_copy, skipped) = other_files(input, &checkpoint.weight_files(), config.is_some())?;
    for folder in &options.folders {
        check_relative(output, folder)?;
        to_copy.extend(files_under(&input.join(folder), folder)?);
    }
    to_copy.retain(|file| !plan.files.contains_key(file.to.to_string_lossy().as_ref()));
    progress.total.store(layout.total_size + copied_bytes(&to_copy), Ordering::Relaxed);

    // Buffers first: a budget the machine cannot give is an error before anything is written.
    let workers = workers(&checkpoint, &layout, options.memory_budget, options.threads)?;
    let staging = Staging::create(output, Some(input), options.overwrite)?;
    let files = create_shards(staging.path(), &layout)?;
    copy_tensors(&checkpoint, &layout, &files, workers, progress)?;
    for (name, text) in &plan.files {
        write_synced(&staging.path().join(name), text.as_bytes())?;
    }
    let mut copied_files = finish(staging, &layout, &files, config.as_deref(), &to_copy, progress)?;
    copied_files.extend(plan.files.keys().cloned());
    copied_files.sort();
    Ok(report(output, &layout, copied_files, skipped))
}

/// The input's config.json with the plan's merge patch applied, or `None` when the plan has none.
fn patched_config(input: &Path, plan: &CutPlan) -> Result<Option<Vec<u8>>> {
    let Some(patch) = &plan.config_patch else { return Ok(None) };
    let path = input.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(Error::Config { path, reason: "the plan edits config.json but the checkpoint has none".into() });
    }
    let bytes = crate::checkpoint::read_limited(&path, MAX_CONFIG_BYTES, |len| Error::Config {
        path: path.clone(),
        reason: format!("{len} bytes is past the {MAX_CONFIG_BYTES}-byte limit for a config.json"),
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::Config { path: path.clone(), reason: format!("not UTF-8 text: {e}") })?;
    let mut config: Value =
        crate::json::from_str(text).map_err(|e| Error::Config { path: path.clone(), reason: format!("not valid JSON: {e}") })?;
    if !config.is_object() {
        return Err(Error::Config { path, reason: "not a JSON object".into() });
    }
    merge_patch(&mut config, patch);
    Ok(Some(pretty_json(&config)))
}

/// RFC 7386 JSON Merge Patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.shift_remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_refused_naming_them() {
        let refused = |options: ApplyOptions, name: &str| match options.validate() {
            Err(err @ Error::Setting { .. }) => assert!(err.to_string().contains(name), "{err}"),
            other => panic!("{name}: expected a setting error, got {other:?}"),
        };
        let base = ApplyOptions::default();
        refused(ApplyOptions { memory_budget: 100_000_000_000_000, ..base.clone() }, "--memory-budget");
        refused(ApplyOptions { memory_budget: u64::MAX, ..base.clone() }, "1 TiB");
        refused(ApplyOptions { threads: 0, ..base.clone() }, "--threads");
        refused(ApplyOptions { threads: MAX_THREADS + 1, ..base.clone() }, "--threads");
        refused(ApplyOptions { max_shard_size: 0, ..base.clone() }, "--max-shard-size");
        assert!(ApplyOptions { memory_budget: MAX_MEMORY_BUDGET, threads: MAX_THREADS, ..base }.validate().is_ok());
    }
}
