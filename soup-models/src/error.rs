//! Errors of soup-models: each names the file, tensor or architecture at fault, in one line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("{path}: tensor {tensor} is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor} is not part of architecture {arch}")]
    UnexpectedTensor {
        path: PathBuf,
        tensor: String,
        arch: String,
    },
    #[error("{path}: tensor {tensor} has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("unknown architecture {name:?} (known: {known})")]
    UnknownArchitecture { name: String, known: String },
    #[error("architecture {arch}: {detail}")]
    Config { arch: String, detail: String },
    /// A device that cannot be used (a GPU this build or machine does not have).
    #[error("device {0}")]
    Device(String),
    /// A model source that cannot be parsed or fetched (Hub, URL, cache).
    #[error("{source_name}: {detail}")]
    Source { source_name: String, detail: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Soup(#[from] soup_core::SoupError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub fn format(path: &Path, detail: impl ToString) -> Self {
        ModelError::Format {
            path: path.to_path_buf(),
            detail: detail.to_string(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn source(source: &str, detail: impl ToString) -> Self {
        ModelError::Source {
            source_name: source.to_string(),
            detail: detail.to_string(),
        }
    }

    pub fn config(arch: &str, detail: impl ToString) -> Self {
        ModelError::Config {
            arch: arch.to_string(),
            detail: detail.to_string(),
        }
    }
}

impl From<ModelError> for soup_core::SoupError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Candle(e) => soup_core::SoupError::Candle(e),
            ModelError::Soup(e) => e,
            other => soup_core::SoupError::External(Box::new(other)),
        }
    }
}
