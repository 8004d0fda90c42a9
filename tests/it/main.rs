//! The one integration-test target: topic modules, real files in unique temp dirs.

mod average;
mod checkpoint;
mod cli;
mod config;
mod dcp;
mod evaluator;
mod faults;
mod layouts;
mod memory;
mod objective;
mod publish;
mod sewa;
mod watch;
