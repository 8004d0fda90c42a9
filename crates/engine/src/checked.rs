//! Values that check themselves while the TOML is deserialised, so that a bad one is rejected
//! at its own line and column: integers ≥ 1, numbers in (0, 1), entry-name globs, loopback
//! socket addresses, and the
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

    /// An optional byte count: a number of bytes (0 allowed) or a size such as "10GiB".
    pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(Some(n as u64)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!("must be ≥ 0 bytes, got {n}"))),
            Raw::Text(t) => super::parse_size(&t).map(Some).map_err(serde::de::Error::custom),
        }
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

/// A socket address on the loopback interface (`127.0.0.0/8` or `::1`), e.g. the metrics
/// endpoint's `"127.0.0.1:9464"`; port 0 asks the system for a free port. Anything else is
/// refused at its line: sewa serves its figures to the machine it runs on, never a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopbackAddr(pub std::net::SocketAddr);

impl LoopbackAddr {
    /// Parse `s` as `IP:PORT` (`[::1]:PORT` for IPv6) and keep it only on loopback.
    pub fn parse(s: &str) -> std::result::Result<LoopbackAddr, String> {
        let addr: std::net::SocketAddr = s.parse().map_err(|_| {
            format!(
                "{s:?} is not an address with a port (e.g. \"127.0.0.1:9464\" or \"[::1]:9464\")"
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{s:?} is not a loopback address: the metrics endpoint is served on this machine \
                 only (127.0.0.0/8 or ::1, e.g. \"127.0.0.1:{}\"); scrape it through a local \
                 agent or a tunnel",
                addr.port()
            ));
        }
        Ok(LoopbackAddr(addr))
    }
}

impl<'de> Deserialize<'de> for LoopbackAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LoopbackAddr::parse(&s).map_err(serde::de::Error::custom)
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

/// Parse a byte size: `1048576`, `64KiB`, `512MiB`, `5GiB`, `5GB` (powers of 1000), `1.5GiB`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("{s:?} is not a size such as 5GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB)")),
    };
    let bytes = num * mult as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("size {s:?} must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// `[runtime] memory_budget`: how many bytes sewa may keep between publications.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryBudget {
    /// A quarter of the memory available when the daemon starts (the trainer needs the rest).
    #[default]
    Auto,
    Bytes(u64),
}

impl<'de> Deserialize<'de> for MemoryBudget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        let err = |m: String| serde::de::Error::custom(m);
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 1 => Ok(MemoryBudget::Bytes(n as u64)),
            Raw::Int(n) => Err(err(format!("must be at least 1 byte, got {n}"))),
            Raw::Text(t) if t == "auto" => Ok(MemoryBudget::Auto),
            Raw::Text(t) => parse_size(&t).map(MemoryBudget::Bytes).map_err(|e| {
                err(format!("{e}; expected \"auto\", a number of bytes or a size like \"8GiB\""))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GiB"), Ok(5 << 30));
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
    }

    #[test]
    fn loopback_addresses_only() {
        for ok in ["127.0.0.1:9464", "127.3.2.1:1", "[::1]:9464", "127.0.0.1:0"] {
            assert!(LoopbackAddr::parse(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("0.0.0.0:9464", "not a loopback"),
            ("10.0.0.1:1", "not a loopback"),
            ("[::]:9464", "not a loopback"),
            ("[::ffff:127.0.0.1]:9464", "not a loopback"),
            ("localhost:9464", "not an address"),
            ("127.0.0.1", "not an address"),
        ] {
            let e = LoopbackAddr::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn memory_budget_is_auto_bytes_or_a_size() {
        #[derive(Deserialize)]
        struct T {
            b: MemoryBudget,
        }
        let b = |s: &str| toml::from_str::<T>(&format!("b = {s}")).map(|t| t.b);
        assert_eq!(b("\"auto\"").unwrap(), MemoryBudget::Auto);
        assert_eq!(b("1024").unwrap(), MemoryBudget::Bytes(1024));
        assert_eq!(b("\"2GiB\"").unwrap(), MemoryBudget::Bytes(2 << 30));
        assert!(b("0").unwrap_err().to_string().contains("at least 1 byte"));
        assert!(b("\"lots\"").unwrap_err().to_string().contains("\"auto\""));
    }
}
