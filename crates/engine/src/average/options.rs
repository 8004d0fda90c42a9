//! How to write an average, independent of which inputs: the output dtype of float tensors,
//! what integer tensors get, what a value beyond a narrower dtype's range does. Shared by the
//! command line, the config file and both averaging paths; imports only the `dtype` and
//! `error` leaves.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use sewa_checkpoint::dtype::DType;

/// Output dtype of floating tensors. Integer and bool tensors always keep their dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutDType {
    /// The inputs' dtype (fp16 in, fp16 out).
    #[default]
    Keep,
    F32,
    BF16,
    F16,
}

impl OutDType {
    /// The dtype an input tensor of dtype `input` is written as.
    pub fn resolve(self, input: DType) -> DType {
        match (self, input.is_float()) {
            (_, false) | (OutDType::Keep, true) => input,
            (OutDType::F32, true) => DType::F32,
            (OutDType::BF16, true) => DType::BF16,
            (OutDType::F16, true) => DType::F16,
        }
    }
}

impl FromStr for OutDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "keep" => Ok(OutDType::Keep),
            "f32" | "float32" => Ok(OutDType::F32),
            "bf16" | "bfloat16" => Ok(OutDType::BF16),
            "f16" | "fp16" | "float16" => Ok(OutDType::F16),
            _ => Err(format!("unknown dtype {s:?}; expected keep, f32, bf16 or f16")),
        }
    }
}

impl fmt::Display for OutDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutDType::Keep => "keep",
            OutDType::F32 => "f32",
            OutDType::BF16 => "bf16",
            OutDType::F16 => "f16",
        })
    }
}

/// What to do with integer and bool tensors (step counters, BatchNorm `num_batches_tracked`),
/// which have no meaningful average.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntPolicy {
    /// Copy from the latest input: highest step, or the last given when steps are unknown.
    #[default]
    Latest,
    /// Copy from the earliest input: lowest step, or the first given when steps are unknown.
    First,
    /// Refuse inputs that have integer or bool tensors.
    Error,
}

impl FromStr for IntPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "latest" => Ok(IntPolicy::Latest),
            "first" => Ok(IntPolicy::First),
            "error" => Ok(IntPolicy::Error),
            _ => Err(format!("unknown int policy {s:?}; expected latest, first or error")),
        }
    }
}

impl fmt::Display for IntPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IntPolicy::Latest => "latest",
            IntPolicy::First => "first",
            IntPolicy::Error => "error",
        })
    }
}

/// What to do when an average is finite but beyond the output dtype's range (f16 above
/// 65504, bf16 or f32 above about 3.4e38): never written as inf silently.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeOverflow {
    /// Refuse the output, naming the tensor and its largest value.
    #[default]
    Error,
    /// Clamp such values to the dtype's largest finite value of the same sign.
    Saturate,
}

impl FromStr for DtypeOverflow {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(DtypeOverflow::Error),
            "saturate" => Ok(DtypeOverflow::Saturate),
            _ => Err(format!("unknown dtype overflow policy {s:?}; expected error or saturate")),
        }
    }
}

impl fmt::Display for DtypeOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DtypeOverflow::Error => "error",
            DtypeOverflow::Saturate => "saturate",
        })
    }
}

/// The refusal of an average whose tensor `tensor` reaches `largest` (at element `at`), a
/// finite value beyond the range of the output dtype `dtype`.
pub fn overflow_error(tensor: &str, dtype: DType, largest: impl fmt::LowerExp, at: usize) -> Error {
    let max = match dtype {
        DType::F16 => half::f16::MAX.to_f64(),
        DType::BF16 => half::bf16::MAX.to_f64(),
        _ => f32::MAX as f64,
    };
    let name = format!("{dtype:?}").to_lowercase();
    Error::Usage(format!(
        "tensor {tensor}: the average reaches {largest:e} at element {at}, beyond the range of \
         {name} (±{max:e}); refusing to write inf. Write a wider dtype, or clamp to ±{max:e} \
         with dtype_overflow = \"saturate\""
    ))
}

/// How to average, independent of which inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AverageOptions {
    pub dtype: OutDType,
    pub int_policy: IntPolicy,
    /// Finite averages beyond a narrower output dtype's range: refuse or saturate.
    pub overflow: DtypeOverflow,
    /// Worker threads per tensor (at least 1).
    pub threads: usize,
}

impl Default for AverageOptions {
    fn default() -> Self {
        AverageOptions {
            dtype: OutDType::Keep,
            int_policy: IntPolicy::Latest,
            overflow: DtypeOverflow::Error,
            threads: 1,
        }
    }
}
