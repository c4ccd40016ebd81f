//! Where every output tensor goes: its shard and offset, and every shard's serialised header,
//! fixed from names, dtypes and shapes alone before any byte is written. Writers can therefore fill
//! the tensors in any order and the bytes come out the same.

use std::ops::Range;

use serde_json::{Map, Value};

use crate::checkpoint::SINGLE_FILE;
use crate::dtype::Dtype;
use crate::header::{serialize_header, TensorEntry};
use crate::plan::OutputTensor;

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
        impl $crate::layout::Placed for $type {
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
        let file_name = if count == 1 { SINGLE_FILE.to_owned() } else { format!("model-{:05}-of-{count:05}.safetensors", s + 1) };
        shards.push(OutputShard { file_name, tensors: range, header, data_len: offset });
    }
    let total_size = tensors.iter().map(Placed::nbytes).sum();
    Layout { tensors, placements, shards, total_size }
}
