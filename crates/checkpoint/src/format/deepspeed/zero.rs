//! The fp32 master weights of a DeepSpeed ZeRO checkpoint, rebuilt exactly as DeepSpeed's
//! `zero_to_fp32.py` does, but as lists of byte ranges (`storage::SegmentStore`) instead of
//! gathered tensors, so nothing is copied until the averaging kernel reads it:
//!
//! - ZeRO-1/2 (`single_partition_of_fp32_groups`): per param group, the ranks' partitions
//!   concatenated in rank order are the group's flat vector; parameters follow each other in
//!   `param_shapes` order (plus `param_alignment_paddings` when recorded), and the vector's
//!   end is padded to a multiple of 2·world_size.
//! - ZeRO-3 (`fp32_flat_groups`): every parameter is split into world_size partitions of
//!   ceil(numel / world_size) elements, one per rank at the same offset of each rank's flat
//!   groups; a parameter is its ranks' partitions concatenated, cut to numel.
//!
//! Buffers come from the (first) model-states file's `module`, frozen parameters from
//! `frozen_param_fragments`, shared parameters are aliases. Every range is checked against
//! the tensors' storages, and those against the files' real sizes, before it is used.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::partition::{Piece, segments, take, zero2, zero3};
use super::pickled::{entry, int, items, list, shape_map};
use super::{Layout, bad};
use crate::error::{Error, Result};
use crate::format::torch::PickleTensor;
use crate::format::torch::RawZip;
use crate::pinned::PinnedFile;
use crate::storage::{Loaded, Segment, SegmentStore};
use crate::strided::{is_contiguous, numel};
use crate::unpickle::{Id, Pickle};
use crate::{DType, Format, TensorMeta};

/// `dp_world_size` of a model-states file's pickle.
fn dp_world_size(path: &Path, pk: &Pickle) -> Result<usize> {
    let v = entry(pk, pk.root, "dp_world_size").and_then(|v| int(pk, v));
    v.filter(|&w| w > 0)
        .ok_or_else(|| bad(path, "no dp_world_size: not a DeepSpeed model-states file"))
}

/// The model-states files the fp32 masters are read with: the module file (ZeRO-1/2) or
/// every rank's (ZeRO-3).
fn model_files(layout: &Layout) -> Vec<PathBuf> {
    match &layout.module {
        Some(m) => vec![m.clone()],
        None => layout.rank_models.clone(),
    }
}

/// The world size of `layout`'s rank files (for `quick_check`): see [`agreed_world`].
pub(super) fn world_size(layout: &Layout) -> Result<usize> {
    let mut stated = Vec::new();
    for p in model_files(layout) {
        let zip = RawZip::open(&p, &layout.open(&p)?)?;
        stated.push((dp_world_size(&p, &zip.pk)?, p));
    }
    for p in &layout.optim {
        let zip = RawZip::open(p, &layout.open(p)?)?;
        stated.push((optim_states(p, &zip.pk)?.world, p.clone()));
    }
    agreed_world(&stated)
}

/// One world size for the whole checkpoint: every model-states file's `dp_world_size` and
/// every optimizer-states file's `partition_count` (`stated`, with each file) must be the
/// same. Files that disagree come from different runs or saves mixed in one directory (no
/// further rank file can fix that): an error naming two files that differ.
fn agreed_world(stated: &[(usize, PathBuf)]) -> Result<usize> {
    let Some((world, first)) = stated.first() else {
        return Err(Error::Internal("no DeepSpeed rank file to read a world size from".into()));
    };
    if let Some((other, path)) = stated.iter().find(|(w, _)| w != world) {
        return Err(bad(
            path,
            format!(
                "states a world size of {other}, but {} states {world}: rank files of \
                 different runs or world sizes are mixed in one checkpoint; refused",
                crate::text::path(first)
            ),
        ));
    }
    Ok(*world)
}

/// As many optimizer-states files (and, for ZeRO-3, model-states files) as ranks.
pub(super) fn check_rank_count(layout: &Layout, world: usize) -> Result<()> {
    let expect = |found: usize, what: &str| {
        if found == world {
            return Ok(());
        }
        let missing = format!("zero_pp_rank_{found}_mp_rank_00_{what}_states.pt");
        Err(Error::bad_input(
            &layout.dir,
            format!(
                "{found} *_{what}_states.pt file(s) for a world size of {world}: missing {} \
                 (a rank did not save, or the checkpoint is still being written)",
                if found < world { missing } else { "none; too many ranks".into() }
            ),
        ))
    };
    expect(layout.optim.len(), "optim")?;
    if layout.module.is_none() {
        expect(layout.rank_models.len(), "model")?;
    }
    Ok(())
}

/// The held files, in order: model-states files first, then optimizer states by rank.
struct Opened {
    paths: Vec<PathBuf>,
    files: Vec<PinnedFile>,
    zips: Vec<RawZip>,
}

impl Opened {
    fn open(layout: &Layout, paths: Vec<PathBuf>) -> Result<Opened> {
        let (mut files, mut zips) = (Vec::new(), Vec::new());
        for p in &paths {
            let file: File = layout.open(p)?;
            zips.push(RawZip::open(p, &file)?);
            files.push(PinnedFile::new(p, file)?);
        }
        Ok(Opened { paths, files, zips })
    }

    /// The contiguous tensor `value` of file `i` as a piece.
    fn piece(&self, i: usize, name: &str, value: Id) -> Result<(Piece, PickleTensor)> {
        let path = &self.paths[i];
        let t = self.zips[i]
            .tensor(path, name, value)?
            .ok_or_else(|| bad(path, format!("{name} is not a tensor")))?;
        let n = numel(&t.shape).ok_or_else(|| bad(path, format!("{name}: shape overflows")))?;
        if n > 1 && !is_contiguous(&t.shape, &t.stride) {
            return Err(bad(path, format!("{name}: a strided view; expected a contiguous tensor")));
        }
        let start = t.data_start + (t.offset * t.dtype.size()) as u64;
        Ok((Piece { file: i, start, numel: n }, t))
    }
}

/// What zero_to_fp32.py reads from the (first) model-states file.
struct ModelStates {
    /// Per param group: (name, shape) in partition order.
    param_shapes: Vec<Vec<(String, Vec<usize>)>>,
    buffers: Vec<String>,
    shared: Vec<(String, String)>,
    frozen: Vec<(String, Vec<usize>)>,
    module: Id,
    step: Option<u64>,
}

fn model_states(path: &Path, pk: &Pickle) -> Result<ModelStates> {
    let root = pk.root;
    let get = |k: &str| entry(pk, root, k);
    let missing = |k: &str| bad(path, format!("no {k}: not a DeepSpeed model-states file"));
    let shapes_list =
        get("param_shapes").and_then(|v| list(pk, v)).ok_or_else(|| missing("param_shapes"))?;
    let param_shapes = shapes_list
        .iter()
        .map(|&g| shape_map(pk, g).ok_or_else(|| bad(path, "param_shapes holds a non-dict group")))
        .collect::<Result<Vec<_>>>()?;
    let names =
        get("buffer_names").and_then(|v| list(pk, v)).ok_or_else(|| missing("buffer_names"))?;
    let buffers = names.iter().filter_map(|&n| pk.str(n).map(str::to_string)).collect();
    let shared = get("shared_params")
        .and_then(|v| items(pk, v))
        .unwrap_or_default()
        .iter()
        .filter_map(|&(k, v)| Some((pk.str(k)?.to_string(), pk.str(v)?.to_string())))
        .collect();
    let frozen = get("frozen_param_shapes").and_then(|v| shape_map(pk, v)).unwrap_or_default();
    let module =
        get("module").filter(|&m| items(pk, m).is_some()).ok_or_else(|| missing("module"))?;
    let step = get("global_steps").and_then(|v| int(pk, v)).map(|s| s as u64);
    Ok(ModelStates { param_shapes, buffers, shared, frozen, module, step })
}

/// What zero_to_fp32.py reads from one rank's optimizer-states file.
struct OptimStates {
    stage: usize,
    world: usize,
    groups: Vec<Id>,
    alignment: Option<Vec<Vec<usize>>>,
}

fn optim_states(path: &Path, pk: &Pickle) -> Result<OptimStates> {
    let osd = entry(pk, pk.root, "optimizer_state_dict").ok_or_else(|| {
        bad(path, "no optimizer_state_dict: not a DeepSpeed optimizer-states file")
    })?;
    let get = |k: &str| entry(pk, osd, k);
    let stage = get("zero_stage")
        .and_then(|v| int(pk, v))
        .ok_or_else(|| bad(path, "no zero_stage: not a ZeRO checkpoint"))?;
    // ZeRO-2 lists a partition count per group (experts may differ): the largest is the world.
    let world = get("partition_count").and_then(|v| match list(pk, v) {
        Some(l) => l.iter().filter_map(|&c| int(pk, c)).max(),
        None => int(pk, v),
    });
    let world = world.filter(|&w| w > 0).ok_or_else(|| bad(path, "no partition_count"))?;
    let key = match stage {
        0..=2 => "single_partition_of_fp32_groups",
        3 => "fp32_flat_groups",
        s => return Err(bad(path, format!("unknown ZeRO stage {s}"))),
    };
    let groups =
        get(key).and_then(|v| list(pk, v)).ok_or_else(|| bad(path, format!("no {key}")))?;
    let alignment = get("param_alignment_paddings").and_then(|v| list(pk, v)).map(|gs| {
        gs.iter()
            .map(|&g| list(pk, g).unwrap_or_default().iter().filter_map(|&p| int(pk, p)).collect())
            .collect()
    });
    Ok(OptimStates { stage, world, groups: groups.to_vec(), alignment })
}

/// Rebuild the fp32 weights of `layout` (see the module header).
pub(super) fn open_fp32(layout: &Layout) -> Result<Loaded> {
    let models = model_files(layout);
    let n_models = models.len();
    let first = layout.first_model()?.to_path_buf();
    let all = models.into_iter().chain(layout.optim.iter().cloned()).collect();
    let opened = Opened::open(layout, all)?;
    let ms = model_states(&first, &opened.zips[0].pk)?;
    let optim: Vec<OptimStates> = (n_models..opened.paths.len())
        .map(|i| optim_states(&opened.paths[i], &opened.zips[i].pk))
        .collect::<Result<_>>()?;
    let Some(o0) = optim.first() else {
        return Err(bad(&layout.dir, "no *_optim_states.pt: the fp32 masters are not saved"));
    };
    // The same rule as `quick_check`: one world size stated by every rank file, then that
    // many rank files.
    let mut stated = Vec::with_capacity(opened.paths.len());
    for (i, p) in opened.paths.iter().enumerate().take(n_models) {
        stated.push((dp_world_size(p, &opened.zips[i].pk)?, p.clone()));
    }
    stated.extend(optim.iter().zip(&opened.paths[n_models..]).map(|(o, p)| (o.world, p.clone())));
    check_rank_count(layout, agreed_world(&stated)?)?;
    let mut out = Tensors::default();
    buffers(&opened, &ms, &mut out)?;
    frozen(&opened, &ms, n_models, o0.stage, &mut out)?;
    let ranks = rank_pieces(&opened, &optim, n_models)?;
    let dtype = ranks.dtype;
    let params = if o0.stage <= 2 {
        zero2(&layout.dir, &ms.param_shapes, &ranks.pieces, o0.alignment.as_deref(), dtype)?
    } else {
        zero3(&layout.dir, &ms.param_shapes, &ranks.pieces, dtype)?
    };
    for (name, shape, segs) in params {
        out.push(name, dtype, shape, segs);
    }
    out.alias(&ms.shared);
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("zero_stage".into(), o0.stage.to_string());
    metadata.insert("dp_world_size".into(), o0.world.to_string());
    Ok(Loaded {
        format: Format::DeepSpeed,
        tensors: out.metas,
        storage: Box::new(SegmentStore {
            dir: layout.dir.clone(),
            files: opened.files,
            index: out.index,
        }),
        metadata,
        step: ms.step,
        side_dir: None,
    })
}

#[derive(Default)]
struct Tensors {
    metas: Vec<TensorMeta>,
    index: HashMap<String, Vec<Segment>>,
}

impl Tensors {
    fn push(&mut self, name: String, dtype: DType, shape: Vec<usize>, segs: Vec<Segment>) {
        if self.index.insert(name.clone(), segs).is_none() {
            self.metas.push(TensorMeta { name, dtype, shape });
        }
    }

    /// `shared_params`: `name` is another name of `target` (tied weights).
    fn alias(&mut self, shared: &[(String, String)]) {
        for (name, target) in shared {
            let meta = self.metas.iter().find(|m| &m.name == target).cloned();
            if let (Some(meta), Some(segs)) = (meta, self.index.get(target).cloned()) {
                self.push(name.clone(), meta.dtype, meta.shape, segs);
            }
        }
    }
}

/// Buffers, as stored in the module of the first model-states file (zero_to_fp32.py also
/// casts floating buffers to fp32; sewa keeps their dtype).
fn buffers(opened: &Opened, ms: &ModelStates, out: &mut Tensors) -> Result<()> {
    let pk = &opened.zips[0].pk;
    for &(k, v) in items(pk, ms.module).unwrap_or_default() {
        let Some(name) = pk.str(k).filter(|n| ms.buffers.iter().any(|b| b == n)) else { continue };
        let (piece, t) = opened.piece(0, name, v)?;
        out.push(name.to_string(), t.dtype, t.shape.clone(), segments(&[piece], t.dtype.size()));
    }
    Ok(())
}

/// Frozen parameters: whole in the module file's fragments (ZeRO-1/2), or each rank's
/// fragment concatenated and cut to numel (ZeRO-3).
fn frozen(
    opened: &Opened,
    ms: &ModelStates,
    n_models: usize,
    stage: usize,
    out: &mut Tensors,
) -> Result<()> {
    for (name, shape) in &ms.frozen {
        let path = &opened.paths[0];
        let n = numel(shape).ok_or_else(|| bad(path, format!("{name}: shape overflows")))?;
        let files = if stage <= 2 { 1 } else { n_models };
        let mut pieces = Vec::new();
        let mut dtype = None;
        for i in 0..files {
            let pk = &opened.zips[i].pk;
            let frag = fragments_of(pk).and_then(|f| entry(pk, f, name));
            let frag = frag.ok_or_else(|| {
                bad(&opened.paths[i], format!("frozen parameter {name} has no fragment"))
            })?;
            let (piece, t) = opened.piece(i, name, frag)?;
            dtype = Some(t.dtype);
            pieces.push(piece);
        }
        let dtype = dtype.ok_or_else(|| bad(path, format!("{name}: no fragments")))?;
        let segs = take(&pieces, n, dtype.size()).ok_or_else(|| {
            bad(path, format!("frozen parameter {name}: fragments hold fewer than {n} elements"))
        })?;
        out.push(name.clone(), dtype, shape.clone(), segs);
    }
    Ok(())
}

fn fragments_of(pk: &Pickle) -> Option<Id> {
    entry(pk, pk.root, "frozen_param_fragments")
}

/// Each rank's fp32 groups as pieces, all of one float dtype.
struct RankPieces {
    pieces: Vec<Vec<Piece>>,
    dtype: DType,
}

fn rank_pieces(opened: &Opened, optim: &[OptimStates], first: usize) -> Result<RankPieces> {
    let mut dtype = None;
    let mut pieces = Vec::new();
    for (r, o) in optim.iter().enumerate() {
        let i = first + r;
        let path = &opened.paths[i];
        let mut groups = Vec::new();
        for (g, &id) in o.groups.iter().enumerate() {
            let (piece, t) = opened.piece(i, &format!("fp32 group {g}"), id)?;
            if t.shape.len() != 1 || !t.dtype.is_float() || dtype.is_some_and(|d| d != t.dtype) {
                return Err(bad(
                    path,
                    format!("fp32 group {g} is not a flat float tensor like the others"),
                ));
            }
            dtype = Some(t.dtype);
            groups.push(piece);
        }
        if o.stage != optim[0].stage || o.groups.len() != optim[0].groups.len() {
            return Err(bad(path, "zero_stage or number of param groups differs from rank 0's"));
        }
        pieces.push(groups);
    }
    let dtype = dtype.ok_or_else(|| bad(&opened.paths[first], "no fp32 groups"))?;
    Ok(RankPieces { pieces, dtype })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unpickle;
    use rand::{Rng, SeedableRng};
    use std::io::Read;

    fn pickle_bytes(rel: &str) -> Vec<u8> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/deepspeed").join(rel);
        let mut zip = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
        let names: Vec<String> =
            zip.file_names().filter_map(|n| n.ok()).map(|n| n.into_owned()).collect();
        let name = names.into_iter().find(|n| n.ends_with("data.pkl")).unwrap();
        let mut out = Vec::new();
        zip.by_name(&name).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    /// Untrusted files: random corruptions of DeepSpeed's real model- and optimizer-states
    /// pickles give errors or other values, never a panic, when walked for what we read.
    #[test]
    fn mutated_deepspeed_pickles_never_panic() {
        let files = [
            "z3/global_step2/zero_pp_rank_0_mp_rank_00_model_states.pt",
            "z2/global_step2/mp_rank_00_model_states.pt",
            "z2/global_step2/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "z3/global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (mut walked, path) = (0, Path::new("x"));
        for rel in files {
            let bytes = pickle_bytes(rel);
            assert!(
                model_states(path, &unpickle::load(&bytes).unwrap()).is_ok()
                    || rel.contains("optim")
            );
            for i in 0..1500 {
                let mut b = bytes.clone();
                if i % 3 == 0 {
                    b.truncate(rng.random_range(0..b.len()));
                } else {
                    for _ in 0..rng.random_range(1..4) {
                        let j = rng.random_range(0..b.len());
                        b[j] = rng.random();
                    }
                }
                let Ok(pk) = unpickle::load(&b) else { continue };
                walked += 1;
                let _ = model_states(path, &pk);
                let _ = optim_states(path, &pk);
            }
        }
        assert!(walked > 0);
    }
}
