//! The daemon's side of the publication history (`crate::history`): one line appended beside
//! the status file per publication, for `sewa report --history`. Recording it is never fatal:
//! a failure is logged and shown among the status file's errors, and the publication stands.

use tracing::warn;

use super::Pipeline;
use crate::history::{self, Entry};
use crate::select::Selection;

impl Pipeline {
    /// Record the publication of `selection` over the current window.
    pub(super) fn record_history(&mut self, selection: &Selection) {
        let entry = Entry::of(selection, self.window.members(), crate::timestamp::now());
        let path = history::beside(&self.cfg.status_file());
        if let Err(e) = history::append(&path, &entry) {
            warn!(error = %e, "publication history not recorded");
            self.status.push_error(format!("publication history not recorded: {e}"));
        }
    }
}
