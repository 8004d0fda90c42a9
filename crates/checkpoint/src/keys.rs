//! Key normalisation: strip prefixes such as `_orig_mod.` (added by `torch.compile`) so that
//! checkpoints from compiled and plain models line up. Reports every rename; two keys that
//! become equal are an error. This module does not touch tensor data.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// `(original, new)` for each renamed key, and new name → original name for every key.
pub(crate) type Normalised = (Vec<(String, String)>, BTreeMap<String, String>);

/// Normalise every name; two names that become equal are an error.
pub(crate) fn normalise(
    path: &Path,
    names: impl Iterator<Item = String>,
    prefixes: &[String],
) -> Result<Normalised> {
    let mut renames = Vec::new();
    let mut to_orig: BTreeMap<String, String> = BTreeMap::new();
    for orig in names {
        let new = strip_one(&orig, prefixes);
        if new != orig {
            renames.push((orig.clone(), new.clone()));
        }
        if let Some(other) = to_orig.insert(new.clone(), orig.clone()) {
            return Err(Error::bad_input(
                path,
                format!(
                    "tensors {other:?} and {orig:?} both become {new:?} after stripping \
                     prefixes {prefixes:?}; open with no prefix stripping"
                ),
            ));
        }
    }
    renames.sort();
    Ok((renames, to_orig))
}

/// Strip leading prefixes repeatedly (`_orig_mod._orig_mod.x` → `x`); never to an empty name.
pub(crate) fn strip_one(name: &str, prefixes: &[String]) -> String {
    let mut cur = name;
    loop {
        let next = prefixes
            .iter()
            .filter(|p| !p.is_empty())
            .find_map(|p| cur.strip_prefix(p.as_str()).filter(|rest| !rest.is_empty()));
        match next {
            Some(rest) => cur = rest,
            None => return cur.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_and_reports() {
        let p = vec!["_orig_mod.".to_string()];
        let names = ["_orig_mod.a.weight", "b.bias", "_orig_mod._orig_mod.c"].map(String::from);
        let (renames, map) = normalise(Path::new("x"), names.into_iter(), &p).unwrap();
        assert_eq!(renames.len(), 2);
        assert_eq!(map["a.weight"], "_orig_mod.a.weight");
        assert_eq!(map["c"], "_orig_mod._orig_mod.c");
        assert_eq!(map["b.bias"], "b.bias");
    }

    #[test]
    fn collision_is_an_error() {
        let p = vec!["_orig_mod.".to_string()];
        let names = ["_orig_mod.a", "a"].map(String::from);
        let err = normalise(Path::new("f.pt"), names.into_iter(), &p).unwrap_err();
        assert!(err.to_string().contains("f.pt"), "{err}");
        assert!(err.to_string().contains("both become"), "{err}");
    }
}
