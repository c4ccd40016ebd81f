//! The thin PyO3 layer: converts arguments and results, maps `Error` onto the Python exception
//! hierarchy of `structprune.errors`, and runs long work with the GIL released.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::error::Error;
use crate::plan::CutPlan;
use crate::rewrite::{self, ApplyOptions, ApplyReport, Progress};
use crate::staging::{self, Staging};
use crate::write::{CheckpointWriter, Extras, Include, TensorSpec, WriteOptions};

/// How often a long call wakes up to report progress and notice Ctrl-C.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

fn to_pyerr(err: Error) -> PyErr {
    Python::attach(|py| {
        let field = match &err {
            Error::Plan { field, .. } => field.clone(),
            _ => None,
        };
        let Some(class) = err.python_class() else { return PyKeyboardInterrupt::new_err("cancelled") };
        let (path, tensor) = match &err {
            Error::Io { path, .. } | Error::ShardIndex { path, .. } | Error::Config { path, .. } => (Some(path.clone()), None),
            Error::OutputExists { path } | Error::Output { path, .. } => (Some(path.clone()), None),
            Error::Header { path, tensor, .. } => (Some(path.clone()), tensor.clone()),
            Error::Plan { tensor, .. } => (None, tensor.clone()),
            Error::Graph { .. } | Error::Setting { .. } | Error::Cancelled => (None, None),
        };
        let build = || -> PyResult<PyErr> {
            let cls = py.import("structprune.errors")?.getattr(class)?;
            let instance = cls.call1((err.to_string(),))?;
            instance.setattr("path", path.map(|p| p.to_string_lossy().into_owned()))?;
            instance.setattr("tensor", tensor)?;
            if class == "PlanError" {
                instance.setattr("field", field)?;
            }
            Ok(PyErr::from_value(instance))
        };
        build().unwrap_or_else(|e| e)
    })
}

/// Reads a plan's text by the engine's rules (strict JSON, every field known and of its type; see
/// `CutPlan::from_slice`) and returns the document as Python objects, so that every reader of a
/// plan, the CLI's and the API's, takes exactly what the engine takes.
#[pyfunction]
fn parse_plan<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let document = py
        .detach(|| {
            let document = crate::plan::parse_document(data)?;
            CutPlan::from_value(&document).map(|_| document)
        })
        .map_err(to_pyerr)?;
    to_python(py, &document)
}

fn to_python<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => pyo3::types::PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().expect("JSON numbers are u64, i64 or f64").into_pyobject(py)?.into_any(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_python(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, to_python(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

#[pyfunction]
fn read_checkpoint<'py>(py: Python<'py>, model_dir: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let checkpoint = py.detach(|| Checkpoint::open(&model_dir)).map_err(to_pyerr)?;
    let tensors = PyList::empty(py);
    for (r, entry) in checkpoint.tensors() {
        let shard = &checkpoint.shards[r.shard];
        let offset = shard.header.data_start + entry.begin;
        tensors.append((&entry.name, entry.dtype.name(), entry.shape.clone(), &shard.file_name, entry.nbytes(), offset))?;
    }
    let result = PyDict::new(py);
    result.set_item("shards", checkpoint.shards.iter().map(|s| s.file_name.clone()).collect::<Vec<_>>())?;
    result.set_item("sharded", checkpoint.index_path.is_some())?;
    result.set_item("tensors", tensors)?;
    Ok(result)
}

/// Validates a plan against a checkpoint and returns the output it would produce, writing nothing.
#[pyfunction]
fn plan_layout<'py>(py: Python<'py>, model_dir: PathBuf, plan_json: &str, max_shard_size: u64) -> PyResult<Bound<'py, PyDict>> {
    let layout = py
        .detach(|| {
            let plan = CutPlan::from_json(plan_json)?;
            let checkpoint = Checkpoint::open(&model_dir)?;
            rewrite::layout(&checkpoint, &plan, max_shard_size)
        })
        .map_err(to_pyerr)?;
    let tensors = PyList::empty(py);
    for (t, (shard, _)) in layout.tensors.iter().zip(&layout.placements) {
        tensors.append((&t.name, t.dtype.name(), t.shape.clone(), &layout.shards[*shard].file_name, t.nbytes))?;
    }
    let result = PyDict::new(py);
    result.set_item("shards", layout.shards.iter().map(|s| s.file_name.clone()).collect::<Vec<_>>())?;
    result.set_item("tensors", tensors)?;
    result.set_item("total_size", layout.total_size)?;
    Ok(result)
}

#[pyfunction]
#[pyo3(signature = (model_dir, plan_json, output_dir, max_shard_size, memory_budget, threads, overwrite, progress=None, folders=Vec::new()))]
#[allow(clippy::too_many_arguments)]
fn apply_plan<'py>(
    py: Python<'py>,
    model_dir: PathBuf,
    plan_json: &str,
    output_dir: PathBuf,
    max_shard_size: u64,
    memory_budget: u64,
    threads: usize,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
    folders: Vec<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let plan = CutPlan::from_json(plan_json).map_err(to_pyerr)?;
    let options = ApplyOptions { max_shard_size, memory_budget, threads, overwrite, folders };
    let state = Arc::new(Progress::default());
    let (sender, mut receiver) = mpsc::channel();
    let engine_state = Arc::clone(&state);
    std::thread::spawn(move || {
        let result = rewrite::apply_plan(&model_dir, &plan, &output_dir, &options, &engine_state);
        let _ = sender.send(result);
    });
    let outcome = loop {
        let (received, back) = py.detach(move || (receiver.recv_timeout(POLL_INTERVAL), receiver));
        receiver = back;
        let report_progress = || -> PyResult<()> {
            if let Some(callback) = &progress {
                callback.call1((state.done.load(Ordering::Relaxed), state.total.load(Ordering::Relaxed)))?;
            }
            py.check_signals()
        };
        match received {
            Ok(result) => {
                report_progress()?;
                break result;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Err(err) = report_progress() {
                    state.cancel.store(true, Ordering::Relaxed);
                    // The engine removes its partial output before it answers; wait for that.
                    let _ = py.detach(move || receiver.recv());
                    return Err(err);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PyRuntimeError::new_err("internal error: the rewrite engine stopped without a result"));
            }
        }
    };
    let report = outcome.map_err(to_pyerr)?;
    report_dict(py, &report)
}

/// Writes tensors held by the caller as a checkpoint: `tensors` are `(name, dtype, shape)` in
/// output order, and `read_tensor(i)` returns tensor i's raw bytes. Each tensor is fetched with the
/// GIL held and written with it released; Ctrl-C between tensors leaves no output.
#[pyfunction]
#[pyo3(signature = (output_dir, tensors, read_tensor, source_dir, includes, config_json, max_shard_size, overwrite, progress=None))]
#[allow(clippy::too_many_arguments)]
fn write_checkpoint<'py>(
    py: Python<'py>,
    output_dir: PathBuf,
    tensors: Vec<(String, String, Vec<u64>)>,
    read_tensor: Bound<'py, PyAny>,
    source_dir: Option<PathBuf>,
    includes: Vec<(PathBuf, PathBuf)>,
    config_json: Option<String>,
    max_shard_size: u64,
    overwrite: bool,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let specs = tensors
        .into_iter()
        .map(|(name, dtype, shape)| match Dtype::parse(&dtype) {
            Some(dtype) => TensorSpec::new(name, dtype, shape),
            None => Err(Error::plan(&name, format!("unknown safetensors dtype '{dtype}'"))),
        })
        .collect::<Result<Vec<_>, Error>>()
        .map_err(to_pyerr)?;
    let extras = Extras {
        source: source_dir,
        includes: includes.into_iter().map(|(from, to)| Include { from, to }).collect(),
        config: config_json.map(String::into_bytes),
    };
    let options = WriteOptions { max_shard_size, overwrite };
    let state = Progress::default();
    let mut writer = py.detach(|| CheckpointWriter::create(&output_dir, specs, extras, &options, &state)).map_err(to_pyerr)?;
    for index in 0..writer.tensors().len() {
        py.check_signals()?;
        let data = read_tensor.call1((index,))?;
        let bytes = data.cast::<PyBytes>().map_err(|_| {
            let name = &writer.tensors()[index].name;
            PyTypeError::new_err(format!("read_tensor({index}) for tensor '{name}' must return bytes"))
        })?;
        let slice = bytes.as_bytes();
        py.detach(|| writer.write_tensor(index, slice, &state)).map_err(to_pyerr)?;
        if let Some(callback) = &progress {
            callback.call1((state.done.load(Ordering::Relaxed), state.total.load(Ordering::Relaxed)))?;
        }
    }
    let report = py.detach(|| writer.finish(&state)).map_err(to_pyerr)?;
    if let Some(callback) = &progress {
        callback.call1((state.done.load(Ordering::Relaxed), state.total.load(Ordering::Relaxed)))?;
    }
    report_dict(py, &report)
}

fn report_dict<'py>(py: Python<'py>, report: &ApplyReport) -> PyResult<Bound<'py, PyDict>> {
    let result = PyDict::new(py);
    result.set_item("output_dir", &report.output_dir)?;
    result.set_item("tensors", report.tensors)?;
    result.set_item("bytes_written", report.bytes_written)?;
    result.set_item("total_size", report.total_size)?;
    result.set_item("shards", &report.shards)?;
    result.set_item("copied_files", &report.copied_files)?;
    result.set_item("skipped_files", &report.skipped_files)?;
    Ok(result)
}

/// The output-path rules every writer applies before it starts (`staging::check_output`); returns
/// the resolved output path.
#[pyfunction]
#[pyo3(signature = (model_dir, output_dir, overwrite))]
fn check_output(model_dir: Option<PathBuf>, output_dir: PathBuf, overwrite: bool) -> PyResult<PathBuf> {
    staging::check_output(model_dir.as_deref(), &output_dir, overwrite).map_err(to_pyerr)
}

/// An all-or-nothing output directory filled by Python code (a sweep's tables and plot).
#[pyclass(name = "Staging", module = "structprune._core")]
struct PyStaging {
    inner: Option<Staging>,
}

#[pymethods]
impl PyStaging {
    #[new]
    #[pyo3(signature = (output_dir, model_dir, overwrite))]
    fn new(output_dir: PathBuf, model_dir: Option<PathBuf>, overwrite: bool) -> PyResult<PyStaging> {
        let inner = Staging::create(&output_dir, model_dir.as_deref(), overwrite).map_err(to_pyerr)?;
        Ok(PyStaging { inner: Some(inner) })
    }

    #[getter]
    fn path(&self) -> PyResult<PathBuf> {
        Ok(self.staged()?.path().to_owned())
    }

    /// Moves the staged directory onto the output.
    fn commit(&mut self, py: Python<'_>) -> PyResult<()> {
        self.staged()?;
        let staging = self.inner.take().expect("checked above");
        py.detach(|| staging.commit()).map_err(to_pyerr)
    }

    /// Removes the staged directory.
    fn discard(&mut self) {
        self.inner = None;
    }
}

impl PyStaging {
    fn staged(&self) -> PyResult<&Staging> {
        self.inner.as_ref().ok_or_else(|| PyRuntimeError::new_err("the staged output was already committed or discarded"))
    }
}

/// Traced-graph JSON in (docs/traced-graph.md), prunable structures as JSON out
/// (docs/structures-format.md).
#[pyfunction]
fn build_structures(py: Python<'_>, ir_json: &str) -> PyResult<String> {
    py.detach(|| crate::graph::build_structures(ir_json).map(|set| set.to_json())).map_err(to_pyerr)
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_MEMORY_BUDGET", rewrite::MAX_MEMORY_BUDGET)?;
    m.add("MAX_THREADS", rewrite::MAX_THREADS)?;
    m.add("ERROR_CLASSES", pyo3::types::PyTuple::new(m.py(), crate::error::PYTHON_CLASSES)?)?;
    m.add_function(wrap_pyfunction!(parse_plan, m)?)?;
    m.add_function(wrap_pyfunction!(read_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(plan_layout, m)?)?;
    m.add_function(wrap_pyfunction!(apply_plan, m)?)?;
    m.add_function(wrap_pyfunction!(write_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(build_structures, m)?)?;
    m.add_function(wrap_pyfunction!(check_output, m)?)?;
    m.add_class::<PyStaging>()?;
    Ok(())
}
