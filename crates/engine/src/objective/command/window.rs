//! Protocol 2: keeping the evaluator's members in step with the window — the `members`
//! message, the handover of each new member (its own path when the evaluator loads that format,
//! else one safetensors copy in staging) and the removal of copies no longer needed. Which
//! members to add and drop is `members.rs`'s pure decision.

use super::members::MemberKey;
use super::protocol::{self, Added, Reply};
use super::{CommandObjective, Session};
use crate::error::{Error, Result};
use sewa_checkpoint::{Checkpoint, Identity};

impl CommandObjective {
    /// Tell the evaluator which members to add and drop; returns the members' ids in order.
    pub(super) fn sync_members(
        &mut self,
        s: &mut Session,
        members: &[&Checkpoint],
    ) -> Result<Vec<String>> {
        let keys: Vec<MemberKey> = members.iter().map(|m| MemberKey::of(m)).collect();
        let change = s.held.change(&keys);
        if !change.add.is_empty() || !change.remove.is_empty() {
            let mut added = Vec::new();
            for &i in &change.add {
                self.next_member += 1;
                added.push(self.handover(members[i], &keys[i], self.next_member.to_string(), s)?);
            }
            self.send(s, &protocol::members(&added, &change.remove))?;
            let want = keys.len();
            match self.receive(s, "startup_timeout_s", self.config.startup_timeout_s)? {
                Reply::Ready { members } if members == want => {}
                Reply::Ready { members } => {
                    return Err(self.failure(format!("holds {members} members, expected {want}")));
                }
                Reply::Error { message } => {
                    return Err(self.failure(format!("could not load members: {message}")));
                }
                other => return Err(self.failure(format!("answered members with {other:?}"))),
            }
            let pairs =
                change.add.iter().zip(&added).map(|(&i, a)| (keys[i].clone(), a.id.clone()));
            s.held.apply(pairs.collect(), &change.remove);
            self.drop_stale_copies(&keys);
        }
        Ok(keys.iter().map(|k| s.held.id_of(k).expect("just added").to_string()).collect())
    }

    /// How the evaluator gets `ckpt`: its own path when it loads that format, no key was
    /// renamed and the path still holds what sewa opened; else a safetensors copy in staging.
    fn handover(
        &mut self,
        ckpt: &Checkpoint,
        key: &MemberKey,
        id: String,
        s: &Session,
    ) -> Result<Added> {
        let tensors = ckpt.tensors().len();
        let direct = protocol::wire_format(ckpt.format())
            .filter(|f| s.abilities.formats.iter().any(|g| g == f))
            .filter(|_| ckpt.renamed_keys().is_empty())
            .filter(|_| Identity::of(ckpt.path()).is_ok_and(|i| &i == ckpt.identity()));
        if let Some(format) = direct {
            // Absolute: sewa opened the path from its own working directory, the evaluator
            // runs in another (`cwd`, by default the config file's directory).
            let path = std::path::absolute(ckpt.path()).map_err(|e| Error::io(ckpt.path(), e))?;
            return Ok(Added { id, path, format, tensors });
        }
        let path = match self.copies.iter().find(|(k, _)| k == key) {
            Some((_, p)) => p.clone(),
            None => {
                let p = self.staging.file(&format!("member-{id}.safetensors"));
                self.staging.write_member(ckpt, &p)?;
                self.copies.push((key.clone(), p.clone()));
                p
            }
        };
        Ok(Added { id, path, format: "safetensors", tensors })
    }

    /// Delete staging copies of members no longer in the window.
    fn drop_stale_copies(&mut self, keys: &[MemberKey]) {
        let staging = &mut self.staging;
        self.copies.retain(|(k, p)| {
            let keep = keys.contains(k);
            if !keep {
                staging.remove_member(p);
            }
            keep
        });
    }
}
