//! Where each parameter of a ZeRO checkpoint lies in the ranks' flat fp32 groups, as byte
//! segments (the rules of DeepSpeed's `zero_to_fp32.py`; see `zero` for the layouts). Pure
//! arithmetic on element counts that were checked against the files: no I/O, no pickles.

use std::path::Path;

use super::bad;
use crate::DType;
use crate::error::Result;
use crate::storage::Segment;
use crate::strided::numel;

/// A contiguous run of elements in one held file.
#[derive(Clone, Copy)]
pub(super) struct Piece {
    pub file: usize,
    pub start: u64,
    pub numel: usize,
}

pub(super) fn segments(pieces: &[Piece], es: usize) -> Vec<Segment> {
    pieces.iter().map(|p| Segment { file: p.file, start: p.start, len: p.numel * es }).collect()
}

/// Elements `[from, from + n)` of the concatenation of `pieces`, as byte segments; `None` when
/// the pieces hold fewer elements.
pub(super) fn slice(pieces: &[Piece], from: usize, n: usize, es: usize) -> Option<Vec<Segment>> {
    let end = from.checked_add(n)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    for p in pieces {
        let (s, e) = (at, at + p.numel);
        at = e;
        let (lo, hi) = (from.max(s), end.min(e));
        if lo < hi {
            let start = p.start + ((lo - s) * es) as u64;
            out.push(Segment { file: p.file, start, len: (hi - lo) * es });
        }
    }
    (at >= end).then_some(out)
}

pub(super) fn take(pieces: &[Piece], n: usize, es: usize) -> Option<Vec<Segment>> {
    slice(pieces, 0, n, es)
}

pub(super) type Params = Vec<(String, Vec<usize>, Vec<Segment>)>;

/// ZeRO-1/2 (see the module header).
pub(super) fn zero2(
    dir: &Path,
    shapes: &[Vec<(String, Vec<usize>)>],
    ranks: &[Vec<Piece>],
    alignment: Option<&[Vec<usize>]>,
    dtype: DType,
) -> Result<Params> {
    let world = ranks.len();
    let n_groups = ranks[0].len();
    if shapes.len() != n_groups {
        return Err(bad(
            dir,
            format!("{} param_shapes groups for {n_groups} fp32 groups", shapes.len()),
        ));
    }
    let align = |x: usize| x.div_ceil(2 * world) * 2 * world;
    let mut out = Vec::new();
    for (g, group) in shapes.iter().enumerate() {
        let pieces: Vec<Piece> = ranks.iter().map(|r| r[g]).collect();
        let avail: usize = pieces.iter().map(|p| p.numel).sum();
        let pads = alignment.and_then(|a| a.get(g));
        if pads.is_some_and(|p| p.len() != group.len()) {
            return Err(bad(
                dir,
                format!("group {g}: param_alignment_paddings do not match param_shapes"),
            ));
        }
        let mut offset = 0usize;
        for (i, (name, shape)) in group.iter().enumerate() {
            let n = numel(shape).ok_or_else(|| bad(dir, format!("{name}: shape overflows")))?;
            let segs = slice(&pieces, offset, n, dtype.size()).ok_or_else(|| {
                bad(dir, format!("parameter {name} needs elements {offset}..{} of group {g}, which has {avail}", offset.saturating_add(n)))
            })?;
            out.push((name.clone(), shape.clone(), segs));
            offset = offset + n + pads.map_or(0, |p| p[i]);
        }
        if align(offset) != align(avail) {
            return Err(bad(dir, format!("group {g}: consumed {offset} elements out of {avail}")));
        }
    }
    Ok(out)
}

/// ZeRO-3 (see the module header).
pub(super) fn zero3(
    dir: &Path,
    shapes: &[Vec<(String, Vec<usize>)>],
    ranks: &[Vec<Piece>],
    dtype: DType,
) -> Result<Params> {
    let world = ranks.len();
    let sizes = |r: &Vec<Piece>| r.iter().map(|p| p.numel).collect::<Vec<_>>();
    if ranks.iter().any(|r| sizes(r) != sizes(&ranks[0])) {
        return Err(bad(dir, "ranks' fp32_flat_groups differ in size"));
    }
    let per_rank: usize = ranks[0].iter().map(|p| p.numel).sum();
    let mut out = Vec::new();
    let mut offset = 0usize;
    for (name, shape) in shapes.iter().flatten() {
        let n = numel(shape).ok_or_else(|| bad(dir, format!("{name}: shape overflows")))?;
        let part = n.div_ceil(world);
        let mut pieces = Vec::new();
        for r in ranks {
            let segs = slice(r, offset, part, dtype.size()).ok_or_else(|| {
                bad(
                    dir,
                    format!(
                        "parameter {name} needs elements {offset}..{} of each rank's {per_rank}",
                        offset.saturating_add(part)
                    ),
                )
            })?;
            pieces.extend(segs.into_iter().map(|s| Piece {
                file: s.file,
                start: s.start,
                numel: s.len / dtype.size(),
            }));
        }
        // world · ceil(n / world) >= n elements were taken: never short.
        let segs = take(&pieces, n, dtype.size())
            .ok_or_else(|| bad(dir, format!("parameter {name}: partitions too short")))?;
        out.push((name.clone(), shape.clone(), segs));
        offset += part;
    }
    if offset != per_rank {
        return Err(bad(
            dir,
            format!("consumed {} elements out of {}", offset * world, per_rank * world),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Segment;

    fn pieces(sizes: &[usize]) -> Vec<Piece> {
        let mut at = 0;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = Piece { file: i, start: at, numel: n };
                at += 1000;
                p
            })
            .collect()
    }

    #[test]
    fn slices_cross_piece_boundaries_and_stop_at_the_end() {
        let p = pieces(&[3, 4]);
        let s = slice(&p, 2, 3, 4).unwrap();
        assert_eq!(
            s,
            vec![Segment { file: 0, start: 8, len: 4 }, Segment { file: 1, start: 1000, len: 8 }]
        );
        assert!(slice(&p, 5, 3, 4).is_none(), "past the end");
        assert!(slice(&p, usize::MAX, 2, 4).is_none(), "overflow");
    }

    #[test]
    fn zero3_takes_ceil_numel_over_world_from_each_rank() {
        // Two ranks, params of 3 and 2 elements: partitions of 2 and 1 per rank.
        let ranks = vec![pieces(&[3]), vec![Piece { file: 9, start: 0, numel: 3 }]];
        let shapes = vec![vec![("a".to_string(), vec![3]), ("b".to_string(), vec![2])]];
        let out = zero3(Path::new("d"), &shapes, &ranks, DType::F32).unwrap();
        assert_eq!(
            out[0].2,
            vec![Segment { file: 0, start: 0, len: 8 }, Segment { file: 9, start: 0, len: 4 }]
        );
        assert_eq!(
            out[1].2,
            vec![Segment { file: 0, start: 8, len: 4 }, Segment { file: 9, start: 8, len: 4 }]
        );
        let short = vec![vec![("a".to_string(), vec![8])]];
        assert!(zero3(Path::new("d"), &short, &ranks, DType::F32).is_err());
    }

    #[test]
    fn zero2_checks_the_padded_length() {
        let ranks = vec![pieces(&[4]), vec![Piece { file: 5, start: 0, numel: 4 }]];
        let ok = vec![vec![("a".to_string(), vec![7])]];
        assert!(zero2(Path::new("d"), &ok, &ranks, None, DType::F32).is_ok());
        let short = vec![vec![("a".to_string(), vec![3])]];
        assert!(zero2(Path::new("d"), &short, &ranks, None, DType::F32).is_err(), "4 of 8 unused");
    }
}
