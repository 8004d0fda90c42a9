//! The one integration-test target: topic modules, real files in unique temp dirs.

mod average;
mod cli;
mod config;
mod dashboard;
mod dcp;
mod deepspeed;
mod distributed;
mod docs;
mod evaluator;
mod faults;
mod history;
mod imports;
mod layouts;
mod megatron;
mod memory;
mod objective;
mod peft;
mod protocol2;
mod publish;
mod sewa;
mod watch;
mod wsm;
