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
    Header { path: PathBuf, tensor: Option<String>, reason: String },

    #[error("{path}: invalid checkpoint: {reason}")]
    ShardIndex { path: PathBuf, reason: String },

    /// `field` is the JSON path of the plan's field at fault (`tensors["a.weight"].keep["00"]`),
    /// for errors found while reading the plan; `tensor` the entry's tensor name.
    #[error("invalid cut plan{}: {reason}", plan_clause(.tensor, .field))]
    Plan { tensor: Option<String>, field: Option<String>, reason: String },

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

/// Every `structprune.errors` class the core raises; the Python tests check each one exists there.
pub const PYTHON_CLASSES: &[&str] = &[
    "StructpruneIOError",
    "HeaderError",
    "ShardIndexError",
    "PlanError",
    "ConfigError",
    "OutputExistsError",
    "OutputError",
    "SettingError",
    "GraphError",
];

impl Error {
    /// The `structprune.errors` class this error is raised as in Python; `None` for `Cancelled`,
    /// which is Python's own `KeyboardInterrupt`. Kept here rather than in the binding so that
    /// `cargo test` alone sees every variant mapped to a class of `PYTHON_CLASSES`.
    pub fn python_class(&self) -> Option<&'static str> {
        Some(match self {
            Error::Io { .. } => "StructpruneIOError",
            Error::Header { .. } => "HeaderError",
            Error::ShardIndex { .. } => "ShardIndexError",
            Error::Plan { .. } => "PlanError",
            Error::Config { .. } => "ConfigError",
            Error::OutputExists { .. } => "OutputExistsError",
            Error::Output { .. } => "OutputError",
            Error::Setting { .. } => "SettingError",
            Error::Graph { .. } => "GraphError",
            Error::Cancelled => return None,
        })
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    pub(crate) fn plan(tensor: &str, reason: impl Into<String>) -> Error {
        Error::Plan { tensor: Some(tensor.to_owned()), field: None, reason: reason.into() }
    }

    /// A plan error found at `field` (a JSON path) of the plan, under tensor entry `tensor` if any.
    pub(crate) fn plan_at(tensor: Option<&str>, field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Plan { tensor: tensor.map(str::to_owned), field: Some(field.into()), reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of each variant. The match in `covers` fails to compile when a variant is added,
    /// so a new variant cannot miss the mapping test below.
    fn one_of_each() -> Vec<Error> {
        let path = PathBuf::from("model");
        let reason = String::from("reason");
        vec![
            Error::Io { path: path.clone(), source: std::io::Error::other("io") },
            Error::Header { path: path.clone(), tensor: None, reason: reason.clone() },
            Error::ShardIndex { path: path.clone(), reason: reason.clone() },
            Error::Plan { tensor: None, field: None, reason: reason.clone() },
            Error::Config { path: path.clone(), reason: reason.clone() },
            Error::OutputExists { path: path.clone() },
            Error::Output { path, reason: reason.clone() },
            Error::Setting { setting: "threads".into(), reason: reason.clone() },
            Error::Graph { node: None, reason },
            Error::Cancelled,
        ]
    }

    fn covers(error: &Error) -> usize {
        match error {
            Error::Io { .. } => 0,
            Error::Header { .. } => 1,
            Error::ShardIndex { .. } => 2,
            Error::Plan { .. } => 3,
            Error::Config { .. } => 4,
            Error::OutputExists { .. } => 5,
            Error::Output { .. } => 6,
            Error::Setting { .. } => 7,
            Error::Graph { .. } => 8,
            Error::Cancelled => 9,
        }
    }

    #[test]
    fn every_variant_maps_to_a_listed_python_class() {
        let errors = one_of_each();
        let covered: std::collections::BTreeSet<usize> = errors.iter().map(covers).collect();
        assert_eq!(covered, (0..errors.len()).collect(), "one_of_each holds every variant once");
        let mut used = std::collections::BTreeSet::new();
        for error in &errors {
            match error.python_class() {
                Some(class) => {
                    assert!(PYTHON_CLASSES.contains(&class), "{error:?} maps to {class}, missing from PYTHON_CLASSES");
                    used.insert(class);
                }
                None => assert!(matches!(error, Error::Cancelled), "only Cancelled is raised as KeyboardInterrupt"),
            }
        }
        assert_eq!(used.len(), PYTHON_CLASSES.len(), "PYTHON_CLASSES lists no class that no variant is raised as");
    }
}
