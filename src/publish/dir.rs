//! A directory output (the Hugging Face layout): the model file or shards with their index,
//! the side files of the newest input (config, tokenizer), and the manifest, all staged in a
//! hidden temp directory and swapped in at once.

use std::fs::{self, File, Permissions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use super::{
    SIDE_FILES, TensorWriter, finish, hidden_prefix, parent_dir, swap_in, sync_dir, write_new,
};
use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result, WithPath};
use crate::layout::FileLayout;
use crate::manifest::{FileRecord, Manifest};

/// What goes into a directory output.
pub(super) struct DirOutput<'l> {
    pub(super) layouts: &'l [FileLayout],
    /// `model.safetensors.index.json` when sharded.
    pub(super) index: Option<Vec<u8>>,
    pub(super) side_dir: Option<&'l Path>,
    /// A PEFT adapter directory (`adapter_config.json` copied too).
    pub(super) adapter: bool,
    pub(super) clock: Instant,
}

/// Copied into the output as well when it is a PEFT adapter directory (never otherwise:
/// transformers takes a model directory holding one for an adapter).
const ADAPTER_CONFIG: &str = "adapter_config.json";

impl DirOutput<'_> {
    pub(super) fn publish(
        &self,
        writer: &mut TensorWriter<'_>,
        out: &Path,
        manifest: &mut Manifest,
    ) -> Result<()> {
        let parent = parent_dir(out);
        let tmp = tempfile::Builder::new()
            .prefix(&hidden_prefix(out))
            .suffix(".sewa-tmp")
            .tempdir_in(parent)
            .with_path(parent)?;
        let dir = tmp.path();
        fs::set_permissions(dir, Permissions::from_mode(0o755)).with_path(dir)?;
        for layout in self.layouts {
            write_new(&dir.join(&layout.name), |f, p| writer.write(f, p, layout))?;
            manifest.files.push(FileRecord { name: (&layout.name).into(), bytes: layout.size });
        }
        if let Some(index) = &self.index {
            let name = "model.safetensors.index.json";
            write_new(&dir.join(name), |f, p| f.write_all(index).with_path(p))?;
            manifest.files.push(FileRecord { name: name.into(), bytes: index.len() as u64 });
        }
        if let Some(src) = self.side_dir {
            let extra: &[&str] = if self.adapter { &[ADAPTER_CONFIG] } else { &[] };
            copy_side_files(src, extra, dir, manifest)?;
        }
        manifest.layout = if self.adapter { "adapter" } else { "dir" }.into();
        finish(manifest, self.clock);
        let json = manifest.to_json()?;
        write_new(&dir.join("manifest.json"), |f, p| f.write_all(&json).with_path(p))?;
        sync_dir(dir)?;
        swap_in(tmp, out)
    }
}

/// Side directory of the newest input (highest step, else the last given) that has one.
pub fn newest_side_dir<'c>(inputs: &[&'c Checkpoint]) -> Option<&'c Path> {
    (inputs.iter().enumerate())
        .filter(|(_, c)| c.side_dir().is_some())
        .max_by_key(|(i, c)| (c.step(), *i))
        .and_then(|(_, c)| c.side_dir())
}

/// Copy the HF side files that `src` has into `dir`. They are opened the way checkpoint files
/// are (`checkpoint::open_in_dir`): a side file that is a symlink (`tokenizer.json ->
/// /etc/shadow`), FIFO or other non-regular file is refused, never followed or copied.
fn copy_side_files(src: &Path, extra: &[&str], dir: &Path, manifest: &mut Manifest) -> Result<()> {
    for name in SIDE_FILES.iter().chain(extra) {
        if !checkpoint::has_file(src, Path::new(name))? {
            continue;
        }
        let from = checkpoint::open_in_dir(src, Path::new(name))?;
        write_new(&dir.join(name), |to, to_path| copy_to(&src.join(name), from, to, to_path))?;
        manifest.side_files.push(name.to_string());
    }
    manifest.side_source = Some(crate::manifest::absolute(src));
    Ok(())
}

/// Copy an input file into an output file; read errors are about the input, write errors
/// about the output.
fn copy_to(from_path: &Path, mut from: File, to: &mut File, to_path: &Path) -> Result<()> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = from.read(&mut buf).map_err(|e| Error::bad_input(from_path, e.to_string()))?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n]).with_path(to_path)?;
    }
}
