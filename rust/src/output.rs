//! The output directory around the tensor data, shared by every writer: the shard files created
//! with their headers, then the index, the config and the checkpoint's other files, and the commit.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{Map, Value};

use crate::checkpoint::{entry_kind, open_regular, EntryKind, CONFIG_FILE, INDEX_FILE};
use crate::error::{Error, Result};
use crate::layout::{Layout, Placed};
use crate::staging::{sync_dir, Staging, MARKER};

/// Weight formats that would be stale after pruning; they are reported and not copied.
const WEIGHT_EXTENSIONS: [&str; 8] = ["bin", "safetensors", "h5", "msgpack", "gguf", "pt", "pth", "ckpt"];
/// Files of a checkpoint directory, besides its weights, that belong to the model and are copied:
/// configs and tokenizer data (JSON, text vocabularies, sentencepiece and tiktoken models, chat
/// templates), remote code, the model card and licences. A model directory is often a working
/// directory too; anything else in it is left out, and reported.
const COPIED_EXTENSIONS: [&str; 6] = ["json", "txt", "model", "tiktoken", "jinja", "py"];
const COPIED_PREFIXES: [&str; 5] = ["README", "LICENSE", "NOTICE", "USE_POLICY", ".GITATTRIBUTES"];

/// Shared between the engine and whoever watches it: bytes done so far, the total, a cancel flag.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub cancel: AtomicBool,
}

#[derive(Debug, Clone)]
pub struct ApplyReport {
    pub output_dir: PathBuf,
    pub tensors: usize,
    pub bytes_written: u64,
    pub total_size: u64,
    pub shards: Vec<String>,
    pub copied_files: Vec<String>,
    pub skipped_files: Vec<String>,
}

/// A file copied unchanged into the output: absolute source, path relative to the output, bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct CopiedFile {
    pub from: PathBuf,
    pub to: PathBuf,
    pub len: u64,
}

pub(crate) fn copied_bytes(files: &[CopiedFile]) -> u64 {
    files.iter().map(|f| f.len).sum()
}

/// Everything after the tensor data, then the commit: shards synced, index (when sharded), config,
/// copied files. Returns the copied files' output paths.
pub(crate) fn finish<T: Placed>(
    staging: Staging,
    layout: &Layout<T>,
    shards: &[(PathBuf, File)],
    config: Option<&[u8]>,
    to_copy: &[CopiedFile],
    progress: &Progress,
) -> Result<Vec<String>> {
    let dir = staging.path().to_owned();
    for (path, file) in shards {
        file.sync_all().map_err(Error::io(path))?;
    }
    if layout.shards.len() > 1 {
        write_synced(&dir.join(INDEX_FILE), &index_json(layout))?;
    }
    if let Some(config) = config {
        write_synced(&dir.join(CONFIG_FILE), config)?;
    }
    let mut copied_files = Vec::with_capacity(to_copy.len());
    for file in to_copy {
        copy_file(&file.from, &dir.join(&file.to))?;
        progress.done.fetch_add(file.len, Ordering::Relaxed);
        copied_files.push(file.to.to_string_lossy().into_owned());
    }
    if progress.cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    staging.commit()?;
    Ok(copied_files)
}

pub(crate) fn report<T: Placed>(output: &Path, layout: &Layout<T>, copied_files: Vec<String>, skipped_files: Vec<String>) -> ApplyReport {
    let headers: u64 = layout.shards.iter().map(|s| s.header.len() as u64).sum();
    ApplyReport {
        output_dir: output.to_owned(),
        tensors: layout.tensors.len(),
        bytes_written: layout.total_size + headers,
        total_size: layout.total_size,
        shards: layout.shards.iter().map(|s| s.file_name.clone()).collect(),
        copied_files,
        skipped_files,
    }
}

pub(crate) fn create_shards<T>(dir: &Path, layout: &Layout<T>) -> Result<Vec<(PathBuf, File)>> {
    layout
        .shards
        .iter()
        .map(|shard| {
            let path = dir.join(&shard.file_name);
            let file = File::options().read(true).write(true).create_new(true).open(&path).map_err(Error::io(&path))?;
            file.set_len(shard.header.len() as u64 + shard.data_len).map_err(Error::io(&path))?;
            file.write_all_at(&shard.header, 0).map_err(Error::io(&path))?;
            Ok((path, file))
        })
        .collect()
}

fn index_json<T: Placed>(layout: &Layout<T>) -> Vec<u8> {
    let mut weight_map: Vec<(&str, &str)> = Vec::with_capacity(layout.tensors.len());
    for shard in &layout.shards {
        for t in &layout.tensors[shard.tensors.clone()] {
            weight_map.push((t.name(), &shard.file_name));
        }
    }
    weight_map.sort();
    let weight_map: Map<String, Value> = weight_map.into_iter().map(|(t, f)| (t.to_owned(), Value::from(f))).collect();
    let index = serde_json::json!({
        "metadata": {"total_size": layout.total_size},
        "weight_map": weight_map,
    });
    pretty_json(&index)
}

pub(crate) fn pretty_json(value: &Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(value).expect("JSON values always serialise");
    text.push(b'\n');
    text
}

/// The checkpoint's own files in the top level of `input`, to copy unchanged, and the entries left
/// out: weights in other formats (stale after pruning), files that are not the model's, and
/// directories (never entered, so a link to a directory outside the checkpoint is not followed;
/// reported with a trailing `/`). `weights`, which are rewritten, and the output marker, which is
/// written anew, are left out silently. A FIFO, socket or device is refused: it is no checkpoint
/// data, and reading it could block forever.
pub(crate) fn other_files(input: &Path, weights: &BTreeSet<String>, config_rewritten: bool) -> Result<(Vec<CopiedFile>, Vec<String>)> {
    let mut copy = Vec::new();
    let mut skipped = Vec::new();
    for file_name in sorted_entries(input)? {
        let name = file_name.to_string_lossy().into_owned();
        if weights.contains(&name) || name == MARKER || (config_rewritten && name == CONFIG_FILE) {
            continue;
        }
        let path = input.join(&file_name);
        match entry_kind(&path)? {
            Some(EntryKind::File { len }) if is_checkpoint_file(&name) => copy.push(CopiedFile { from: path, to: file_name.into(), len }),
            Some(EntryKind::File { .. }) | None => skipped.push(name),
            Some(EntryKind::Directory { .. }) => skipped.push(format!("{name}/")),
            Some(EntryKind::Special(kind)) => {
                let reason = format!("a {kind}, not a regular file: only regular files are copied (move it out of the model directory)");
                return Err(Error::ShardIndex { path, reason });
            }
        }
    }
    Ok((copy, skipped))
}

fn sorted_entries(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(Error::io(dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(Error::io(dir))?;
    names.sort();
    Ok(names)
}

fn is_checkpoint_file(name: &str) -> bool {
    let extension = Path::new(name).extension().and_then(|e| e.to_str()).unwrap_or_default();
    let upper = name.to_ascii_uppercase();
    !is_weight_file(name) && (COPIED_EXTENSIONS.contains(&extension) || COPIED_PREFIXES.iter().any(|p| upper.starts_with(p)))
}

/// Included files go inside the output: a relative path without `..`.
pub(crate) fn check_relative(output: &Path, to: &Path) -> Result<()> {
    let inside = !to.as_os_str().is_empty() && to.components().all(|c| matches!(c, Component::Normal(_)));
    if inside {
        Ok(())
    } else {
        Err(Error::Output {
            path: output.to_owned(),
            reason: format!("included files must go to a relative path inside the output, not '{}'", to.display()),
        })
    }
}

/// Every file under the directory `root` (or `root` itself when it is a file), to be copied to
/// `to` (relative to the output), sorted by destination. Links to files are followed; links to
/// directories below `root`, FIFOs, sockets and devices are refused (an included directory is the
/// caller's own output, an adapter say, so anything of the kind there is a mistake).
pub(crate) fn files_under(root: &Path, to: &Path) -> Result<Vec<CopiedFile>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        // `join("")` would add a trailing separator, which a file does not take.
        let (full, dest) = match relative.as_os_str().is_empty() {
            true => (root.to_owned(), to.to_owned()),
            false => (root.join(&relative), to.join(&relative)),
        };
        let refuse = |what: &str| Error::Output {
            path: full.clone(),
            reason: format!("{what}: included directories hold only files and directories"),
        };
        match entry_kind(&full)? {
            Some(EntryKind::File { len }) => files.push(CopiedFile { from: full, to: dest, len }),
            Some(EntryKind::Directory { linked }) if !linked || relative.as_os_str().is_empty() => {
                pending.extend(sorted_entries(&full)?.into_iter().map(|name| relative.join(name)));
            }
            Some(EntryKind::Directory { .. }) => return Err(refuse("a symbolic link to a directory, which is not followed")),
            Some(EntryKind::Special(kind)) => return Err(refuse(&format!("a {kind}, not a regular file"))),
            None => return Err(Error::io(&full)(std::io::ErrorKind::NotFound.into())),
        }
    }
    files.sort_by(|a, b| a.to.cmp(&b.to));
    Ok(files)
}

fn is_weight_file(name: &str) -> bool {
    name.ends_with(".bin.index.json")
        || Path::new(name).extension().and_then(|e| e.to_str()).is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e))
}

/// Copies the regular file `from` to `to`, refusing anything else: the file may have been replaced
/// by a FIFO since the directory was listed.
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    let mut source = open_regular(from).map_err(Error::io(from))?;
    let mut target = File::create(to).map_err(Error::io(to))?;
    // Not io::copy: its error does not say which side failed, and a full disk is the output's fault.
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = match source.read(&mut buffer) {
            Ok(read) => read,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(Error::io(from)(err)),
        };
        if read == 0 {
            break;
        }
        target.write_all(&buffer[..read]).map_err(Error::io(to))?;
    }
    target.sync_all().map_err(Error::io(to))
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let file = File::create(path).map_err(Error::io(path))?;
    file.write_all_at(bytes, 0).and_then(|_| file.sync_all()).map_err(Error::io(path))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_full_disk_while_copying_a_file_names_the_output_not_the_source() {
        let source = std::env::temp_dir().join(format!("structprune-copy-source-{}", std::process::id()));
        fs::write(&source, vec![7u8; 200_000]).unwrap();
        // Every write to /dev/full fails with ENOSPC, as a full disk does.
        let outcome = copy_file(&source, Path::new("/dev/full"));
        fs::remove_file(&source).unwrap();
        match outcome {
            Err(Error::Io { path, source }) => {
                assert_eq!(path, Path::new("/dev/full"));
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            }
            other => panic!("expected an I/O error naming the output, got {other:?}"),
        }
    }
}
