//! One integration-test target; topic modules below.
mod objective;
mod sewa;
