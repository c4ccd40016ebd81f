//! structprune's core: safetensors checkpoints read and rewritten out of core, cut plans validated
//! and applied, in-memory tensors written as checkpoints. Pure Rust; the Python binding lives in
//! `python.rs` behind the `python` feature.

pub mod checkpoint;
mod copy;
pub mod dtype;
pub mod error;
pub mod gather;
pub mod graph;
pub mod header;
pub mod json;
pub mod layout;
pub mod output;
pub mod plan;
pub mod rewrite;
pub mod staging;
pub mod write;

pub use error::{Error, Result};

#[cfg(feature = "python")]
mod python;
