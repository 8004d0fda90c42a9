//! The exhaustive best k-subset of every cold window, and its cache: a JSON file committed in
//! the repo (`bench/zoo/reference-<split>.json`), one entry per window id with a content hash of
//! what the answer depends on (the cold window's member files, the selection data, k, the
//! activation and the loss). An entry whose hash differs from the window on disk is stale: it is
//! recomputed and rewritten, never used.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::zoo::{Window, loss_at};

/// The exhaustive answer for one cold window (indices into the window, oldest first).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reference {
    pub hash: String,
    pub window: usize,
    pub k: usize,
    pub subsets: usize,
    pub best: Vec<usize>,
    pub best_loss: f64,
    /// The five best subsets and their losses, best first.
    pub top: Vec<(Vec<usize>, f64)>,
    pub median_loss: f64,
    pub worst_loss: f64,
    /// 1-based rank of LAWA-k (the newest k) among all subsets.
    pub lawa_rank: usize,
    /// Wall time of the exhaustive pass when it was computed (for the record).
    pub seconds: f64,
}

#[derive(Default, Serialize, Deserialize)]
pub struct Cache {
    pub split: String,
    pub note: String,
    pub windows: BTreeMap<String, Reference>,
}

impl Cache {
    pub fn read(path: &Path, split: &str) -> Result<Cache, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Cache {
                split: split.to_string(),
                note: "exhaustive best k-subset per cold window of the zoo (examples/bench_zoo); \
                       keyed by window id and content hash; regenerated when stale"
                    .into(),
                windows: BTreeMap::new(),
            }),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn write(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())? + "\n";
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The cache key of the window `[start, start + window)`: the window id for the cold window,
/// `<id>@slide<start>` for a slid one.
pub fn key(w: &Window, start: usize) -> String {
    if start == 0 { w.entry.id.clone() } else { format!("{}@slide{start}", w.entry.id) }
}

/// The content hash of what the exhaustive answer on members `[start, start + window)` depends
/// on: k, window size, activation, loss, then each member's name and bytes and the selection
/// data's.
pub fn content_hash(w: &Window, start: usize) -> Result<String, String> {
    let e = &w.entry;
    let mut parts =
        vec![format!("k={} window={} {:?} {:?}", e.k, e.window, e.activation, e.loss).into_bytes()];
    for rel in e.members[start..start + e.window].iter().chain([&e.select]) {
        let path = w.dir.join(rel);
        parts.push(rel.clone().into_bytes());
        parts.push(std::fs::read(&path).map_err(|err| format!("{}: {err}", path.display()))?);
    }
    Ok(fnv1a(&parts))
}

/// FNV-1a (64-bit) over length-prefixed parts, as 16 hex digits. Not cryptographic: it detects
/// a regenerated or changed zoo, which is all the cache needs.
fn fnv1a(parts: &[Vec<u8>]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in (part.len() as u64).to_le_bytes().iter().chain(part) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// All k-subsets of 0..n in lexicographic order.
fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut c: Vec<usize> = (0..k).collect();
    loop {
        out.push(c.clone());
        let Some(i) = (0..k).rev().find(|&i| c[i] < n - k + i) else { return out };
        c[i] += 1;
        for j in i + 1..k {
            c[j] = c[j - 1] + 1;
        }
    }
}

/// Evaluate every k-subset of members `[start, start + window)` (uniform weights) on the
/// selection split, split over `threads` threads, each with its own objective.
pub fn exhaustive(
    w: &Window,
    start: usize,
    hash: String,
    threads: usize,
) -> Result<Reference, String> {
    let (n, k) = (w.entry.window, w.entry.k);
    let all = subsets(n, k);
    let started = Instant::now();
    let threads = threads.max(1);
    let mut losses = vec![f64::NAN; all.len()];
    let chunk = all.len().div_ceil(threads);
    std::thread::scope(|s| -> Result<(), String> {
        let mut handles = Vec::new();
        for (sets, out) in all.chunks(chunk).zip(losses.chunks_mut(chunk)) {
            handles.push(s.spawn(move || -> Result<(), String> {
                let mut obj = w.objective(&w.entry.select)?;
                let mut weights = vec![0.0; n];
                for (set, slot) in sets.iter().zip(out.iter_mut()) {
                    weights.iter_mut().for_each(|x| *x = 0.0);
                    set.iter().for_each(|&i| weights[i] = 1.0 / k as f64);
                    *slot = loss_at(w, obj.as_mut(), start, &weights);
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join().map_err(|_| "exhaustive worker panicked".to_string())??;
        }
        Ok(())
    })?;
    if let Some(i) = losses.iter().position(|l| !l.is_finite()) {
        return Err(format!("{}: subset {:?} has a non-finite loss", w.entry.id, all[i]));
    }
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by(|a, b| losses[*a].total_cmp(&losses[*b]).then(a.cmp(b)));
    let lawa: Vec<usize> = (n - k..n).collect();
    let lawa_rank = 1 + order.iter().position(|&i| all[i] == lawa).unwrap_or(0);
    Ok(Reference {
        hash,
        window: n,
        k,
        subsets: all.len(),
        best: all[order[0]].clone(),
        best_loss: losses[order[0]],
        top: order.iter().take(5).map(|&i| (all[i].clone(), losses[i])).collect(),
        median_loss: losses[order[order.len() / 2]],
        worst_loss: losses[order[order.len() - 1]],
        lawa_rank,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn subsets_are_all_combinations() {
        let s = super::subsets(6, 3);
        assert_eq!(s.len(), 20);
        assert_eq!(s[0], vec![0, 1, 2]);
        assert_eq!(s[19], vec![3, 4, 5]);
    }

    #[test]
    fn the_hash_sees_every_byte_and_where_parts_end() {
        let h =
            |parts: &[&[u8]]| super::fnv1a(&parts.iter().map(|p| p.to_vec()).collect::<Vec<_>>());
        let base = h(&[b"k=5", b"members/step_1", &[0, 1, 2, 3]]);
        assert_eq!(base, h(&[b"k=5", b"members/step_1", &[0, 1, 2, 3]]));
        assert_ne!(base, h(&[b"k=5", b"members/step_1", &[0, 1, 2, 4]]));
        assert_ne!(base, h(&[b"k=3", b"members/step_1", &[0, 1, 2, 3]]));
        assert_ne!(h(&[b"ab", b"c"]), h(&[b"a", b"bc"]));
    }
}
