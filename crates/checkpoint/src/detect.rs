//! Which format handles a path, decided once for both `quick_check` and `Checkpoint::open`:
//! a directory or a file opened once (regular files only, never through a symlink), then each
//! format of `format::FORMATS` asked in turn. The formats themselves live in `format/`; this
//! module only dispatches.

use std::path::{Path, PathBuf};

use super::format::magic::sniff;
use super::format::{FORMATS, Found, Probe, is_weight_file};
use super::identity::Identity;
use super::storage::Loaded;
use super::{InputIo, OpenOptions, files};
use crate::error::{Error, Result};

/// A path whose format is known: check it, then open it, without detecting it again.
pub struct Detected {
    path: PathBuf,
    opts: OpenOptions,
    /// The path's identity before detection: `open` refuses a path changed meanwhile.
    before: Identity,
    found: Box<dyn Found>,
}

impl std::fmt::Debug for Detected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detected").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Detect the format of `path`. A legacy torch pickle, or a file named as a torch file without
/// a zip header, is refused here with an error saying so.
pub fn detect(path: &Path, opts: &OpenOptions) -> Result<Detected> {
    let before = Identity::of(path)?;
    let meta = std::fs::metadata(path).input(path)?;
    let file = if meta.is_dir() {
        None
    } else {
        let file = files::open_regular(path)?;
        let magic = sniff(path, &file)?;
        Some((file, magic))
    };
    let probe = Probe { path, opts, file };
    for format in FORMATS {
        if let Some(found) = (format.detect)(&probe)? {
            return Ok(Detected { path: path.to_path_buf(), opts: opts.clone(), before, found });
        }
    }
    Err(Error::Internal(format!("{}: no format claimed it", path.display())))
}

impl Identity {
    /// Identity of a file or checkpoint directory (follows symlinks, as opening does); for a
    /// directory, of the files any format takes for weights (see `FormatSpec::weight_file`).
    pub fn of(path: &Path) -> Result<Identity> {
        Identity::of_with(path, is_weight_file)
    }
}

impl Detected {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Is the checkpoint complete enough to open? Cheap, without reading tensor data:
    /// safetensors header and length, zip end-of-central-directory record for torch files,
    /// HF directory marker and shard completeness; opening repeats these checks and more.
    /// `marker` is the file an HF checkpoint directory must contain (the Trainer writes
    /// `trainer_state.json` last); empty = no marker. DeepSpeed and PEFT directories have
    /// their own completion rules (see their modules). Never call this on temp names (see
    /// `is_temp_name`): a preallocated temp file can pass.
    pub fn quick_check(&self, marker: &str) -> Result<()> {
        self.found.quick_check(marker)
    }

    /// Read it (see `Checkpoint::open`).
    pub fn open(self) -> Result<super::Checkpoint> {
        let Detected { path, opts, before, found } = self;
        let loaded: Loaded = found.open()?;
        if Identity::of(&path)? != before {
            return Err(Error::bad_input(
                &path,
                "changed while being opened (still being written?); it will be retried",
            ));
        }
        super::Checkpoint::from_loaded(&path, loaded, before, &opts)
    }
}

/// [`Detected::quick_check`] of `path` for the default options.
pub fn quick_check(path: &Path, marker: &str) -> Result<()> {
    quick_check_with(path, marker, &OpenOptions::default())
}

/// [`Detected::quick_check`] of `path` for the weights `opts` asks for (DeepSpeed fp32
/// masters need every rank's optimizer states).
pub fn quick_check_with(path: &Path, marker: &str, opts: &OpenOptions) -> Result<()> {
    detect(path, opts)?.quick_check(marker)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-tensor safetensors file, written by hand (`w`: f32 of `values`).
    fn safetensors(values: &[f32]) -> Vec<u8> {
        let n = values.len() * 4;
        let head = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{n}]}}}}"#,
            values.len()
        );
        let mut out = (head.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(head.as_bytes());
        values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        out
    }

    /// Detected once: the check and the open read the file that was detected, and a path
    /// renamed over in between (a trainer's next save, a half-written file) is refused as
    /// changed, to be retried, not read as whatever the new file is.
    #[test]
    fn the_check_and_the_open_read_the_file_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("step_1.safetensors");
        std::fs::write(&path, safetensors(&[1.0, 2.0])).unwrap();
        let found = detect(&path, &OpenOptions::default()).unwrap();
        let torn = dir.path().join("tmp");
        std::fs::write(&torn, &safetensors(&[3.0, 4.0])[..20]).unwrap();
        std::fs::rename(&torn, &path).unwrap();
        // The detected file is complete, whatever the path now holds.
        found.quick_check("").unwrap();
        assert!(quick_check(&path, "").is_err(), "the new file is torn");
        let e = found.open().err().expect("a path renamed over is refused").to_string();
        assert!(e.contains("changed while being opened"), "{e}");
        // Undisturbed, the same steps read it.
        std::fs::write(&path, safetensors(&[5.0, 6.0])).unwrap();
        let found = detect(&path, &OpenOptions::default()).unwrap();
        found.quick_check("").unwrap();
        let ckpt = found.open().unwrap();
        assert_eq!(&ckpt.data("w").unwrap()[..4], &5.0f32.to_le_bytes());
    }
}
