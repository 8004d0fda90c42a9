use super::*;
use std::os::unix::ffi::OsStringExt;

fn entry(step: u64, loss: f64) -> Entry {
    Entry {
        at: format!("2026-12-07T00:00:{:02}Z", step % 60),
        step: Some(step),
        method: "greedy".into(),
        loss: Some(loss),
        members: vec![EntryMember {
            path: PathBuf::from(format!("runs/step_{step}")),
            step,
            weight: 1.0,
            loss: Some(loss + 0.5),
        }],
        window: vec![StepLoss { step, loss: loss + 0.5 }],
    }
}

#[test]
fn beside_the_status_file() {
    assert_eq!(
        beside(Path::new("/r/.sewa/status.json")),
        Path::new("/r/.sewa/status.history.jsonl")
    );
    assert_eq!(beside(Path::new("st")), Path::new("st.history.jsonl"));
}

/// Appended entries read back in order, a non-UTF-8 member path losslessly.
#[test]
fn appended_entries_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("status.history.jsonl");
    let mut odd = entry(3, 0.25);
    odd.members[0].path = PathBuf::from(std::ffi::OsString::from_vec(b"runs/step_\xff".to_vec()));
    let want = vec![entry(1, 1.0), entry(2, 0.5), odd];
    for e in &want {
        append(&path, e).unwrap();
    }
    let h = read(&path).unwrap();
    assert_eq!(h.entries, want);
    assert_eq!(h.skipped, 0);
}

/// A crash mid-append leaves a torn last line: the next append ends it first, so only the torn
/// line is lost (regression guard: appending straight after it would merge the two).
#[test]
fn a_torn_last_line_costs_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.jsonl");
    append(&path, &entry(1, 1.0)).unwrap();
    let mut f = File::options().append(true).open(&path).unwrap();
    f.write_all(br#"{"at":"2026-12-07T00:00:02Z","step":2,"meth"#).unwrap();
    append(&path, &entry(3, 0.5)).unwrap();
    let h = read(&path).unwrap();
    assert_eq!(h.entries, vec![entry(1, 1.0), entry(3, 0.5)]);
    assert_eq!(h.skipped, 1);
    assert_eq!(h.first_skipped.as_ref().map(|s| s.0), Some(2), "{:?}", h.first_skipped);
}

/// The file stays under its bound: past `MAX_HISTORY_BYTES` it is cut to its newest whole
/// lines, the latest entry always kept.
#[test]
fn the_file_is_cut_to_its_newest_lines_past_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.jsonl");
    let window: Vec<StepLoss> = (0..4000).map(|s| StepLoss { step: s, loss: 1.0 / 3.0 }).collect();
    let n = 40;
    for step in 0..n {
        let e = Entry { window: window.clone(), ..entry(step, 1.0) };
        append(&path, &e).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= MAX_HISTORY_BYTES, "{len} bytes after entry {step}");
    }
    let h = read(&path).unwrap();
    assert_eq!(h.skipped, 0, "{:?}", h.first_skipped);
    let steps: Vec<u64> = h.entries.iter().filter_map(|e| e.step).collect();
    assert!(steps.len() < n as usize && steps.len() > 2, "{steps:?}");
    assert_eq!(steps.last(), Some(&(n - 1)));
    assert!(steps.windows(2).all(|w| w[1] == w[0] + 1), "newest, in order: {steps:?}");
}

/// A window too large for one line is recorded without its losses, never refused whole.
#[test]
fn an_oversized_window_is_recorded_without_its_losses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.jsonl");
    let window: Vec<StepLoss> = (0..20_000).map(|s| StepLoss { step: s, loss: 0.1 }).collect();
    append(&path, &Entry { window, ..entry(7, 1.0) }).unwrap();
    let h = read(&path).unwrap();
    assert_eq!(h.entries, vec![Entry { window: Vec::new(), ..entry(7, 1.0) }]);
}

/// A file grown far past the bound by something else (here 16 MiB of one unterminated line,
/// then a publication) is cut back to whole lines under the bound; the new entry survives.
#[test]
fn a_file_grown_past_the_bound_by_another_writer_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.jsonl");
    std::fs::write(&path, vec![b'x'; 16 << 20]).unwrap();
    append(&path, &entry(9, 0.5)).unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() <= MAX_HISTORY_BYTES);
    let h = read(&path).unwrap();
    assert_eq!(h.entries, vec![entry(9, 0.5)]);
}

#[test]
fn newest_lines_are_whole_lines() {
    assert_eq!(newest_lines(b"aa\nbb\ncc\n", 100), b"aa\nbb\ncc\n");
    assert_eq!(newest_lines(b"aa\nbb\ncc\n", 6), b"bb\ncc\n");
    assert_eq!(newest_lines(b"aa\nbb\ncc\n", 7), b"bb\ncc\n");
    assert_eq!(newest_lines(b"aa\nbb\ncc\n", 5), b"cc\n");
    assert_eq!(newest_lines(b"aaaaaaa\n", 3), b"");
}

/// Hostile lines are skipped and counted, never a panic: torn, not UTF-8, too long, wrong
/// shape, numbers that cannot be drawn.
#[test]
fn hostile_lines_are_skipped_and_counted() {
    let good = serde_json::to_string(&entry(1, 1.0)).unwrap();
    let mut huge = br#"{"at":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 1));
    let mut non_utf8 = good.clone().into_bytes();
    non_utf8[8] = 0xff;
    let too_big = good.replace("\"loss\":1.0", "\"loss\":1e300");
    assert_ne!(too_big, good);
    let lines: Vec<Vec<u8>> = vec![
        good.clone().into_bytes(),
        good.as_bytes()[..good.len() / 2].to_vec(),
        non_utf8,
        huge,
        b"[1,2,3]".to_vec(),
        b"\x00\x01\x02".to_vec(),
        too_big.into_bytes(),
        br#"{"at":"t","step":-1,"method":"x","loss":null,"members":[]}"#.to_vec(),
        good.into_bytes(),
    ];
    let h = parse(&lines.join(&b'\n'));
    assert_eq!(h.entries.len(), 2);
    assert_eq!(h.skipped, 7);
    assert_eq!(h.first_skipped.unwrap().0, 2);
}

/// A FIFO or a symlink in the history's place: reading is one clear error naming the file,
/// appending is refused (nothing written through the link), and neither hangs.
#[test]
fn a_fifo_or_symlink_in_place_of_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("status.history.jsonl");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let err = read(&fifo).unwrap_err().to_string();
    assert!(err.contains("status.history.jsonl") && err.contains("FIFO"), "{err}");
    assert!(append(&fifo, &entry(1, 1.0)).is_err());
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, b"").unwrap();
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(append(&link, &entry(1, 1.0)).is_err());
    assert_eq!(std::fs::read(&target).unwrap(), b"", "written through a symlink");
}
