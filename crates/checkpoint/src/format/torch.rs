//! torch zip pickles (`torch.save`: `.pt`, `.pth`, `.bin`) and Lightning `.ckpt` files. The
//! pickle is decoded by our own `unpickle` into plain values — no Python code runs, so
//! untrusted files are safe — and we walk those values to index each tensor's
//! storage entry, dtype, offset, shape and strides (with errors naming the tensor; which
//! entry holds the state dict is `torch/objects.rs`). Tensor bytes are read on demand from the
//! zip with positioned reads on the file opened at open time (`store::PickleStore`; never
//! mapped: torch.save rewrites files in place). Legacy (non-zip) files are refused.
//! A zip is read through a [`Window`] of its file, so the same reader serves a whole `.pt`
//! file and a `torch.save` stream embedded in a larger file (a DCP chunk, `dcp`), in place.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

mod objects;
mod store;
mod window;

use super::magic::{Magic, sniff};
use super::{Claim, FormatSpec, Found, Probe, no_weight_file};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::storage::Loaded;
use crate::strided::{is_non_overlapping, numel, view_span};
use crate::unpickle::{self, Pickle, Value};
use crate::{InputIo, TensorMeta};
use objects::{
    RawTensor, dtype_of_storage, model_checkpoint_score, no_state_dict, state_dict,
    step_of_entries, tensor_of,
};
pub(crate) use store::{PickleStore, PickleTensor};
pub(crate) use window::Window;

const RESAVE: &str = "re-save it with torch.save(obj, path, _use_new_zipfile_serialization=True) \
                      or convert it to safetensors";

pub(crate) fn has_torch_extension(name: &str) -> bool {
    TORCH_ENDINGS.iter().any(|e| name.ends_with(e))
}

const TORCH_ENDINGS: &[&str] = &[".pt", ".pth", ".bin", ".ckpt"];

pub(crate) fn legacy_error(path: &Path) -> Error {
    Error::bad_input(
        path,
        format!("legacy (non-zip) torch serialization is not supported: {RESAVE}"),
    )
}

pub(crate) fn not_zip_error(path: &Path) -> Error {
    Error::bad_input(
        path,
        "not a torch zip file (no zip header): zero-filled, truncated or not written by \
         torch.save",
    )
}

/// The score Lightning's `ModelCheckpoint` callback recorded when it saved this file
/// (`current_score`, a 0-d tensor or a float) and the name of the monitored quantity.
/// Best effort: anything unexpected means no metric, never an error.
fn lightning_score(
    path: &Path,
    pk: &Pickle,
    entries: &Entries,
    store: &PickleStore,
) -> Option<(String, f64)> {
    let (monitor, score) = model_checkpoint_score(pk)?;
    if let Value::Float(f) = pk.get(score) {
        return Some((monitor, *f));
    }
    let raw = tensor_of(path, pk, "current_score", score).ok()??;
    let t = locate(path, "current_score", raw, entries).ok()?;
    if numel(&t.shape)? != 1 {
        return None;
    }
    let b = store.read_tensor(&t, 1).ok()?;
    let v = crate::dtype::decode_f64(t.dtype, &b)?;
    Some((monitor, v))
}

/// Cheap completeness check of a torch file (opened by `files` from `path`, named as a torch
/// file): a zip (not a legacy or zero-filled file) whose end record is present.
pub(crate) fn quick_check(path: &Path, file: File) -> Result<()> {
    match sniff(path, &file)? {
        Magic::Zip => check_zip(path, file),
        Magic::LegacyPickle => Err(legacy_error(path)),
        Magic::Other => Err(not_zip_error(path)),
    }
}

/// The zip's central directory (end record) is present and the archive holds a `data.pkl`.
/// A half-written torch.save file has no end record.
pub(crate) fn check_zip(path: &Path, file: File) -> Result<()> {
    let window = Window::whole(path, &file)?;
    let zip = zip::ZipArchive::new(BufReader::new(window)).map_err(|e| zip_error(path, e))?;
    find_pickle(path, &zip).map(|_| ())
}

fn zip_error(path: &Path, e: zip::result::ZipError) -> Error {
    Error::bad_input(
        path,
        format!(
            "incomplete or corrupt torch zip ({e}): still being written by torch.save, or \
             truncated"
        ),
    )
}

/// Name of the `…/data.pkl` entry.
fn find_pickle<R: Read + std::io::Seek>(path: &Path, zip: &zip::ZipArchive<R>) -> Result<String> {
    zip.file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.as_ref() == "data.pkl" || n.ends_with("/data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| Error::bad_input(path, "zip file has no data.pkl: not a torch.save file"))
}

/// Open a torch zip pickle (opened by `files` from `path`) and index its state dict's tensors
/// (those under the top-level entry `state_key` when given).
pub(crate) fn open(path: &Path, file: File, state_key: Option<&str>) -> Result<Loaded> {
    let identity = Identity::from_metadata(&file.metadata().input(path)?);
    let (pk, entries) = read_archive(path, Window::whole(path, &file)?)?;
    let (dict, format, mut metadata) = state_dict(path, &pk, state_key)?;
    let mut metas = Vec::new();
    let mut tensors = HashMap::new();
    for (key, value) in dict {
        let Some(name) = pk.str(key) else { continue };
        let name = name.to_string();
        let Some(raw) = tensor_of(path, &pk, &name, value)? else { continue };
        let t = locate(path, &name, raw, &entries)?;
        metas.push(TensorMeta { name: name.clone(), dtype: t.dtype, shape: t.shape.clone() });
        tensors.insert(name, t);
    }
    if metas.is_empty() {
        return Err(match state_key {
            Some(key) => Error::bad_input(path, format!("state key {key:?} holds no tensors")),
            None => no_state_dict(path, &pk),
        });
    }
    let step = step_of_entries(&metadata);
    let store = PickleStore::new(path, file, identity, tensors);
    if let Some((monitor, score)) = lightning_score(path, &pk, &entries, &store) {
        metadata.insert("metric".to_string(), score.to_string());
        metadata.insert("metric_name".to_string(), monitor);
    }
    Ok(Loaded { format, tensors: metas, storage: Box::new(store), metadata, step, side_dir: None })
}

/// The decoded `data.pkl` of the torch.save archive in `window`, and where its storages lie.
fn read_archive(path: &Path, window: Window<'_>) -> Result<(Pickle, Entries)> {
    let (base, len) = (window.base(), window.len());
    let mut zip = zip::ZipArchive::new(BufReader::new(window)).map_err(|e| zip_error(path, e))?;
    let pkl = find_pickle(path, &zip)?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    check_byteorder(path, &mut zip, &prefix)?;
    let pk = decode_pickle(path, &mut zip, &pkl, len)?;
    let entries = entry_offsets(path, &mut zip, &prefix, base, len)?;
    Ok((pk, entries))
}

/// The one tensor a `torch.save(tensor)` stream holds, read in place from `window` of the
/// file at `path` (a DCP chunk: `name` is what it is a chunk of, for errors). Its view is
/// checked to lie inside its storage, and the storage inside the window.
pub(crate) fn window_tensor(path: &Path, window: Window<'_>, name: &str) -> Result<PickleTensor> {
    let (pk, entries) = read_archive(path, window)?;
    let raw = tensor_of(path, &pk, name, pk.root)?.ok_or_else(|| {
        Error::bad_input(path, format!("tensor {name}: the stored item is not a tensor"))
    })?;
    locate(path, name, raw, &entries)
}

type Zip<'f> = zip::ZipArchive<BufReader<Window<'f>>>;

/// Storage key → (absolute data offset, stored length); `None` for compressed entries.
type Entries = HashMap<String, Option<(u64, u64)>>;

/// A whole (small) entry. Its declared size is checked against `cap` before reading: sizes in
/// the central directory are numbers from the file, not facts.
fn read_entry(path: &Path, zip: &mut Zip<'_>, name: &str, cap: u64) -> Result<Vec<u8>> {
    let entry = zip.by_name(name).map_err(|e| zip_error(path, e))?;
    if entry.size() > cap {
        return Err(Error::bad_input(
            path,
            format!(
                "zip entry {name} claims {} bytes, more than the {cap} it can hold",
                entry.size()
            ),
        ));
    }
    let mut buf = Vec::new();
    entry.take(cap).read_to_end(&mut buf).input(path)?;
    Ok(buf)
}

fn check_byteorder(path: &Path, zip: &mut Zip<'_>, prefix: &str) -> Result<()> {
    let name = format!("{prefix}byteorder");
    if zip.index_for_name(&name).is_none() {
        return Ok(()); // older torch versions wrote no byteorder record: little-endian
    }
    let order = read_entry(path, zip, &name, 16)?;
    if order.trim_ascii() != b"little" {
        return Err(Error::bad_input(
            path,
            "big-endian torch file: re-save it on a little-endian machine",
        ));
    }
    Ok(())
}

fn decode_pickle(path: &Path, zip: &mut Zip<'_>, pkl: &str, file_len: u64) -> Result<Pickle> {
    let bytes = read_entry(path, zip, pkl, file_len)?;
    unpickle::load(&bytes).map_err(|e| {
        Error::bad_input(path, format!("cannot decode the pickle in {pkl}: {e}; {RESAVE}"))
    })
}

/// Zip entry name → (absolute data offset, stored length), for uncompressed entries;
/// compressed entries map to `None` (torch never compresses; a re-zipped file might).
/// Every stored entry must lie inside the archive's window (`base`, `len` bytes) of the
/// file: later reads are sized from these lengths.
fn entry_offsets(
    path: &Path,
    zip: &mut Zip<'_>,
    prefix: &str,
    base: u64,
    len: u64,
) -> Result<Entries> {
    let mut out = HashMap::new();
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| zip_error(path, e))?;
        let name = entry.name().map_err(|e| zip_error(path, e))?;
        let Some(key) = name.strip_prefix(prefix).and_then(|n| n.strip_prefix("data/")) else {
            continue;
        };
        let key = key.to_string();
        let stored = entry.compression() == zip::CompressionMethod::Stored;
        let loc = entry.data_start().filter(|_| stored).map(|s| (s, entry.size()));
        if let Some((start, size)) = loc
            && start.checked_add(size).is_none_or(|end| end > len)
        {
            let within = match base {
                0 => format!("the {len}-byte file"),
                _ => format!("the {len}-byte torch.save item at byte {base}"),
            };
            return Err(Error::bad_input(
                path,
                format!(
                    "storage data/{key} claims {size} bytes at offset {start}, past the end of \
                     {within}: truncated or corrupt"
                ),
            ));
        }
        out.insert(key, loc.map(|(start, size)| (base + start, size)));
    }
    Ok(out)
}

/// Resolve a tensor's storage in the zip and check its view stays inside the storage.
fn locate(path: &Path, name: &str, raw: RawTensor, entries: &Entries) -> Result<PickleTensor> {
    let bad = |what: String| Error::bad_input(path, format!("tensor {name}: {what}"));
    let dtype = dtype_of_storage(&raw.storage_class).ok_or_else(|| {
        bad(format!(
            "storage type {} is not supported (supported: Float, Double, Half, BFloat16, Long, \
             Int, Short, Char, Byte, Bool); convert the tensor (e.g. .float()) before saving",
            raw.storage_class
        ))
    })?;
    if raw.shape.len() != raw.stride.len() {
        return Err(bad("shape and stride lengths differ".into()));
    }
    let (data_start, storage_len) = match entries.get(&raw.key) {
        None => return Err(bad(format!("storage data/{} is missing from the zip", raw.key))),
        Some(None) => return Err(bad(format!("storage data/{} is compressed; {RESAVE}", raw.key))),
        Some(Some(loc)) => *loc,
    };
    let numel = numel(&raw.shape).ok_or_else(|| bad(format!("shape {:?} overflows", raw.shape)))?;
    if !is_non_overlapping(&raw.shape, &raw.stride) {
        return Err(bad(format!(
            "view (shape {:?}, stride {:?}) repeats storage elements (a broadcast/expanded or \
             overlapping as_strided view); save t.contiguous() instead",
            raw.shape, raw.stride
        )));
    }
    let end = view_span(&raw.shape, &raw.stride).and_then(|s| s.checked_add(raw.offset));
    let need = end.and_then(|e| e.checked_mul(dtype.size()));
    let fits = |e: usize, n: usize| e <= raw.numel && n as u64 <= storage_len;
    if numel > 0 && !matches!((end, need), (Some(e), Some(n)) if fits(e, n)) {
        return Err(bad(format!(
            "view (offset {}, shape {:?}, stride {:?}) reaches past its storage of {} bytes",
            raw.offset, raw.shape, raw.stride, storage_len
        )));
    }
    let span = end.map_or(0, |e| e - raw.offset);
    Ok(PickleTensor {
        data_start,
        dtype,
        offset: raw.offset,
        span,
        shape: raw.shape,
        stride: raw.stride,
    })
}

/// A torch zip whose pickle a caller walks itself (DeepSpeed's model and optimizer states):
/// the decoded pickle, and its tensors located on request with the same checks as `open`.
pub(crate) struct RawZip {
    pub pk: Pickle,
    entries: Entries,
}

impl RawZip {
    /// Decode the pickle of the torch zip `file` (opened by `files` from `path`).
    pub fn open(path: &Path, file: &File) -> Result<RawZip> {
        let (pk, entries) = read_archive(path, Window::whole(path, file)?)?;
        Ok(RawZip { pk, entries })
    }

    /// The tensor `value` describes (`None` if it is no tensor), its view checked to lie in
    /// its storage and the storage in the file.
    pub fn tensor(
        &self,
        path: &Path,
        name: &str,
        value: unpickle::Id,
    ) -> Result<Option<PickleTensor>> {
        match tensor_of(path, &self.pk, name, value)? {
            Some(raw) => locate(path, name, raw, &self.entries).map(Some),
            None => Ok(None),
        }
    }
}

/// A file whose first bytes are a zip's is a torch file; one named as a torch file that is not
/// a zip (a legacy pickle, zero-filled, truncated) is refused here, saying which.
pub(crate) const FORMAT: FormatSpec =
    FormatSpec { detect: claim, weight_file: no_weight_file, endings: TORCH_ENDINGS };

fn claim(probe: &Probe<'_>) -> Claim {
    let Some((file, magic)) = probe.file()? else { return Ok(None) };
    let path = probe.path;
    match magic {
        Magic::Zip => {
            let state_key = probe.opts.state_key.clone();
            Ok(Some(Box::new(FoundTorch { path: path.to_path_buf(), file, state_key })))
        }
        Magic::LegacyPickle => Err(legacy_error(path)),
        Magic::Other if has_torch_extension(&probe.name()) => Err(not_zip_error(path)),
        Magic::Other => Ok(None),
    }
}

struct FoundTorch {
    path: std::path::PathBuf,
    file: File,
    state_key: Option<String>,
}

impl Found for FoundTorch {
    fn quick_check(&self, _marker: &str) -> Result<()> {
        // The zip header was seen: only the end record is left to check.
        check_zip(&self.path, super::dup(&self.path, &self.file)?)
    }

    fn open(self: Box<Self>) -> Result<Loaded> {
        open(&self.path, self.file, self.state_key.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Untrusted files: random corruptions of a real pickle must give errors, never panics
    /// (the zip's CRC would catch most of these first; this drives the decoder directly).
    #[test]
    fn mutated_pickles_never_panic() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lightning.ckpt");
        let file = File::open(&path).unwrap();
        let mut zip = Zip::new(BufReader::new(Window::whole(&path, &file).unwrap())).unwrap();
        let pkl = find_pickle(&path, &zip).unwrap();
        let bytes = read_entry(&path, &mut zip, &pkl, u64::MAX).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (mut decoded, mut failed) = (0, 0);
        for i in 0..3000 {
            let mut b = bytes.clone();
            if i % 3 == 0 {
                b.truncate(rng.random_range(0..b.len()));
            } else {
                for _ in 0..rng.random_range(1..4) {
                    let j = rng.random_range(0..b.len());
                    b[j] = rng.random();
                }
            }
            let Ok(pk) = unpickle::load(&b) else {
                failed += 1;
                continue;
            };
            decoded += 1;
            // The paths taken when no state dict is found, or one is named, must not panic.
            let _ = no_state_dict(&path, &pk);
            let _ = state_dict(&path, &pk, Some("state_dict"));
            if let Ok((items, _, _)) = state_dict(&path, &pk, None) {
                for (k, v) in items {
                    if let Some(name) = pk.str(k) {
                        let _ = tensor_of(&path, &pk, name, v);
                    }
                }
            }
        }
        assert!(decoded > 0 && failed > 0, "decoded {decoded}, failed {failed}");
    }
}
