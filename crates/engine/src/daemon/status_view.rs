//! What the status file says about the window and the published selection: each member's
//! weight in the published average and in the last selection, the published members (those
//! that left the window too), whether the file version sewa holds is still on disk and how
//! many bytes sewa keeps allocated for it once deleted. Built when the status is written (one
//! `stat` per member, one per weight file of a directory member, one `fstat` per held file);
//! the pipeline decides what goes in.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::output::{LastPublished, PublishedInput};
use crate::status::{MemberStatus, OnDisk, PublishedMember, PublishedSelection, SelectionSummary};
use crate::window::Member;
use sewa_checkpoint::{Checkpoint, Identity};

/// The window as the status shows it. `weights`: the last selection's, by path.
pub fn members(
    window: &[Member],
    open: &BTreeMap<PathBuf, Arc<Checkpoint>>,
    weights: &BTreeMap<PathBuf, f64>,
    last: Option<&LastPublished>,
) -> Vec<MemberStatus> {
    let each = window.iter().map(|m| {
        let ckpt = open.get(&m.path);
        let identity = ckpt.map(|c| c.identity());
        let published = last.and_then(|l| l.inputs.iter().find(|i| is(i, m, identity)));
        MemberStatus {
            path: m.path.clone(),
            step: m.step,
            metric: m.metric,
            weight: weights.get(&m.path).copied().unwrap_or(0.0),
            published_weight: published.map_or(0.0, |i| i.weight),
            on_disk: OnDisk::check(&m.path, identity),
            held_bytes: ckpt.map_or(0, |c| c.unlinked_bytes()),
        }
    });
    each.collect()
}

/// The published selection, each input marked as in the window (the same file version) or not.
pub fn published(
    last: Option<&LastPublished>,
    window: &[Member],
    open: &BTreeMap<PathBuf, Arc<Checkpoint>>,
    acceptance_loss: Option<f64>,
) -> Option<PublishedSelection> {
    let last = last?;
    let each = last.inputs.iter().map(|i| PublishedMember {
        path: i.path.clone(),
        step: i.step,
        weight: i.weight,
        loss: i.loss,
        in_window: window.iter().any(|m| is(i, m, open.get(&m.path).map(|c| c.identity()))),
        on_disk: OnDisk::check(&i.path, i.identity.as_ref()),
    });
    let summary = SelectionSummary {
        at: last.at.clone(),
        method: last.method.clone(),
        why: last.why.clone(),
        loss: last.loss,
        acceptance_loss,
    };
    Some(PublishedSelection { summary, members: each.collect() })
}

/// Whether published input `i` is window member `m` (whose checkpoint has `identity`): same
/// path and step, and the same file version when both identities are known.
fn is(i: &PublishedInput, m: &Member, identity: Option<&Identity>) -> bool {
    let same_version = match (&i.identity, identity) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    i.path == m.path && i.step == Some(m.step) && same_version
}
