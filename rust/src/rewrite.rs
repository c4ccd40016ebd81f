//! The out-of-core rewrite: a checkpoint and a cut plan in, a new checkpoint directory out.
//!
//! Every output tensor gets a fixed place (shard, offset) before any byte moves, so workers can copy
//! tensors in any order with positional reads and writes, and the result is byte-identical whatever
//! the thread count or buffer size. Each worker owns one output buffer and one read buffer, so peak
//! memory is `memory_budget` however large the tensors and shards are.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::checkpoint::{entry_kind, open_regular, Checkpoint, EntryKind, CONFIG_FILE, INDEX_FILE, MAX_CONFIG_BYTES, SINGLE_FILE};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::gather::{Segment, SegmentIter};
use crate::header::{serialize_header, TensorEntry};
use crate::plan::{output_tensors, CutPlan, Data, OutputTensor};
use crate::staging::{sync_dir, Staging, MARKER};

/// Reading a gap between two wanted ranges is cheaper than another system call when it is this small.
const MAX_READ_GAP: u64 = 16 * 1024;
/// Segments gathered per batch: a fine column cut yields a segment every few bytes, and the list of
/// segments must not grow with the buffer (it would double the memory the budget allows).
const MAX_SEGMENTS_PER_BATCH: usize = 1 << 15;
/// Contiguous ranges at least this long (whole uncut tensors, runs of kept rows) are copied file to
/// file by the kernel (`copy_file_range`: no trip through user space, reflinks where supported).
const DIRECT_COPY_MIN: u64 = 1 << 20;
/// Below this a per-worker buffer makes system-call overhead dominate.
const MIN_BUFFER: u64 = 4 * 1024;
/// The largest memory budget accepted (1 TiB). The buffers are allocated before any work, and a
/// budget past what the machine has would end the process in an allocation failure.
pub const MAX_MEMORY_BUDGET: u64 = 1 << 40;
/// The most copy threads accepted: the engine is bound by the disk long before this.
pub const MAX_THREADS: usize = 256;
/// Weight formats that would be stale after pruning; they are reported and not copied.
const WEIGHT_EXTENSIONS: [&str; 8] = ["bin", "safetensors", "h5", "msgpack", "gguf", "pt", "pth", "ckpt"];
/// Files of a checkpoint directory, besides its weights, that belong to the model and are copied:
/// configs and tokenizer data (JSON, text vocabularies, sentencepiece and tiktoken models, chat
/// templates), remote code, the model card and licences. A model directory is often a working
/// directory too; anything else in it is left out, and reported.
const COPIED_EXTENSIONS: [&str; 6] = ["json", "txt", "model", "tiktoken", "jinja", "py"];
const COPIED_PREFIXES: [&str; 5] = ["README", "LICENSE", "NOTICE", "USE_POLICY", ".GITATTRIBUTES"];

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub max_shard_size: u64,
    pub memory_budget: u64,
    pub threads: usize,
    pub overwrite: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions { max_shard_size: 5_000_000_000, memory_budget: 64 << 20, threads: 4, overwrite: false }
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

/// Shared between the engine and whoever watches it: bytes done so far, the total, a cancel flag.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub cancel: AtomicBool,
}

#[derive(Debug, Clone)]
pub struct OutputShard {
    pub file_name: String,
    /// Range into `Layout::tensors`.
    pub tensors: Range<usize>,
    pub header: Vec<u8>,
    pub data_len: u64,
}

/// What placing a tensor in an output shard needs to know about it.
pub trait Placed {
    fn name(&self) -> &str;
    fn dtype(&self) -> Dtype;
    fn shape(&self) -> &[u64];
    fn nbytes(&self) -> u64;
}

/// Implements [`Placed`] for a struct with `name`, `dtype`, `shape` and `nbytes` fields (invoked
/// where the fields are visible).
macro_rules! placed_from_fields {
    ($type:ty) => {
        impl $crate::rewrite::Placed for $type {
            fn name(&self) -> &str {
                &self.name
            }
            fn dtype(&self) -> $crate::dtype::Dtype {
                self.dtype
            }
            fn shape(&self) -> &[u64] {
                &self.shape
            }
            fn nbytes(&self) -> u64 {
                self.nbytes
            }
        }
    };
}
pub(crate) use placed_from_fields;

placed_from_fields!(OutputTensor);

/// Where every output tensor goes.
#[derive(Debug, Clone)]
pub struct Layout<T = OutputTensor> {
    pub tensors: Vec<T>,
    /// Per tensor: output shard and absolute file offset.
    pub placements: Vec<(usize, u64)>,
    pub shards: Vec<OutputShard>,
    pub total_size: u64,
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

/// Validates `plan` against `checkpoint` and places every output tensor.
pub fn layout(checkpoint: &Checkpoint, plan: &CutPlan, max_shard_size: u64) -> Result<Layout> {
    Ok(place(output_tensors(plan, checkpoint)?, max_shard_size))
}

/// Places `tensors`, in their order, into shards of at most `max_shard_size` bytes (a larger tensor
/// gets a shard of its own) and serialises every shard header.
pub fn place<T: Placed>(tensors: Vec<T>, max_shard_size: u64) -> Layout<T> {
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut current = 0..0;
    let mut current_bytes = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if current.end > current.start && current_bytes + t.nbytes() > max_shard_size {
            groups.push(current.clone());
            current = i..i;
            current_bytes = 0;
        }
        current.end = i + 1;
        current_bytes += t.nbytes();
    }
    groups.push(current);
    let count = groups.len();
    let metadata = Map::from_iter([("format".to_owned(), Value::from("pt"))]);
    let mut placements = vec![(0, 0); tensors.len()];
    let mut shards = Vec::with_capacity(count);
    for (s, range) in groups.into_iter().enumerate() {
        let mut offset = 0u64;
        let entries: Vec<TensorEntry> = tensors[range.clone()]
            .iter()
            .map(|t| {
                let entry = TensorEntry {
                    name: t.name().to_owned(),
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    begin: offset,
                    end: offset + t.nbytes(),
                };
                offset += t.nbytes();
                entry
            })
            .collect();
        let header = serialize_header(&entries, &metadata);
        for (i, entry) in range.clone().zip(&entries) {
            placements[i] = (s, header.len() as u64 + entry.begin);
        }
        let file_name = if count == 1 {
            SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", s + 1)
        };
        shards.push(OutputShard { file_name, tensors: range, header, data_len: offset });
    }
    let total_size = tensors.iter().map(Placed::nbytes).sum();
    Layout { tensors, placements, shards, total_size }
}

/// Writes the pruned checkpoint of `input` under `plan` to `output`, atomically.
pub fn apply_plan(
    input: &Path,
    plan: &CutPlan,
    output: &Path,
    options: &ApplyOptions,
    progress: &Progress,
) -> Result<ApplyReport> {
    options.validate()?;
    let checkpoint = Checkpoint::open(input)?;
    let layout = layout(&checkpoint, plan, options.max_shard_size)?;
    let config = patched_config(input, plan)?;
    let (mut to_copy, skipped) = other_files(input, &checkpoint.weight_files(), config.is_some())?;
    to_copy.retain(|file| !plan.files.contains_key(file.to.to_string_lossy().as_ref()));
    progress.total.store(layout.total_size + copied_bytes(&to_copy), Ordering::Relaxed);

    // Buffers first: a budget the machine cannot give is an error before anything is written.
    let workers = workers(&checkpoint, &layout, options)?;
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

/// One unit of work: output rows `rows` (along dimension 0) of tensor `tensor`.
struct WorkItem {
    tensor: usize,
    rows: Range<u64>,
}

fn work_items(layout: &Layout, chunk_bytes: u64) -> Vec<WorkItem> {
    let mut items = Vec::new();
    for (i, t) in layout.tensors.iter().enumerate() {
        let rows = t.shape.first().copied().unwrap_or(0);
        if t.nbytes == 0 || rows == 0 {
            items.push(WorkItem { tensor: i, rows: 0..rows });
            continue;
        }
        // Items hold whole bytes: a multiple of `rows_per_byte` rows (a packed sub-byte row can be
        // a fraction of a byte, F4 `[4, 1]`), about `chunk_bytes` of them, or every row.
        let row_bits = u128::from(t.row_bits().expect("rows > 0"));
        let step = t.rows_per_byte();
        let fitting = (u128::from(chunk_bytes) * 8 / row_bits).min(u128::from(rows)) as u64;
        let rows_per_item = (fitting / step * step).max(step).min(rows);
        let mut start = 0;
        while start < rows {
            let end = (start + rows_per_item).min(rows);
            items.push(WorkItem { tensor: i, rows: start..end });
            start = end;
        }
    }
    items
}

/// One worker per thread, each with an output and a read buffer of `memory_budget / (2 × threads)`
/// bytes (at least `MIN_BUFFER`), never larger than the largest tensor read or written, so a generous
/// budget costs nothing on a small model. Allocation failure is an error, not an abort.
fn workers(checkpoint: &Checkpoint, layout: &Layout, options: &ApplyOptions) -> Result<Vec<Worker>> {
    let threads = options.threads.clamp(1, MAX_THREADS);
    let largest = layout
        .tensors
        .iter()
        .map(|t| match t.data {
            Data::Stored(source) => t.nbytes.max(checkpoint.entry(source).nbytes()),
            _ => t.nbytes,
        })
        .max()
        .unwrap_or(0);
    let buffer = (options.memory_budget / (2 * threads as u64)).min(largest).max(MIN_BUFFER);
    let count = threads.min(work_items(layout, buffer).len()).max(1);
    (0..count).map(|_| Worker::new(buffer)).collect()
}

fn copy_tensors(
    checkpoint: &Checkpoint,
    layout: &Layout,
    outputs: &[(PathBuf, File)],
    workers: Vec<Worker>,
    progress: &Progress,
) -> Result<()> {
    let inputs: Vec<File> = checkpoint
        .shards
        .iter()
        .map(|s| File::open(&s.path).map_err(Error::io(&s.path)))
        .collect::<Result<_>>()?;
    let buffer = workers.first().map_or(MIN_BUFFER, |w| w.out.len() as u64);
    let items = work_items(layout, buffer);
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for mut worker in workers {
            let (items, next, failure, inputs) = (&items, &next, &failure, &inputs);
            scope.spawn(move || {
                loop {
                    if progress.cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
                    if let Err(err) = worker.copy(checkpoint, layout, inputs, outputs, item, progress) {
                        progress.cancel.store(true, Ordering::Relaxed);
                        failure.lock().unwrap().get_or_insert(err);
                        return;
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap() {
        Some(err) => Err(err),
        None if progress.cancel.load(Ordering::Relaxed) => Err(Error::Cancelled),
        None => Ok(()),
    }
}

struct Worker {
    out: Vec<u8>,
    read: Vec<u8>,
    batch: Vec<Segment>,
    /// Whether large ranges go file to file in the kernel (cleared once the file system refuses).
    direct: bool,
}

impl Worker {
    fn new(buffer: u64) -> Result<Worker> {
        Ok(Worker {
            out: zeroed(buffer)?,
            read: zeroed(buffer)?,
            batch: Vec::with_capacity(MAX_SEGMENTS_PER_BATCH),
            direct: true,
        })
    }

    fn copy(
        &mut self,
        checkpoint: &Checkpoint,
        layout: &Layout,
        inputs: &[File],
        outputs: &[(PathBuf, File)],
        item: &WorkItem,
        progress: &Progress,
    ) -> Result<()> {
        let t = &layout.tensors[item.tensor];
        if t.nbytes == 0 {
            return Ok(());
        }
        let (out_shard, tensor_offset) = layout.placements[item.tensor];
        // 0-d tensors have no rows: their one work item covers all of them.
        let (start, len) = t.row_span(&item.rows);
        let mut out_offset = tensor_offset + start;
        let (out_path, output) = &outputs[out_shard];
        let source = match &t.data {
            Data::Stored(source) => *source,
            Data::External { path, offset } => {
                self.copy_external(path, offset + start, len, output, out_path, out_offset, progress)?;
                return Ok(());
            }
            given => {
                self.write_given(given, start, len, output, out_offset).map_err(Error::io(out_path))?;
                progress.done.fetch_add(len, Ordering::Relaxed);
                return Ok(());
            }
        };
        let shard = &checkpoint.shards[source.shard];
        let source_base = shard.header.data_start + checkpoint.entry(source).begin;
        let input = &inputs[source.shard];
        let mut segments = SegmentIter::new(t, item.rows.clone()).peekable();
        let mut carry: Option<Segment> = None;
        loop {
            if progress.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            if carry.is_none() && self.direct && segments.peek().is_some_and(|s| s.len >= DIRECT_COPY_MIN) {
                let segment = segments.next().expect("peeked");
                match copy_range(input, source_base + segment.offset, output, out_offset, segment.len) {
                    Ok(true) => {
                        out_offset += segment.len;
                        progress.done.fetch_add(segment.len, Ordering::Relaxed);
                        continue;
                    }
                    Ok(false) => {
                        self.direct = false;
                        carry = Some(segment);
                    }
                    Err(err) => return Err(Error::io(out_path)(err)),
                }
            }
            let filled = self.fill_batch(&mut carry, &mut segments);
            if filled == 0 {
                return Ok(());
            }
            self.gather(input, source_base, &shard.path)?;
            output.write_all_at(&self.out[..filled], out_offset).map_err(Error::io(out_path))?;
            out_offset += filled as u64;
            progress.done.fetch_add(filled as u64, Ordering::Relaxed);
        }
    }

    /// Copies `len` bytes at `from` of another safetensors file (a tensor the plan takes from it) to
    /// `to`, through the worker's buffer or file to file.
    #[allow(clippy::too_many_arguments)]
    fn copy_external(
        &mut self,
        path: &Path,
        mut from: u64,
        mut len: u64,
        output: &File,
        out_path: &Path,
        mut to: u64,
        progress: &Progress,
    ) -> Result<()> {
        let input = File::open(path).map_err(Error::io(path))?;
        if self.direct && len >= DIRECT_COPY_MIN {
            match copy_range(&input, from, output, to, len) {
                Ok(true) => {
                    progress.done.fetch_add(len, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(false) => self.direct = false,
                Err(err) => return Err(Error::io(out_path)(err)),
            }
        }
        while len > 0 {
            if progress.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let n = len.min(self.out.len() as u64) as usize;
            input.read_exact_at(&mut self.out[..n], from).map_err(Error::io(path))?;
            output.write_all_at(&self.out[..n], to).map_err(Error::io(out_path))?;
            progress.done.fetch_add(n as u64, Ordering::Relaxed);
            (from, to, len) = (from + n as u64, to + n as u64, len - n as u64);
        }
        Ok(())
    }

    /// Writes bytes `start..start + len` of a tensor whose data the plan gives, at `offset`.
    fn write_given(&mut self, data: &Data, start: u64, len: u64, output: &File, offset: u64) -> std::io::Result<()> {
        match data {
            Data::Given(bytes) => output.write_all_at(&bytes[start as usize..(start + len) as usize], offset),
            Data::Repeated(element) => {
                // Whole elements per write, so every chunk starts on an element boundary.
                let chunk = (self.out.len() / element.len()) * element.len();
                for (slot, byte) in self.out[..chunk].iter_mut().zip(element.iter().cycle()) {
                    *slot = *byte;
                }
                let mut written = 0;
                while written < len {
                    let n = (len - written).min(chunk as u64);
                    output.write_all_at(&self.out[..n as usize], offset + written)?;
                    written += n;
                }
                Ok(())
            }
            Data::Stored(_) | Data::External { .. } => unreachable!("stored and external tensors are copied from their files"),
        }
    }

    /// Takes segments until the output buffer is full, splitting the last one if needed; stops
    /// before a segment large enough to be copied without passing through the buffer.
    fn fill_batch(&mut self, carry: &mut Option<Segment>, segments: &mut std::iter::Peekable<SegmentIter>) -> usize {
        self.batch.clear();
        let capacity = self.out.len() as u64;
        let mut filled = 0u64;
        while filled < capacity && self.batch.len() < MAX_SEGMENTS_PER_BATCH {
            if carry.is_none() && filled > 0 && self.direct && segments.peek().is_some_and(|s| s.len >= DIRECT_COPY_MIN) {
                break;
            }
            let Some(segment) = carry.take().or_else(|| segments.next()) else { break };
            let take = segment.len.min(capacity - filled);
            self.batch.push(Segment { offset: segment.offset, len: take });
            if take < segment.len {
                *carry = Some(Segment { offset: segment.offset + take, len: segment.len - take });
            }
            filled += take;
        }
        filled as usize
    }

    /// Reads the batch's segments into the output buffer, merging nearby segments into one read.
    fn gather(&mut self, input: &File, source_base: u64, path: &Path) -> Result<()> {
        let read_capacity = self.read.len() as u64;
        let mut out_pos = 0usize;
        let mut i = 0;
        while i < self.batch.len() {
            let start = self.batch[i].offset;
            let mut j = i;
            while j + 1 < self.batch.len() {
                let (prev, next) = (self.batch[j], self.batch[j + 1]);
                if next.offset - (prev.offset + prev.len) > MAX_READ_GAP || next.offset + next.len - start > read_capacity {
                    break;
                }
                j += 1;
            }
            if i == j {
                let len = self.batch[i].len as usize;
                input
                    .read_exact_at(&mut self.out[out_pos..out_pos + len], source_base + start)
                    .map_err(Error::io(path))?;
                out_pos += len;
            } else {
                let end = self.batch[j].offset + self.batch[j].len;
                let window = &mut self.read[..(end - start) as usize];
                input.read_exact_at(window, source_base + start).map_err(Error::io(path))?;
                for segment in &self.batch[i..=j] {
                    let from = (segment.offset - start) as usize;
                    let len = segment.len as usize;
                    self.out[out_pos..out_pos + len].copy_from_slice(&window[from..from + len]);
                    out_pos += len;
                }
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// A zeroed buffer of `len` bytes, or an error naming the memory budget when the allocator cannot
/// give it (`vec![0; len]` would abort the process). Zeroed pages are mapped lazily, so only the part
/// of the buffer a copy uses is ever touched.
fn zeroed(len: u64) -> Result<Vec<u8>> {
    let refuse = || Error::Setting {
        setting: "memory_budget (--memory-budget)".into(),
        reason: format!("cannot allocate a {len}-byte copy buffer: choose a smaller budget"),
    };
    let len = usize::try_from(len).map_err(|_| refuse())?;
    let layout = std::alloc::Layout::array::<u8>(len).map_err(|_| refuse())?;
    if len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: `layout` has a non-zero size; a non-null result is an allocation of exactly `len`
    // zeroed bytes from the global allocator with u8's alignment, which is what `Vec<u8>` with
    // length and capacity `len` owns and later frees.
    unsafe {
        let pointer = std::alloc::alloc_zeroed(layout);
        if pointer.is_null() {
            return Err(refuse());
        }
        Ok(Vec::from_raw_parts(pointer, len, len))
    }
}

/// Copies `len` bytes between files at the given offsets in the kernel. `Ok(false)` when the file
/// system or platform cannot (the caller then copies through its buffer).
#[cfg(target_os = "linux")]
fn copy_range(input: &File, mut from: u64, output: &File, mut to: u64, mut len: u64) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    let mut first = true;
    while len > 0 {
        let mut off_in = from as libc::loff_t;
        let mut off_out = to as libc::loff_t;
        // SAFETY: valid open descriptors and offset pointers that live through the call.
        let copied = unsafe { libc::copy_file_range(input.as_raw_fd(), &mut off_in, output.as_raw_fd(), &mut off_out, len as usize, 0) };
        if copied < 0 {
            let err = std::io::Error::last_os_error();
            let unsupported = matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL));
            return if unsupported && first { Ok(false) } else { Err(err) };
        }
        if copied == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "source ended early"));
        }
        first = false;
        from += copied as u64;
        to += copied as u64;
        len -= copied as u64;
    }
    Ok(true)
}

#[cfg(not(target_os = "linux"))]
fn copy_range(_input: &File, _from: u64, _output: &File, _to: u64, _len: u64) -> std::io::Result<bool> {
    Ok(false)
}

fn index_json<T: Placed>(layout: &Layout<T>) -> Vec<u8> {
    let mut weight_map: Vec<(&str, &str)> = Vec::with_capacity(layout.tensors.len());
    for shard in &layout.shards {
        for t in &layout.tensors[shard.tensors.clone()] {
            weight_map.push((t.name(), &shard.file_name));
        }
    }
    weight_map.sort();
    let weight_map: Map<String, Value> =
        weight_map.into_iter().map(|(t, f)| (t.to_owned(), Value::from(f))).collect();
    let index = serde_json::json!({
        "metadata": {"total_size": layout.total_size},
        "weight_map": weight_map,
    });
    pretty_json(&index)
}

fn pretty_json(value: &Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(value).expect("JSON values always serialise");
    text.push(b'\n');
    text
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
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| Error::Config { path: path.clone(), reason: format!("not UTF-8 text: {e}") })?;
    let mut config: Value = crate::json::from_str(text)
        .map_err(|e| Error::Config { path: path.clone(), reason: format!("not valid JSON: {e}") })?;
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
        let refuse = |what: &str| Error::Output { path: full.clone(), reason: format!("{what}: included directories hold only files and directories") };
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
        || Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e))
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

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
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

    #[test]
    fn a_buffer_the_allocator_cannot_give_is_an_error_not_an_abort() {
        match zeroed(1 << 62) {
            Err(Error::Setting { setting, reason }) => {
                assert!(setting.contains("--memory-budget"), "{setting}");
                assert!(reason.contains("cannot allocate"), "{reason}");
            }
            other => panic!("expected a setting error, got {:?}", other.map(|v| v.len())),
        }
        assert_eq!(zeroed(4096).unwrap(), vec![0u8; 4096]);
    }

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
