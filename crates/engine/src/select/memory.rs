//! What model-based selection carries from one selection to the next in a long-running process
//! (the daemon): SeWA's warm-start state, and each member's own loss keyed by the member's
//! identity and the objective, so the report's member-loss panel costs objective calls only
//! for members not seen before. It holds numbers only; the oracle computes them.

use std::collections::HashMap;
use std::path::PathBuf;

use super::oracle::Oracle;
use super::warm::SewaState;
use crate::error::Result;
use sewa_checkpoint::{Checkpoint, Identity};

/// A member as seen by one objective: same path, step and file identity, same objective.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MemberId {
    objective: String,
    path: PathBuf,
    step: Option<u64>,
    identity: Identity,
}

impl MemberId {
    fn of(c: &Checkpoint, objective: &str) -> MemberId {
        MemberId {
            objective: objective.to_string(),
            path: c.path().to_path_buf(),
            step: c.step(),
            identity: *c.identity(),
        }
    }
}

/// Selection state kept between selections. `Default` is a fresh start.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// SeWA's state after the last `sewa` selection (warm start).
    pub sewa: Option<SewaState>,
    member_losses: HashMap<MemberId, f64>,
}

/// Members' own losses for a report, and how many of them cost an objective call.
pub struct MemberLosses {
    pub losses: Vec<f64>,
    /// Losses computed now (each one objective call).
    pub computed: usize,
    /// Losses taken from earlier selections.
    pub remembered: usize,
}

impl Memory {
    /// Each member's own loss: from this selection's oracle cache (free), from an earlier
    /// selection (then put in the oracle's cache), or computed now. Afterwards only the
    /// current members are remembered, so the memory stays the size of the window.
    pub fn member_losses(
        &mut self,
        oracle: &mut Oracle,
        members: &[&Checkpoint],
    ) -> Result<MemberLosses> {
        let objective = oracle.describe();
        let ids: Vec<MemberId> = members.iter().map(|m| MemberId::of(m, &objective)).collect();
        let (mut computed, mut remembered) = (0, 0);
        let mut losses = Vec::with_capacity(members.len());
        for (i, id) in ids.iter().enumerate() {
            let loss = if let Some(l) = oracle.cached(&[i]) {
                l
            } else if let Some(l) = self.member_losses.get(id) {
                remembered += 1;
                // Later subset lookups of this selection (greedy's ranking, the surrogate's
                // vertices) find it too.
                oracle.remember(&[i], *l);
                *l
            } else {
                computed += 1;
                oracle.subset(&[i])?
            };
            losses.push(loss);
        }
        self.member_losses = ids.into_iter().zip(losses.iter().copied()).collect();
        Ok(MemberLosses { losses, computed, remembered })
    }
}
