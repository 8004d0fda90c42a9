//! torch.distributed.checkpoint (DCP) directories, as `dcp.save` / `FileSystemWriter` write
//! them (FSDP, FSDP2, torchtitan `step-N/`, Lightning's sharded `*.ckpt/`, Accelerate
//! `pytorch_model_fsdp_0/`): a `.metadata` pickle (written last, by rename) describing every
//! item, and `__{rank}_{k}.distcp` files holding each tensor chunk as a `torch.save` stream.
//! This module checks a directory against its `.metadata` (every file it names is a regular
//! file inside the directory, at least as long as the ranges it names, ranges of one file
//! disjoint) and picks the model's tensors (`layout`); decoding is `metadata`, reading `store`.

mod layout;
mod metadata;
mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use super::{Claim, FormatSpec, Found, Probe, hf_dir};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::storage::Loaded;
use crate::{DType, Format, InputIo, TensorMeta, files};
pub(crate) use layout::Keys;
use metadata::{Metadata, StorageInfo};
pub(crate) use store::DcpStore;
use store::{DcpChunk, DcpTensor, LazyFile};

/// The file whose presence makes a directory a DCP checkpoint (and a complete one: it is
/// renamed into place after every data file is written).
pub(crate) const METADATA: &str = ".metadata";

/// Largest `.metadata` read. Real files take 120–250 bytes per chunk (its
/// `ChunkStorageMetadata` and `storage_data` entry), so this is 130k–270k chunks: a model of
/// 700 tensors sharded over 64 ranks with two optimizer moments per parameter is ~135k.
/// Decoding a file of torch's structure costs ~21 bytes per byte (0.69 GB peak RSS for 32 MB
/// and 270k chunks, measured); `unpickle`'s budget (32 per byte) and the chunk bound
/// (`metadata::MIN_CHUNK_BYTES`) keep a hostile file at the cap near 1.3 GB at worst. A
/// larger file is refused by its size alone, before it is read (the 180 MB file took
/// 3.7 GB to refuse before).
const METADATA_CAP: u64 = 32 << 20;

/// Where Accelerate (and so the HF Trainer with FSDP's sharded state dict) puts the model
/// inside a checkpoint directory.
const ACCELERATE_MODEL: &str = "pytorch_model_fsdp_0";

/// The DCP checkpoint `dir` is: itself when it holds `.metadata` (a regular file), else its
/// `pytorch_model_fsdp_0/` when that does (`nested`); `None` when neither.
pub(crate) fn find(dir: &Path) -> Result<Option<(std::path::PathBuf, bool)>> {
    if files::has_file(dir, Path::new(METADATA))? {
        return Ok(Some((dir.to_path_buf(), false)));
    }
    let nested = Path::new(ACCELERATE_MODEL).join(METADATA);
    Ok(files::has_file(dir, &nested)?.then(|| (dir.join(ACCELERATE_MODEL), true)))
}

fn read_metadata(dir: &Path) -> Result<Metadata> {
    let path = dir.join(METADATA);
    let bytes =
        files::read_capped(&path, files::open_in_dir(dir, Path::new(METADATA))?, METADATA_CAP)?;
    metadata::decode(&path, &bytes)
}

/// Complete when `.metadata` decodes and every file it references exists (a regular file in
/// the directory) with at least the bytes it references.
pub(crate) fn quick_check(dir: &Path) -> Result<()> {
    let md = read_metadata(dir)?;
    stat_files(dir, md.storage.iter()).map(|_| ())
}

/// Open a DCP directory: decode `.metadata`, pick the model's tensors by the naming `keys`
/// follow (`state_key` names the entry explicitly), and check the files their chunks live in.
/// No data file is held open: `store` opens each the first time one of its chunks is read.
pub(crate) fn open(dir: &Path, state_key: Option<&str>, keys: Keys) -> Result<Loaded> {
    let md = read_metadata(dir)?;
    let mpath = dir.join(METADATA);
    let picked = layout::select(dir, &md, state_key, keys)?;
    let dtypes = (picked.iter().map(|(_, t)| readable(&mpath, t))).collect::<Result<Vec<_>>>()?;
    let used = picked.iter().flat_map(|(_, t)| t.chunks.iter().map(|c| &c.storage));
    let lazies = stat_files(dir, used)?;
    let index: HashMap<&str, usize> =
        lazies.iter().enumerate().map(|(i, f)| (f.rel.as_str(), i)).collect();
    let mut metas = Vec::with_capacity(picked.len());
    let mut tensors = HashMap::with_capacity(picked.len());
    for ((name, t), dtype) in picked.into_iter().zip(dtypes) {
        let chunks = t.chunks.iter().map(|c| chunk(&mpath, t, c, &index, dtype.size()));
        let chunks = chunks.collect::<Result<Vec<_>>>()?;
        metas.push(TensorMeta { name: name.clone(), dtype, shape: t.size.clone() });
        let fqn = t.fqn.clone();
        tensors.insert(name, DcpTensor { fqn, dtype, shape: t.size.clone(), chunks });
    }
    let metadata = describe(&md, &lazies, metas.len());
    Ok(Loaded {
        format: Format::Dcp,
        tensors: metas,
        storage: Box::new(DcpStore::new(dir, lazies, tensors)),
        metadata,
        step: None,
        side_dir: None,
    })
}

/// The dtype of `t`, which must be one sewa reads, stored as plain `torch.save` streams.
fn readable(mpath: &Path, t: &metadata::TensorItem) -> Result<DType> {
    let dtype = t.dtype.clone().map_err(|d| {
        Error::bad_input(mpath, format!("tensor {}: dtype {d} is not supported", t.fqn))
    })?;
    // Elements are bounded by the bytes that back them (`chunk`); what is left to refuse here
    // is a shape whose dimensions multiply past any real size though it has no element.
    let fits = crate::strided::nonzero_product(&t.size)
        .and_then(|n| n.checked_mul(dtype.size()))
        .is_some_and(|b| b <= isize::MAX as usize);
    if !fits {
        return Err(Error::bad_input(
            mpath,
            format!("tensor {}: size {:?} is absurd (its dimensions overflow)", t.fqn, t.size),
        ));
    }
    if let Some(c) = t.chunks.iter().find(|c| !c.storage.transforms.is_empty()) {
        return Err(Error::bad_input(
            mpath,
            format!(
                "tensor {} is stored transformed ({}: compressed or otherwise encoded by a \
                 storage extension), which sewa does not decode; save without extensions",
                t.fqn,
                c.storage.transforms.join(", ")
            ),
        ));
    }
    Ok(dtype)
}

/// A chunk of `t` with its file resolved; its stored stream must be able to hold its bytes.
fn chunk(
    mpath: &Path,
    t: &metadata::TensorItem,
    c: &metadata::Chunk,
    index: &HashMap<&str, usize>,
    es: usize,
) -> Result<DcpChunk> {
    let need = crate::strided::numel(&c.sizes).unwrap_or(usize::MAX);
    if (need as u64).saturating_mul(es as u64) > c.storage.length {
        return Err(Error::bad_input(
            mpath,
            format!(
                "tensor {}: the chunk at offsets {:?} ({:?}) is given {} bytes of storage, too \
                 few for its elements",
                t.fqn, c.offsets, c.sizes, c.storage.length
            ),
        ));
    }
    Ok(DcpChunk {
        offsets: c.offsets.clone(),
        sizes: c.sizes.clone(),
        file: index[c.storage.relative_path.as_str()],
        offset: c.storage.offset,
        length: c.storage.length,
    })
}

/// Check every file the storage entries reference: a regular file inside `dir`, named by a
/// canonical relative path (no `..`, no absolute path, no symlink, no `a/`, `a//` or `a/.`
/// spelling of another entry's file), at least as long as each range in it, and ranges
/// disjoint per file *identity* (device, inode), so neither another spelling nor a hard link
/// lets one file's bytes back two items: the tensors' claimed sizes stay bounded by the
/// files' real sizes. Returns the files, not held open.
fn stat_files<'s>(
    dir: &Path,
    entries: impl Iterator<Item = &'s StorageInfo>,
) -> Result<Vec<LazyFile>> {
    let mut ranges: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for s in entries {
        ranges.entry(s.relative_path.as_str()).or_default().push((s.offset, s.length));
    }
    let mut out = Vec::with_capacity(ranges.len());
    let mut by_file: HashMap<(u64, u64), Vec<Range>> = HashMap::new();
    for (rel, rs) in ranges {
        let path = dir.join(rel);
        let file = files::open_in_dir(dir, Path::new(rel)).map_err(missing)?;
        let identity = Identity::from_metadata(&file.metadata().input(&path)?);
        let at = by_file.entry((identity.dev, identity.ino)).or_default();
        at.extend(rs.into_iter().map(|(offset, length)| (offset, length, out.len())));
        out.push(LazyFile::new(rel.to_string(), path, identity));
    }
    for mut rs in by_file.into_values() {
        rs.sort_unstable();
        disjoint_inside(&out, &rs)?;
    }
    Ok(out)
}

/// A byte range of a data file: `(offset, length, index in the files)`, grouped by the file's
/// (device, inode).
type Range = (u64, u64, usize);

/// The ranges `rs` (sorted; all in one file, under the names `files[i]`) lie inside the file
/// and do not overlap.
fn disjoint_inside(files: &[LazyFile], rs: &[Range]) -> Result<()> {
    let mut end = (0u64, None::<usize>);
    for &(offset, length, i) in rs {
        let f = &files[i];
        let stop = offset.checked_add(length).filter(|&s| s <= f.identity.size);
        let Some(stop) = stop else {
            return Err(Error::bad_input(
                &f.path,
                format!(
                    "has {} bytes, but .metadata places an item at bytes {offset}..{}: still \
                     being written, or truncated",
                    f.identity.size,
                    offset.saturating_add(length)
                ),
            ));
        };
        if offset < end.0 {
            let other = end.1.filter(|&j| j != i).map_or(String::new(), |j| {
                format!(
                    " with an item of {}, which is the same file (a hard link)",
                    crate::text::path(&files[j].path)
                )
            });
            return Err(Error::bad_input(
                &f.path,
                format!("items overlap at byte {offset}{other} (corrupt .metadata)"),
            ));
        }
        end = (stop, Some(i));
    }
    Ok(())
}

/// A referenced data file that is absent gets an error saying `.metadata` wants it.
fn missing(e: Error) -> Error {
    match e {
        Error::BadInput { path, msg } if msg.contains("No such file") => Error::bad_input(
            path,
            format!("is referenced by {METADATA} but missing ({msg}): a rank's file was lost"),
        ),
        other => other,
    }
}

/// What `inspect` shows about the directory as a whole.
fn describe(md: &Metadata, lazies: &[LazyFile], picked: usize) -> BTreeMap<String, String> {
    let ranks: BTreeSet<u32> = lazies.iter().filter_map(|f| rank_of(&f.rel)).collect();
    let mut m = BTreeMap::new();
    if let Some(v) = &md.version {
        m.insert("dcp_version".to_string(), v.clone());
    }
    m.insert("dcp_files".to_string(), lazies.len().to_string());
    m.insert("dcp_ranks".to_string(), ranks.len().to_string());
    m.insert("dcp_skipped_tensors".to_string(), (md.tensors.len() - picked).to_string());
    m.insert("dcp_skipped_bytes_items".to_string(), md.bytes.len().to_string());
    m
}

/// The rank that wrote `__{rank}_{k}.distcp`.
pub(crate) fn rank_of(rel: &str) -> Option<u32> {
    let name = Path::new(rel).file_name()?.to_str()?;
    name.strip_prefix("__")?.split('_').next()?.parse().ok()
}

/// A directory holding `.metadata`, or whose `pytorch_model_fsdp_0/` does (Accelerate's FSDP
/// inside an HF Trainer checkpoint).
pub(crate) const FORMAT: FormatSpec = FormatSpec { detect: claim, weight_file, endings: &[] };

pub(crate) fn weight_file(name: &str) -> bool {
    name.ends_with(".distcp") || name == METADATA
}

fn claim(probe: &Probe<'_>) -> Claim {
    if probe.file.is_some() {
        return Ok(None);
    }
    let Some((dir, nested)) = find(probe.path)? else { return Ok(None) };
    let outer = probe.path.to_path_buf();
    Ok(Some(Box::new(FoundDcp { outer, dir, nested, state_key: probe.opts.state_key.clone() })))
}

struct FoundDcp {
    /// The path detected; `dir` itself, or the HF checkpoint around it (`nested`).
    outer: std::path::PathBuf,
    dir: std::path::PathBuf,
    nested: bool,
    state_key: Option<String>,
}

impl Found for FoundDcp {
    /// `.metadata` is a DCP directory's marker (renamed in last); one nested in an HF Trainer
    /// checkpoint also waits for the Trainer's marker.
    fn quick_check(&self, marker: &str) -> Result<()> {
        if self.nested {
            hf_dir::check_marker(&self.outer, marker)?;
        }
        quick_check(&self.dir)
    }

    fn open(self: Box<Self>) -> Result<Loaded> {
        let mut loaded = open(&self.dir, self.state_key.as_deref(), Keys::Dcp)?;
        // An HF Trainer checkpoint around Accelerate's DCP: config, tokenizer beside it.
        loaded.side_dir = self.nested.then_some(self.outer);
        Ok(loaded)
    }
}
