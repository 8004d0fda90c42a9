//! Where `sewa average` and `sewa watch` may publish: destinations that are not ours to
//! replace are refused, and missing parents created only when asked, before anything is
//! written.

use std::fs;
use std::path::{Path, PathBuf};

use super::{is_file_output, parent_dir};
use crate::error::{Error, Result, WithPath};

/// Refuse destinations we must not replace, before anything is written.
pub fn check_destination(out: &Path) -> Result<()> {
    let name = out.file_name().ok_or_else(|| {
        Error::Usage(format!("output {}: needs a file or directory name", out.display()))
    })?;
    let Ok(meta) = out.symlink_metadata() else { return Ok(()) };
    if is_file_output(out) {
        if meta.is_dir() {
            return Err(Error::Usage(format!(
                "output {}: is a directory, but a path ending in .safetensors is written as a \
                 file (drop the extension to write a directory)",
                out.display()
            )));
        }
        return Ok(());
    }
    if !meta.is_dir() {
        return Err(Error::Usage(format!(
            "output {}: exists and is not a directory (a path without .safetensors is written \
             as a Hugging Face directory)",
            out.display()
        )));
    }
    let empty = fs::read_dir(out).with_path(out)?.next().is_none();
    if !empty && !written_by_sewa(out) {
        return Err(Error::Usage(format!(
            "output {}: directory exists and was not written by sewa (no sewa manifest.json); \
             refusing to replace it — choose a new path such as {}-averaged",
            out.display(),
            name.to_string_lossy()
        )));
    }
    Ok(())
}

/// The directory `out` goes in must exist, or be created when `create` says so: a typo in the
/// output path must not quietly build a directory tree. Returns the directories it
/// created, outermost first.
pub fn check_parent(out: &Path, create: bool) -> Result<Vec<PathBuf>> {
    let parent = parent_dir(out);
    match parent.metadata() {
        Ok(m) if m.is_dir() => return Ok(Vec::new()),
        Ok(_) => {
            return Err(Error::Usage(format!(
                "output {}: {} is not a directory",
                out.display(),
                parent.display()
            )));
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(parent, e)),
        Err(_) => {}
    }
    if !create {
        return Err(Error::Usage(format!(
            "output {}: directory {} does not exist; create it, or set parents = true to have \
             sewa create it",
            out.display(),
            parent.display()
        )));
    }
    let missing: Vec<PathBuf> =
        parent.ancestors().take_while(|a| !a.exists()).map(Path::to_path_buf).collect();
    fs::create_dir_all(parent).with_path(parent)?;
    Ok(missing.into_iter().rev().collect())
}

fn written_by_sewa(dir: &Path) -> bool {
    let Ok(bytes) = fs::read(dir.join("manifest.json")) else { return false };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .is_ok_and(|v| v.get("sewa_version").is_some())
}
