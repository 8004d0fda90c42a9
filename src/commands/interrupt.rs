//! Ctrl-C and SIGTERM for one-shot commands that start an evaluator (`average --select`,
//! `report --config`, `check-config --objective`). The evaluator runs in its own process group,
//! so the terminal's SIGINT no longer reaches it; on either signal sewa stops every evaluator
//! group and removes its staging copies (`objective::command::stop_all`), then exits as the
//! signal would have (128 + its number), leaving nothing of the evaluator behind. `sewa watch`
//! has its own shutdown (`daemon::termination`).

use std::sync::{Mutex, Once};

/// Held by the signal thread from the signal until it exits the process: `main` waits on it,
/// so an evaluator failing because it is being stopped does not end sewa with its own error
/// (and exit code) before the group and the staging are gone.
static STOPPING: Mutex<()> = Mutex::new(());

/// Install the handlers (once per process). They stay installed for the rest of the command.
pub fn stop_evaluators_on_signal() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = install() {
            tracing::warn!(error = %e, "cannot handle SIGINT/SIGTERM: an interrupted evaluator may outlive sewa");
        }
    });
}

fn install() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Registered here, before returning: a signal right after is already ours.
    let (mut int, mut term) = {
        let _in_rt = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    std::thread::Builder::new().name("sewa-signals".into()).spawn(move || {
        let code = rt.block_on(async {
            tokio::select! { _ = int.recv() => 130, _ = term.recv() => 143 }
        });
        let _held = STOPPING.lock().unwrap_or_else(|e| e.into_inner());
        sewa_engine::objective::command::stop_all();
        std::process::exit(code);
    })?;
    Ok(())
}

/// Called by `main` before it exits: waits while a signal is stopping the evaluators (the
/// signal thread then ends the process with the signal's code).
pub fn settle() {
    drop(STOPPING.lock());
}
