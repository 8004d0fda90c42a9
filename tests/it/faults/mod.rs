//! Regression tests for faults found by attacking sewa as a hostile user and running it as a
//! production service would be (issue 8). Each test is named after what it guards.

mod checkcfg;
mod disk;
mod evaluator_processes;
mod input;
mod losses;
mod publish;
mod reads;
mod service;
mod staging;
mod status;
mod validation;
mod window;
