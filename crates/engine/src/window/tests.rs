//! The window's decisions, event by event, with no files: admission by step, eviction,
//! rejection memory, copies, layouts and the descriptor shortage.

use super::*;

fn sig(n: u64) -> Identity {
    Identity { dev: 1, ino: n, size: n, mtime_ns: n as i128, members: 0 }
}

fn p(step: u64) -> PathBuf {
    PathBuf::from(format!("step_{step}.safetensors"))
}

/// Settle and load `step` successfully; returns the actions of the load.
fn admit(w: &mut Window, step: u64, s: Identity) -> Vec<Action> {
    let a = w.handle(Event::Settled { path: p(step), sig: s, step: Some(step) });
    assert_eq!(a, vec![Action::Load { path: p(step), sig: s }]);
    w.handle(Event::Loaded(Member { path: p(step), sig: s, step, metric: None }))
}

fn steps(w: &Window) -> Vec<u64> {
    w.members().iter().map(|m| m.step).collect()
}

#[test]
fn keeps_the_last_size_by_step_whatever_the_arrival_order() {
    let mut w = Window::new(3, 1);
    for step in [300, 100, 500, 200, 400] {
        admit(&mut w, step, sig(step));
    }
    assert_eq!(steps(&w), vec![300, 400, 500]);
    // Older than the full window: not even loaded.
    assert!(w.handle(Event::Settled { path: p(50), sig: sig(50), step: Some(50) }).is_empty());
}

#[test]
fn eviction_and_reselect_every() {
    let mut w = Window::new(2, 2);
    assert_eq!(admit(&mut w, 1, sig(1)), vec![]);
    assert_eq!(admit(&mut w, 2, sig(2)), vec![Action::Reselect]);
    let a = admit(&mut w, 3, sig(3));
    assert_eq!(a, vec![Action::Evict { path: p(1) }]);
    let a = admit(&mut w, 4, sig(4));
    assert_eq!(a, vec![Action::Evict { path: p(2) }, Action::Reselect]);
}

#[test]
fn rejected_is_not_retried_until_it_changes() {
    let mut w = Window::new(3, 1);
    w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) });
    let reason = "tensor w: NaN at element 3".to_string();
    let a = w.handle(Event::Rejected {
        path: p(1),
        sig: sig(1),
        reason: reason.clone(),
        incomplete: false,
        skipped: false,
    });
    assert_eq!(a, vec![Action::Quarantine { path: p(1), reason }]);
    assert!(w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) }).is_empty());
    let a = w.handle(Event::Settled { path: p(1), sig: sig(11), step: Some(1) });
    assert_eq!(a, vec![Action::Load { path: p(1), sig: sig(11) }]);
}

#[test]
fn rotation_keeps_members_and_forgets_rejections() {
    let mut w = Window::new(3, 1);
    admit(&mut w, 1, sig(1));
    assert!(w.handle(Event::Gone { path: p(1) }).is_empty());
    assert_eq!(steps(&w), vec![1], "an open member survives deletion of its path");
}

#[test]
fn a_released_member_leaves_and_asks_for_a_reselection_and_its_path_can_come_back() {
    let mut w = Window::new(3, 1);
    admit(&mut w, 1, sig(1));
    admit(&mut w, 2, sig(2));
    let a = w.handle(Event::Released { path: p(1) });
    assert_eq!(a, vec![Action::Evict { path: p(1) }, Action::Reselect]);
    assert_eq!(steps(&w), vec![2]);
    assert!(w.rejected().next().is_none(), "a release is not a quarantine");
    assert!(w.handle(Event::Released { path: p(1) }).is_empty(), "not a member any more");
    // A new file at that path is a new candidate.
    admit(&mut w, 1, sig(11));
    assert_eq!(steps(&w), vec![1, 2]);
}

#[test]
fn rewritten_member_is_reloaded_and_invalidated_member_dropped() {
    let mut w = Window::new(3, 1);
    admit(&mut w, 1, sig(1));
    admit(&mut w, 2, sig(2));
    // Same path, new content: load the new version; the old one goes when it is loaded.
    let a = w.handle(Event::Settled { path: p(2), sig: sig(22), step: Some(2) });
    assert_eq!(a, vec![Action::Load { path: p(2), sig: sig(22) }]);
    let a = w.handle(Event::Loaded(Member { path: p(2), sig: sig(22), step: 2, metric: None }));
    assert_eq!(a[0], Action::Evict { path: p(2) });
    assert_eq!(w.members()[1].sig, sig(22));
    // In-place rewrite caught by still_valid(): dropped and quarantined at that signature.
    let a = w.handle(Event::Invalidated { path: p(1), reason: "rewritten".into() });
    assert!(a.contains(&Action::Evict { path: p(1) }) && a.contains(&Action::Reselect));
    assert_eq!(steps(&w), vec![2]);
    assert!(w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) }).is_empty());
}

/// Settle `path` (no step in its name) and load it, showing `step` from its metadata.
fn admit_stepless(w: &mut Window, path: &str, s: Identity, step: u64) -> Vec<Action> {
    let path = PathBuf::from(path);
    let a = w.handle(Event::Settled { path: path.clone(), sig: s, step: None });
    assert_eq!(a, vec![Action::Load { path: path.clone(), sig: s }], "first settle loads");
    w.handle(Event::Loaded(Member { path, sig: s, step, metric: None }))
}

#[test]
fn evicted_stepless_checkpoint_is_not_reloaded_by_rescans() {
    let mut w = Window::new(2, 1);
    admit(&mut w, 5, sig(5));
    admit(&mut w, 6, sig(6));
    // `model.safetensors` shows step 1 only once opened: loaded, then evicted at once.
    let a = admit_stepless(&mut w, "model.safetensors", sig(100), 1);
    assert_eq!(a, vec![Action::Evict { path: PathBuf::from("model.safetensors") }]);
    // Every rescan settles it again, unchanged: no second open, NaN scan and eviction.
    for _ in 0..3 {
        let again = Event::Settled { path: "model.safetensors".into(), sig: sig(100), step: None };
        assert_eq!(w.handle(again), vec![], "reloaded an evicted checkpoint");
    }
    // Changed on disk: it may hold a newer step now, so it is loaded again.
    let changed = Event::Settled { path: "model.safetensors".into(), sig: sig(101), step: None };
    assert_eq!(w.handle(changed).len(), 1);
}

#[test]
fn evicted_checkpoint_refills_the_window_when_room_opens_and_is_forgotten_when_gone() {
    let mut w = Window::new(2, 1);
    admit_stepless(&mut w, "old.safetensors", sig(100), 1);
    admit(&mut w, 5, sig(5));
    admit(&mut w, 6, sig(6));
    assert_eq!(steps(&w), vec![5, 6]);
    let again = || Event::Settled { path: "old.safetensors".into(), sig: sig(100), step: None };
    assert_eq!(w.handle(again()), vec![]);
    // Step 6 turns out rewritten: the window has room, the evicted one may come back.
    w.handle(Event::Invalidated { path: p(6), reason: "rewritten".into() });
    let a = w.handle(again());
    assert_eq!(a, vec![Action::Load { path: "old.safetensors".into(), sig: sig(100) }]);
    // Deleted and recreated with the same signature: nothing is remembered about it.
    let mut w = Window::new(1, 1);
    admit(&mut w, 5, sig(5));
    admit_stepless(&mut w, "old.safetensors", sig(100), 1);
    w.handle(Event::Gone { path: "old.safetensors".into() });
    assert_eq!(w.handle(again()).len(), 1);
}

#[test]
fn same_step_under_two_names_is_not_reloaded_forever() {
    let mut w = Window::new(1, 1);
    let named =
        |path: &str, s: u64| Event::Settled { path: path.into(), sig: sig(s), step: Some(5) };
    w.handle(named("b_step_5.safetensors", 1));
    let m = Member { path: "b_step_5.safetensors".into(), sig: sig(1), step: 5, metric: None };
    w.handle(Event::Loaded(m));
    // "a_step_5" sorts before "b_step_5": trim() would evict it, so it is not loaded.
    assert_eq!(w.handle(named("a_step_5.safetensors", 2)), vec![]);
}

#[test]
fn stale_load_is_discarded() {
    let mut w = Window::new(3, 1);
    w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) });
    w.handle(Event::Settled { path: p(1), sig: sig(2), step: Some(1) });
    let a = w.handle(Event::Loaded(Member { path: p(1), sig: sig(1), step: 1, metric: None }));
    assert!(a.is_empty());
    assert!(w.members().is_empty());
}

fn load(w: &mut Window, name: &str, s: Identity, step: u64) -> Vec<Action> {
    let path = PathBuf::from(name);
    let a = w.handle(Event::Settled { path: path.clone(), sig: s, step: step_of(&path) });
    assert_eq!(a, vec![Action::Load { path: path.clone(), sig: s }]);
    w.handle(Event::Loaded(Member { path, sig: s, step, metric: None }))
}

fn names(w: &Window) -> Vec<String> {
    w.members().iter().map(|m| m.path.display().to_string()).collect()
}

/// `last.pt` holding `{"model": sd, "step": 2}` is the step-2 checkpoint again: averaging
/// both would count step 2 twice, whichever of the two arrives first.
#[test]
fn an_alias_without_a_step_in_its_name_is_not_a_second_member() {
    let mut w = Window::new(4, 1);
    load(&mut w, "ckpt_1.pt", sig(1), 1);
    load(&mut w, "ckpt_2.pt", sig(2), 2);
    let a = load(&mut w, "last.pt", sig(20), 2);
    assert!(matches!(&a[..], [Action::Quarantine { reason, .. }] if reason.contains("ckpt_2.pt")));
    let r = w.rejected().find(|r| r.path == Path::new("last.pt")).unwrap();
    assert!(r.skipped && !r.repeated);
    assert_eq!(names(&w), ["ckpt_1.pt", "ckpt_2.pt"]);
    // Rewritten for step 3 before ckpt_3.pt arrives: a member until its original comes.
    load(&mut w, "last.pt", sig(30), 3);
    assert_eq!(names(&w), ["ckpt_1.pt", "ckpt_2.pt", "last.pt"]);
    assert!(w.rejected().next().is_none(), "a successful load clears the rejection");
    let a = load(&mut w, "ckpt_3.pt", sig(3), 3);
    assert!(a.contains(&Action::Evict { path: PathBuf::from("last.pt") }), "{a:?}");
    assert_eq!(names(&w), ["ckpt_1.pt", "ckpt_2.pt", "ckpt_3.pt"]);
    assert!(w.rejected().any(|r| r.path == Path::new("last.pt") && r.skipped));
    // Unchanged, it is not loaded again.
    let settled = Event::Settled { path: "last.pt".into(), sig: sig(30), step: None };
    assert!(w.handle(settled).is_empty());
    // Two names with steps at one step are both kept (not aliases: e.g. model and EMA).
    load(&mut w, "ema_3.pt", sig(33), 3);
    assert_eq!(names(&w).len(), 4);
}

#[test]
fn the_same_reason_after_a_rewrite_is_a_repeat() {
    let mut w = Window::new(3, 1);
    let reject = |w: &mut Window, n: u64, reason: &str| {
        let path = PathBuf::from("last.pt");
        w.handle(Event::Settled { path: path.clone(), sig: sig(n), step: None });
        let reason = reason.to_string();
        let (incomplete, skipped) = (false, false);
        w.handle(Event::Rejected { path, sig: sig(n), reason, incomplete, skipped });
        w.rejected().next().unwrap().repeated
    };
    assert!(!reject(&mut w, 1, "no step"));
    assert!(reject(&mut w, 2, "no step"), "rewritten in place, same problem");
    assert!(!reject(&mut w, 3, "NaN"));
    w.handle(Event::Gone { path: "last.pt".into() });
    assert!(!reject(&mut w, 4, "NaN"), "deleted and written again: news");
}
/// Settle `step` and report it as of another layout than the window's.
fn mismatch(w: &mut Window, step: u64, layout: u64) -> Vec<Action> {
    let a = w.handle(Event::Settled { path: p(step), sig: sig(step), step: Some(step) });
    assert_eq!(a, vec![Action::Load { path: p(step), sig: sig(step) }]);
    let reason = format!("tensor w: shape [4] here but [8] in {}", p(1).display());
    w.handle(Event::Mismatched { path: p(step), sig: sig(step), layout, reason })
}

fn loads(a: &[Action]) -> Vec<PathBuf> {
    let paths = a.iter().filter_map(|a| match a {
        Action::Load { path, .. } => Some(path.clone()),
        _ => None,
    });
    paths.collect()
}

/// Issue 19 item 7: a stale file of another model present at start-up must not make the
/// real run's checkpoints be quarantined forever.
#[test]
fn the_newest_consistent_checkpoints_win_over_a_stale_layout_reported_once() {
    let mut w = Window::new(4, 1);
    admit(&mut w, 1, sig(1)); // the stale file, alone at start-up
    let a = mismatch(&mut w, 10, 77);
    assert!(matches!(&a[..], [Action::Quarantine { path, .. }] if path == &p(10)), "{a:?}");
    let a = mismatch(&mut w, 20, 77);
    let relayouts: Vec<_> = a.iter().filter(|a| matches!(a, Action::Relayout { .. })).collect();
    assert_eq!(relayouts.len(), 1, "reported once: {a:?}");
    let Action::Relayout { by, against, superseded, reason } = relayouts[0] else { unreachable!() };
    assert_eq!((by, against), (&p(20), &p(1)), "names both files");
    assert_eq!(superseded, &[p(1)]);
    assert!(reason.contains("shape"));
    assert!(a.contains(&Action::Evict { path: p(1) }) && a.contains(&Action::Reselect));
    assert_eq!(loads(&a), [p(10), p(20)], "the new layout's checkpoints are loaded again");
    assert!(w.members().is_empty());
    for step in [10, 20] {
        let m = Member { path: p(step), sig: sig(step), step, metric: None };
        w.handle(Event::Loaded(m));
    }
    assert_eq!(steps(&w), [10, 20]);
    assert!(w.rejected().all(|r| r.path == p(1) && r.skipped), "only the stale one, skipped");
    // A rescan does not bring the stale file back while it is unchanged.
    assert!(w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) }).is_empty());
    admit(&mut w, 30, sig(30));
    assert_eq!(steps(&w), [10, 20, 30]);
}

#[test]
fn a_stray_checkpoint_of_another_model_stays_quarantined() {
    let mut w = Window::new(4, 1);
    admit(&mut w, 1, sig(1));
    admit(&mut w, 2, sig(2));
    let a = mismatch(&mut w, 3, 77);
    assert!(matches!(&a[..], [Action::Quarantine { .. }]), "{a:?}");
    admit(&mut w, 4, sig(4)); // the run goes on in its own layout
    let a = mismatch(&mut w, 5, 77);
    assert!(matches!(&a[..], [Action::Quarantine { .. }]), "not in a row: {a:?}");
    // Two strays of different layouts are not a run either.
    let a = mismatch(&mut w, 6, 88);
    assert!(matches!(&a[..], [Action::Quarantine { .. }]), "{a:?}");
    assert_eq!(steps(&w), [1, 2, 4]);
}

#[test]
fn superseded_checkpoints_evicted_earlier_are_not_loaded_back() {
    let mut w = Window::new(1, 1);
    admit(&mut w, 1, sig(1));
    admit(&mut w, 2, sig(2)); // step 1 evicted as too old
    mismatch(&mut w, 10, 77);
    let a = mismatch(&mut w, 20, 77);
    assert_eq!(loads(&a), [p(10), p(20)]);
    for step in [10, 20] {
        let m = Member { path: p(step), sig: sig(step), step, metric: None };
        w.handle(Event::Loaded(m));
    }
    assert_eq!(steps(&w), [20]);
    w.handle(Event::Invalidated { path: p(20), reason: "rewritten".into() });
    // Room in the window, but steps 1 and 2 have the old layout: not loaded again.
    for step in [1, 2] {
        let again = Event::Settled { path: p(step), sig: sig(step), step: Some(step) };
        assert!(w.handle(again).is_empty(), "step {step} came back");
    }
}

fn out_of_fds(w: &mut Window, step: u64, ours: bool) -> Vec<Action> {
    let a = w.handle(Event::Settled { path: p(step), sig: sig(step), step: Some(step) });
    assert_eq!(a, vec![Action::Load { path: p(step), sig: sig(step) }]);
    w.handle(Event::OutOfDescriptors { path: p(step), sig: sig(step), step: Some(step), ours })
}

/// Issue 19 item 6: running out of descriptors is no verdict on a file.
#[test]
fn out_of_descriptors_is_retried_never_quarantined_and_the_oldest_makes_room() {
    let mut w = Window::new(8, 1);
    for step in [1, 2, 3] {
        admit(&mut w, step, sig(step));
    }
    // The system's table is full: nothing to gain from evicting; retried at the next scan.
    assert!(out_of_fds(&mut w, 4, false).is_empty());
    assert!(w.rejected().next().is_none(), "never quarantined");
    // Our own limit: the oldest members make room for the newcomer and a member's worth
    // of descriptors to spare; the window keeps one fewer than it held from now on.
    let a = out_of_fds(&mut w, 4, true);
    assert_eq!(
        a,
        vec![
            Action::Shrunk { members: 2 },
            Action::Evict { path: p(1) },
            Action::Evict { path: p(2) },
            Action::Load { path: p(4), sig: sig(4) }
        ]
    );
    w.handle(Event::Loaded(Member { path: p(4), sig: sig(4), step: 4, metric: None }));
    assert_eq!(steps(&w), [3, 4]);
    admit(&mut w, 5, sig(5));
    assert_eq!(steps(&w), [4, 5], "held at what the limit allowed");
    // The evicted one is not reloaded by rescans while the capped window is full.
    assert!(w.handle(Event::Settled { path: p(1), sig: sig(1), step: Some(1) }).is_empty());
    // A reload lifts the cap.
    w.resize(8, 1);
    admit(&mut w, 6, sig(6));
    assert_eq!(steps(&w), [4, 5, 6]);
    assert!(w.rejected().next().is_none());
}

#[test]
fn out_of_descriptors_for_an_older_or_stepless_file_keeps_the_newest_members() {
    let mut w = Window::new(8, 1);
    for step in [5, 6, 7] {
        admit(&mut w, step, sig(step));
    }
    // Older than every member: not loaded, and one member fewer to spare descriptors.
    let a = out_of_fds(&mut w, 4, true);
    assert_eq!(a, vec![Action::Shrunk { members: 2 }, Action::Evict { path: p(5) }]);
    assert_eq!(steps(&w), [6, 7]);
    // Older than the capped, full window: not even loaded again.
    assert!(w.handle(Event::Settled { path: p(4), sig: sig(4), step: Some(4) }).is_empty());
    let path = PathBuf::from("last.pt");
    w.handle(Event::Settled { path: path.clone(), sig: sig(9), step: None });
    let e = Event::OutOfDescriptors { path: path.clone(), sig: sig(9), step: None, ours: true };
    assert_eq!(w.handle(e), vec![Action::Shrunk { members: 1 }, Action::Evict { path: p(6) }]);
    assert_eq!(steps(&w), [7], "never below one member");
    assert!(w.rejected().next().is_none(), "never quarantined");
    // Retried when settled again (no rejection remembered).
    let again = Event::Settled { path, sig: sig(9), step: None };
    assert_eq!(w.handle(again).len(), 1);
}
