//! RFC 3339 UTC timestamps as sewa writes them into status files and manifests: one format
//! (milliseconds), so every file a monitor reads parses the same way.

use std::time::SystemTime;

/// `t` as an RFC 3339 UTC timestamp with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Now, as [`rfc3339`].
pub fn now() -> String {
    rfc3339(SystemTime::now())
}

/// Now with microseconds: the manifest's `started`, at the precision it has always had.
pub fn now_micros() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        // One day and 5 ms after the epoch.
        let t = UNIX_EPOCH + Duration::from_millis(86_400_005);
        assert_eq!(super::rfc3339(t), "1970-01-02T00:00:00.005Z");
    }
}
