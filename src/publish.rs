//! Atomic publication of an average, then its manifest.
//!
//! `PATH` ending in `.safetensors` is one file; any other `PATH` is a directory in Hugging Face
//! layout (`model.safetensors` or shards plus `model.safetensors.index.json`, side files such
//! as `config.json` and tokenizer files copied from the newest input, `manifest.json`).
//!
//! Guarantee: a reader of `PATH` sees the complete old output or the complete new one, never a
//! mix or a torn file, and the new one is durable (fsynced, directory entry fsynced) before its
//! manifest appears. Files are written under hidden temp names in the destination directory
//! and renamed over; a directory is built as a hidden sibling and swapped in with
//! `renameat2(RENAME_EXCHANGE)`. Where the file system lacks RENAME_EXCHANGE the old directory
//! is renamed away and the new one renamed in, leaving a moment with no `PATH` (never a partial
//! one). Any failure (NaN in an input mid-stream, disk full) removes the temp file or directory
//! and leaves the old output untouched. Files are mode 0644.
//!
//! This module does not average (see `average`) and does not decide what to average.

use std::collections::HashMap;
use std::fs::{self, File, Permissions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::average::{AveragePlan, Workspace};
use crate::error::{Error, Result, WithPath};
use crate::layout::{FileLayout, index_json, plan_files};
use crate::manifest::{FileRecord, Manifest, Provenance, rfc3339};

/// Default shard size for directory outputs (as `save_pretrained`'s `max_shard_size` 5GB).
pub const DEFAULT_SHARD_BYTES: u64 = 5 << 30;

/// Hugging Face side files copied into a directory output, when the newest input has them.
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// Directory outputs above this many tensor bytes are sharded.
    pub shard_bytes: u64,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions { shard_bytes: DEFAULT_SHARD_BYTES }
    }
}

/// What was published.
#[derive(Debug)]
pub struct Published {
    pub path: PathBuf,
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
}

/// True when `out` is published as a single file (it ends in `.safetensors`).
pub fn is_file_output(out: &Path) -> bool {
    out.extension().is_some_and(|e| e == "safetensors")
}

/// Where the manifest of output `out` goes.
pub fn manifest_path(out: &Path) -> PathBuf {
    if is_file_output(out) {
        let mut s = out.as_os_str().to_owned();
        s.push(".manifest.json");
        PathBuf::from(s)
    } else {
        out.join("manifest.json")
    }
}

/// Refuse destinations we must not replace, before anything is written.
pub fn check_destination(out: &Path) -> Result<()> {
    let name = out.file_name().ok_or_else(|| {
        Error::Usage(format!("--out {}: needs a file or directory name", out.display()))
    })?;
    let Ok(meta) = out.symlink_metadata() else { return Ok(()) };
    if is_file_output(out) {
        if meta.is_dir() {
            return Err(Error::Usage(format!(
                "--out {}: is a directory, but a path ending in .safetensors is written as a \
                 file (drop the extension to write a directory)",
                out.display()
            )));
        }
        return Ok(());
    }
    if !meta.is_dir() {
        return Err(Error::Usage(format!(
            "--out {}: exists and is not a directory (a path without .safetensors is written \
             as a Hugging Face directory)",
            out.display()
        )));
    }
    let empty = fs::read_dir(out).with_path(out)?.next().is_none();
    if !empty && !written_by_sewa(out) {
        return Err(Error::Usage(format!(
            "--out {}: directory exists and was not written by sewa (no sewa manifest.json); \
             refusing to replace it — choose a new path such as {}-averaged",
            out.display(),
            name.to_string_lossy()
        )));
    }
    Ok(())
}

fn written_by_sewa(dir: &Path) -> bool {
    let Ok(bytes) = fs::read(dir.join("manifest.json")) else { return false };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .is_ok_and(|v| v.get("sewa_version").is_some())
}

/// Average `plan` into `out` and publish it atomically, then its manifest. `progress` is
/// called with the tensor bytes done so far.
pub fn publish(
    plan: &AveragePlan<'_>,
    out: &Path,
    provenance: Provenance,
    opts: &PublishOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Published> {
    let manifest = Manifest::new(plan, out.to_path_buf(), provenance);
    publish_recorded(plan, out, manifest, opts, progress)
}

/// As [`publish`], with a manifest the caller prepared from `Manifest::new` (the daemon
/// publishes its running average held in memory and records the window members it came from).
pub fn publish_recorded(
    plan: &AveragePlan<'_>,
    out: &Path,
    mut manifest: Manifest,
    opts: &PublishOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Published> {
    check_destination(out)?;
    let clock = Instant::now();
    let metadata = provenance_metadata(&manifest);
    let parent = parent_dir(out);
    fs::create_dir_all(parent).with_path(parent)?;
    let mut writer = TensorWriter { plan, ws: Workspace::default(), done: 0, progress };
    if is_file_output(out) {
        let name = out.file_name().expect("checked").to_string_lossy().into_owned();
        let layout = plan_files(plan.outputs(), &name, u64::MAX, &metadata)?.remove(0);
        write_atomic(out, |f, p| writer.write(f, p, &layout))?;
        manifest.layout = "file".into();
        manifest.files = vec![FileRecord { name, bytes: layout.size }];
        finish(&mut manifest, clock);
        write_atomic(&manifest_path(out), |f, p| f.write_all(&manifest.to_json()).with_path(p))?;
    } else {
        publish_dir(&mut writer, out, &mut manifest, &metadata, opts, clock)?;
    }
    tracing::info!(out = %out.display(), bytes = plan.output_bytes(), "published average");
    Ok(Published { path: out.to_path_buf(), manifest_path: manifest_path(out), manifest })
}

fn publish_dir(
    writer: &mut TensorWriter<'_, '_>,
    out: &Path,
    manifest: &mut Manifest,
    metadata: &HashMap<String, String>,
    opts: &PublishOptions,
    clock: Instant,
) -> Result<()> {
    let parent = parent_dir(out);
    let tmp = tempfile::Builder::new()
        .prefix(&hidden_prefix(out))
        .suffix(".sewa-tmp")
        .tempdir_in(parent)
        .with_path(parent)?;
    let dir = tmp.path();
    fs::set_permissions(dir, Permissions::from_mode(0o755)).with_path(dir)?;
    let plan = writer.plan;
    let layouts = plan_files(plan.outputs(), "model.safetensors", opts.shard_bytes, metadata)?;
    for layout in &layouts {
        write_new(&dir.join(&layout.name), |f, p| writer.write(f, p, layout))?;
        manifest.files.push(FileRecord { name: layout.name.clone(), bytes: layout.size });
    }
    if layouts.len() > 1 {
        let index = index_json(&layouts, plan.outputs());
        let name = "model.safetensors.index.json";
        write_new(&dir.join(name), |f, p| f.write_all(&index).with_path(p))?;
        manifest.files.push(FileRecord { name: name.into(), bytes: index.len() as u64 });
    }
    copy_side_files(plan, dir, manifest)?;
    manifest.layout = "dir".into();
    finish(manifest, clock);
    let json = manifest.to_json();
    write_new(&dir.join("manifest.json"), |f, p| f.write_all(&json).with_path(p))?;
    sync_dir(dir)?;
    swap_in(tmp, out)
}

/// Streams averaged tensors into files, sharing one workspace across files.
struct TensorWriter<'p, 'a> {
    plan: &'p AveragePlan<'a>,
    ws: Workspace,
    done: u64,
    progress: &'p mut dyn FnMut(u64),
}

impl TensorWriter<'_, '_> {
    fn write(&mut self, file: &mut File, path: &Path, layout: &FileLayout) -> Result<()> {
        file.write_all(&layout.header).with_path(path)?;
        for &i in &layout.tensors {
            let bytes = self.plan.average_tensor(i, &mut self.ws)?;
            file.write_all(bytes).with_path(path)?;
            self.done += bytes.len() as u64;
            (self.progress)(self.done);
        }
        Ok(())
    }
}

/// Copy HF side files from the newest input that has a side directory.
fn copy_side_files(plan: &AveragePlan<'_>, dir: &Path, manifest: &mut Manifest) -> Result<()> {
    let newest = (plan.inputs().iter().enumerate())
        .filter(|(_, c)| c.side_dir().is_some())
        .max_by_key(|(i, c)| (c.step(), *i))
        .map(|(_, c)| *c);
    let Some(src) = newest.and_then(|c| c.side_dir()) else { return Ok(()) };
    for name in SIDE_FILES {
        let from = src.join(name);
        if !from.is_file() {
            continue;
        }
        let to = dir.join(name);
        fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        fs::set_permissions(&to, Permissions::from_mode(0o644)).with_path(&to)?;
        File::open(&to).and_then(|f| f.sync_all()).with_path(&to)?;
        manifest.side_files.push(name.to_string());
    }
    manifest.side_source = Some(src.to_path_buf());
    Ok(())
}

/// Swap the finished temp directory in at `out` (see the module docs for the guarantee).
fn swap_in(tmp: tempfile::TempDir, out: &Path) -> Result<()> {
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
fn write_new(path: &Path, write: impl FnOnce(&mut File, &Path) -> Result<()>) -> Result<()> {
    let mut f = File::create_new(path).with_path(path)?;
    write(&mut f, path)?;
    f.set_permissions(Permissions::from_mode(0o644)).with_path(path)?;
    f.sync_all().with_path(path)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_path(dir)
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// `.name.` — temp names are hidden so watchers and globs skip them.
fn hidden_prefix(p: &Path) -> String {
    format!(".{}.", p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())
}

fn finish(manifest: &mut Manifest, clock: Instant) {
    manifest.finished = rfc3339(SystemTime::now());
    manifest.wall_time_s = clock.elapsed().as_secs_f64();
}

/// Short provenance for safetensors `__metadata__` (the manifest has the full record).
/// `format = pt` is what transformers expects of a PyTorch-loadable file.
fn provenance_metadata(m: &Manifest) -> HashMap<String, String> {
    let join = |v: Vec<String>| v.join(",");
    HashMap::from([
        ("format".into(), "pt".into()),
        ("sewa_version".into(), m.sewa_version.clone()),
        ("sewa_method".into(), m.selection.method.clone()),
        ("sewa_inputs".into(), m.inputs.len().to_string()),
        (
            "sewa_steps".into(),
            join(m.inputs.iter().map(|i| i.step.map_or("?".into(), |s| s.to_string())).collect()),
        ),
        ("sewa_weights".into(), join(m.weights.iter().map(|w| format!("{w:.6}")).collect())),
        ("sewa_dtype".into(), m.dtype.clone()),
        ("sewa_int_policy".into(), m.int_policy.clone()),
        ("sewa_started".into(), m.started.clone()),
    ])
}
