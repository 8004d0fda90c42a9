//! Durable, atomic file-system steps of publishing: write a file under a hidden temp name and
//! rename it over its destination (alone, or as the first of a pair); swap a finished
//! directory in; fsync files and directories; the names of temp and parked files.
//! Knows nothing about tensors or manifests.

use std::ffi::OsString;
use std::fs::{self, File, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, WithPath};

/// Swap the finished temp directory in at `out` (see the module docs for the guarantee).
pub(super) fn swap_in(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
    swap_dir_in(&tmp.keep(), out)
}

/// Swap the finished directory `new` (a hidden sibling of `out`) in at `out`; on failure
/// `new` is removed and `out` is as it was.
pub(super) fn swap_dir_in(new: &Path, out: &Path) -> Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    let parent = parent_dir(out);
    if out.symlink_metadata().is_err() {
        if let Err(e) = fs::rename(new, out) {
            let _ = fs::remove_dir_all(new);
            return Err(Error::io(out, e));
        }
        sync_renamed(parent);
        return Ok(());
    }
    match renameat_with(CWD, new, CWD, out, RenameFlags::EXCHANGE) {
        // `new` now holds the old output: kept a while for its readers.
        Ok(()) => {
            keep_previous(new, out);
            sync_renamed(parent);
            return Ok(());
        }
        Err(e) if ![Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP].contains(&e) => {
            let _ = fs::remove_dir_all(new);
            return Err(Error::io(out, e.into()));
        }
        Err(_) => tracing::debug!("RENAME_EXCHANGE unsupported here; renaming the old output away"),
    }
    swap_by_renames(new, out)
}

/// Fallback swap: rename the old output away, the new one in, then keep the old one a while
/// (`keep_previous`). On failure the old output is put back. A crash between the two renames
/// leaves the old output at [`old_name`]; `recover` puts it back at start-up.
fn swap_by_renames(new: &Path, out: &Path) -> Result<()> {
    let parent = parent_dir(out);
    let old = parent.join(old_name(out, std::process::id()));
    if let Err(e) = fs::rename(out, &old) {
        let _ = fs::remove_dir_all(new);
        return Err(Error::io(out, e));
    }
    if let Err(e) = fs::rename(new, out) {
        let _ = fs::rename(&old, out);
        let _ = fs::remove_dir_all(new);
        return Err(Error::io(out, e));
    }
    sync_renamed(parent);
    keep_previous(&old, out);
    Ok(())
}

/// The directory output just replaced (now at `old`) stays, as [`previous_name`], until the
/// next publication of `out` replaces it in turn: a reader that opened the previous output (a
/// directory handle, a working directory, `from_pretrained` between listing the directory and
/// opening its files) still finds every file of it for a whole publication interval, where
/// deleting it at once gave that reader ENOENT. The one kept from the publication before is
/// deleted now. Costs one more copy of the output on disk. Failures are logged: the new
/// output is in place either way.
fn keep_previous(old: &Path, out: &Path) {
    let previous = parent_dir(out).join(previous_name(out));
    let gone = match previous.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&previous),
        Ok(_) => fs::remove_file(&previous),
        Err(_) => Ok(()),
    };
    let kept = gone.and_then(|()| fs::rename(old, &previous));
    if let Err(e) = kept {
        tracing::warn!(path = %previous.display(), error = %e,
            "could not keep the previous output for its readers; deleting it");
        if let Err(e) = fs::remove_dir_all(old) {
            tracing::warn!(path = %old.display(), "could not remove the previous output: {e}");
        }
    }
}

/// A complete, fsynced file under a hidden temp name beside its destination, not yet renamed.
/// Dropping it removes the temp file.
pub(super) struct Staged(tempfile::NamedTempFile);

impl Staged {
    /// Rename over `dest` (the directory is not fsynced here). On failure the temp file is
    /// kept (it is complete) and its path returned with the error.
    fn commit(self, dest: &Path) -> std::result::Result<(), (Option<PathBuf>, Error)> {
        self.0.persist(dest).map(drop).map_err(|e| {
            let error = Error::io(dest, e.error);
            (Staged(e.file).keep(), error)
        })
    }

    /// Leave the temp file on disk; its path, unless that failed (then it is removed).
    fn keep(self) -> Option<PathBuf> {
        self.0.keep().ok().map(|(_, path)| path)
    }
}

/// Write `dest`'s new contents under a hidden temp name in its directory: write, chmod 0644,
/// fsync. Nothing is renamed yet; on error the temp file is removed.
pub(super) fn stage(
    dest: &Path,
    write: impl FnOnce(&mut File, &Path) -> Result<()>,
) -> Result<Staged> {
    let parent = parent_dir(dest);
    let mut tmp = tempfile::Builder::new()
        .prefix(&hidden_prefix(dest))
        .rand_bytes(TEMP_RAND)
        .suffix(TEMP_SUFFIX)
        .tempfile_in(parent)
        .with_path(parent)?;
    let path = tmp.path().to_path_buf();
    write(tmp.as_file_mut(), &path)?;
    tmp.as_file().set_permissions(Permissions::from_mode(0o644)).with_path(&path)?;
    tmp.as_file().sync_all().with_path(&path)?;
    Ok(Staged(tmp))
}

/// How far [`commit_pair`] got when it failed.
pub(super) enum PairError {
    /// Nothing was renamed: both destinations are as they were, both temp files removed.
    Neither(Error),
    /// The first file is in place; the second is not. Its complete temp file is kept at the
    /// path given (if keeping it worked), for `recover` to finish the pair.
    FirstOnly(Error, Option<PathBuf>),
}

/// Rename `first` over `first_dest`, fsync the directory, then `second` over `second_dest`,
/// fsync again: a reader that sees the new second file finds the new first one, even after a
/// power loss. Between the two renames a reader sees the new first file beside the old second
/// one; this gap (one directory fsync) is the only moment the pair is mixed.
pub(super) fn commit_pair(
    (first, first_dest): (Staged, &Path),
    (second, second_dest): (Staged, &Path),
) -> std::result::Result<(), PairError> {
    first.commit(first_dest).map_err(|(_, e)| PairError::Neither(e))?;
    sync_renamed(parent_dir(first_dest));
    second.commit(second_dest).map_err(|(kept, e)| PairError::FirstOnly(e, kept))?;
    sync_renamed(parent_dir(second_dest));
    Ok(())
}

/// Fsync a directory after a rename that readers can already see. A failure is not a failed
/// publication (the new files are in place, which an error would deny): it is logged.
fn sync_renamed(dir: &Path) {
    if let Err(e) = sync_dir(dir) {
        tracing::warn!(error = %e, "published, but the directory fsync failed: a power loss \
            may bring back the previous output");
    }
}

/// Write `dest` through a hidden temp file in its directory: write, chmod 0644, fsync, rename,
/// fsync the directory. On error the temp file is removed and `dest` is untouched.
pub fn write_atomic(dest: &Path, write: impl FnOnce(&mut File, &Path) -> Result<()>) -> Result<()> {
    stage(dest, write)?.0.persist(dest).map_err(|e| Error::io(dest, e.error))?;
    sync_renamed(parent_dir(dest));
    Ok(())
}

/// Create a new file (inside our temp directory), write, chmod 0644, fsync.
pub(super) fn write_new(
    path: &Path,
    write: impl FnOnce(&mut File, &Path) -> Result<()>,
) -> Result<()> {
    let mut f = File::create_new(path).with_path(path)?;
    write(&mut f, path)?;
    f.set_permissions(Permissions::from_mode(0o644)).with_path(path)?;
    f.sync_all().with_path(path)
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_path(dir)
}

pub(super) fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Random characters in a temp name (ASCII letters and digits, as tempfile makes them).
const TEMP_RAND: usize = 6;
/// Suffix of temp files and directories being written.
pub(super) const TEMP_SUFFIX: &str = ".sewa-tmp";
/// Suffix of a previous directory output renamed away by the fallback swap.
pub(super) const OLD_SUFFIX: &str = ".sewa-old";

/// `.name.` — temp names are hidden so watchers and globs skip them. Built from the name's
/// bytes, so two outputs whose names differ only in non-UTF-8 bytes never share temp names.
pub(super) fn hidden_prefix(p: &Path) -> OsString {
    let mut s = OsString::from(".");
    s.push(p.file_name().unwrap_or_default());
    s.push(".");
    s
}

/// `.name.PID.sewa-old`: where the fallback swap parks the previous directory output.
fn old_name(out: &Path, pid: u32) -> OsString {
    let mut s = hidden_prefix(out);
    s.push(format!("{pid}{OLD_SUFFIX}"));
    s
}

/// `.name.sewa-prev`: the previous directory output, kept until the next publication.
fn previous_name(out: &Path) -> OsString {
    let mut s = hidden_prefix(out);
    s.push("sewa-prev");
    s
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_failed_second_stage_leaves_the_first_destination_and_no_temps() {
        let dir = tempfile::tempdir().unwrap();
        let (model, manifest) = (dir.path().join("m.safetensors"), dir.path().join("m.json"));
        fs::write(&model, "old model").unwrap();
        fs::write(&manifest, "old manifest").unwrap();
        let first = stage(&model, |f, p| f.write_all(b"new model").with_path(p)).unwrap();
        let full = std::io::Error::from_raw_os_error(28); // ENOSPC
        let second = stage(&manifest, |_, p| Err(Error::io(p, full)));
        assert!(second.is_err());
        drop(first);
        assert_eq!(fs::read_to_string(&model).unwrap(), "old model");
        assert_eq!(fs::read_to_string(&manifest).unwrap(), "old manifest");
        assert_eq!(names(dir.path()), ["m.json", "m.safetensors"]);
    }

    #[test]
    fn a_committed_pair_replaces_both_and_leaves_no_temps() {
        let dir = tempfile::tempdir().unwrap();
        let (model, manifest) = (dir.path().join("m.safetensors"), dir.path().join("m.json"));
        fs::write(&model, "old model").unwrap();
        let first = stage(&model, |f, p| f.write_all(b"new model").with_path(p)).unwrap();
        let second = stage(&manifest, |f, p| f.write_all(b"new manifest").with_path(p)).unwrap();
        assert!(commit_pair((first, &model), (second, &manifest)).is_ok());
        assert_eq!(fs::read_to_string(&model).unwrap(), "new model");
        assert_eq!(fs::read_to_string(&manifest).unwrap(), "new manifest");
        assert_eq!(names(dir.path()), ["m.json", "m.safetensors"]);
    }

    fn dir_with(parent: &Path, name: &str, content: &str) -> PathBuf {
        let d = parent.join(name);
        fs::create_dir(&d).unwrap();
        fs::write(d.join("model.safetensors"), content).unwrap();
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rename_fallback_swaps_and_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let out = dir_with(root.path(), "avg", "old");
        let tmp = tempfile::Builder::new().prefix(".avg.").tempdir_in(root.path()).unwrap();
        fs::write(tmp.path().join("model.safetensors"), "new").unwrap();
        swap_by_renames(&tmp.keep(), &out).unwrap();
        assert_eq!(fs::read_to_string(out.join("model.safetensors")).unwrap(), "new");
        assert_eq!(names(root.path()), [".avg.sewa-prev", "avg"]);
        let kept = root.path().join(".avg.sewa-prev/model.safetensors");
        assert_eq!(fs::read_to_string(kept).unwrap(), "old");
    }

    #[test]
    fn exchange_swaps_and_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let out = dir_with(root.path(), "avg", "old");
        let tmp = tempfile::Builder::new().prefix(".avg.").tempdir_in(root.path()).unwrap();
        fs::write(tmp.path().join("model.safetensors"), "new").unwrap();
        swap_in(tmp, &out).unwrap();
        assert_eq!(fs::read_to_string(out.join("model.safetensors")).unwrap(), "new");
        assert_eq!(names(root.path()), [".avg.sewa-prev", "avg"]);
    }

    /// Issue 19 item 14: the replaced directory was deleted right after the swap, so a reader
    /// holding it open (here a directory handle, as `openat` readers and a cwd do) got ENOENT
    /// for files it had not opened yet. It now lasts until the next publication.
    #[test]
    fn a_reader_holding_the_previous_directory_reads_it_until_the_next_publication() {
        let root = tempfile::tempdir().unwrap();
        let out = dir_with(root.path(), "avg", "first");
        let publish = |content: &str| {
            let tmp = tempfile::Builder::new().prefix(".avg.").tempdir_in(root.path()).unwrap();
            fs::write(tmp.path().join("model.safetensors"), content).unwrap();
            swap_in(tmp, &out).unwrap();
        };
        let held = File::open(&out).unwrap(); // the reader's handle on the first output
        let read_held = || {
            use std::io::Read;
            let fd = rustix::fs::openat(
                &held,
                "model.safetensors",
                rustix::fs::OFlags::RDONLY,
                rustix::fs::Mode::empty(),
            )?;
            let mut text = String::new();
            File::from(fd).read_to_string(&mut text).unwrap();
            Ok::<_, rustix::io::Errno>(text)
        };
        publish("second");
        assert_eq!(fs::read_to_string(out.join("model.safetensors")).unwrap(), "second");
        assert_eq!(read_held().as_deref(), Ok("first"), "the replaced output is still whole");
        publish("third");
        assert_eq!(read_held(), Err(rustix::io::Errno::NOENT), "kept one publication only");
        assert_eq!(names(root.path()), [".avg.sewa-prev", "avg"]);
        let kept = root.path().join(".avg.sewa-prev/model.safetensors");
        assert_eq!(fs::read_to_string(kept).unwrap(), "second");
    }
}
