//! A directory output (the Hugging Face layout): the model file or shards with their index,
//! the side files (config, tokenizer) from the bytes held for them (`side.rs`), and the
//! manifest, all staged in a hidden temp directory and swapped in at once.

use std::fs::{self, Permissions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use super::side::SideFiles;
use super::{TensorWriter, finish, hidden_prefix, parent_dir, swap_in, sync_dir, write_new};
use crate::error::{Result, WithPath};
use crate::layout::FileLayout;
use crate::manifest::{FileRecord, Manifest, OutputLayout};
use sewa_checkpoint::Checkpoint;

/// What goes into a directory output.
pub(super) struct DirOutput<'l> {
    pub(super) layouts: &'l [FileLayout],
    /// `model.safetensors.index.json` when sharded.
    pub(super) index: Option<Vec<u8>>,
    pub(super) side: Option<&'l SideFiles>,
    pub(super) clock: Instant,
}

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
        if let Some(side) = self.side {
            side.write_into(dir, manifest)?;
        }
        let adapter = self.side.is_some_and(|s| s.adapter);
        manifest.layout = if adapter { OutputLayout::Adapter } else { OutputLayout::Dir }.into();
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
