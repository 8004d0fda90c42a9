//! A progress bar for long work someone may be watching (an exhaustive search, an average):
//! drawn on stderr only when stderr is a terminal and the work has run for a while, so quick
//! jobs, logs, pipes and the journal never get bar fragments; cleared when dropped. It only
//! draws; callers say how far they are.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Work shorter than this shows no bar at all.
const SHOW_AFTER: Duration = Duration::from_secs(1);

pub struct Meter {
    bar: ProgressBar,
    start: Instant,
    tty: bool,
    show_after: Duration,
    shown: bool,
}

impl Meter {
    /// A bar over `total` units; `template` is indicatif's (`{pos}`, `{len}`, `{eta}`, ...).
    pub fn new(total: u64, template: &str) -> Meter {
        Meter::on(std::io::stderr().is_terminal(), SHOW_AFTER, total, template)
    }

    fn on(tty: bool, show_after: Duration, total: u64, template: &str) -> Meter {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        Meter { bar, start: Instant::now(), tty, show_after, shown: false }
    }

    /// `done` units so far; the bar appears once the work has run `SHOW_AFTER` on a terminal.
    pub fn set(&mut self, done: u64) {
        self.bar.set_position(done);
        if self.tty && !self.shown && self.start.elapsed() >= self.show_after {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.bar.enable_steady_tick(Duration::from_millis(200));
            self.shown = true;
        }
    }

    /// Whether the bar is being drawn.
    pub fn drawn(&self) -> bool {
        self.shown
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawn_only_on_a_terminal_and_only_after_the_delay() {
        let mut m = Meter::on(false, Duration::ZERO, 10, "{pos}/{len}");
        m.set(5);
        assert!(!m.drawn(), "never without a terminal");
        let mut m = Meter::on(true, Duration::from_secs(3600), 10, "{pos}/{len}");
        m.set(5);
        assert!(!m.drawn(), "not for quick work");
    }
}
