//! Averaging real checkpoint files end to end through the library (the kernel's numerics are
//! checked against the f64 twin in the unit tests; here: formats, dtypes, policies, files).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use safetensors::Dtype;

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every tensor of a safetensors file: name → ("dtype shape", bytes).
pub fn read_tensors(path: &Path) -> BTreeMap<String, (String, Vec<u8>)> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?} {:?}", v.dtype(), v.shape()), v.data().to_vec())))
        .collect()
}

/// Write a safetensors file with the safetensors crate: `(name, dtype, shape, bytes)`.
pub fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
}
