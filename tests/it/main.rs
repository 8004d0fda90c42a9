//! One integration-test target; each topic lives in its own module.

mod checkpoint;
