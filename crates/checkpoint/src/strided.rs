//! Strided tensor views as torch stores them (a transposed weight, a slice at an offset):
//! how many storage elements a view spans, whether it is row-major contiguous, and copying it
//! into row-major order. Pure functions over byte slices.

/// Number of elements, `None` on overflow (hostile sizes). A shape with a zero dimension has
/// no elements, but its other dimensions must still multiply without overflow (as the
/// safetensors format requires): `[2^40, 2^40, 0]` is refused, since any product taken in
/// another order (strides, a writer's own check) would overflow.
pub(crate) fn numel(shape: &[usize]) -> Option<usize> {
    let n = nonzero_product(shape)?;
    Some(if shape.contains(&0) { 0 } else { n })
}

/// The product of the non-zero dimensions, `None` on overflow: what any row-major
/// computation over the shape (strides included) multiplies up to.
pub(crate) fn nonzero_product(shape: &[usize]) -> Option<usize> {
    shape.iter().filter(|&&d| d != 0).try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Elements from the view's first to its last element, inclusive; `None` on overflow.
/// Only meaningful for views with at least one element.
pub(crate) fn view_span(shape: &[usize], stride: &[usize]) -> Option<usize> {
    shape.iter().zip(stride).try_fold(1usize, |acc, (&d, &s)| {
        d.saturating_sub(1).checked_mul(s).and_then(|x| acc.checked_add(x))
    })
}

/// True when no two elements of the view can share a storage element: taking the dimensions
/// of size > 1 by increasing stride, each stride exceeds the furthest offset the smaller ones
/// reach. Slices, transposes and permutes of a tensor pass; broadcast views (`expand`: a
/// stride of 0) and overlapping `as_strided`/`unfold` views do not. A passing view has at
/// most as many elements as it spans in storage, so reading it never allocates more than the
/// storage's real bytes.
pub(crate) fn is_non_overlapping(shape: &[usize], stride: &[usize]) -> bool {
    if shape.contains(&0) {
        return true; // no elements
    }
    let mut dims: Vec<(usize, usize)> =
        shape.iter().zip(stride).filter(|(d, _)| **d > 1).map(|(&d, &s)| (s, d)).collect();
    dims.sort_unstable();
    let mut reach = 0usize;
    for (s, d) in dims {
        if s <= reach {
            return false;
        }
        match (d - 1).checked_mul(s).and_then(|x| x.checked_add(reach)) {
            Some(r) => reach = r,
            None => return false,
        }
    }
    true
}

pub(crate) fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expect {
            return false;
        }
        expect *= d;
    }
    true
}

/// Copy a strided view (transposes, slices) into row-major order.
pub(crate) fn gather(raw: &[u8], shape: &[usize], stride: &[usize], es: usize) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..numel {
        let pos: usize = idx.iter().zip(stride).map(|(i, s)| i * s).sum();
        out.extend_from_slice(&raw[pos * es..(pos + 1) * es]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_shapes_with_overflowing_dimensions_have_no_element_count() {
        assert_eq!(numel(&[2, 0, 3]), Some(0));
        assert_eq!(numel(&[]), Some(1));
        assert_eq!(numel(&[1 << 40, 1 << 40, 0]), None, "issue 19");
        assert_eq!(numel(&[0, 1 << 40, 1 << 40]), None);
        assert_eq!(numel(&[1 << 40, 1 << 20]), Some(1 << 60));
    }

    #[test]
    fn gather_transposes() {
        // storage [0,1,2,3,4,5] as 3x2, viewed transposed: shape [2,3], stride [1,2]
        let raw: Vec<u8> = (0u8..6).collect();
        assert_eq!(gather(&raw, &[2, 3], &[1, 2], 1), vec![0, 2, 4, 1, 3, 5]);
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[], &[]));
        assert_eq!(view_span(&[2, 3], &[1, 2]), Some(6));
        assert_eq!(view_span(&[1 << 40, 2], &[1 << 40, 1]), None);
        assert_eq!(numel(&[1 << 40, 1 << 40]), None);
    }

    /// A 1-element storage viewed as [2^24, 2^24] with strides (0, 0) asked for a petabyte.
    #[test]
    fn broadcast_and_overlapping_views_are_not_readable() {
        assert!(!is_non_overlapping(&[1 << 24, 1 << 24], &[0, 0]));
        assert!(!is_non_overlapping(&[4, 3], &[0, 1]), "expand of a row");
        assert!(!is_non_overlapping(&[1 << 24, 1 << 24], &[1, 1]), "as_strided overlap");
        assert!(!is_non_overlapping(&[3, 4], &[1, 2]), "unfold-like windows");
        assert!(!is_non_overlapping(&[2, 1 << 62], &[1 << 62, 4]), "overflowing reach");
        for (shape, stride) in [
            (vec![2, 3], vec![3, 1]),
            (vec![2, 3], vec![1, 2]),
            (vec![4, 1, 5], vec![5, 0, 1]),
            (vec![3], vec![7]),
            (vec![2, 2, 2], vec![1, 4, 2]),
            (vec![], vec![]),
            (vec![0, 5], vec![0, 0]),
        ] {
            assert!(is_non_overlapping(&shape, &stride), "{shape:?} {stride:?}");
            let n = numel(&shape).unwrap();
            assert!(n == 0 || n <= view_span(&shape, &stride).unwrap(), "{shape:?} {stride:?}");
        }
    }
}
