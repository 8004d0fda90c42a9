//! `sewa average`: take the output's lock, open inputs, choose them (--last), weigh them
//! (--weights, a fixed rule: --method wsm orders them oldest first and takes Megatron-LM's WSM
//! coefficients, or a model-based --select), check everything, then publish the average
//! atomically with a progress bar on a terminal. Nothing is written when an input or a flag is
//! bad: every check runs before the publisher creates its first file. Another sewa process
//! publishing to the same output is refused before any input is opened; the lock is held until
//! this process exits. With `--distributed` this process is one rank of several (`ranks`):
//! each writes its share of the tensors and rank 0, alone holding the lock, commits the whole
//! output once every rank's shards are complete (`publish::publish_distributed`).

use crate::cli::{AverageArgs, AverageMethod, LoraMode};
use sewa_checkpoint::Checkpoint;
use sewa_engine::average::PlanSource;
use sewa_engine::average::{AverageOptions, AveragePlan};
use sewa_engine::error::{Error, Result};
use sewa_engine::manifest::{Manifest, Provenance, SelectedBy};
use sewa_engine::publish::{
    self, DistributedOptions, PublishOptions, Published, RankOutcome, Ranks, check_destination,
    check_parent, publish_distributed,
};
use sewa_engine::select::{MemberSummary, Method, WsmShape, rules};
use std::time::Duration;

/// Run `sewa average`; what to print on success.
pub fn run(args: &AverageArgs) -> Result<String> {
    if args.lora == LoraMode::MergeDelta && args.select.is_some() {
        return Err(Error::Usage("--lora merge-delta takes --weights, not --select".into()));
    }
    // Only under --distributed are the launcher's variables read (see `ranks`).
    let ranks = match args.distributed {
        true => Some(super::ranks::resolve(args.rank, args.world_size, |k| std::env::var(k).ok())?),
        false => None,
    };
    if ranks.is_some() && args.lora == LoraMode::MergeDelta {
        return Err(Error::Usage(
            "--lora merge-delta is not distributed: drop --distributed".into(),
        ));
    }
    check_destination(&args.out)?;
    for dir in check_parent(&args.out, args.parents)? {
        tracing::info!(dir = %dir.display(), "created (--parents)");
    }
    // Rank 0 alone publishes, so it alone holds the output's lock; the other ranks write only
    // into the plan's staging directory.
    let _lock = match ranks {
        Some(r) if r.rank != 0 => None,
        _ => {
            let lock = publish::hold(&args.out)?;
            for done in publish::recover(&lock) {
                tracing::warn!(%done, "cleaned up after an interrupted publish");
            }
            Some(lock)
        }
    };
    // Read before any input is opened: a bad config fails fast.
    let selection = match &args.select {
        Some(_) => Some(super::select::load(args.config.as_deref())?),
        None => None,
    };
    // Integer buffers: the command line's policy, else the config's `[publish] int_policy`;
    // the evaluator mixes them the way the published average will.
    let int_policy = args
        .int_policy
        .or_else(|| selection.as_ref().and_then(|s| s.int_policy))
        .unwrap_or_default();
    let opts =
        super::open_options(&args.strip_prefix, args.state_key.as_deref(), args.deepspeed_weights);
    let opened = super::open_all(&args.inputs, &opts)?;
    let mut chosen = choose_last(&opened, args.last)?;
    let wsm = wsm_shape(args)?;
    if wsm.is_some() && chosen.iter().all(|c| c.step().is_some()) {
        chosen.sort_by_key(|c| c.step()); // oldest first; stable: equal steps keep their order
    }
    for c in chosen.iter().skip(1) {
        sewa_checkpoint::check_same_adapter(chosen[0], c)?;
    }
    let opts = AverageOptions {
        dtype: args.dtype,
        int_policy,
        overflow: args.dtype_overflow,
        threads: args.threads,
    };
    let mut window_note = None;
    let (chosen, weights, provenance) = match (&args.select, selection) {
        (Some(method), Some(mut cfg)) => {
            cfg.objective.int_policy = int_policy;
            let sel = super::select::run(&cfg, method, args.k, &chosen)?;
            // The manifest lists the members averaged, as the daemon's does; the window the
            // selection looked at goes in a note (and its per-member details stay whole).
            window_note = Some(window_of(&chosen, &sel.weights));
            let (kept, weights) = selected(&chosen, &sel.weights);
            (kept, Some(weights), Provenance::from(&sel))
        }
        _ => match wsm {
            Some(shape) => {
                let (w, why) = wsm_weights(&chosen, shape, args, opened.len())?;
                (chosen, Some(w), why)
            }
            None => {
                let why = provenance(args, opened.len(), chosen.len());
                (chosen, args.weights.clone(), why)
            }
        },
    };
    let plan = AveragePlan::new(chosen, weights.as_deref(), opts)?
        .with_read_ahead(args.read_ahead.enabled());
    if args.lora == LoraMode::MergeDelta {
        return merge_delta(args, &plan, provenance).map(|p| shown(&p));
    }
    if args.base.is_some() {
        return Err(Error::Usage("--base is for --lora merge-delta".into()));
    }
    // Cleared when dropped, after the publish.
    let mut meter = sewa_engine::meter::Meter::new(
        plan.output_bytes(),
        "{spinner} averaging {bytes}/{total_bytes} {wide_bar} {binary_bytes_per_sec} eta {eta}",
    );
    let mut manifest = Manifest::new(publish::record_of(&plan), args.out.clone(), provenance);
    manifest.notes.extend(window_note);
    let side = publish::side_files_for(&args.out, publish::newest_side_dir(plan.inputs()))?;
    if let Some(ranks) = ranks {
        let opts = DistributedOptions {
            ranks,
            shard_bytes: args.max_shard_size,
            wait: Duration::from_secs(args.commit_timeout.unwrap_or(3600)),
        };
        let done =
            publish_distributed(&plan, manifest, side.as_ref(), &args.out, &opts, &mut |d| {
                meter.set(d)
            })?;
        return Ok(distributed_outcome(&done, ranks));
    }
    let opts = PublishOptions { shard_bytes: args.max_shard_size };
    publish::publish_tensors(
        &mut PlanSource::new(&plan),
        manifest,
        side.as_ref(),
        &args.out,
        &opts,
        &mut |done| meter.set(done),
    )
    .map(|p| shown(&p))
}

/// What `sewa average` prints: the output and its manifest.
fn shown(p: &Published) -> String {
    format!("{}\nmanifest: {}", p.path.display(), p.manifest_path.display())
}

/// What one rank of `sewa average --distributed` prints.
fn distributed_outcome(done: &RankOutcome, ranks: Ranks) -> String {
    let Ranks { rank, world } = ranks;
    match done {
        RankOutcome::Committed(p) => shown(p),
        RankOutcome::Written { record: r, reused } => format!(
            "rank {rank} of {world}: {} shard file(s), {} tensor bytes{}; published by rank 0",
            r.files.len(),
            r.bytes,
            if *reused { " (complete from an earlier run, reused)" } else { "" },
        ),
        RankOutcome::AlreadyPublished(out) => format!(
            "rank {rank} of {world}: {} already holds this average (same inputs, weights and \
             options): nothing written",
            out.display()
        ),
    }
}

/// The members a selection gave a weight, with their weights (in window order).
fn selected<'a>(window: &[&'a Checkpoint], weights: &[f64]) -> (Vec<&'a Checkpoint>, Vec<f64>) {
    window.iter().zip(weights).filter(|(_, w)| **w > 0.0).map(|(c, w)| (*c, *w)).unzip()
}

/// The manifest's note on the window a selection chose from (the daemon writes the same).
fn window_of(window: &[&Checkpoint], weights: &[f64]) -> String {
    let each: Vec<String> = window
        .iter()
        .zip(weights)
        .map(|(c, w)| {
            let step = c.step().map_or_else(|| "?".to_string(), |s| s.to_string());
            format!("{} (step {step}, weight {w:.6})", c.path().display())
        })
        .collect();
    format!("sewa average --select: window of {} members: {}", window.len(), each.join(", "))
}

/// `--lora merge-delta`: the base plus the average of the adapters' merged deltas, published
/// in the base's layout with its side files (see `commands::lora`).
fn merge_delta(args: &AverageArgs, plan: &AveragePlan<'_>, why: Provenance) -> Result<Published> {
    let base = args.base.as_deref().ok_or_else(|| {
        Error::Usage(
            "--lora merge-delta needs --base DIR (the model the adapters were trained on)".into(),
        )
    })?;
    if let Some(c) =
        plan.inputs().iter().find(|c| c.format() != sewa_checkpoint::Format::PeftAdapter)
    {
        return Err(Error::bad_input(c.path(), "--lora merge-delta: not a PEFT adapter directory"));
    }
    let opts =
        super::open_options(&args.strip_prefix, args.state_key.as_deref(), args.deepspeed_weights);
    let base = Checkpoint::open(base, &opts)?;
    let mut source = super::lora::MergedDelta::new(&base, plan)?;
    let mut record = publish::record_of(plan);
    record.outputs = sewa_engine::average::TensorSource::tensors(&source).to_vec();
    let mut manifest = sewa_engine::manifest::Manifest::new(record, args.out.clone(), why);
    source.describe(&mut manifest);
    let mut meter = sewa_engine::meter::Meter::new(
        source.output_bytes(),
        "{spinner} merging {bytes}/{total_bytes} {wide_bar} {binary_bytes_per_sec} eta {eta}",
    );
    let opts = PublishOptions { shard_bytes: args.max_shard_size };
    let side = publish::side_files_for(&args.out, base.side_dir())?;
    publish::publish_tensors(&mut source, manifest, side.as_ref(), &args.out, &opts, &mut |done| {
        meter.set(done)
    })
}

/// The shape `--method wsm` weighs with (`--wsm-shape`, by default linear as in Megatron's
/// tool); `None` for the other rules, which take no shape.
fn wsm_shape(args: &AverageArgs) -> Result<Option<WsmShape>> {
    match (args.method, args.wsm_shape) {
        (Some(AverageMethod::Wsm), shape) => Ok(Some(shape.unwrap_or(WsmShape::Linear))),
        (_, Some(_)) => Err(Error::Usage("--wsm-shape is for --method wsm".into())),
        (_, None) => Ok(None),
    }
}

/// `--method wsm`: Megatron-LM's merge coefficients for `shape` over every chosen input
/// (already oldest first), recorded as the selection that chose them.
fn wsm_weights(
    chosen: &[&Checkpoint],
    shape: WsmShape,
    args: &AverageArgs,
    given: usize,
) -> Result<(Vec<f64>, Provenance)> {
    let members: Vec<MemberSummary> = chosen
        .iter()
        .map(|c| MemberSummary { path: c.path().to_path_buf(), step: c.step(), metric: None })
        .collect();
    let sel = rules::wsm(&members, members.len(), shape)?;
    let mut why = Provenance::from(&sel);
    let order = if chosen.iter().all(|c| c.step().is_some()) {
        "oldest first by step"
    } else {
        "oldest first as given (an input has no step)"
    };
    let scope = match args.last {
        Some(_) => format!("the last {} of {given} inputs", chosen.len()),
        None => format!("{} inputs", chosen.len()),
    };
    why.why = format!("WSM {shape} weights over {scope}, {order}");
    if let Some(d) = why.details.as_object_mut() {
        d.insert("command".into(), serde_json::json!("sewa average"));
    }
    Ok((sel.weights, why))
}

/// The inputs to average: all, or the last `n` by step (by order given if a step is unknown).
pub fn choose_last(all: &[Checkpoint], last: Option<usize>) -> Result<Vec<&Checkpoint>> {
    let mut chosen: Vec<&Checkpoint> = all.iter().collect();
    let Some(n) = last else { return Ok(chosen) };
    if n == 0 {
        return Err(Error::Usage("--last must be at least 1".into()));
    }
    if chosen.iter().all(|c| c.step().is_some()) {
        chosen.sort_by_key(|c| c.step()); // stable: equal steps keep the order given
    }
    if n > chosen.len() {
        tracing::warn!("--last {n} but only {} inputs: averaging all of them", chosen.len());
    }
    Ok(chosen.split_off(chosen.len().saturating_sub(n)))
}

fn provenance(args: &AverageArgs, given: usize, used: usize) -> Provenance {
    let scope = match args.last {
        Some(_) => format!("last {used} of {given} inputs by step"),
        None => format!("{used} inputs"),
    };
    let (method, why) = match &args.weights {
        Some(w) => {
            (SelectedBy::Weights, format!("weights {w:?} given on the command line, {scope}"))
        }
        None => (Method::Uniform.into(), format!("uniform average of {scope}")),
    };
    Provenance {
        method,
        why,
        loss: None,
        details: serde_json::json!({ "command": "sewa average" }),
    }
}
