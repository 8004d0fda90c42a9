//! Integration tests: one target, one module per topic.

mod config;
mod watch;
