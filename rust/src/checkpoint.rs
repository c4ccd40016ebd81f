//! Discovering and validating a Hugging Face checkpoint directory: one `model.safetensors`, or
//! shards listed by `model.safetensors.index.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::header::{read_header, Header, TensorEntry};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const CONFIG_FILE: &str = "config.json";
/// Largest shard index read (a 405B-parameter model's is about 100 KB): memory stays a small
/// multiple of the input however the file was made.
pub const MAX_INDEX_BYTES: u64 = 100_000_000;
/// Largest `config.json` read (real ones are a few KB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The bytes of the regular file `path`, refused as `too_large(len)` past `limit` bytes before any
/// is read.
pub(crate) fn read_limited(path: &Path, limit: u64, too_large: impl FnOnce(u64) -> Error) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path).map_err(Error::io(path))?;
    let len = file.metadata().map_err(Error::io(path))?.len();
    if len > limit {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take`: a file that grows while it is read still stops at the limit.
    file.take(limit + 1).read_to_end(&mut bytes).map_err(Error::io(path))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[derive(Debug)]
pub struct Shard {
    pub file_name: String,
    pub path: PathBuf,
    pub header: Header,
}

/// Where a tensor lives: shard number and entry number within that shard's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorRef {
    pub shard: usize,
    pub entry: usize,
}

#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    /// Shards in file-name order.
    pub shards: Vec<Shard>,
    /// Set when the checkpoint is sharded.
    pub index_path: Option<PathBuf>,
    /// Every tensor in storage order: shard by shard, then by offset.
    pub order: Vec<TensorRef>,
    by_name: HashMap<String, TensorRef>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            return Err(Error::ShardIndex { path: dir.to_owned(), reason: "not a directory".into() });
        }
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (shards, index_path) = if regular_file(&index_path)? {
            if regular_file(&single_path)? {
                // transformers loads model.safetensors when both are there, the index otherwise:
                // which tensors are "the checkpoint" would depend on the reader.
                return Err(Error::ShardIndex {
                    path: dir.to_owned(),
                    reason: format!(
                        "holds both {SINGLE_FILE} and {INDEX_FILE}, so which is the checkpoint is ambiguous \
                         (transformers reads {SINGLE_FILE}): move one of them away"
                    ),
                });
            }
            (open_sharded(dir, &index_path)?, Some(index_path))
        } else if regular_file(&single_path)? {
            let header = read_header(&single_path)?;
            let shard = Shard { file_name: SINGLE_FILE.into(), path: single_path, header };
            (vec![shard], None)
        } else {
            return Err(Error::ShardIndex {
                path: dir.to_owned(),
                reason: format!(
                    "no {SINGLE_FILE} or {INDEX_FILE} found (only safetensors checkpoints are supported; \
                     convert pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))"
                ),
            });
        };
        let mut order = Vec::new();
        let mut by_name = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (e, entry) in shard.header.tensors.iter().enumerate() {
                let r = TensorRef { shard: s, entry: e };
                if let Some(previous) = by_name.insert(entry.name.clone(), r) {
                    return Err(Error::ShardIndex {
                        path: shard.path.clone(),
                        reason: format!(
                            "tensor '{}' is stored in both {} and {}",
                            entry.name, shards[previous.shard].file_name, shard.file_name
                        ),
                    });
                }
                order.push(r);
            }
        }
        Ok(Checkpoint { dir: dir.to_owned(), shards, index_path, order, by_name })
    }

    pub fn get(&self, name: &str) -> Option<TensorRef> {
        self.by_name.get(name).copied()
    }

    pub fn entry(&self, r: TensorRef) -> &TensorEntry {
        &self.shards[r.shard].header.tensors[r.entry]
    }

    pub fn tensors(&self) -> impl Iterator<Item = (TensorRef, &TensorEntry)> + '_ {
        self.order.iter().map(|&r| (r, self.entry(r)))
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Files that are part of the weights and therefore rewritten rather than copied.
    pub fn weight_files(&self) -> BTreeSet<String> {
        let mut files: BTreeSet<String> = self.shards.iter().map(|s| s.file_name.clone()).collect();
        if self.index_path.is_some() {
            files.insert(INDEX_FILE.into());
        }
        files
    }
}

/// What a directory entry is, a symbolic link followed to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File {
        len: u64,
    },
    /// `linked`: the entry is a symbolic link to the directory.
    Directory {
        linked: bool,
    },
    /// A FIFO, socket or device: reading it could block forever or never end.
    Special(&'static str),
}

/// The kind of `path`, `None` when nothing is there (or a link points nowhere). A link to a file is
/// that file: a Hugging Face cache snapshot links every file of a checkpoint to its blob store.
pub fn entry_kind(path: &Path) -> Result<Option<EntryKind>> {
    use std::os::unix::fs::FileTypeExt;
    let linked = match path.symlink_metadata() {
        Ok(meta) => meta.file_type().is_symlink(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(Error::io(path)(err)),
    };
    let meta = match path.metadata() {
        Ok(meta) => meta,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(Error::io(path)(err)),
    };
    let kind = meta.file_type();
    Ok(Some(if kind.is_file() {
        EntryKind::File { len: meta.len() }
    } else if kind.is_dir() {
        EntryKind::Directory { linked }
    } else if kind.is_fifo() {
        EntryKind::Special("FIFO")
    } else if kind.is_socket() {
        EntryKind::Special("socket")
    } else if kind.is_block_device() {
        EntryKind::Special("block device")
    } else {
        EntryKind::Special("character device")
    }))
}

/// Opening a FIFO for reading blocks until a writer appears; opened non-blocking, it returns at
/// once and the type check on the open file refuses it.
#[cfg(target_os = "linux")]
const OPEN_NONBLOCK: i32 = libc::O_NONBLOCK;
#[cfg(not(target_os = "linux"))]
const OPEN_NONBLOCK: i32 = 0;

/// Opens `path` for reading if it is a regular file (checked on the open file, so a file swapped
/// for a FIFO after a directory listing is refused too, without blocking).
pub(crate) fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options().read(true).custom_flags(OPEN_NONBLOCK).open(path)?;
    if file.metadata()?.is_file() {
        Ok(file)
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"))
    }
}

/// Whether `path` is a regular file; a directory, FIFO, socket or device there is an error, so
/// that nothing opens (and blocks on) a FIFO named like a shard.
fn regular_file(path: &Path) -> Result<bool> {
    match entry_kind(path)? {
        None => Ok(false),
        Some(EntryKind::File { .. }) => Ok(true),
        Some(other) => {
            let what = match other {
                EntryKind::Special(kind) => kind,
                _ => "directory",
            };
            Err(Error::ShardIndex { path: path.to_owned(), reason: format!("a {what}, not a regular file") })
        }
    }
}

/// `prefix-00002-of-00005.safetensors` → (`prefix`, 2, 5, digits of the number, digits of the total).
fn shard_number(file: &str) -> Option<(&str, u64, u64, usize, usize)> {
    let stem = file.strip_suffix(".safetensors")?;
    let (left, total) = stem.rsplit_once("-of-")?;
    let (prefix, number) = left.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(number) || !digits(total) {
        return None;
    }
    Some((prefix, number.parse().ok()?, total.parse().ok()?, number.len(), total.len()))
}

/// A partial index is refused: a listed `P-i-of-N` shard implies shards 1 to N, and each must hold a
/// listed tensor; a file of the directory named like a shard of a listed prefix must be listed.
/// Either would otherwise leave weights out of the output without a word.
fn check_every_shard_listed(
    dir: &Path,
    by_file: &BTreeMap<String, BTreeSet<String>>,
    weight_map: &serde_json::Map<String, Value>,
) -> std::result::Result<(), String> {
    // What an unlisted shard file holds, for the message: a tensor the index maps elsewhere says
    // more than "partial".
    let holds = |name: &str| -> String {
        let Ok(header) = read_header(&dir.join(name)) else { return String::new() };
        let Some(first) = header.tensors.first() else { return String::new() };
        match weight_map.get(&first.name).and_then(Value::as_str) {
            Some(other) => format!(" (it stores tensor '{}', which the index maps to {other})", first.name),
            None => format!(" (it stores tensor '{}', which the index does not list)", first.name),
        }
    };
    let mut expected: BTreeSet<String> = BTreeSet::new();
    let mut prefixes: BTreeSet<&str> = BTreeSet::new();
    for file in by_file.keys() {
        let Some((prefix, _, total, width, total_width)) = shard_number(file) else { continue };
        prefixes.insert(prefix);
        if total <= 100_000 {
            expected.extend((1..=total).map(|i| format!("{prefix}-{i:0width$}-of-{total:0total_width$}.safetensors")));
        }
    }
    if let Some(unlisted) = expected.iter().find(|name| !by_file.contains_key(*name)) {
        let state = if dir.join(unlisted).exists() { "is in the directory but" } else { "is missing and" };
        return Err(format!("shard {unlisted} {state} the index lists no tensor in it{}: the index is partial", holds(unlisted)));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if by_file.contains_key(&name) {
            continue;
        }
        if shard_number(&name).is_some_and(|(prefix, ..)| prefixes.contains(prefix)) {
            return Err(format!(
                "shard {name} is in the directory but the index lists no tensor in it{}: the index is partial",
                holds(&name)
            ));
        }
    }
    Ok(())
}

fn open_sharded(dir: &Path, index_path: &Path) -> Result<Vec<Shard>> {
    let invalid = |reason: String| Error::ShardIndex { path: index_path.to_owned(), reason };
    let bytes = read_limited(index_path, MAX_INDEX_BYTES, |len| {
        invalid(format!("{len} bytes is past the {MAX_INDEX_BYTES}-byte limit for a shard index"))
    })?;
    let root = crate::json::from_slice(&bytes).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    drop(bytes);
    if !root.is_object() {
        return Err(invalid("not a JSON object".into()));
    }
    let weight_map = root.get("weight_map").and_then(Value::as_object).ok_or_else(|| invalid("missing object 'weight_map'".into()))?;
    if weight_map.is_empty() {
        return Err(invalid("'weight_map' lists no tensors".into()));
    }
    let mut by_file: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (tensor, file) in weight_map {
        let file = file.as_str().ok_or_else(|| invalid(format!("weight_map entry of tensor '{tensor}' is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(invalid(format!(
                "weight_map names '{file}' for tensor '{tensor}', which is not a file in the checkpoint directory"
            )));
        }
        by_file.entry(file.to_owned()).or_default().insert(tensor.clone());
    }
    check_every_shard_listed(dir, &by_file, weight_map).map_err(invalid)?;
    let mut shards = Vec::with_capacity(by_file.len());
    for (file_name, listed) in by_file {
        let path = dir.join(&file_name);
        if !regular_file(&path)? {
            let example = listed.iter().next().map(String::as_str).unwrap_or_default();
            return Err(invalid(format!(
                "shard {file_name} (holding tensor '{example}' and {} more) does not exist",
                listed.len().saturating_sub(1)
            )));
        }
        let header = read_header(&path)?;
        let stored: BTreeSet<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        if let Some(missing) = listed.iter().find(|t| !stored.contains(t.as_str())) {
            return Err(invalid(format!("the index maps tensor '{missing}' to {file_name}, which does not contain it")));
        }
        if let Some(extra) = stored.iter().find(|t| !listed.contains(**t)) {
            let mapped = weight_map.get(*extra).and_then(Value::as_str);
            let reason = match mapped {
                Some(other) => format!("tensor '{extra}' is stored in {file_name} but the index maps it to {other}"),
                None => format!("tensor '{extra}' is stored in {file_name} but the index does not list it"),
            };
            return Err(invalid(reason));
        }
        shards.push(Shard { file_name, path, header });
    }
    Ok(shards)
}
