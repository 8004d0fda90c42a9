//! Handing the running average to the publisher, and reading back what was published last
//! (restart: the window is rebuilt from the directory, the published selection from its
//! manifest). This module owns the manifest fields the daemon adds, not the publishing itself.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::accumulate::OutTensor;
use crate::config::Config;
use crate::error::{Error, Result, WithPath};

/// What the last manifest says was published.
#[derive(Clone, Debug, Default)]
pub struct LastPublished {
    /// `(path, weight)` of every input with a non-zero weight.
    pub inputs: Vec<(PathBuf, f64)>,
    pub loss: Option<f64>,
}

impl LastPublished {
    /// True when `inputs` equals this publication (same paths, same weights).
    pub fn same_as(&self, inputs: &[(PathBuf, f64)]) -> bool {
        self.inputs.len() == inputs.len()
            && self.inputs.iter().zip(inputs).all(|(a, b)| a.0 == b.0 && (a.1 - b.1).abs() < 1e-9)
    }
}

/// Read the manifest of the published output, if there is a readable one.
pub fn read_last(cfg: &Config) -> Option<LastPublished> {
    let text = std::fs::read(cfg.manifest_path()).ok()?;
    let m: Value = serde_json::from_slice(&text).ok()?;
    let inputs = m.get("inputs")?.as_array()?;
    let inputs = inputs
        .iter()
        .filter_map(|i| {
            let path = PathBuf::from(i.get("path")?.as_str()?);
            let w = i.get("weight")?.as_f64()?;
            (w > 0.0).then_some((path, w))
        })
        .collect();
    let loss = m.pointer("/selection/loss").and_then(Value::as_f64);
    Some(LastPublished { inputs, loss })
}

/// Publish `tensors` at `[publish] out` and its manifest, both atomically, manifest last.
/// Returns the manifest path.
pub fn publish(cfg: &Config, tensors: &[OutTensor], manifest: &Value) -> Result<PathBuf> {
    let out = &cfg.publish.out;
    let file = if out.extension().is_some_and(|e| e == "safetensors") {
        out.clone()
    } else {
        out.join("model.safetensors")
    };
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let v =
                safetensors::tensor::TensorView::new(dtype.to_safetensors(), shape.clone(), bytes)
                    .map_err(|e| Error::Internal(format!("tensor {name}: {e}")))?;
            Ok((name.clone(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([(
        "sewa".to_string(),
        json!({ "selection": manifest.get("selection"), "published_at": manifest.get("published_at") })
            .to_string(),
    )]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Internal(format!("serialising the average: {e}")))?;
    write_durable(&file, &bytes)?;
    let manifest_path = cfg.manifest_path();
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| Error::Internal(e.to_string()))?;
    write_durable(&manifest_path, &text)?;
    Ok(manifest_path)
}

/// Temp file in the destination directory, fsync, rename over, fsync the directory, mode 0644.
fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_path(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-sewa").tempfile_in(dir).with_path(dir)?;
    tmp.write_all(bytes).with_path(tmp.path())?;
    tmp.as_file().sync_all().with_path(tmp.path())?;
    let perms = std::fs::Permissions::from_mode(0o644);
    tmp.as_file().set_permissions(perms).with_path(tmp.path())?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_path(dir)?;
    Ok(())
}
