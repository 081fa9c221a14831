//! The model crate's error type: every failure names the file, field or tensor at fault.

use std::path::PathBuf;

/// Errors from loading or running the model. Messages are one line and name what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or parsed.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// A config field is missing, has the wrong type, or an unsupported value.
    #[error("{file}: field `{field}`: {message}")]
    Config { file: &'static str, field: String, message: String },
    /// A weight tensor is absent from every safetensors file.
    #[error("weight `{name}` not found in the checkpoint")]
    MissingTensor { name: String },
    /// A weight tensor has a different shape than the config implies.
    #[error("weight `{name}` in {file}: expected shape {expected:?}, found {found:?}")]
    TensorShape { name: String, file: String, expected: Vec<usize>, found: Vec<usize> },
    /// Prompt rendering or tokenization failed.
    #[error("prompt: {0}")]
    Prompt(String),
    /// Inputs handed to the model do not fit together (e.g. image count vs `<image>` slots).
    #[error("input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        ModelError::File { path: path.into(), message: message.to_string() }
    }
}
