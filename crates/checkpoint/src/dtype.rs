//! Little-endian float element bytes: decoding f16/bf16/f32/f64 to f32 or f64 (one element,
//! or a whole slice through the `half` crate's slice conversions) and the NaN/Inf scan. Every
//! module that reads float bytes (the averaging kernel, the running average, SeWA's blend, the
//! evaluator's gradients, the unpickler's scores, the daemon's load check) decodes here, so a
//! dtype is read one way everywhere. Knows nothing about files or tensors' names.

use half::slice::HalfFloatSliceExt;

/// Element type of a tensor, as stored on disk (little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    pub fn to_safetensors(self) -> ::safetensors::Dtype {
        use ::safetensors::Dtype as S;
        match self {
            DType::Bool => S::BOOL,
            DType::U8 => S::U8,
            DType::I8 => S::I8,
            DType::I16 => S::I16,
            DType::U16 => S::U16,
            DType::I32 => S::I32,
            DType::U32 => S::U32,
            DType::I64 => S::I64,
            DType::U64 => S::U64,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::F32 => S::F32,
            DType::F64 => S::F64,
        }
    }

    /// `None` for safetensors dtypes sewa does not average (fp8, complex, ...).
    pub fn from_safetensors(d: ::safetensors::Dtype) -> Option<Self> {
        use ::safetensors::Dtype as S;
        Some(match d {
            S::BOOL => DType::Bool,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::I16 => DType::I16,
            S::U16 => DType::U16,
            S::I32 => DType::I32,
            S::U32 => DType::U32,
            S::I64 => DType::I64,
            S::U64 => DType::U64,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            _ => return None,
        })
    }
}

/// A bf16 element as f32 (exact: bf16 is f32's upper half).
#[inline(always)]
pub fn bf16_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
}

/// An f16 element as f32 (exact).
#[inline(always)]
pub fn f16_to_f32(b: [u8; 2]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(b)).to_f32()
}

/// One element of a float `dtype` as f32 (f64 rounds); `None` for other dtypes or when `c`
/// is not exactly one element.
#[inline]
pub fn decode_f32(dtype: DType, c: &[u8]) -> Option<f32> {
    Some(match dtype {
        DType::F32 => f32::from_le_bytes(c.try_into().ok()?),
        DType::F16 => f16_to_f32(c.try_into().ok()?),
        DType::BF16 => bf16_to_f32(c.try_into().ok()?),
        DType::F64 => f64::from_le_bytes(c.try_into().ok()?) as f32,
        _ => return None,
    })
}

/// One element of a float `dtype` as f64 (exact); `None` for other dtypes or when `c` is not
/// exactly one element.
#[inline]
pub fn decode_f64(dtype: DType, c: &[u8]) -> Option<f64> {
    Some(match dtype {
        DType::F64 => f64::from_le_bytes(c.try_into().ok()?),
        DType::F32 => f32::from_le_bytes(c.try_into().ok()?) as f64,
        DType::F16 => f16_to_f32(c.try_into().ok()?) as f64,
        DType::BF16 => bf16_to_f32(c.try_into().ok()?) as f64,
        _ => return None,
    })
}

/// Little-endian f32s from (possibly unaligned) bytes; a trailing partial element is ignored.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// f32 values as little-endian bytes of the float `dtype` (f32, bf16 or f16; rounding to
/// nearest, through `half`'s slice conversions for the 16-bit types). Other dtypes get f32.
pub fn encode_f32s(dtype: DType, values: &[f32]) -> Vec<u8> {
    use half::slice::HalfFloatSliceExt;
    let halves = |bits: Vec<u16>| bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    match dtype {
        DType::BF16 => {
            let mut out = vec![half::bf16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            halves(out.iter().map(|h| h.to_bits()).collect())
        }
        DType::F16 => {
            let mut out = vec![half::f16::ZERO; values.len()];
            out.convert_from_f32_slice(values);
            halves(out.iter().map(|h| h.to_bits()).collect())
        }
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A whole float tensor's bytes as f32s (f64 rounds); `None` for a non-float dtype. Aligned
/// f16/bf16 bytes go through `half`'s slice conversion (vectorised where the CPU allows).
pub fn to_f32_vec(dtype: DType, bytes: &[u8]) -> Option<Vec<f32>> {
    let halves = || {
        bytemuck::try_cast_slice::<u8, u16>(bytes).ok().filter(|_| cfg!(target_endian = "little"))
    };
    Some(match dtype {
        DType::F32 => f32s(bytes),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        DType::F16 => match halves() {
            Some(h) => half::slice::HalfBitsSliceExt::reinterpret_cast::<half::f16>(h).to_f32_vec(),
            None => bytes.chunks_exact(2).map(|c| f16_to_f32([c[0], c[1]])).collect(),
        },
        DType::BF16 => match halves() {
            Some(h) => {
                half::slice::HalfBitsSliceExt::reinterpret_cast::<half::bf16>(h).to_f32_vec()
            }
            None => bytes.chunks_exact(2).map(|c| bf16_to_f32([c[0], c[1]])).collect(),
        },
        _ => return None,
    })
}

/// Position of the first NaN/Inf element in little-endian float bytes (`None` for non-float
/// dtypes, which hold neither).
pub fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<usize> {
    let size = dtype.size();
    bytes.chunks_exact(size).position(|c| match dtype {
        DType::F64 => !f64::from_le_bytes(c.try_into().expect("8 bytes")).is_finite(),
        DType::F32 => !f32::from_le_bytes(c.try_into().expect("4 bytes")).is_finite(),
        DType::BF16 => !bf16_to_f32([c[0], c[1]]).is_finite(),
        DType::F16 => !f16_to_f32([c[0], c[1]]).is_finite(),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOATS: [DType; 4] = [DType::F16, DType::BF16, DType::F32, DType::F64];

    fn encode(dtype: DType, vals: &[f64]) -> Vec<u8> {
        vals.iter()
            .flat_map(|&v| match dtype {
                DType::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
                DType::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
                DType::F32 => (v as f32).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            })
            .collect()
    }

    #[test]
    fn every_float_dtype_decodes_its_own_encoding() {
        let vals = [0.0, -1.5, 2.0, 0.25, -384.0];
        for dtype in FLOATS {
            let bytes = encode(dtype, &vals);
            let one: Vec<f64> =
                bytes.chunks_exact(dtype.size()).map(|c| decode_f64(dtype, c).unwrap()).collect();
            assert_eq!(one, vals, "{dtype:?}");
            let all: Vec<f64> =
                to_f32_vec(dtype, &bytes).unwrap().into_iter().map(f64::from).collect();
            assert_eq!(all, vals, "{dtype:?} as a slice");
            // Unaligned bytes take the element-wise path and agree.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            let unaligned = to_f32_vec(dtype, &shifted[1..]).unwrap();
            assert_eq!(unaligned.iter().map(|&x| x as f64).collect::<Vec<_>>(), vals);
        }
    }

    #[test]
    fn the_scan_finds_the_first_nan_or_inf_in_every_float_dtype() {
        for dtype in FLOATS {
            let bytes = encode(dtype, &[1.0, 2.0, f64::INFINITY, f64::NAN]);
            assert_eq!(first_non_finite(&bytes, dtype), Some(2), "{dtype:?}");
            assert_eq!(first_non_finite(&encode(dtype, &[1.0, -2.0]), dtype), None);
        }
        assert_eq!(first_non_finite(&[0xff; 8], DType::I64), None, "ints hold no NaN");
    }

    #[test]
    fn a_wrong_length_or_non_float_element_does_not_decode() {
        assert_eq!(decode_f64(DType::F32, &[0; 3]), None);
        assert_eq!(decode_f32(DType::F16, &[0; 4]), None);
        assert_eq!(decode_f64(DType::I32, &[0; 4]), None);
        assert!(to_f32_vec(DType::U8, &[1, 2]).is_none());
    }
}
