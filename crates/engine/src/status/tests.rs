//! The status file: its strings as written (old files included), rendering for people,
//! and members' on-disk state.

use super::*;
use crate::select::Method;

#[test]
fn write_is_atomic_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/status.json");
    let mut s = Status { state: State::Watching, ..Status::default() };
    for i in 0..30 {
        s.push_error(format!("e{i}"));
    }
    s.write(&path).unwrap();
    let back = Status::read(&path).unwrap();
    assert_eq!(back.errors.len(), MAX_ERRORS);
    assert_eq!(back.errors.last().unwrap().message, "e29");
    assert!(render(&back).contains("watching"));
    let leftovers = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 1, "no temp file left behind");
}

/// A status file written before the published selection and on-disk marks existed still
/// reads (`sewa status` of an older running daemon).
#[test]
fn an_older_status_file_still_reads() {
    let old = serde_json::json!({
        "pid": 1, "version": "0.1.0", "state": "watching", "started_at": "t",
        "updated_at": "t", "dir": "runs", "out": "out.safetensors", "method": "lawa",
        "members": [{"path": "runs/step_1", "step": 1, "metric": null, "weight": 1.0}],
        "last_selection": {"at": "t", "method": "lawa", "why": "w", "loss": null,
                           "outcome": "published"},
        "last_publish": null, "quarantined": [], "errors": [],
        "counters": {"loaded": 1, "quarantined": 0, "selections": 1, "publishes": 1,
                     "rescans": 0}
    });
    let s: Status = serde_json::from_value(old).unwrap();
    assert_eq!((&s.state, &s.method), (&State::Watching, &SelectedBy::Method(Method::Lawa)));
    assert_eq!(s.members[0].on_disk, OnDisk::Present);
    assert!(s.published.is_none() && s.waiting.is_none());
    assert!(render(&s).contains("step        1"));
}

/// The state and method are written as the strings monitoring always matched on, and
/// ones this version does not know (a newer sewa's file) read back as written.
#[test]
fn state_and_method_keep_their_strings_and_unknown_ones_read_back() {
    let all = [
        (State::Starting, "starting"),
        (State::WaitingForDir, "waiting for the watched directory"),
        (State::Watching, "watching"),
        (State::Stopping, "stopping"),
        (State::Stopped, "stopped"),
        (State::Failed, "failed"),
    ];
    for (state, name) in all {
        let s =
            Status { state: state.clone(), method: Method::BestMetric.into(), ..Status::default() };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            (&json["state"], &json["method"]),
            (&serde_json::json!(name), &serde_json::json!("best-metric"))
        );
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back.state, state);
    }
    let mut v = serde_json::to_value(Status::default()).unwrap();
    v["state"] = "draining".into();
    v["method"] = "swa-v9".into();
    let s: Status = serde_json::from_value(v).unwrap();
    assert_eq!(s.state, State::Other("draining".into()));
    let text = render(&s);
    assert!(text.contains("— draining,") && text.contains("method swa-v9"), "{text}");
    v = serde_json::to_value(Status::default()).unwrap();
    v["state"] = 3.into();
    assert!(serde_json::from_value::<Status>(v).is_err(), "not a string: an error");
}

#[test]
fn render_lists_the_published_members_apart_from_the_window() {
    let gone = PublishedMember {
        path: "runs/step_1".into(),
        step: Some(1),
        weight: 0.25,
        loss: Some(0.5),
        in_window: false,
        on_disk: OnDisk::Deleted,
    };
    let summary = SelectionSummary {
        at: "t0".into(),
        method: Method::Sewa.into(),
        why: "sewa: 4 of 8".into(),
        loss: Some(0.125),
        acceptance_loss: Some(0.25),
    };
    let published = PublishedSelection { summary, members: vec![gone] };
    let s = Status { published: Some(published), ..Status::default() };
    let text = render(&s);
    assert!(text.contains("published t0 (sewa, loss 0.125000 (0.250000 on the acceptance data))"));
    assert!(text.contains("step        1  weight 0.2500  loss 0.500000  runs/step_1  [left the window]  [deleted from disk]"), "{text}");
    assert!(!text.contains("nothing published yet"), "{text}");
}

/// The selection fields shared through `SelectionSummary` stay where they always were.
#[test]
fn the_selection_fields_keep_their_place_in_the_json() {
    let summary = SelectionSummary {
        at: "t".into(),
        method: Method::Lawa.into(),
        why: "w".into(),
        loss: Some(0.5),
        acceptance_loss: None,
    };
    let last =
        SelectionStatus { summary: summary.clone(), published: true, outcome: "published".into() };
    let published = PublishedSelection { summary, members: vec![] };
    let s = Status { last_selection: Some(last), published: Some(published), ..Status::default() };
    let json = serde_json::to_value(&s).unwrap();
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let common = ["acceptance_loss", "at", "loss", "method", "why"];
    let with = |extra: &[&str]| {
        let mut k: Vec<String> = common.iter().chain(extra).map(|s| s.to_string()).collect();
        k.sort();
        k
    };
    assert_eq!(keys(&json["last_selection"]), with(&["outcome", "published"]));
    assert_eq!(keys(&json["published"]), with(&["members"]));
    assert_eq!(json["last_selection"]["loss"], 0.5);
    let back: Status = serde_json::from_value(json).unwrap();
    assert_eq!(back.published.unwrap().summary.why, "w");
}

#[test]
fn render_shows_what_sewa_holds_for_deleted_files() {
    let member = MemberStatus {
        path: "runs/step_1".into(),
        step: 1,
        metric: None,
        weight: 0.5,
        published_weight: 0.5,
        on_disk: OnDisk::Deleted,
        held_bytes: 3 << 20,
    };
    let disk = DiskStatus {
        free_bytes: 1 << 30,
        total_bytes: 1 << 34,
        min_free_bytes: 2 << 30,
        held_bytes: 3 << 20,
        keep_deleted: true,
    };
    let s = Status { members: vec![member], disk: Some(disk), ..Status::default() };
    let text = render(&s);
    assert!(text.contains("runs/step_1  [deleted from disk, sewa holds 3.00 MiB"), "{text}");
    assert!(
        text.contains("disk: 1.00 GiB (1073741824 bytes) free (min_free_bytes 2.00 GiB"),
        "{text}"
    );
    assert!(text.contains("sewa holds 3.00 MiB (3145728 bytes) of deleted checkpoints"), "{text}");
}

#[test]
fn on_disk_tells_deleted_from_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("step_5.safetensors");
    std::fs::write(&path, b"version one").unwrap();
    let id = Identity::of(&path).unwrap();
    assert_eq!(OnDisk::check(&path, Some(&id)), OnDisk::Present);
    assert_eq!(OnDisk::check(&path, None), OnDisk::Present);
    std::fs::write(dir.path().join("new"), b"version two, longer").unwrap();
    std::fs::rename(dir.path().join("new"), &path).unwrap();
    assert_eq!(OnDisk::check(&path, Some(&id)), OnDisk::Changed);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(OnDisk::check(&path, Some(&id)), OnDisk::Deleted);
    assert_eq!(OnDisk::check(&path, None), OnDisk::Deleted);
}

#[test]
fn non_utf8_paths_are_written_losslessly() {
    use std::os::unix::ffi::OsStringExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("status.json");
    let odd = PathBuf::from(std::ffi::OsString::from_vec(b"runs/step_\xff.safetensors".to_vec()));
    let member = MemberStatus {
        path: odd.clone(),
        step: 1,
        metric: None,
        weight: 1.0,
        published_weight: 1.0,
        on_disk: OnDisk::Present,
        held_bytes: 0,
    };
    let mut s = Status { members: vec![member], out: odd.clone(), ..Status::default() };
    s.write(&path).unwrap();
    let back = Status::read(&path).unwrap();
    assert_eq!((back.members[0].path.clone(), back.out), (odd.clone(), odd));
}

/// `sewa status` shows the run's totals: how much selecting (an evaluator's calls) has cost.
#[test]
fn render_shows_the_runs_totals() {
    let counters = Counters {
        selections: 7,
        failed_selections: 1,
        publishes: 5,
        oracle_calls: 41,
        selection_ms: 12_345,
        ..Counters::default()
    };
    let text = render(&Status { counters, ..Status::default() });
    let want = "this run: 7 selections (1 failed), 5 publishes, 41 oracle calls, 12.3 s selecting";
    assert!(text.contains(want), "{text}");
}
