//! Library side of each subcommand: turn parsed flags into a call on the engine and a result
//! for `main` to print. No flag definitions (see `cli`) and no process exit codes (see `main`).

pub mod average;
pub mod check;
pub mod inspect;
pub mod select;
pub mod startup;
pub mod watch;

use std::path::PathBuf;

use crate::checkpoint::{Checkpoint, OpenOptions};
use crate::error::Result;

/// Open options with `_orig_mod.` plus the user's extra prefixes, and the state key if given.
pub fn open_options(strip_prefix: &[String], state_key: Option<&str>) -> OpenOptions {
    let mut opts = OpenOptions { state_key: state_key.map(str::to_string), ..Default::default() };
    for p in strip_prefix {
        if !opts.strip_prefixes.contains(p) {
            opts.strip_prefixes.push(p.clone());
        }
    }
    opts
}

/// Open every input, failing on the first bad one (the error names it).
pub fn open_all(paths: &[PathBuf], opts: &OpenOptions) -> Result<Vec<Checkpoint>> {
    paths.iter().map(|p| Checkpoint::open(p, opts)).collect()
}

/// Parse a byte size: `1048576`, `64KiB`, `512MiB`, `5GiB`, `5GB` (powers of 1000), `1.5GiB`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("{s:?} is not a size such as 5GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB)")),
    };
    let bytes = num * mult as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("size {s:?} must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
    }
}
