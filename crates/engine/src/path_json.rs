//! Paths in JSON, losslessly. A Linux path is bytes; JSON text is Unicode. A path that is valid
//! UTF-8 is written as a plain JSON string (what every manifest has always held); any other
//! path is written as an object
//!
//! ```json
//! {"bytes_hex": "6f75745ffe2e7361666574656e736f7273", "lossy": "out_\ufffd.safetensors"}
//! ```
//!
//! where `bytes_hex` is the path's bytes in lowercase hex (the exact path: decode it) and
//! `lossy` is the same path with invalid sequences replaced by U+FFFD, for people only (two
//! different paths may read alike). Use with `#[serde(with = "path_json")]` (or
//! `path_json::option` for `Option<PathBuf>`). Serialising never fails.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The JSON shapes of a path.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Repr {
    Text(String),
    Bytes {
        bytes_hex: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lossy: Option<String>,
    },
}

impl Repr {
    fn of(p: &Path) -> Repr {
        match p.to_str() {
            Some(s) => Repr::Text(s.to_owned()),
            None => Repr::Bytes {
                bytes_hex: hex(p.as_os_str().as_bytes()),
                lossy: Some(p.to_string_lossy().into_owned()),
            },
        }
    }

    fn into_path(self) -> Result<PathBuf, String> {
        match self {
            Repr::Text(s) => Ok(PathBuf::from(s)),
            Repr::Bytes { bytes_hex, .. } => {
                Ok(PathBuf::from(OsString::from_vec(unhex(&bytes_hex)?)))
            }
        }
    }
}

/// The path as a JSON value (for `json!` bodies, which would panic on a non-UTF-8 `Path`).
pub fn value(p: &Path) -> serde_json::Value {
    serde_json::to_value(Repr::of(p)).unwrap_or(serde_json::Value::Null)
}

pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    Repr::of(p).serialize(s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    Repr::deserialize(d)?.into_path().map_err(serde::de::Error::custom)
}

/// The same for `Option<PathBuf>` (`null` for `None`).
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        p.as_deref().map(Repr::of).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        match Option::<Repr>::deserialize(d)? {
            Some(r) => r.into_path().map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if !s.len().is_multiple_of(2) {
        return Err(format!("bytes_hex {s:?}: odd number of digits"));
    }
    (s.as_bytes().chunks_exact(2))
        .map(|p| match (digit(p[0]), digit(p[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(format!("bytes_hex {s:?}: not hexadecimal")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        #[serde(with = "super")]
        p: PathBuf,
        #[serde(with = "super::option", default)]
        o: Option<PathBuf>,
    }

    fn raw(bytes: &[u8]) -> PathBuf {
        PathBuf::from(OsString::from_vec(bytes.to_vec()))
    }

    #[test]
    fn utf8_paths_stay_plain_strings() {
        let r = Rec { p: "runs/café/step_1.safetensors".into(), o: None };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json, serde_json::json!({"p": "runs/café/step_1.safetensors", "o": null}));
        assert_eq!(serde_json::from_value::<Rec>(json).unwrap(), r);
    }

    #[test]
    fn non_utf8_paths_round_trip_exactly() {
        let r = Rec { p: raw(b"out_\xfe.safetensors"), o: Some(raw(b"/r/\xff\x80x")) };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["p"]["bytes_hex"], "6f75745ffe2e7361666574656e736f7273");
        assert_eq!(json["p"]["lossy"], "out_\u{fffd}.safetensors");
        assert_eq!(serde_json::from_value::<Rec>(json).unwrap(), r);
        // Two paths with the same lossy text stay distinct.
        let other = Rec { p: raw(b"out_\xfd.safetensors"), o: None };
        assert_ne!(
            serde_json::to_value(&other).unwrap()["p"],
            serde_json::to_value(&r).unwrap()["p"]
        );
    }

    #[test]
    fn bad_hex_is_an_error_not_a_panic() {
        for bad in
            [r#"{"p": {"bytes_hex": "abc"}}"#, r#"{"p": {"bytes_hex": "zz"}}"#, r#"{"p": 3}"#]
        {
            assert!(serde_json::from_str::<Rec>(bad).is_err(), "{bad}");
        }
        let missing_option = serde_json::from_str::<Rec>(r#"{"p": "a"}"#).unwrap();
        assert_eq!(missing_option.o, None);
    }
}
