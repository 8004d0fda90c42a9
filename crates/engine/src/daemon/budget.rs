//! `[runtime] memory_budget` made a number of bytes: "auto" is a quarter of the memory the
//! kernel says is available when the daemon starts (`MemAvailable`), so the trainer keeps the
//! rest. The pipeline keeps its running average only when that fits (see
//! `average::running::RunningAverage::fits`); otherwise it streams the selected members at
//! every publication, which needs only a tensor's worth of buffers.

use std::path::Path;

use crate::checked::MemoryBudget;

/// The budget in bytes. When "auto" cannot read `/proc/meminfo` (not Linux, a locked-down
/// container), the budget is 0: nothing model-sized is kept, every publication streams.
pub fn resolve(budget: MemoryBudget) -> u64 {
    match budget {
        MemoryBudget::Bytes(b) => b,
        MemoryBudget::Auto => available(Path::new("/proc/meminfo")).map_or(0, |b| b / 4),
    }
}

/// `MemAvailable` of a meminfo file, in bytes.
fn available(meminfo: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_a_quarter_of_available_memory_and_bytes_are_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let info = dir.path().join("meminfo");
        std::fs::write(&info, "MemTotal: 100 kB\nMemAvailable:    4096 kB\n").unwrap();
        assert_eq!(available(&info), Some(4096 * 1024));
        std::fs::write(&info, "MemTotal: 100 kB\n").unwrap();
        assert_eq!(available(&info), None, "no MemAvailable line");
        assert_eq!(resolve(MemoryBudget::Bytes(123)), 123);
        assert!(resolve(MemoryBudget::Auto) > 0, "this Linux machine has /proc/meminfo");
    }
}
