//! Durable, atomic file-system steps of publishing: write a file under a hidden temp name and
//! rename it over its destination; swap a finished directory in; fsync files and directories.
//! Knows nothing about tensors or manifests.

use std::fs::{self, File, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::{Error, Result, WithPath};

/// Swap the finished temp directory in at `out` (see the module docs for the guarantee).
pub(super) fn swap_in(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    let parent = parent_dir(out);
    if out.symlink_metadata().is_err() {
        let new = tmp.keep();
        if let Err(e) = fs::rename(&new, out) {
            let _ = fs::remove_dir_all(&new);
            return Err(Error::io(out, e));
        }
        return sync_dir(parent);
    }
    match renameat_with(CWD, tmp.path(), CWD, out, RenameFlags::EXCHANGE) {
        // The temp path now holds the old output; dropping `tmp` deletes it.
        Ok(()) => return sync_dir(parent),
        Err(e) if ![Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP].contains(&e) => {
            return Err(Error::io(out, e.into()));
        }
        Err(_) => tracing::debug!("RENAME_EXCHANGE unsupported here; renaming the old output away"),
    }
    swap_by_renames(tmp, out)
}

/// Fallback swap: rename the old output away, the new one in, then delete the old one. On
/// failure the old output is put back.
fn swap_by_renames(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
    let parent = parent_dir(out);
    let old = parent.join(format!("{}{}.sewa-old", hidden_prefix(out), std::process::id()));
    fs::rename(out, &old).with_path(out)?;
    let new = tmp.keep();
    if let Err(e) = fs::rename(&new, out) {
        let _ = fs::rename(&old, out);
        let _ = fs::remove_dir_all(&new);
        return Err(Error::io(out, e));
    }
    sync_dir(parent)?;
    if let Err(e) = fs::remove_dir_all(&old) {
        tracing::warn!(path = %old.display(), "could not remove the previous output: {e}");
    }
    Ok(())
}

/// Write `dest` through a hidden temp file in its directory: write, chmod 0644, fsync, rename,
/// fsync the directory. On error the temp file is removed and `dest` is untouched.
pub fn write_atomic(dest: &Path, write: impl FnOnce(&mut File, &Path) -> Result<()>) -> Result<()> {
    let parent = parent_dir(dest);
    let mut tmp = tempfile::Builder::new()
        .prefix(&hidden_prefix(dest))
        .suffix(".sewa-tmp")
        .tempfile_in(parent)
        .with_path(parent)?;
    let path = tmp.path().to_path_buf();
    write(tmp.as_file_mut(), &path)?;
    tmp.as_file().set_permissions(Permissions::from_mode(0o644)).with_path(&path)?;
    tmp.as_file().sync_all().with_path(&path)?;
    tmp.persist(dest).map_err(|e| Error::io(dest, e.error))?;
    sync_dir(parent)
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

/// `.name.` — temp names are hidden so watchers and globs skip them.
pub(super) fn hidden_prefix(p: &Path) -> String {
    format!(".{}.", p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())
}

/// Remove temp files and directories a killed publisher left beside `dest` (and beside its
/// manifest), untouched for at least `min_age` so a publish still under way is never hit.
/// Returns what was removed; failures to remove are skipped (they are only litter).
pub fn remove_stale_temps(dest: &Path, min_age: std::time::Duration) -> Vec<std::path::PathBuf> {
    let prefix = hidden_prefix(dest);
    let Ok(entries) = std::fs::read_dir(parent_dir(dest)) else { return Vec::new() };
    let stale = |e: &std::fs::DirEntry| {
        let name = e.file_name().to_string_lossy().into_owned();
        let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        name.starts_with(&prefix)
            && name.ends_with(".sewa-tmp")
            && age.is_some_and(|a| a >= min_age)
    };
    let mut removed = Vec::new();
    for e in entries.filter_map(|e| e.ok()).filter(stale) {
        let path = e.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn stale_temps_of_this_output_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.safetensors");
        let keep =
            ["model.safetensors", ".other.safetensors.ab12.sewa-tmp", ".model.safetensors.x"];
        let litter =
            [".model.safetensors.ab12.sewa-tmp", ".model.safetensors.manifest.json.cd34.sewa-tmp"];
        for n in keep.iter().chain(&litter) {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join(".model.safetensors.ef56.sewa-tmp")).unwrap();
        // Too young: a publish may still be writing it.
        assert!(remove_stale_temps(&out, std::time::Duration::from_secs(3600)).is_empty());
        let mut removed = remove_stale_temps(&out, std::time::Duration::ZERO);
        removed.sort();
        assert_eq!(removed.len(), 3, "{removed:?}");
        for n in keep {
            assert!(dir.path().join(n).exists(), "{n} was removed");
        }
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
        swap_by_renames(tmp, &out).unwrap();
        assert_eq!(fs::read_to_string(out.join("model.safetensors")).unwrap(), "new");
        assert_eq!(names(root.path()), ["avg"]);
    }

    #[test]
    fn exchange_swaps_and_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let out = dir_with(root.path(), "avg", "old");
        let tmp = tempfile::Builder::new().prefix(".avg.").tempdir_in(root.path()).unwrap();
        fs::write(tmp.path().join("model.safetensors"), "new").unwrap();
        swap_in(tmp, &out).unwrap();
        assert_eq!(fs::read_to_string(out.join("model.safetensors")).unwrap(), "new");
        assert_eq!(names(root.path()), ["avg"]);
    }
}
