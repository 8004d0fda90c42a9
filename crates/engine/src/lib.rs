//! sewa — Selective Weight Averaging beside a training job.
//!
//! The engine: the data path, in reading order, `watch` → `window` → `select` → `average` →
//! `publish`, driven by `daemon`; `objective` owns the loss used by selectors. Checkpoint files
//! are read through the `sewa-checkpoint` crate; the command line is the `sewa` binary's.
#![forbid(unsafe_code)]

pub mod average;
pub mod checked;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod error;
pub mod history;
pub mod layout;
pub mod manifest;
pub mod meter;
pub mod objective;
pub mod path_json;
pub mod publish;
pub mod report;
pub mod schema;
pub mod select;
pub mod status;
pub mod timestamp;
pub mod watch;
pub mod window;

pub use error::{Error, Result};
