//! sewa — Selective Weight Averaging beside a training job.
//!
//! The data path, in reading order: `watch` → `window` → `select` → `average` → `publish`.
//! `checkpoint` owns file formats; `objective` owns the differentiable loss used by selectors.
#![forbid(unsafe_code)]

pub mod average;
pub mod checked;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod dtype;
pub mod error;
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
pub mod text;
pub mod timestamp;
pub mod watch;
pub mod window;

pub use error::{Error, Result};
