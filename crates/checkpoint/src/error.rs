//! The errors of reading a checkpoint. *Bad input* (`BadInput`, `NotWeights`) is about one
//! file: the caller skips or quarantines it and goes on; `Io` (a failure on a path we were
//! asked to read, not about its content) and `Internal` (our fault) are not about the input.
//! Every error names its file; paths and messages are printed through `crate::text`, so names
//! taken from hostile files cannot drive the terminal. The engine's own error type converts
//! from this one variant for variant.

use std::path::{Path, PathBuf};

use crate::text::{escape, escape_lines, path as shown};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint (or other input file) is unusable. The message often quotes the file
    /// (tensor names, metadata): it prints on one line.
    #[error("{}: {}", shown(path), escape(msg))]
    BadInput { path: PathBuf, msg: String },
    /// An input that holds no model weights (optimizer, scheduler or RNG state, another
    /// model's tensors).
    #[error("{}: {}", shown(path), escape(msg))]
    NotWeights { path: PathBuf, msg: String },
    /// An I/O failure that says nothing about the file's content.
    #[error("{}: {source}", shown(path))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A broken invariant of this crate.
    #[error("{}", escape_lines(.0))]
    Internal(String),
}

impl Error {
    pub fn bad_input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadInput { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    pub fn not_weights(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::NotWeights { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// True for errors about one input: skip (quarantine) it and keep running.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::BadInput { .. } | Error::NotWeights { .. })
    }
}

/// Attach a path to I/O results: `fs::read(p).with_path(p)?`.
pub trait WithPath<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> WithPath<T> for std::io::Result<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
