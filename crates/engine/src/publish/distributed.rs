//! One average written by `world` processes (ranks) on a shared file system, committed once.
//! The ranks share nothing but files: each computes the same plan from the same inputs and
//! options, the same split of the tensors by bytes (`layout::plan_rank_files`) and the same
//! plan id, a digest of all of it. Then:
//!
//! 1. Every rank makes the staging directory `.NAME.<plan id>.sewa-dist` beside the output.
//!    The first to arrive records the publication's start time in its `plan.json` (written
//!    whole, then hard-linked into place, which fails for all but one rank); every rank reads
//!    it back, so all shard headers carry the same `sewa_started`.
//! 2. Each rank writes its shard files there (temp, fsync, rename, directory fsync), then its
//!    completion marker `rank-N.json` the same way. A marker therefore means complete, durable
//!    shards. A rank whose marker from an earlier run of the same plan is still there, with
//!    its files of the planned size and header, does not write them again.
//! 3. Rank 0, holding the output's lock, waits for every marker (up to a deadline), checks
//!    each planned file's size and header against the plan, then renames the staging
//!    directory to `.NAME.<plan id>.sewa-commit`: from then on no rank writes into it. There it
//!    removes anything unplanned (markers, temps of a killed rank, leftovers), writes the
//!    index, side files and manifest, fsyncs, and swaps the directory in at the output as the
//!    single-process publisher does.
//! 4. The other ranks wait until the output's manifest names their plan (or a deadline), so
//!    every rank's exit status says whether the average was published. A rank that starts
//!    late (rank 0 may commit with markers left by an earlier run of the same plan) finds the
//!    plan published, or waits out the commit, and writes nothing; a staging directory it made
//!    meanwhile is removed once the plan is published.
//!
//! A rank killed at any point leaves the previous output as it was: nothing is renamed into
//! the output until every shard is verified, and the swap is one `renameat2`. A rerun of the
//! same job finds the staging directory (rank 0 first renames back a commit directory that a
//! killed rank 0 left), reuses the complete shards and rewrites the rest. Staging directories
//! of other plans for the same output are removed after a commit. Nothing here is trusted:
//! markers are read bounded and without following links, and every planned file is checked by
//! `lstat` and by its header bytes before it is published.

use std::collections::BTreeSet;
use std::fs::{self, File, Permissions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::side::SideFiles;
use super::{
    Published, TensorWriter, check_destination, finish, hidden_prefix, is_file_output,
    manifest_path, parent_dir, provenance_metadata, swap_dir_in, sync_dir, write_atomic,
};
use crate::average::{AveragePlan, PlanSource};
use crate::error::{Error, Result, WithPath};
use crate::layout::{FileLayout, index_json, plan_rank_files};
use crate::manifest::{DistributedRecord, FileRecord, Manifest, OutputLayout, RankRecord};

/// Suffix of a distributed publication's staging directory.
pub(super) const DIST_SUFFIX: &str = ".sewa-dist";
/// Suffix of the staging directory once rank 0 has taken it to commit.
const COMMIT_SUFFIX: &str = ".sewa-commit";
/// Markers and `plan.json` are a few hundred bytes; anything bigger is not ours.
const MAX_MARKER: u64 = 1 << 20;
const PLAN_FILE: &str = "plan.json";
/// The longest pause between two looks at the staging directory or the output: a look is a
/// few small reads, and a rank should not exit long after the commit it waits for.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// Every file of the output, with the rank that writes it.
type RankFiles = Vec<(usize, FileLayout)>;

/// Which process of how many this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ranks {
    pub rank: usize,
    pub world: usize,
}

#[derive(Clone, Debug)]
pub struct DistributedOptions {
    pub ranks: Ranks,
    /// Each rank's part is split into shard files of at most this many tensor bytes.
    pub shard_bytes: u64,
    /// How long rank 0 waits for the other ranks' markers once its own shards are written,
    /// and the other ranks for rank 0's commit once theirs are.
    pub wait: Duration,
}

/// What this rank did.
#[derive(Debug)]
pub enum RankOutcome {
    /// Rank 0: the output is published.
    Committed(Box<Published>),
    /// Any other rank: its shards are complete (`reused`: from an earlier run of the same
    /// plan) and rank 0 has published the output.
    Written { record: RankRecord, reused: bool },
    /// The output already holds this plan's publication: nothing was written.
    AlreadyPublished(PathBuf),
}

/// Average this rank's part of `plan` and, on rank 0, commit the whole output at `out` (a
/// directory) with `manifest` (see the module docs). `progress` gets this rank's bytes.
pub fn publish_distributed(
    plan: &AveragePlan<'_>,
    mut manifest: Manifest,
    side: Option<&SideFiles>,
    out: &Path,
    opts: &DistributedOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<RankOutcome> {
    let Ranks { rank, world } = opts.ranks;
    if world == 0 || rank >= world {
        return Err(Error::Usage(format!("rank {rank} of world size {world}: no such rank")));
    }
    if is_file_output(out) {
        return Err(Error::Usage(format!(
            "{}: a distributed average writes a directory (Hugging Face shards and their \
             index), not one .safetensors file",
            out.display()
        )));
    }
    check_destination(out)?;
    let clock = Instant::now();
    manifest.output = crate::manifest::absolute(out);
    let id = plan_id(plan, &manifest, opts);
    let parent = parent_dir(out);
    let staging = parent.join(staging_name(out, &id, DIST_SUFFIX));
    let committing = parent.join(staging_name(out, &id, COMMIT_SUFFIX));
    if rank == 0 {
        // We hold the lock: a commit directory is a killed rank 0's; its shards are verified.
        take_back(&committing, &staging)?;
    } else if wait_out_commit(out, &id, &committing, opts.wait)? {
        return Ok(RankOutcome::AlreadyPublished(out.to_path_buf()));
    }
    if published_plan(out).as_deref() == Some(id.as_str()) {
        return Ok(RankOutcome::AlreadyPublished(out.to_path_buf()));
    }
    let part = write_part(plan, &mut manifest, &staging, &id, opts, progress);
    let (files, record, reused) = match part {
        Ok(done) => done,
        // A late rank whose staging directory rank 0 took to commit under it (with this
        // rank's shards of an earlier run): the commit decides.
        Err(e) if rank != 0 => {
            let published = wait_out_commit(out, &id, &committing, opts.wait).unwrap_or(false)
                || published_plan(out).as_deref() == Some(id.as_str());
            return match published {
                true => Ok(RankOutcome::AlreadyPublished(out.to_path_buf())),
                false => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    if rank != 0 {
        tracing::info!(rank, world, "shards complete; waiting for rank 0 to publish the average");
        wait_for_commit(out, &id, &staging, opts)?;
        return Ok(RankOutcome::Written { record, reused });
    }

    // Every other rank's files are verified there; rank 0's own were just written or verified.
    let mut records = wait_for_ranks(&staging, &id, &files, world, opts.wait, record)?;
    // Taken out of the other ranks' reach: a late rank now makes a new staging directory.
    fs::rename(&staging, &committing).with_path(&staging)?;
    let staging = committing;
    prune(&staging, &files)?;
    manifest
        .files
        .extend(files.iter().map(|(_, f)| FileRecord { name: (&f.name).into(), bytes: f.size }));
    if files.len() > 1 {
        let layouts: Vec<FileLayout> = files.iter().map(|(_, f)| f.clone()).collect();
        let index = index_json(&layouts, plan.outputs())?;
        let name = "model.safetensors.index.json";
        write_atomic(&staging.join(name), |f, p| f.write_all(&index).with_path(p))?;
        manifest.files.push(FileRecord { name: name.into(), bytes: index.len() as u64 });
    }
    if let Some(side) = side {
        side.write_into(&staging, &mut manifest)?;
    }
    records.sort_by_key(|r| r.rank);
    manifest.layout = OutputLayout::Dir.into();
    manifest.distributed =
        Some(DistributedRecord { plan: id.clone(), world_size: world, ranks: records });
    finish(&mut manifest, clock);
    let json = manifest.to_json()?;
    write_atomic(&staging.join("manifest.json"), |f, p| f.write_all(&json).with_path(p))?;
    sync_dir(&staging)?;
    swap_dir_in(&staging, out)?;
    remove_other_stagings(out, &id);
    Ok(RankOutcome::Committed(Box::new(Published {
        path: out.to_path_buf(),
        manifest_path: manifest_path(out),
        manifest,
    })))
}

/// Steps 1 and 2 for this rank (see the module docs): the staging directory, the agreed start
/// time (set in `manifest`), every rank's files, and this rank's shards and marker; the files,
/// this rank's record, and whether its shards were reused from an earlier run.
fn write_part(
    plan: &AveragePlan<'_>,
    manifest: &mut Manifest,
    staging: &Path,
    id: &str,
    opts: &DistributedOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<(RankFiles, RankRecord, bool)> {
    let Ranks { rank, world } = opts.ranks;
    fs::create_dir_all(staging).with_path(staging)?;
    // Ours only if it is a directory itself: a link planted under its name would send every
    // shard, and then the swap, somewhere else.
    if !staging.symlink_metadata().with_path(staging)?.is_dir() {
        return Err(Error::Internal(format!(
            "{}: the staging directory of this average is a link or not a directory; remove it",
            staging.display()
        )));
    }
    fs::set_permissions(staging, Permissions::from_mode(0o755)).with_path(staging)?;
    manifest.started = agree_started(staging, id, &manifest.started)?;
    let metadata = provenance_metadata(manifest);
    let files =
        plan_rank_files(plan.outputs(), world, "model.safetensors", opts.shard_bytes, &metadata)?;
    let mine: Vec<&FileLayout> = files.iter().filter(|(r, _)| *r == rank).map(|(_, f)| f).collect();

    let marker = staging.join(marker_name(rank));
    let (record, reused) = match read_marker(&marker, id) {
        Some(r)
            if r.files.len() == mine.len() && mine.iter().all(|f| verify(staging, f).is_ok()) =>
        {
            tracing::info!(rank, staging = %staging.display(), "shards complete from an earlier run of this plan: reused");
            (r, true)
        }
        stale => {
            if stale.is_some() {
                // Not vouching any more for shards about to be replaced (rank 0 waits).
                fs::remove_file(&marker).with_path(&marker)?;
            }
            let started = Instant::now();
            let mut source = PlanSource::new(plan);
            let mut writer = TensorWriter { source: &mut source, done: 0, progress };
            for f in &mine {
                write_atomic(&staging.join(&f.name), |file, p| writer.write(file, p, f))?;
            }
            let record = RankRecord {
                rank,
                files: mine.iter().map(|f| f.name.clone()).collect(),
                bytes: writer.done,
                seconds: started.elapsed().as_secs_f64(),
                written: crate::timestamp::now(),
            };
            let json = marker_json(id, &record)?;
            write_atomic(&marker, |f, p| f.write_all(&json).with_path(p))?;
            (record, false)
        }
    };
    Ok((files, record, reused))
}

/// The plan's identity, the same on every rank of one job and across reruns of it: XXH3-128
/// over the output's provenance metadata (version, method, steps, weights, dtype, integer
/// policy; not its start time), every input's path as given with its size and newest mtime
/// (not device or inode numbers, which differ between the nodes of a network file system),
/// the output tensors, the overflow policy, the number of ranks and the shard size.
fn plan_id(plan: &AveragePlan<'_>, manifest: &Manifest, opts: &DistributedOptions) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    let mut put = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    put(b"sewa-distributed-1");
    let mut meta: Vec<(String, String)> =
        provenance_metadata(manifest).into_iter().filter(|(k, _)| k != "sewa_started").collect();
    meta.sort();
    for (k, v) in &meta {
        put(k.as_bytes());
        put(v.as_bytes());
    }
    for c in plan.inputs() {
        put(c.path().as_os_str().as_bytes());
        let id = c.identity();
        put(&id.size.to_le_bytes());
        put(&id.mtime_ns.to_le_bytes());
    }
    for t in plan.outputs() {
        put(t.name.as_bytes());
        put(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
    }
    put(format!("{:?}", plan.options().overflow).as_bytes());
    put(&(opts.ranks.world as u64).to_le_bytes());
    put(&opts.shard_bytes.to_le_bytes());
    format!("{:032x}", h.digest128())
}

/// `.NAME.<id><suffix>`: hidden, beside the output, never one of `recover`'s names.
fn staging_name(out: &Path, id: &str, suffix: &str) -> std::ffi::OsString {
    let mut s = hidden_prefix(out);
    s.push(format!("{id}{suffix}"));
    s
}

/// Rank 0 at start: a commit directory left by a killed rank 0 goes back to being the staging
/// directory (replacing one a late rank may have made since), so this run reuses its shards.
fn take_back(committing: &Path, staging: &Path) -> Result<()> {
    match committing.symlink_metadata() {
        Ok(m) if m.is_dir() => {
            if staging.symlink_metadata().is_ok() {
                fs::remove_dir_all(staging).with_path(staging)?;
            }
            fs::rename(committing, staging).with_path(committing)?;
            tracing::info!(path = %staging.display(), "took back the shards of an interrupted commit");
            Ok(())
        }
        Ok(_) => fs::remove_file(committing).with_path(committing),
        Err(_) => Ok(()),
    }
}

/// A rank other than 0 at start: while rank 0 is committing this plan, wait. True when the
/// plan is then published (nothing left to do).
fn wait_out_commit(out: &Path, id: &str, committing: &Path, wait: Duration) -> Result<bool> {
    match poll(wait, || committing.symlink_metadata().is_err().then_some(())) {
        Some(()) => Ok(published_plan(out).as_deref() == Some(id)),
        None => Err(timed_out(
            committing,
            format!("rank 0 has been committing this average for {:.0} s", wait.as_secs_f64()),
        )),
    }
}

/// A rank other than 0, its shards complete: wait until the output's manifest names this plan.
fn wait_for_commit(out: &Path, id: &str, staging: &Path, opts: &DistributedOptions) -> Result<()> {
    if poll(opts.wait, || (published_plan(out).as_deref() == Some(id)).then_some(())).is_none() {
        return Err(timed_out(
            out,
            format!(
                "rank {} of {}: rank 0 did not publish this average within {:.0} s; this \
                 rank's shards are complete in {} and a rerun reuses them",
                opts.ranks.rank,
                opts.ranks.world,
                opts.wait.as_secs_f64(),
                staging.display()
            ),
        ));
    }
    // Rank 0 committed: a staging directory of this plan now is a late rank's, and garbage.
    remove_late_staging(staging);
    Ok(())
}

/// Remove a staging directory of a plan already published (made by a rank that started after
/// rank 0 took the staging directory to commit). Failures are logged.
fn remove_late_staging(staging: &Path) {
    if staging.symlink_metadata().is_ok_and(|m| m.is_dir())
        && let Err(e) = fs::remove_dir_all(staging)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %staging.display(), "could not remove a staging directory of a published plan: {e}");
    }
}

fn marker_name(rank: usize) -> String {
    format!("rank-{rank}.json")
}

/// The plan id in the output's manifest, if the output is a distributed publication.
fn published_plan(out: &Path) -> Option<String> {
    let bytes = read_small(&manifest_path(out)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("distributed")?.get("plan")?.as_str().map(str::to_string)
}

/// The start time every rank puts in its headers: the one in `plan.json`, written by the
/// first rank to get there (`now` if that is us).
fn agree_started(staging: &Path, id: &str, now: &str) -> Result<String> {
    let path = staging.join(PLAN_FILE);
    if path.symlink_metadata().is_err() {
        let json = serde_json::to_vec(&serde_json::json!({ "plan": id, "started": now }))
            .map_err(|e| Error::Internal(format!("plan.json: {e}")))?;
        let tmp = tempfile::Builder::new()
            .prefix(".plan.")
            .suffix(super::atomic::TEMP_SUFFIX)
            .tempfile_in(staging)
            .with_path(staging)?;
        tmp.as_file().write_all(&json).with_path(tmp.path())?;
        tmp.as_file().sync_all().with_path(tmp.path())?;
        // A hard link fails if the name exists: exactly one rank's start time is kept.
        match fs::hard_link(tmp.path(), &path) {
            Ok(()) => sync_dir(staging)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    let bad = |msg: &str| Error::Internal(format!("{}: {msg}", path.display()));
    let v: serde_json::Value =
        serde_json::from_slice(&read_small(&path)?).map_err(|e| bad(&format!("not JSON: {e}")))?;
    if v.get("plan").and_then(|p| p.as_str()) != Some(id) {
        return Err(bad("belongs to another plan (remove the directory)"));
    }
    match v.get("started").and_then(|s| s.as_str()) {
        Some(s) if humantime::parse_rfc3339(s).is_ok() => Ok(s.to_string()),
        _ => Err(bad("no valid \"started\" time (remove the directory)")),
    }
}

fn marker_json(id: &str, record: &RankRecord) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(&serde_json::json!({ "plan": id, "record": record }))
        .map_err(|e| Error::Internal(format!("rank marker: {e}")))
}

/// The record in a rank's marker, if it is a regular file of plan `id`.
fn read_marker(path: &Path, id: &str) -> Option<RankRecord> {
    let bytes = read_small(path).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    if v.get("plan")?.as_str()? != id {
        return None;
    }
    serde_json::from_value(v.get("record")?.clone()).ok()
}

/// A small regular file's bytes: not through a link, at most [`MAX_MARKER`].
fn read_small(path: &Path) -> Result<Vec<u8>> {
    let file =
        fs::OpenOptions::new().read(true).custom_flags(o_nofollow()).open(path).with_path(path)?;
    let meta = file.metadata().with_path(path)?;
    if !meta.is_file() || meta.len() > MAX_MARKER {
        return Err(Error::Internal(format!("{}: not a small regular file", path.display())));
    }
    let mut bytes = Vec::new();
    file.take(MAX_MARKER).read_to_end(&mut bytes).with_path(path)?;
    Ok(bytes)
}

fn o_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Poll for the marker of every rank that owns files until `wait` has passed; the records of
/// all of them (`own` for rank 0).
fn wait_for_ranks(
    staging: &Path,
    id: &str,
    files: &[(usize, FileLayout)],
    world: usize,
    wait: Duration,
    own: RankRecord,
) -> Result<Vec<RankRecord>> {
    let owners: BTreeSet<usize> = files.iter().map(|(r, _)| *r).filter(|&r| r != 0).collect();
    // What the last look found missing, and a damaged shard a marker still vouched for.
    let (mut missing, mut damaged) = (Vec::new(), None);
    let looked = poll(wait, || {
        let mut found = vec![own.clone()];
        (missing, damaged) = (Vec::new(), None);
        for &r in &owners {
            let marker = staging.join(marker_name(r));
            match read_marker(&marker, id) {
                Some(rec) if rec.rank == r => {
                    let planned: Vec<&FileLayout> =
                        files.iter().filter(|(o, _)| *o == r).map(|(_, f)| f).collect();
                    match planned.iter().try_for_each(|f| verify(staging, f)) {
                        // The files are the plan's, whatever a marker says.
                        Ok(()) => found.push(RankRecord {
                            files: planned.iter().map(|f| f.name.clone()).collect(),
                            ..rec
                        }),
                        // A rank that finds its shards damaged removes its marker, then
                        // writes them again: wait for it. A marker that still vouches for a
                        // damaged shard at the deadline is the error reported.
                        Err(e) => {
                            missing.push(r);
                            damaged.get_or_insert(e);
                        }
                    }
                }
                _ => missing.push(r),
            }
        }
        missing.is_empty().then_some(found)
    });
    match (looked, damaged) {
        (Some(found), _) => Ok(found),
        (None, Some(e)) => Err(e),
        (None, None) => Err(timed_out(
            staging,
            format!(
                "rank 0 of {world}: after {:.0} s, no completion marker from rank{} {}; the \
                 output is unchanged. Rerun the job: complete shards are reused.{}",
                wait.as_secs_f64(),
                if missing.len() > 1 { "s" } else { "" },
                join(&missing),
                other_plans_hint(staging, id),
            ),
        )),
    }
}

/// Call `look` until it finds something, with pauses growing from 10 ms to [`MAX_PAUSE`], for
/// at most `wait`; `None` when it found nothing in time.
fn poll<T>(wait: Duration, mut look: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(found) = look() {
            return Some(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// A wait that ran out, as an error about `path`.
fn timed_out(path: &Path, msg: String) -> Error {
    Error::io(path, std::io::Error::new(std::io::ErrorKind::TimedOut, msg))
}

fn join(ranks: &[usize]) -> String {
    ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

/// When ranks disagree on the plan (other inputs, weights or options on another rank), they
/// write other staging directories: say so.
fn other_plans_hint(staging: &Path, id: &str) -> String {
    let (Some(parent), Some(name)) = (staging.parent(), staging.file_name()) else {
        return String::new();
    };
    let ours = name.to_string_lossy();
    let Some(prefix) = ours.strip_suffix(&format!("{id}{DIST_SUFFIX}")) else {
        return String::new();
    };
    let others = fs::read_dir(parent).into_iter().flatten().flatten().filter(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n != ours && n.starts_with(prefix) && n.ends_with(DIST_SUFFIX)
    });
    match others.count() {
        0 => String::new(),
        n => format!(
            " {n} staging director{} of other plans for this output exist{}: do all ranks \
             run the same command on the same inputs?",
            if n == 1 { "y" } else { "ies" },
            if n == 1 { "s" } else { "" },
        ),
    }
}

/// A planned file is complete: a regular file of the planned size starting with the planned
/// header (which names every tensor, its dtype, shape and offsets, and the start time).
fn verify(staging: &Path, f: &FileLayout) -> Result<()> {
    let path = staging.join(&f.name);
    let bad = |msg: String| {
        Error::Internal(format!(
            "{}: {msg}; rerun the job: the rank that writes it checks it and writes it again",
            path.display()
        ))
    };
    let meta = path.symlink_metadata().map_err(|e| bad(format!("missing: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() != f.size {
        return Err(bad(format!("{} bytes where {} are planned", meta.len(), f.size)));
    }
    let mut head = vec![0u8; f.header.len()];
    File::open(&path).and_then(|mut file| file.read_exact(&mut head)).with_path(&path)?;
    // Compared as JSON: each process orders `__metadata__` (a hash map) its own way.
    let json = |h: &[u8]| serde_json::from_slice::<serde_json::Value>(h.get(8..)?).ok();
    if head[..8] != f.header[..8] || json(&head).is_none() || json(&head) != json(&f.header) {
        return Err(bad("its header is not the planned one".into()));
    }
    Ok(())
}

/// Remove from the staging directory everything but the planned files.
fn prune(staging: &Path, files: &[(usize, FileLayout)]) -> Result<()> {
    let keep: BTreeSet<&str> = files.iter().map(|(_, f)| f.name.as_str()).collect();
    for entry in fs::read_dir(staging).with_path(staging)? {
        let entry = entry.with_path(staging)?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| keep.contains(n)) {
            continue;
        }
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        gone.with_path(&path)?;
    }
    Ok(())
}

/// After a commit: staging directories of other plans for this output are dead (their plan
/// was superseded); remove them. Failures are logged.
fn remove_other_stagings(out: &Path, id: &str) {
    let parent = parent_dir(out);
    let prefix = hidden_prefix(out);
    let prefix = prefix.as_bytes();
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let b = name.as_bytes();
        let stem = b.strip_prefix(prefix).and_then(|r| {
            r.strip_suffix(DIST_SUFFIX.as_bytes())
                .or_else(|| r.strip_suffix(COMMIT_SUFFIX.as_bytes()))
        });
        let is_plan = stem.is_some_and(|s| s.len() == 32 && s.iter().all(u8::is_ascii_hexdigit));
        if is_plan && stem != Some(id.as_bytes()) {
            let path = parent.join(&name);
            match fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed the staging directory of a superseded plan")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "could not remove a stale staging directory: {e}")
                }
            }
        }
    }
}
