//! The crate's one error type. Every variant names the file, tensor or setting at fault, because
//! the person reading the message usually has a multi-gigabyte checkpoint and no debugger.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid safetensors file{}: {reason}", tensor_clause(.tensor))]
    Header {
        path: PathBuf,
        tensor: Option<String>,
        reason: String,
    },

    #[error("{path}: invalid checkpoint: {reason}")]
    ShardIndex { path: PathBuf, reason: String },

    /// `field` is the JSON path of the plan's field at fault (`tensors["a.weight"].keep["00"]`),
    /// for errors found while reading the plan; `tensor` the entry's tensor name.
    #[error("invalid cut plan{}: {reason}", plan_clause(.tensor, .field))]
    Plan {
        tensor: Option<String>,
        field: Option<String>,
        reason: String,
    },

    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("{path}: output already exists (pass --overwrite, or overwrite=True, to replace it)")]
    OutputExists { path: PathBuf },

    #[error("{path}: {reason}")]
    Output { path: PathBuf, reason: String },

    /// An option of the engine (a memory budget, a thread count) out of its range; `setting` names
    /// it as the API and the command line spell it.
    #[error("{setting}: {reason}")]
    Setting { setting: String, reason: String },

    #[error("traced graph{}: {reason}", node_clause(.node))]
    Graph { node: Option<usize>, reason: String },

    #[error("cancelled")]
    Cancelled,
}

fn tensor_clause(tensor: &Option<String>) -> String {
    match tensor {
        Some(name) => format!(", tensor '{name}'"),
        None => String::new(),
    }
}

fn plan_clause(tensor: &Option<String>, field: &Option<String>) -> String {
    match field {
        Some(field) => format!(" at {field}"),
        None => tensor_clause(tensor),
    }
}

fn node_clause(node: &Option<usize>) -> String {
    match node {
        Some(id) => format!(", node {id}"),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    pub(crate) fn plan(tensor: &str, reason: impl Into<String>) -> Error {
        Error::Plan {
            tensor: Some(tensor.to_owned()),
            field: None,
            reason: reason.into(),
        }
    }

    /// A plan error found at `field` (a JSON path) of the plan, under tensor entry `tensor` if any.
    pub(crate) fn plan_at(tensor: Option<&str>, field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Plan {
            tensor: tensor.map(str::to_owned),
            field: Some(field.into()),
            reason: reason.into(),
        }
    }
}
