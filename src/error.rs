//! The crate's one error type. Every variant carries the context a user needs to act on it (which
//! file, which tensor, which config field); `main` prints the chain on one line and maps errors to
//! exit code 2.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in glimpse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {}", io_words(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A config.json field that is missing, malformed, inconsistent or unsupported.
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    /// A safetensors file or index that cannot be read.
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// Tensors the model needs that the checkpoint lacks or has in the wrong shape.
    #[error("{0}")]
    Weights(String),
    /// A dump file that does not follow `glm5-dump/1`.
    #[error("dump {path}: {msg}")]
    Dump { path: PathBuf, msg: String },
    /// Bad command-line input.
    #[error("{0}")]
    Usage(String),
    /// A resumable run stopped at a checkpoint after Ctrl-C; the message says how to go on.
    #[error("{0}")]
    Interrupted(String),
    /// The GPU path: no CUDA library or device, a kernel that does not compile, a failed launch.
    #[error("cuda: {0}")]
    Device(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    /// An error with a line of context in front of it.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An I/O error in words a user acts on ("does not exist", not "os error 2").
fn io_words(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => "does not exist".into(),
        ErrorKind::IsADirectory => "is a folder, not a file".into(),
        ErrorKind::NotADirectory => "a part of the path is a file, not a folder".into(),
        ErrorKind::AlreadyExists => "already exists".into(),
        ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { field: field.into(), msg: msg.into() }
    }
    pub fn checkpoint(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn dump(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Dump { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
}

/// Adds a line of context to any error that converts into [`Error`].
pub trait Context<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Context { context: context(), source: Box::new(e.into()) })
    }
}
