//! The project's error type.

use std::path::{Path, PathBuf};

/// Errors of every `gen` library crate. Each variant names what it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error inside candle, with what we were doing when it happened.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    /// A candle error without extra context.
    #[error(transparent)]
    CandleRaw(#[from] candle_core::Error),
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is missing from a model folder or cache.
    #[error("missing file {path}{}", if hint.is_empty() { String::new() } else { format!(" ({hint})") })]
    MissingFile { path: PathBuf, hint: String },
    /// A config file that lacks a field or holds a bad value.
    #[error("{file}: field `{key}`: {msg}")]
    Config { file: PathBuf, key: String, msg: String },
    /// A tensor with a wrong shape, naming the file and key it came from.
    #[error("{file}: tensor `{key}`: expected shape {expected:?}, found {found:?}")]
    Shape { file: String, key: String, expected: Vec<usize>, found: Vec<usize> },
    /// A tensor that a weight file does not contain.
    #[error("{file}: missing tensor `{key}`")]
    MissingTensor { file: String, key: String },
    /// A value outside its allowed range (CLI flag, config, argument).
    #[error("invalid {what}: {msg}")]
    Invalid { what: String, msg: String },
    /// Anything else, with a message that says what happened.
    #[error("{0}")]
    Msg(String),
}

/// `Result` with the project's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A plain message error.
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    /// A value out of range.
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), msg: msg.into() }
    }
}

/// Adds context to candle results: `t.matmul(&w).ctx("attn1.to_q")?`.
pub trait ResultExt<T> {
    fn ctx(self, context: impl std::fmt::Display) -> Result<T>;
}

impl<T> ResultExt<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: impl std::fmt::Display) -> Result<T> {
        self.map_err(|source| Error::Candle { context: context.to_string(), source })
    }
}
