//! Schema check across the inputs of one average: same tensor names, dtypes and shapes.
//! The error names the first mismatch (tensor, both files, both shapes or dtypes), so a user can
//! see at once which checkpoint does not belong. This module reads only tensor lists, no bytes.

use crate::error::{Error, Result};
use sewa_checkpoint::{Checkpoint, TensorMeta};

/// Check that every input has exactly the tensors of the first one. `Error::BadInput` names the
/// offending input (not the reference) with both sides of the first difference.
pub fn check_schema(inputs: &[&Checkpoint]) -> Result<()> {
    check_schema_with(inputs, false)
}

/// [`check_schema`], where `mixed_floats` lets a float tensor's dtype differ across inputs
/// (allowed when the output dtype is given, so no input's dtype has to be chosen for it).
pub fn check_schema_with(inputs: &[&Checkpoint], mixed_floats: bool) -> Result<()> {
    let Some((first, rest)) = inputs.split_first() else {
        return Err(Error::Usage("no input checkpoints given".into()));
    };
    let reference = first.path().display().to_string();
    for other in rest {
        walk(&reference, first.tensors(), other, mixed_floats)?;
    }
    Ok(())
}

/// Check `other` against the tensor list `a` of `reference` (a file, or a description such as
/// "the window"); the error names `other` with both sides of the first difference.
pub fn check_against(reference: &str, a: &[TensorMeta], other: &Checkpoint) -> Result<()> {
    walk(reference, a, other, false)
}

fn walk(reference: &str, a: &[TensorMeta], other: &Checkpoint, mixed_floats: bool) -> Result<()> {
    let b = other.tensors();
    // Both lists are sorted by name: walk them together to find the first name in one only.
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x.name == y.name => {
                compare_meta(reference, other, x, y, mixed_floats)?;
                i += 1;
                j += 1;
            }
            (Some(x), y) if y.is_none_or(|y| x.name < y.name) => {
                return Err(missing(other, reference, &x.name));
            }
            (_, Some(y)) => return Err(extra(other, reference, &y.name)),
            _ => unreachable!("loop condition guarantees one side has a tensor"),
        }
    }
    Ok(())
}

fn compare_meta(
    reference: &str,
    other: &Checkpoint,
    x: &TensorMeta,
    y: &TensorMeta,
    mixed_floats: bool,
) -> Result<()> {
    let both_float = x.dtype.is_float() && y.dtype.is_float();
    if x.dtype != y.dtype && !(mixed_floats && both_float) {
        let hint = if both_float {
            "; give an output dtype (dtype = \"f32\", or bf16 or f16) to average mixed float \
             dtypes"
        } else {
            ""
        };
        return Err(Error::bad_input(
            other.path(),
            format!(
                "tensor {}: dtype {:?} here but {:?} in {} (all inputs must share dtypes{hint})",
                x.name, y.dtype, x.dtype, reference
            ),
        ));
    }
    if x.shape != y.shape {
        return Err(Error::bad_input(
            other.path(),
            format!(
                "tensor {}: shape {:?} here but {:?} in {} (inputs must come from the same model)",
                x.name, y.shape, x.shape, reference
            ),
        ));
    }
    Ok(())
}

/// `lacking` has no tensor `name` that `having` has.
fn missing(lacking: &Checkpoint, having: &str, name: &str) -> Error {
    Error::bad_input(
        lacking.path(),
        format!(
            "has no tensor {name}, which {} has (inputs must have the same tensor names; \
             for torch.compile's `_orig_mod.` or another prefix: strip_prefix = \"PREFIX\")",
            having
        ),
    )
}

/// `blamed` has a tensor `name` that `reference` lacks.
fn extra(blamed: &Checkpoint, reference: &str, name: &str) -> Error {
    Error::bad_input(
        blamed.path(),
        format!(
            "has a tensor {name} that {} lacks (inputs must have the same tensor names)",
            reference
        ),
    )
}
