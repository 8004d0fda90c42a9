//! What each subcommand does, on top of the library. `main` only dispatches here.

pub mod watch;
