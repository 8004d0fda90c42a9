//! The Hugging Face side files of a directory output (`config.json`, tokenizer files, ...),
//! held in memory: read once from a checkpoint directory, written into every publication from
//! the bytes held. `sewa watch` reads them when a member is admitted, so a publication never
//! depends on a directory the trainer may have rotated away since (`save_total_limit`).
//! Files are opened the way checkpoint files are (`checkpoint::open_in_dir`): a side file that
//! is a symlink (`tokenizer.json -> /etc/shadow`), FIFO or other non-regular file is refused,
//! never followed or read. Sizes are capped per file and in total.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{SIDE_FILES, write_new};
use crate::error::{Error, Result, WithPath};
use crate::manifest::Manifest;
use sewa_checkpoint as checkpoint;

/// The largest side file read (the largest real tokenizer files are a few tens of MB).
pub const MAX_SIDE_FILE: u64 = 64 << 20;
/// The most side-file bytes read from one directory.
pub const MAX_SIDE_TOTAL: u64 = 128 << 20;

/// Copied into the output as well when it is a PEFT adapter directory (never otherwise:
/// transformers takes a model directory holding one for an adapter).
const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The side files of one checkpoint directory, as read.
#[derive(Clone, Debug, PartialEq)]
pub struct SideFiles {
    /// The directory they were read from (named in the manifest).
    pub source: PathBuf,
    /// It was a PEFT adapter directory (the output is one too, with its `adapter_config.json`).
    pub adapter: bool,
    /// (name, bytes), in `SIDE_FILES` order. Bytes are shared between members holding the same.
    pub files: Vec<(String, Arc<[u8]>)>,
}

impl SideFiles {
    /// Read the side files `dir` has (absent ones are skipped; anything but a regular file
    /// under a side file's name is an error naming it, as is a file over the caps).
    pub fn read(dir: &Path) -> Result<SideFiles> {
        let adapter = checkpoint::is_adapter_dir(dir);
        let extra: &[&str] = if adapter { &[ADAPTER_CONFIG] } else { &[] };
        let mut files = Vec::new();
        let mut total = 0u64;
        for name in SIDE_FILES.iter().chain(extra) {
            if !checkpoint::has_file(dir, Path::new(name))? {
                continue;
            }
            let path = dir.join(name);
            let file = checkpoint::open_in_dir(dir, Path::new(name))?;
            let bytes = checkpoint::read_capped(&path, file, MAX_SIDE_FILE)?;
            total += bytes.len() as u64;
            if total > MAX_SIDE_TOTAL {
                let msg = format!(
                    "side files (config, tokenizer) of this directory exceed {MAX_SIDE_TOTAL} \
                     bytes together: too large to keep for publication (corrupt?)"
                );
                return Err(Error::bad_input(dir, msg));
            }
            files.push((name.to_string(), Arc::from(bytes)));
        }
        Ok(SideFiles { source: crate::manifest::absolute(dir), adapter, files })
    }

    /// Hold the bytes of any file equal to one in `other` through `other`'s buffer, so members
    /// of one run (whose config and tokenizer rarely change) keep one copy between them.
    pub fn share_with(&mut self, other: &SideFiles) {
        for (name, bytes) in &mut self.files {
            let same = other.files.iter().find(|(n, b)| n == name && b[..] == bytes[..]);
            if let Some((_, b)) = same {
                *bytes = Arc::clone(b);
            }
        }
    }

    /// Bytes held (counting shared buffers once per holder).
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Write them into the staged output directory `dir`; record them in `manifest`.
    pub(super) fn write_into(&self, dir: &Path, manifest: &mut Manifest) -> Result<()> {
        for (name, bytes) in &self.files {
            write_new(&dir.join(name), |f, p| f.write_all(bytes).with_path(p))?;
            manifest.side_files.push(name.clone());
        }
        manifest.side_source = Some(self.source.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_is_there_refuses_links_and_shares_equal_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("config.json"), b"{\"model_type\": \"toy\"}").unwrap();
            std::fs::write(d.join("optimizer.pt"), b"not a side file").unwrap();
        }
        std::fs::write(b.join("tokenizer.json"), b"{}").unwrap();
        let sa = SideFiles::read(&a).unwrap();
        let mut sb = SideFiles::read(&b).unwrap();
        let names: Vec<&str> = sb.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["config.json", "tokenizer.json"]);
        assert!(!sb.adapter);
        sb.share_with(&sa);
        assert!(Arc::ptr_eq(&sa.files[0].1, &sb.files[0].1), "one copy of an equal config");
        // The bytes stay when the directory goes (trainer rotation).
        std::fs::remove_dir_all(&b).unwrap();
        assert_eq!(&sb.files[1].1[..], b"{}");
        // A symlinked side file is refused, naming it.
        std::os::unix::fs::symlink("/etc/passwd", a.join("tokenizer.json")).unwrap();
        let e = SideFiles::read(&a).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn a_side_file_over_the_cap_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(tmp.path().join("tokenizer.json")).unwrap();
        f.set_len(MAX_SIDE_FILE + 1).unwrap(); // sparse: costs no disk
        let e = SideFiles::read(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("larger than"), "{e}");
    }
}
