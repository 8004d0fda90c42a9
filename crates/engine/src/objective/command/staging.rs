//! Files exchanged with the evaluator in sewa's private staging directory (in memory under
//! /dev/shm when it exists): protocol 1's candidate and gradient files, and protocol 2's
//! safetensors copy of a member whose format the evaluator cannot load (written once per
//! member, never per request). Counts every byte it writes and reads, so tests and the
//! benchmark can show what a request costs, and the bytes it holds (under /dev/shm, memory
//! taken from the trainer), which it logs. Named `sewa-eval-<pid>-…` with a marker inside, so
//! a later start removes what a killed sewa left (`leftovers`); removed when dropped, and by
//! `group::stop_all` when sewa exits without dropping it. It does not speak the protocol.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::super::{NamedTensor, Params};
use super::group::{self, Enlisted};
use super::leftovers;
use crate::error::{Error, Result};
use sewa_checkpoint::{Checkpoint, DType};

/// Bytes of a member read at a time when copying it.
const CHUNK: usize = 1 << 20;

/// The staging directory and its byte counts.
pub struct Staging {
    dir: tempfile::TempDir,
    /// Bytes sewa wrote into the directory (candidates, member copies).
    pub written: u64,
    /// Bytes sewa read back from it (gradients).
    pub read: u64,
    /// Bytes of member copies it holds now (candidates are deleted after each request).
    pub held: u64,
}

impl Drop for Staging {
    fn drop(&mut self) {
        group::discharge_dir(self.dir.path()); // `dir` removes itself next
    }
}

impl Staging {
    /// A private directory inside `[objective] staging_dir` when given, else in memory when
    /// /dev/shm is usable, else in the temp dir.
    /// Its path is absolute: the evaluator, in another working directory, is sent paths in it.
    /// Stale directories a killed sewa left beside it are removed.
    pub fn new(configured: Option<&Path>) -> Result<Staging> {
        let (parent, dir) = match configured {
            Some(d) => {
                let d = std::path::absolute(d).map_err(|e| Error::io(d, e))?;
                let dir = make_in(&d).map_err(|e| Error::io(&d, e))?;
                (d, dir)
            }
            None => match make_in(Path::new("/dev/shm")) {
                Ok(dir) => (PathBuf::from("/dev/shm"), dir),
                Err(_) => {
                    let tmp = std::path::absolute(std::env::temp_dir())
                        .unwrap_or_else(|_| std::env::temp_dir());
                    let dir = make_in(&tmp).map_err(|e| Error::io(&tmp, e))?;
                    (tmp, dir)
                }
            },
        };
        let marker = dir.path().join(leftovers::MARKER);
        std::fs::write(&marker, leftovers::marker()).map_err(|e| Error::io(&marker, e))?;
        for (path, bytes) in leftovers::clean(&parent, dir.path()) {
            tracing::info!(dir = %path.display(), bytes,
                "removed a staging directory left by a sewa that is no longer running");
        }
        Ok(Staging { dir, written: 0, read: 0, held: 0 })
    }

    /// Refuse to write `bytes` (`what`) into a staging filesystem that cannot hold them: a
    /// full /dev/shm fails the write half-way, or takes memory the trainer needs. Checked with
    /// `statvfs` (space an unprivileged writer may use) before every file sewa stages.
    pub fn ensure_room(&self, bytes: u64, what: &str) -> Result<()> {
        let dir = self.dir.path();
        let Ok(st) = rustix::fs::statvfs(dir) else { return Ok(()) }; // unknown: let the write say
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free >= bytes {
            return Ok(());
        }
        let msg = format!(
            "staging needs {bytes} bytes for {what} but its filesystem has {free} free; set \
             [objective] staging_dir to a directory on a filesystem with room, or use an \
             evaluator speaking protocol 2 (mixing weights, no per-request files)"
        );
        Err(Error::io(dir, std::io::Error::new(std::io::ErrorKind::StorageFull, msg)))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write a candidate as safetensors in `dtype` (f32, what every client loads, or the
    /// members' bf16/f16 for an evaluator that said it reads it), when the staging filesystem
    /// has room for it and for the gradient the evaluator writes back (up to f64).
    pub fn write_params(&mut self, params: &Params, path: &Path, dtype: DType) -> Result<()> {
        let numel: u64 = params.iter().map(|t| t.data.len() as u64).sum();
        let need = numel * (dtype.size() as u64 + 8);
        self.ensure_room(need, &format!("a candidate ({dtype:?}) and its gradient (up to f64)"))?;
        let narrowed: Vec<Vec<u8>> =
            params.iter().map(|t| sewa_checkpoint::dtype::encode_f32s(dtype, &t.data)).collect();
        let views = params.iter().zip(&narrowed).map(|(t, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                dtype.to_safetensors(),
                t.shape.clone(),
                bytes,
            );
            (t.name.as_str(), view.expect("shape matches data by construction"))
        });
        safetensors::serialize_to_file(views, None, path).map_err(|e| {
            Error::io(path, std::io::Error::other(format!("cannot write candidate: {e}")))
        })?;
        self.written += std::fs::metadata(path).map_or(0, |m| m.len());
        Ok(())
    }

    /// Copy every tensor of `ckpt` (sewa's names, stored dtypes) into one safetensors file at
    /// `path`, streamed tensor by tensor from the files sewa holds open.
    pub fn write_member(&mut self, ckpt: &Checkpoint, path: &Path) -> Result<()> {
        self.copy_member(ckpt, path)?;
        let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
        self.held += bytes;
        tracing::info!(member = %ckpt.path().display(), bytes, staging_holds = self.held,
            dir = %self.dir.path().display(),
            "staged a safetensors copy for the evaluator (under /dev/shm this is memory)");
        Ok(())
    }

    /// Delete a member copy made by `write_member`.
    pub fn remove_member(&mut self, path: &Path) {
        let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
        if std::fs::remove_file(path).is_ok() {
            self.held = self.held.saturating_sub(bytes);
        }
    }

    fn copy_member(&mut self, ckpt: &Checkpoint, path: &Path) -> Result<()> {
        self.ensure_room(ckpt.total_bytes(), &format!("a copy of {}", ckpt.path().display()))?;
        let fail = |e: std::io::Error| {
            let what = format!("cannot write a copy for the evaluator: {e}");
            sewa_checkpoint::Error::io(path, std::io::Error::new(e.kind(), what))
        };
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for t in ckpt.tensors() {
            let dtype = format!("{:?}", t.dtype.to_safetensors());
            let end = offset + t.nbytes();
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut head = serde_json::to_vec(&header).expect("json values serialise");
        head.resize(head.len().div_ceil(8) * 8, b' ');
        let mut out = BufWriter::new(std::fs::File::create(path).map_err(fail)?);
        out.write_all(&(head.len() as u64).to_le_bytes()).map_err(fail)?;
        out.write_all(&head).map_err(fail)?;
        let mut buf = Vec::new();
        for t in ckpt.tensors() {
            ckpt.for_each_chunk(&t.name, CHUNK, &mut buf, |_, bytes| {
                out.write_all(bytes).map_err(fail)
            })?;
        }
        out.flush().map_err(fail)?;
        self.written += 8 + head.len() as u64 + offset as u64;
        Ok(())
    }

    /// Read a gradient file and check it covers every parameter with the right shape. The
    /// file is read into memory (never mapped: the evaluator may still be writing it) and only
    /// up to the largest size a gradient of `params` can have, so a runaway evaluator cannot
    /// make us allocate more.
    pub fn read_grad(&mut self, path: &Path, params: &Params) -> Result<Params> {
        // f64 elements at most, plus the safetensors length prefix and its 100 MB header cap.
        let numel: u64 = params.iter().map(|p| p.data.len() as u64).sum();
        let limit = numel.saturating_mul(8).saturating_add(8 + 100_000_000);
        let mut bytes = Vec::new();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
        self.read += bytes.len() as u64;
        if bytes.len() as u64 > limit {
            return Err(Error::Evaluator(format!(
                "{}: gradient file is larger than any gradient of these {numel} parameters",
                path.display()
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::Evaluator(format!("{}: gradient file unreadable: {e}", path.display()))
        })?;
        params.iter().map(|p| grad_tensor(&st, p, path)).collect()
    }
}

fn grad_tensor(st: &safetensors::SafeTensors, p: &NamedTensor, path: &Path) -> Result<NamedTensor> {
    let bad = |msg: String| Error::Evaluator(format!("{}: {msg}", path.display()));
    let view = st.tensor(&p.name).map_err(|_| bad(format!("gradient has no tensor {}", p.name)))?;
    if view.shape() != p.shape.as_slice() {
        return Err(bad(format!(
            "gradient of {} has shape {:?}, weights have {:?}",
            p.name,
            view.shape(),
            p.shape
        )));
    }
    let data = DType::from_safetensors(view.dtype())
        .and_then(|d| sewa_checkpoint::dtype::to_f32_vec(d, view.data()))
        .ok_or_else(|| bad(format!("gradient of {} is {:?}, not float", p.name, view.dtype())))?;
    if sewa_checkpoint::dtype::first_non_finite(bytemuck::cast_slice(&data), DType::F32).is_some() {
        return Err(bad(format!("gradient of {} has NaN or Inf", p.name)));
    }
    Ok(NamedTensor { name: p.name.clone(), shape: p.shape.clone(), data })
}

/// A new `sewa-eval-<pid>-<random>` directory in `parent`, enlisted for `group::stop_all`.
fn make_in(parent: &Path) -> std::io::Result<tempfile::TempDir> {
    let prefix = format!("{}{}-", leftovers::PREFIX, std::process::id());
    let made = group::enlist(
        || tempfile::Builder::new().prefix(&prefix).tempdir_in(parent),
        |r| match r {
            Ok(d) => Enlisted::Dir(d.path().to_path_buf()),
            Err(_) => Enlisted::Nothing,
        },
    );
    made.unwrap_or_else(|| Err(std::io::Error::other("sewa is stopping")))
}
