//! Values that check themselves while the TOML is deserialised, so that a bad one is rejected
//! at its own line and column: integers ≥ 1, numbers in (0, 1), entry-name globs, and the
//! `deserialize_with` helpers the owners' tables (`[objective]`, `[select.sewa]`) use for their
//! plain-number fields. A leaf: the config and every table's owner import it, it imports none.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// An integer ≥ 1 (rejected at its line otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Positive(pub u64);

impl Positive {
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if v < 1 {
            return Err(serde::de::Error::custom(format!("must be at least 1, got {v}")));
        }
        Ok(Positive(v as u64))
    }
}

/// `deserialize_with` helpers for the owners' tables (`[objective]`, `[select.sewa]`), whose
/// plain-number fields must reject themselves at their line as this module's types do.
pub mod de {
    use serde::{Deserialize, Deserializer};

    /// An integer ≥ 1.
    pub fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        super::Positive::deserialize(d).map(|p| p.get())
    }

    /// An optional integer ≥ 1.
    pub fn opt_at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        at_least_one(d).map(Some)
    }

    /// A finite number > 0.
    pub fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(serde::de::Error::custom(format!("must be a positive number, got {v}")));
        }
        Ok(v)
    }

    /// A finite number ≥ 0.
    pub fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(serde::de::Error::custom(format!("must be a number >= 0, got {v}")));
        }
        Ok(v)
    }
}

/// A float strictly between 0 and 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnitOpen(pub f64);

impl<'de> Deserialize<'de> for UnitOpen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v > 0.0 && v < 1.0) {
            return Err(serde::de::Error::custom(format!(
                "must be strictly between 0 and 1 (e.g. 0.9), got {v}"
            )));
        }
        Ok(UnitOpen(v))
    }
}

/// A validated glob on entry names.
#[derive(Clone)]
pub struct Pattern(pub glob::Pattern);

impl Pattern {
    pub fn matches(&self, name: &str) -> bool {
        self.0.matches(name)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.contains('/') {
            return Err(serde::de::Error::custom(
                "matches entry names directly under `dir`; it cannot contain '/'",
            ));
        }
        glob::Pattern::new(&s)
            .map(Pattern)
            .map_err(|e| serde::de::Error::custom(format!("bad glob {s:?}: {e}")))
    }
}
