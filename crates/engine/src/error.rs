//! Two classes of error: *fatal* stops the daemon or the command (bad config, unwritable
//! output, internal failure); *bad input* skips one checkpoint (truncated, bad header, shape
//! mismatch, NaN...). Between them, conditions the user can fix that stop one selection
//! (`Selection`) or one evaluator run (`Evaluator`).
//! Every error about a file names it. Paths and messages are printed through `sewa_checkpoint::text`,
//! so names taken from hostile files cannot drive the terminal.

use std::path::{Path, PathBuf};

use sewa_checkpoint::text::{escape, escape_lines, path as shown};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A checkpoint (or other input file) is unusable. The daemon quarantines it; the CLI exits 2.
    /// The message often quotes the file (tensor names, metadata): it prints on one line.
    #[error("{}: {}", shown(path), escape(msg))]
    BadInput { path: PathBuf, msg: String },
    /// An input that holds no model weights (optimizer, scheduler or RNG state, another
    /// model's tensors). Bad input to a command (exit 2); the daemon skips it quietly.
    #[error("{}: {}", shown(path), escape(msg))]
    NotWeights { path: PathBuf, msg: String },
    /// The command line is wrong. Exit 2.
    #[error("{}", escape_lines(.0))]
    Usage(String),
    /// The configuration file is wrong. Exit 78 (EX_CONFIG).
    #[error("{}: {}", shown(path), escape_lines(msg))]
    Config { path: PathBuf, msg: String },
    /// An I/O failure on a path we own (output dir, state files). Fatal, exit 1.
    #[error("{}: {source}", shown(path))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No selection can be made from this window with this selector (an empty window, no
    /// member with the metric, a non-finite loss from the objective). The daemon records it
    /// and publishes nothing from it; the CLI exits 2 (it is about the inputs, not sewa).
    #[error("{}", escape_lines(.0))]
    Selection(String),
    /// The external evaluator failed (would not start, crashed, timed out, broke the
    /// protocol). The daemon restarts it with backoff; the CLI exits 1.
    #[error("{}", escape_lines(.0))]
    Evaluator(String),
    /// Anything else that is our fault or the environment's. Exit 1.
    #[error("{}", escape_lines(.0))]
    Internal(String),
}

/// A checkpoint reader's error is the same error here, variant for variant.
impl From<sewa_checkpoint::Error> for Error {
    fn from(e: sewa_checkpoint::Error) -> Self {
        use sewa_checkpoint::Error as E;
        match e {
            E::BadInput { path, msg } => Error::BadInput { path, msg },
            E::NotWeights { path, msg } => Error::NotWeights { path, msg },
            E::Io { path, source } => Error::Io { path, source },
            E::Internal(msg) => Error::Internal(msg),
        }
    }
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

    pub fn config(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    /// What is wrong, without the path when the error is about `path` itself (for records
    /// that already name the file, such as a quarantine entry).
    pub fn reason_about(&self, path: &Path) -> String {
        match self {
            Error::BadInput { path: p, msg } | Error::NotWeights { path: p, msg } if p == path => {
                escape(msg).into_owned()
            }
            other => other.to_string(),
        }
    }

    /// True for errors about one input: skip (quarantine) it and keep running.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Error::BadInput { .. } | Error::NotWeights { .. })
    }

    /// Process exit code for the CLI: 2 bad input or usage, 78 config, 1 internal.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadInput { .. }
            | Error::NotWeights { .. }
            | Error::Usage(_)
            | Error::Selection(_) => 2,
            Error::Config { .. } => 78,
            Error::Io { .. } | Error::Evaluator(_) | Error::Internal(_) => 1,
        }
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
