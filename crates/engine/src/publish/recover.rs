//! Leftovers of an interrupted publication of one output, dealt with at start-up once its lock
//! is held (so no other process can be publishing to it): temp files and directories
//! (`.NAME.XXXXXX.sewa-tmp`) are removed; a previous directory output parked by the fallback
//! swap (`.NAME.PID.sewa-old`) is put back if `NAME` is missing, else removed; and a file
//! output whose model was renamed in but whose manifest was not (a crash in the gap between
//! the two renames) gets its complete, fsynced manifest temp renamed in — only when that
//! manifest's `started` equals the model's `__metadata__.sewa_started`.
//!
//! Only names built from this output's own name are touched (`.NAME.` then a temp token, never
//! another output's `.NAME.x.…`). Without an exclusive lock (a file system that cannot lock),
//! only temps older than [`STALE_AGE`] are removed, as a publish under way is never that old.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::atomic::{OLD_SUFFIX, TEMP_SUFFIX, parent_dir, sync_dir};
use super::lock::OutputLock;
use super::{is_file_output, manifest_path};
use crate::error::{Error, Result, WithPath};

/// Without a lock, temps younger than this may belong to a publish under way.
pub const STALE_AGE: Duration = Duration::from_secs(600);
/// Bigger manifests or safetensors headers are not ours (sewa writes a few KiB).
const MAX_JSON: u64 = 100 << 20;

/// One thing done to a leftover.
#[derive(Debug, PartialEq)]
pub enum Recovered {
    Removed(PathBuf),
    /// A parked previous directory output put back at the output path.
    Restored {
        from: PathBuf,
        to: PathBuf,
    },
    /// A manifest temp renamed in beside the model it describes.
    Completed {
        from: PathBuf,
        to: PathBuf,
    },
}

impl std::fmt::Display for Recovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recovered::Removed(p) => write!(f, "removed {}", p.display()),
            Recovered::Restored { from, to } => {
                write!(f, "restored the previous output {} from {}", to.display(), from.display())
            }
            Recovered::Completed { from, to } => write!(
                f,
                "completed an interrupted publication: renamed {} to {}",
                from.display(),
                to.display()
            ),
        }
    }
}

/// What a hidden entry beside the output is, judged by its name alone.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Leftover {
    /// `.NAME.TOKEN.sewa-tmp`: a temp file or directory of the output.
    Temp,
    /// `.NAME.manifest.json.TOKEN.sewa-tmp` beside a file output: its manifest's temp file.
    ManifestTemp,
    /// `.NAME.PID.sewa-old`: a previous directory output renamed away.
    Old,
}

/// A leftover found beside the output.
struct Found {
    path: PathBuf,
    kind: Leftover,
    mtime: SystemTime,
}

fn classify(out_name: &OsStr, file_output: bool, entry: &OsStr) -> Option<Leftover> {
    let rest = entry.as_bytes().strip_prefix(b".")?.strip_prefix(out_name.as_bytes())?;
    let rest = rest.strip_prefix(b".")?;
    let token = |t: &[u8]| !t.is_empty() && t.iter().all(u8::is_ascii_alphanumeric);
    if let Some(mid) = rest.strip_suffix(TEMP_SUFFIX.as_bytes()) {
        if token(mid) {
            return Some(Leftover::Temp);
        }
        let tok = mid.strip_prefix(b"manifest.json.")?;
        return (file_output && token(tok)).then_some(Leftover::ManifestTemp);
    }
    let pid = rest.strip_suffix(OLD_SUFFIX.as_bytes())?;
    (!file_output && !pid.is_empty() && pid.iter().all(u8::is_ascii_digit)).then_some(Leftover::Old)
}

/// Deal with the leftovers of `lock`'s output (see the module docs); returns what was done.
/// Failures are logged and skipped: leftovers never stop a start-up.
pub fn recover(lock: &OutputLock) -> Vec<Recovered> {
    let out = lock.out();
    let Some(name) = out.file_name() else { return Vec::new() };
    let min_age = if lock.exclusive() { Duration::ZERO } else { STALE_AGE };
    let Ok(entries) = fs::read_dir(parent_dir(out)) else { return Vec::new() };
    let mut found: Vec<Found> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let kind = classify(name, is_file_output(out), &e.file_name())?;
            let mtime = e.metadata().and_then(|m| m.modified()).ok()?;
            let old_enough = mtime.elapsed().is_ok_and(|a| a >= min_age);
            old_enough.then(|| Found { path: e.path(), kind, mtime })
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.mtime)); // newest first
    let mut done = Vec::new();
    if lock.exclusive() {
        restore_old(out, &found, &mut done);
        complete_manifest(out, &found, &mut done);
    } else {
        found.retain(|f| f.kind != Leftover::Old); // maybe another publisher's only old copy
    }
    for Found { path, .. } in &found {
        if path.symlink_metadata().is_ok() && remove(path) {
            done.push(Recovered::Removed(path.clone()));
        }
    }
    done
}

/// A directory output missing with a parked old copy: put the newest copy back.
fn restore_old(out: &Path, found: &[Found], done: &mut Vec<Recovered>) {
    if out.symlink_metadata().is_ok() {
        return;
    }
    let Some(Found { path: old, .. }) = found.iter().find(|f| f.kind == Leftover::Old) else {
        return;
    };
    match fs::rename(old, out).with_path(out).and_then(|()| sync_dir(parent_dir(out))) {
        Ok(()) => done.push(Recovered::Restored { from: old.clone(), to: out.to_path_buf() }),
        Err(e) => tracing::warn!(error = %e, "could not restore the previous output"),
    }
}

/// A file output's model newer than its manifest, with the matching manifest temp: rename it in.
fn complete_manifest(out: &Path, found: &[Found], done: &mut Vec<Recovered>) {
    let Ok(Some(started)) = model_started(out) else { return };
    let manifest = manifest_path(out);
    if manifest_started(&manifest).is_some_and(|s| s == started) {
        return; // the pair is whole
    }
    let mut temps = found.iter().filter(|f| f.kind == Leftover::ManifestTemp);
    let Some(Found { path: temp, .. }) =
        temps.find(|f| manifest_started(&f.path).as_ref() == Some(&started))
    else {
        tracing::warn!(model = %out.display(), sewa_started = %started,
            "the published model and its manifest do not match and no manifest for this \
             model was left; the next publication replaces both");
        return;
    };
    match fs::rename(temp, &manifest).with_path(&manifest).and_then(|()| sync_dir(parent_dir(out)))
    {
        Ok(()) => done.push(Recovered::Completed { from: temp.clone(), to: manifest }),
        Err(e) => tracing::warn!(error = %e, "could not complete the interrupted publication"),
    }
}

fn remove(path: &Path) -> bool {
    let gone = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        _ => fs::remove_file(path),
    };
    if let Err(e) = &gone {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a leftover");
    }
    gone.is_ok()
}

/// The `started` of the sewa manifest at `path`, if it is a readable one.
fn manifest_started(path: &Path) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&read_bounded(path, 0, MAX_JSON).ok()?).ok()?;
    v.get("sewa_version")?;
    v.get("started")?.as_str().map(str::to_owned)
}

/// `__metadata__.sewa_started` of the safetensors file at `path`: the `started` of the
/// manifest published with it. `None` when the file has no such entry.
///
/// This is how a reader checks that a model and a manifest belong together: read the 8-byte
/// little-endian header length `n`, parse the `n` bytes of JSON that follow, and compare
/// `["__metadata__"]["sewa_started"]` with the manifest's `"started"`.
pub fn model_started(path: &Path) -> Result<Option<String>> {
    let len = read_bounded(path, 0, 8)?;
    let n = u64::from_le_bytes(
        len.as_slice()
            .try_into()
            .map_err(|_| Error::bad_input(path, "shorter than a safetensors header length"))?,
    );
    let header = read_bounded(path, 8, n.min(MAX_JSON))?;
    if (header.len() as u64) < n {
        return Err(Error::bad_input(path, format!("header of {n} bytes is cut short or too big")));
    }
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::bad_input(path, format!("safetensors header: {e}")))?;
    Ok(v.get("__metadata__")
        .and_then(|m| m.get("sewa_started"))
        .and_then(|s| s.as_str())
        .map(str::to_owned))
}

/// Up to `max` bytes of the regular file `path` from `offset` (never blocks on a FIFO).
fn read_bounded(path: &Path, offset: u64, max: u64) -> Result<Vec<u8>> {
    use std::io::Seek;
    let mut f = File::options()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .with_path(path)?;
    if !f.metadata().with_path(path)?.is_file() {
        return Err(Error::bad_input(path, "not a regular file"));
    }
    f.seek(std::io::SeekFrom::Start(offset)).with_path(path)?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf).with_path(path)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_outputs_own_leftover_names_are_recognised() {
        let c = |out: &str, entry: &str| {
            classify(OsStr::new(out), out.ends_with(".safetensors"), OsStr::new(entry))
        };
        assert_eq!(c("m.safetensors", ".m.safetensors.Ab12x9.sewa-tmp"), Some(Leftover::Temp));
        assert_eq!(
            c("m.safetensors", ".m.safetensors.manifest.json.Ab12x9.sewa-tmp"),
            Some(Leftover::ManifestTemp)
        );
        assert_eq!(c("avg", ".avg.4242.sewa-old"), Some(Leftover::Old));
        assert_eq!(c("avg", ".avg.Zz09aa.sewa-tmp"), Some(Leftover::Temp));
        // Another output whose name starts with ours: `avg.safetensors` beside `avg`.
        assert_eq!(c("avg", ".avg.safetensors.Ab12x9.sewa-tmp"), None);
        assert_eq!(c("avg", ".avg.safetensors.manifest.json.Ab12x9.sewa-tmp"), None);
        for other in [
            "m.safetensors",
            ".m.safetensors",
            ".m.safetensors.x",
            ".other.Ab12x9.sewa-tmp",
            ".m.safetensors..sewa-tmp",
            ".m.safetensors.12.sewa-old",
            "..m.safetensors.Ab12x9.sewa-tmp",
        ] {
            assert_eq!(c("m.safetensors", other), None, "{other}");
        }
    }
}
