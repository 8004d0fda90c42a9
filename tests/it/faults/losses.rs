//! Issue 8 item 18: a selection whose loss (or gradient) is not finite fails — logged, counted
//! in the status, never published — and under `policy = "best"` it cannot remove the published
//! model's loss, the baseline later selections must beat.

use std::time::{Duration, Instant};

use crate::watch::{DEADLINE, Daemon, input_steps, write_mlp, write_selection_data};

/// Wait until the daemon has selected over a window holding `step` (the status is written after
/// the selection), and return the status.
fn wait_selected(d: &mut Daemon, step: u64) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(s) = d.status() {
            let members = s["members"].as_array().cloned().unwrap_or_default();
            if members.iter().any(|m| m["step"] == step) {
                return s;
            }
        }
        assert!(start.elapsed() < DEADLINE && d.alive(), "step {step} not selected\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn non_finite_selection_loss_is_never_published_and_keeps_the_best_baseline() {
    // Window of one, k = 1: each selection is the newest checkpoint alone, so its loss is that
    // checkpoint's own (see write_mlp: larger `a` is better).
    let cfg = "[window]\nsize = 1\n[select]\nmethod = \"sewa\"\nk = 1\n\
               [objective]\nkind = \"builtin\"\ndata = \"sel.safetensors\"\n";
    let mut d = Daemon::start_full(cfg, "averaged/model.safetensors", "policy = \"best\"");
    write_selection_data(&d.tmp.path().join("sel.safetensors"));
    write_mlp(&d.runs, 1, 1.0);
    let first = d.wait_published(&[1]);
    let baseline = first["selection"]["loss"].as_f64().expect("a finite loss");
    // Finite weights (the load-time NaN scan passes them) whose logits overflow to ±inf: the
    // builtin objective's loss is NaN, and NaN >= baseline is false.
    write_mlp(&d.runs, 2, f32::MAX);
    let status = wait_selected(&mut d, 2);
    let m = d.manifest().unwrap();
    assert_eq!(input_steps(&m), [1], "the diverged selection was published");
    assert_eq!(m["selection"]["loss"].as_f64(), Some(baseline), "the baseline was removed");
    assert_eq!(status["counters"]["failed_selections"], 1, "{status}");
    let errors = status["errors"].to_string();
    assert!(errors.contains("non-finite loss"), "{errors}");
    // A worse (finite) checkpoint must still lose to the kept baseline; a better one wins.
    write_mlp(&d.runs, 3, 0.5);
    wait_selected(&mut d, 3);
    assert_eq!(
        input_steps(&d.manifest().unwrap()),
        [1],
        "published a model worse than the baseline"
    );
    write_mlp(&d.runs, 4, 3.0);
    let better = d.wait_published(&[4]);
    assert!(better["selection"]["loss"].as_f64().unwrap() < baseline);
    assert!(d.alive(), "sewa died:\n{}", d.log());
}
