//! Tensors held by the caller (a fine-tuned model in memory) written as a checkpoint, with the
//! layout, shard files, index, file copies and all-or-nothing staging the rewrite engine uses too.
//!
//! The layout is fixed up front from names, dtypes and shapes, so every tensor has its place before
//! any byte is written; the caller then hands in each tensor's bytes, in any order, and `finish`
//! commits the directory only when every tensor has arrived. Dropping the writer earlier removes
//! the partial output.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::checkpoint::{Checkpoint, CONFIG_FILE, INDEX_FILE};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::layout::{place, placed_from_fields, Layout};
use crate::output::{
    check_relative, copied_bytes, create_shards, files_under, finish, other_files, report, ApplyReport, CopiedFile, Progress,
};
use crate::staging::Staging;

/// One tensor to write: its name, element type and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    nbytes: u64,
}

impl TensorSpec {
    /// Fails when the shape's element count overflows or is not a whole number of bytes.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<u64>) -> Result<TensorSpec> {
        let name = name.into();
        let nbytes =
            shape.iter().try_fold(1u64, |numel, &dim| numel.checked_mul(dim)).and_then(|numel| dtype.span_bytes(numel)).ok_or_else(
                || Error::Plan {
                    tensor: Some(name.clone()),
                    field: None,
                    reason: format!("shape {shape:?} of {dtype} is not a whole number of bytes below 2^64"),
                },
            )?;
        Ok(TensorSpec { name, dtype, shape, nbytes })
    }
}

placed_from_fields!(TensorSpec);

/// A file or directory copied into the output at a relative path (an adapter, a report).
#[derive(Debug, Clone)]
pub struct Include {
    pub from: PathBuf,
    pub to: PathBuf,
}

#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub max_shard_size: u64,
    pub overwrite: bool,
}

/// What to write besides the tensors.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// The checkpoint these tensors replace: its files other than weights are copied.
    pub source: Option<PathBuf>,
    pub includes: Vec<Include>,
    /// Written as `config.json` in place of the source's.
    pub config: Option<Vec<u8>>,
}

/// A checkpoint being written: shard files created with their headers, tensor data still to come.
#[derive(Debug)]
pub struct CheckpointWriter {
    output: PathBuf,
    layout: Layout<TensorSpec>,
    staging: Staging,
    shards: Vec<(PathBuf, File)>,
    written: Vec<bool>,
    config: Option<Vec<u8>>,
    to_copy: Vec<CopiedFile>,
    skipped: Vec<String>,
}

impl CheckpointWriter {
    /// Validates everything, lays the tensors out in the given order and creates the shard files
    /// in a staging directory beside `output`.
    pub fn create(
        output: &Path,
        tensors: Vec<TensorSpec>,
        extras: Extras,
        options: &WriteOptions,
        progress: &Progress,
    ) -> Result<CheckpointWriter> {
        check_unique_names(&tensors)?;
        let (mut to_copy, skipped) = match &extras.source {
            Some(source) => {
                let weights = Checkpoint::open(source)?.weight_files();
                other_files(source, &weights, extras.config.is_some())?
            }
            None => (Vec::new(), Vec::new()),
        };
        for include in &extras.includes {
            check_relative(output, &include.to)?;
            to_copy.extend(files_under(&include.from, &include.to)?);
        }
        let layout = place(tensors, options.max_shard_size);
        check_no_clashes(output, &layout, &to_copy, extras.config.is_some())?;
        progress.total.store(layout.total_size + copied_bytes(&to_copy), Ordering::Relaxed);

        let staging = Staging::create(output, extras.source.as_deref(), options.overwrite)?;
        let shards = create_shards(staging.path(), &layout)?;
        Ok(CheckpointWriter {
            output: output.to_owned(),
            written: vec![false; layout.tensors.len()],
            layout,
            staging,
            shards,
            config: extras.config,
            to_copy,
            skipped,
        })
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.layout.tensors
    }

    /// Writes the data of tensor `index` (its raw little-endian bytes, exactly `nbytes` of them).
    pub fn write_tensor(&mut self, index: usize, bytes: &[u8], progress: &Progress) -> Result<()> {
        let Some(spec) = self.layout.tensors.get(index) else {
            return Err(self.error(format!("no tensor number {index}: there are {}", self.layout.tensors.len())));
        };
        if bytes.len() as u64 != spec.nbytes {
            return Err(self.error(format!(
                "tensor '{}' ({} {:?}) needs {} bytes, got {}",
                spec.name,
                spec.dtype,
                spec.shape,
                spec.nbytes,
                bytes.len()
            )));
        }
        if self.written[index] {
            return Err(self.error(format!("tensor '{}' was written twice", spec.name)));
        }
        let (shard, offset) = self.layout.placements[index];
        let (path, file) = &self.shards[shard];
        file.write_all_at(bytes, offset).map_err(Error::io(path))?;
        self.written[index] = true;
        progress.done.fetch_add(spec.nbytes, Ordering::Relaxed);
        Ok(())
    }

    /// Writes index, config and copied files and moves the checkpoint into place, once every
    /// tensor has been written.
    pub fn finish(self, progress: &Progress) -> Result<ApplyReport> {
        if let Some(missing) = self.written.iter().position(|done| !done) {
            return Err(self.error(format!("tensor '{}' was never written", self.layout.tensors[missing].name)));
        }
        let copied = finish(self.staging, &self.layout, &self.shards, self.config.as_deref(), &self.to_copy, progress)?;
        Ok(report(&self.output, &self.layout, copied, self.skipped))
    }

    fn error(&self, reason: String) -> Error {
        Error::Output { path: self.output.clone(), reason }
    }
}

fn check_unique_names(tensors: &[TensorSpec]) -> Result<()> {
    let mut seen = HashSet::with_capacity(tensors.len());
    match tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
        Some(t) => Err(Error::plan(&t.name, "the tensor is listed twice")),
        None => Ok(()),
    }
}

/// Every output file has one origin: a shard, the index, the config or one copied file.
fn check_no_clashes(output: &Path, layout: &Layout<TensorSpec>, to_copy: &[CopiedFile], config_given: bool) -> Result<()> {
    let mut taken: BTreeSet<PathBuf> = layout.shards.iter().map(|s| PathBuf::from(&s.file_name)).collect();
    if layout.shards.len() > 1 {
        taken.insert(INDEX_FILE.into());
    }
    if config_given {
        taken.insert(CONFIG_FILE.into());
    }
    for file in to_copy {
        if !taken.insert(file.to.clone()) {
            return Err(Error::Output {
                path: output.to_owned(),
                reason: format!("two files would be written to '{}' (from {})", file.to.display(), file.from.display()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Placed;

    #[test]
    fn specs_need_whole_bytes() {
        assert_eq!(TensorSpec::new("a", Dtype::BF16, vec![3, 2]).unwrap().nbytes(), 12);
        assert_eq!(TensorSpec::new("s", Dtype::F32, vec![]).unwrap().nbytes(), 4);
        assert!(TensorSpec::new("p", Dtype::F4, vec![3]).is_err());
        assert!(TensorSpec::new("o", Dtype::F64, vec![u64::MAX, 2]).is_err());
    }

    #[test]
    fn relative_destinations_only() {
        let out = Path::new("out");
        assert!(check_relative(out, Path::new("adapter")).is_ok());
        assert!(check_relative(out, Path::new("a/b.json")).is_ok());
        assert!(check_relative(out, Path::new("../x")).is_err());
        assert!(check_relative(out, Path::new("/abs")).is_err());
        assert!(check_relative(out, Path::new("")).is_err());
    }
}
