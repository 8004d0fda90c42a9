//! Whether a selection replaces the published model (`[publish] policy`, `max_age_steps`):
//! pure rules over what is published and what was selected. The caller supplies the losses
//! (on the selection split, or on the acceptance split when one is configured) and says which
//! published inputs are still on disk; this module decides and says why. It logs nothing and
//! publishes nothing: the pipeline acts on the verdict.
//!
//! With `policy = "best"` a loss is believed only within a range its members' own losses make
//! plausible (`floor`): a lying or broken evaluator's −1e308 would otherwise be a "best" no
//! later selection could ever beat, pinning the published model for good.

use super::output::{LastPublished, PublishedInput};
use crate::config::Policy;

/// The publication rules of `[publish]`.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub policy: Policy,
    /// `policy = "best"`: a published model whose newest member is more than this many steps
    /// older than the window's newest no longer blocks a worse selection.
    pub max_age_steps: Option<u64>,
}

/// The data a loss was computed on: the selection's own (what the selector optimised), or
/// `[objective] acceptance_data` (a held-out split). Printed in the verdicts' reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Selection,
    Acceptance,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Selection => "selection data",
            Split::Acceptance => "acceptance data",
        })
    }
}

/// A selection as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Its non-zero-weight inputs, in window order.
    pub inputs: &'a [PublishedInput],
    /// Its loss on the selection data (what the selector optimised).
    pub loss: Option<f64>,
    /// What `policy = "best"` compares: the candidate's and the published model's loss on
    /// `split` (None: unknown).
    pub judged: Option<f64>,
    pub published: Option<f64>,
    /// What `judged` and `published` were computed on.
    pub split: Split,
    /// Step of the window's newest member.
    pub newest_step: Option<u64>,
    /// The window members' own losses on the selection data, as the selector recorded them
    /// (empty when it did not: then only non-finite losses are refused).
    pub member_losses: &'a [f64],
}

/// What to do with a selection.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Publish it; `note` says why when the rules let through what they usually hold back.
    Publish { note: Option<String> },
    /// Keep the published model, for this reason.
    Skip(String),
    /// Keep the published model: the evaluator's loss is outside what the members' own losses
    /// allow (`floor`), which is the evaluator's error, not a new best.
    Implausible(String),
}

impl Verdict {
    #[cfg(test)]
    pub fn skip(&self) -> Option<&str> {
        match self {
            Verdict::Skip(why) | Verdict::Implausible(why) => Some(why),
            Verdict::Publish { .. } => None,
        }
    }

    fn publish(note: impl Into<Option<String>>) -> Verdict {
        Verdict::Publish { note: note.into() }
    }
}

/// Whether `c` should replace `last`: not when it is the same (members, file versions and
/// weights); with `policy = "best"` not when its loss or its judged loss is not finite or is
/// below the members' `floor` (`Implausible`), nor when its judged loss does not beat the
/// published one's — unless the published model is older than `max_age_steps` (a published
/// model without a judged loss is beaten by any finite loss); with `policy = "latest"` not when
/// it is older than the published one while that is available (see `older_than_published`).
/// `available` says whether a published input is still a candidate on disk as it was averaged.
pub fn decide(
    rules: Rules,
    last: Option<&LastPublished>,
    c: &Candidate<'_>,
    available: impl Fn(&PublishedInput) -> bool,
) -> Verdict {
    let best = rules.policy == Policy::Best;
    let new = c.judged.filter(|l| l.is_finite());
    if best && (new.is_none() || !c.loss.is_some_and(f64::is_finite)) {
        let split = c.split;
        return Verdict::Skip(format!(
            "policy best: the selection has no finite loss ({:?}; on the {split}: {:?})",
            c.loss, c.judged
        ));
    }
    if best && let Some(why) = implausible(c) {
        return Verdict::Implausible(why);
    }
    let Some(last) = last else { return Verdict::publish(None) };
    if last.same_as(c.inputs) {
        return Verdict::Skip(
            "same members, file versions and weights as the published average".into(),
        );
    }
    match rules.policy {
        Policy::Best => beats_published(rules, last, c, new.unwrap_or(f64::NAN)),
        Policy::Latest => older_than_published(last, c.inputs, available),
    }
}

/// How many of the members' spreads (highest own loss minus lowest) an average may be better
/// than its best member, when their losses are signed (see `floor`).
const FLOOR_SPREADS: f64 = 10.0;

/// The lowest loss a selection over members with these own losses can plausibly have, `None`
/// without any finite one. When every member's loss is ≥ 0 the floor is 0: a loss that is
/// non-negative at every member (cross-entropy, squared error, any negative log-likelihood of
/// a discrete target) is non-negative everywhere, so a negative value is a wrong answer, not a
/// good model. Otherwise (a signed objective) the floor is `lowest − max(FLOOR_SPREADS ×
/// spread, |lowest|)`: an average is not ten spreads, nor twice the best member's magnitude,
/// better than its best member. Generous on purpose — real averages beat their best member by
/// a fraction of the spread — and unreachable for a −1e308.
pub fn floor(member_losses: &[f64]) -> Option<f64> {
    let (lo, hi) = range(member_losses)?;
    if lo >= 0.0 {
        return Some(0.0);
    }
    Some(lo - (FLOOR_SPREADS * (hi - lo)).max(lo.abs()))
}

/// The lowest and highest finite loss, if any.
fn range(losses: &[f64]) -> Option<(f64, f64)> {
    let finite = losses.iter().copied().filter(|l| l.is_finite());
    finite.fold(None, |acc, l| {
        Some(acc.map_or((l, l), |(lo, hi): (f64, f64)| (lo.min(l), hi.max(l))))
    })
}

/// Why `c`'s selection loss or judged loss is below its members' `floor`, if one is. The
/// acceptance split is judged against the same floor: it is the same loss on other data.
fn implausible(c: &Candidate<'_>) -> Option<String> {
    let floor = floor(c.member_losses)?;
    let (lowest, highest) = range(c.member_losses)?;
    let losses = [(c.loss, Split::Selection), (c.judged, c.split)];
    let (loss, split) =
        losses.into_iter().find_map(|(l, split)| l.filter(|l| *l < floor).map(|l| (l, split)))?;
    Some(format!(
        "policy best: the evaluator's loss {loss:e} on the {split} is below what the members' \
         own losses allow (lowest {lowest}, highest {highest}: nothing below {floor}); an \
         evaluator error, not a new best — the published model stays"
    ))
}

/// `policy = "best"` with a finite candidate loss `new`.
fn beats_published(rules: Rules, last: &LastPublished, c: &Candidate<'_>, new: f64) -> Verdict {
    let split = c.split;
    let Some(old) = c.published.filter(|l| l.is_finite()) else {
        return Verdict::publish(format!(
            "policy best: the published model has no loss on the {split}; any finite loss \
             replaces it"
        ));
    };
    if new < old {
        return Verdict::publish(None);
    }
    match stale(last, c.newest_step, rules.max_age_steps) {
        Some(age) => Verdict::publish(format!(
            "policy best: loss {new:.6} does not beat {old:.6} on the {split}, published anyway: \
             {age}"
        )),
        None => Verdict::Skip(format!(
            "policy best: loss {new:.6} does not beat {old:.6} on the {split}"
        )),
    }
}

/// Why the published model is too old to block a selection, if it is: its newest member is
/// more than `max_age` steps older than the window's newest. A published model whose steps
/// are unknown is never too old.
fn stale(last: &LastPublished, newest: Option<u64>, max_age: Option<u64>) -> Option<String> {
    let (max_age, newest) = (max_age?, newest?);
    let published = last.newest()?.step?;
    let age = newest.saturating_sub(published);
    (age > max_age).then(|| {
        format!(
            "the published model's newest member (step {published}) is {age} steps older than \
             the window's newest (step {newest}), more than [publish] max_age_steps = {max_age}"
        )
    })
}

/// `policy = "latest"` never goes back in training time: when newer members left the window
/// and it refilled from older checkpoints, the published average (with the newer ones) stays.
/// Unless the published newest member is gone (deleted or replaced on disk: the trainer went
/// back; or no longer a candidate: the config now watches another directory or pattern), then
/// the older selection is what exists now and is published.
fn older_than_published(
    last: &LastPublished,
    inputs: &[PublishedInput],
    available: impl Fn(&PublishedInput) -> bool,
) -> Verdict {
    let Some(published) = last.newest() else { return Verdict::publish(None) };
    let (Some(old), Some(new)) = (published.step, inputs.iter().filter_map(|i| i.step).max())
    else {
        return Verdict::publish(None);
    };
    if new >= old {
        return Verdict::publish(None);
    }
    let path = published.path.display();
    if !available(published) {
        return Verdict::publish(format!(
            "policy latest: publishing an older selection (step {new} < {old}): the published \
             newest member {path} is gone"
        ));
    }
    Verdict::Skip(format!(
        "policy latest: its newest member (step {new}) is older than the published one \
         (step {old}, {path}, still there)"
    ))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use sewa_checkpoint::Identity;

    /// A file version: identities are opaque outside `checkpoint`, but they round-trip JSON.
    fn version(n: u64) -> Identity {
        let v = serde_json::json!({"dev": 1, "ino": n, "size": 8, "mtime_ns": n, "members": 0});
        serde_json::from_value(v).unwrap()
    }

    fn input(step: u64, v: u64, weight: f64) -> PublishedInput {
        let path = PathBuf::from(format!("step_{step}.safetensors"));
        PublishedInput { path, step: Some(step), identity: Some(version(v)), weight, loss: None }
    }

    fn published(inputs: Vec<PublishedInput>, loss: Option<f64>) -> LastPublished {
        LastPublished { inputs, loss, ..LastPublished::default() }
    }

    /// A candidate judged on its selection loss, as without `acceptance_data`.
    fn cand<'a>(
        inputs: &'a [PublishedInput],
        loss: Option<f64>,
        last: Option<&LastPublished>,
    ) -> Candidate<'a> {
        let newest_step = inputs.iter().filter_map(|i| i.step).max();
        let published = last.and_then(|l| l.loss);
        let split = Split::Selection;
        Candidate { inputs, loss, judged: loss, published, split, newest_step, member_losses: &[] }
    }

    const LATEST: Rules = Rules { policy: Policy::Latest, max_age_steps: None };
    const BEST: Rules = Rules { policy: Policy::Best, max_age_steps: None };
    const THERE: fn(&PublishedInput) -> bool = |_| true;
    const GONE: fn(&PublishedInput) -> bool = |_| false;

    fn skip(rules: Rules, last: Option<&LastPublished>, c: &Candidate<'_>) -> Option<String> {
        decide(rules, last, c, THERE).skip().map(String::from)
    }

    #[test]
    fn best_policy_never_replaces_a_better_published_model() {
        let a = vec![input(1, 1, 0.5), input(2, 2, 0.5)];
        let b = vec![input(2, 2, 0.5), input(3, 3, 0.5)];
        let last = published(a.clone(), Some(0.30));
        let l = Some(&last);
        assert!(skip(BEST, None, &cand(&b, Some(9.0), None)).is_none(), "first");
        assert!(skip(LATEST, l, &cand(&a, Some(0.2), l)).is_some(), "same");
        assert!(skip(BEST, l, &cand(&b, Some(0.31), l)).is_some(), "worse");
        assert!(skip(BEST, l, &cand(&b, Some(0.30), l)).is_some(), "tie");
        assert!(skip(BEST, l, &cand(&b, Some(0.29), l)).is_none(), "better");
        assert!(skip(LATEST, l, &cand(&b, Some(0.9), l)).is_none(), "latest");
    }

    #[test]
    fn a_member_replaced_at_the_same_path_is_not_the_published_average() {
        let last = published(vec![input(1, 1, 0.5), input(2, 2, 0.5)], None);
        let l = Some(&last);
        let skipped = |inputs: &[PublishedInput]| skip(LATEST, l, &cand(inputs, None, l));
        assert!(skipped(&[input(1, 1, 0.5), input(2, 2, 0.5)]).is_some(), "same versions");
        // Step 2 rewritten in place or replaced by rename: same path and step, new version.
        assert!(skipped(&[input(1, 1, 0.5), input(2, 22, 0.5)]).is_none(), "new file version");
        let mut renumbered = input(2, 2, 0.5);
        renumbered.step = Some(7);
        assert!(skipped(&[input(1, 1, 0.5), renumbered]).is_none(), "new step in metadata");
        // A manifest without identities (older sewa) cannot prove sameness: publish again.
        let mut old = published(vec![input(1, 1, 0.5), input(2, 2, 0.5)], None);
        old.inputs.iter_mut().for_each(|i| i.identity = None);
        let again = [input(1, 1, 0.5), input(2, 2, 0.5)];
        assert!(skip(LATEST, Some(&old), &cand(&again, None, Some(&old))).is_none());
    }

    #[test]
    fn latest_policy_never_publishes_an_older_selection_while_the_published_one_exists() {
        let last = published(vec![input(3, 3, 0.4), input(4, 4, 0.3), input(5, 5, 0.3)], None);
        let l = Some(&last);
        let verdict = |inputs: &[PublishedInput], on_disk: fn(&PublishedInput) -> bool| {
            decide(LATEST, l, &cand(inputs, None, l), on_disk)
        };
        // Step 5 left the window and it refilled from step 2: older than what is published.
        let refilled = [input(2, 2, 0.4), input(3, 3, 0.3), input(4, 4, 0.3)];
        let v = verdict(&refilled, THERE);
        let why = v.skip().expect("an older selection must not be published");
        assert!(why.contains("step 4") && why.contains("step 5"), "{why}");
        // The published step 5 is gone from disk (the trainer went back): publish what exists.
        let Verdict::Publish { note: Some(note) } = verdict(&refilled, GONE) else {
            panic!("the older selection is what exists now")
        };
        assert!(note.contains("is gone"), "{note}");
        // Newer or as new: published as usual.
        assert_eq!(verdict(&[input(4, 4, 0.5), input(5, 5, 0.5)], THERE), Verdict::publish(None));
        assert_eq!(verdict(&[input(5, 5, 0.5), input(6, 6, 0.5)], THERE), Verdict::publish(None));
        // `best` judges by loss, not by age.
        let scored = published(last.inputs.clone(), Some(0.5));
        let best = skip(BEST, Some(&scored), &cand(&refilled, Some(0.1), Some(&scored)));
        assert!(best.is_none());
    }

    #[test]
    fn best_policy_never_publishes_a_selection_without_a_finite_loss() {
        let a = vec![input(1, 1, 0.5), input(2, 2, 0.5)];
        let b = vec![input(2, 2, 0.5), input(3, 3, 0.5)];
        let scored = published(a.clone(), Some(0.30));
        let unscored = published(a, None);
        for bad in [None, Some(f64::NAN), Some(f64::INFINITY)] {
            for last in [None, Some(&scored), Some(&unscored)] {
                let why = skip(BEST, last, &cand(&b, bad, last));
                assert!(
                    why.as_deref().is_some_and(|s| s.contains("no finite loss")),
                    "{bad:?} over {:?}",
                    last.map(|l| l.loss)
                );
                // A finite selection loss whose acceptance loss is not finite: the same.
                let judged_bad = Candidate { judged: bad, ..cand(&b, Some(0.1), last) };
                assert!(skip(BEST, last, &judged_bad).is_some_and(|s| s.contains("no finite")));
            }
        }
        let l = Some(&unscored);
        let v = decide(BEST, l, &cand(&b, Some(9.0), l), THERE);
        assert!(matches!(v, Verdict::Publish { note: Some(n) } if n.contains("no loss")));
    }

    /// Issue 9 item 12: at step 2000 the published model still came from steps 300–1200.
    #[test]
    fn max_age_steps_lets_a_worse_selection_replace_a_stale_published_model() {
        let old = vec![input(300, 1, 0.5), input(1200, 2, 0.5)];
        let last = published(old, Some(0.30));
        let l = Some(&last);
        let newer = [input(1900, 3, 0.5), input(2000, 4, 0.5)];
        let worse = cand(&newer, Some(0.35), l);
        let rules = |n| Rules { policy: Policy::Best, max_age_steps: Some(n) };
        assert!(skip(BEST, l, &worse).is_some(), "without max_age_steps the old one stays");
        // Newest published 1200, newest window 2000: 800 steps old.
        assert!(skip(rules(800), l, &worse).is_some(), "800 steps is not more than 800");
        let Verdict::Publish { note: Some(note) } = decide(rules(799), l, &worse, THERE) else {
            panic!("a stale published model must not block")
        };
        assert!(note.contains("step 1200") && note.contains("max_age_steps = 799"), "{note}");
        assert!(note.contains("0.350000") && note.contains("0.300000"), "{note}");
        // It never lets through what is never published: no finite loss, or the same average.
        let nan = cand(&newer, Some(f64::NAN), l);
        assert!(skip(rules(1), l, &nan).is_some_and(|s| s.contains("no finite")));
        let same = published(newer.to_vec(), Some(0.30));
        let s = Some(&same);
        assert!(skip(rules(1), s, &cand(&newer, Some(0.4), s)).is_some_and(|s| s.contains("same")));
        // A published model without steps is never too old.
        let mut stepless = last.clone();
        stepless.inputs.iter_mut().for_each(|i| i.step = None);
        let sl = Some(&stepless);
        assert!(skip(rules(1), sl, &cand(&newer, Some(0.35), sl)).is_some());
    }

    #[test]
    fn the_floor_is_zero_for_non_negative_members_and_generous_for_signed_ones() {
        assert_eq!(floor(&[]), None);
        assert_eq!(floor(&[f64::NAN, f64::NEG_INFINITY]), None);
        assert_eq!(floor(&[2.4, 2.1, f64::NAN]), Some(0.0));
        assert_eq!(floor(&[0.0, 0.0]), Some(0.0));
        // −3 − max(10 × 0.5, 3): ten spreads below the best member.
        assert_eq!(floor(&[-3.0, -2.5]), Some(-8.0));
        // −3 − max(10 × 0.1, 3): twice the best member's magnitude when they agree.
        assert_eq!(floor(&[-3.0, -2.9]), Some(-6.0));
        assert_eq!(floor(&[-1.0, 1.0]), Some(-21.0));
    }

    /// Issue 19 item 14: a lying evaluator's −1e308 became the published "best", which no later
    /// selection could beat.
    #[test]
    fn best_policy_takes_a_loss_below_the_members_floor_as_an_evaluator_error() {
        let a = vec![input(1, 1, 0.5), input(2, 2, 0.5)];
        let b = vec![input(2, 2, 0.5), input(3, 3, 0.5)];
        let last = published(a, Some(0.30));
        let l = Some(&last);
        let members = [2.1, 2.4, 2.2];
        let with =
            |loss: f64, last| Candidate { member_losses: &members, ..cand(&b, Some(loss), last) };
        for (lie, last) in [(-1e308, l), (-1e308, None), (-0.001, l)] {
            let v = decide(BEST, last, &with(lie, last), THERE);
            let Verdict::Implausible(why) = v else { panic!("{lie} was believed: {v:?}") };
            assert!(why.contains(&format!("{lie:e}")) && why.contains("evaluator error"), "{why}");
            assert!(why.contains("lowest 2.1, highest 2.4"), "{why}");
        }
        // Better than every member, not below zero: believed (and it beats 0.30).
        assert_eq!(decide(BEST, l, &with(0.0, l), THERE), Verdict::publish(None));
        assert_eq!(decide(BEST, l, &with(0.25, l), THERE), Verdict::publish(None));
        // The acceptance split is the same loss on other data: judged against the same floor.
        let acc = Candidate {
            judged: Some(-5.0),
            published: Some(0.3),
            split: Split::Acceptance,
            ..with(2.0, l)
        };
        let v = decide(BEST, l, &acc, THERE);
        assert!(matches!(&v, Verdict::Implausible(w) if w.contains("on the acceptance data")));
        // Without member losses only non-finite losses are refused; `latest` judges no loss.
        assert_eq!(decide(BEST, l, &cand(&b, Some(-1e308), l), THERE), Verdict::publish(None));
        assert_eq!(decide(LATEST, l, &with(-1e308, l), THERE), Verdict::publish(None));
    }

    #[test]
    fn with_an_acceptance_split_the_judged_losses_decide_not_the_selection_losses() {
        let last = published(vec![input(1, 1, 1.0)], Some(0.10));
        let l = Some(&last);
        let b = [input(2, 2, 1.0)];
        // Better on the selection data (0.05 < 0.10), worse on the acceptance data.
        let c = Candidate {
            judged: Some(0.40),
            published: Some(0.30),
            split: Split::Acceptance,
            ..cand(&b, Some(0.05), l)
        };
        let why = skip(BEST, l, &c).expect("worse on the acceptance data");
        assert!(why.contains("acceptance data") && why.contains("0.400000"), "{why}");
        // Worse on the selection data, better on the acceptance data: published.
        let c = Candidate { loss: Some(0.5), judged: Some(0.20), ..c };
        assert_eq!(decide(BEST, l, &c, THERE), Verdict::publish(None));
    }

    /// The reasons name the split in the words the log and status always used.
    #[test]
    fn splits_are_named_as_before() {
        assert_eq!(Split::Selection.to_string(), "selection data");
        assert_eq!(Split::Acceptance.to_string(), "acceptance data");
    }
}
