//! The selection bench on the trajectory zoo (`scripts/make_zoo.py`): per window, the exhaustive
//! best k-subset (cached in `bench/zoo/reference-<split>.json`, recomputed when the window's
//! bytes changed), then each strategy's selection — its loss on the selection split, gap to the
//! exhaustive best, whether it is worse than LAWA-k, objective calls, wall time — and the loss of
//! its weights on the held-out test split beside LAWA-k's, the uniform window's and EMA's.
//! `--warm` slides every window member by member through `run_configured` with one `Memory`, as
//! the daemon does, and compares each warm selection with a cold one on the same window.
//! Uses only sewa's public API; docs/selection-bench.md explains the columns.
//!
//!     python3 scripts/make_zoo.py --split design
//!     cargo run --release --example bench_zoo -- --split design [--methods sewa,lawa]
//!         [--warm] [--no-cold] [--only FAMILY] [--id WINDOW] [--json rows.json]
//!         [--threads 2] [--reference-only] [--zoo target/zoo] [--reference FILE]

mod reference;
mod report;
mod zoo;

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Value, json};

use sewa_checkpoint::Checkpoint;
use sewa_engine::objective::Objective;
use sewa_engine::select::{
    MemberSummary, Memory, Method, Options, Selection, SewaConfig, SoupConfig, Strategy, TwaConfig,
    rules, run_configured,
};

use reference::{Cache, Reference, content_hash, exhaustive, key};
use report::{Row, WarmRow, cold_summary, planted_summary, warm_summary};
use zoo::{Window, loss_at, read_index};

/// Strategies the bench knows, in table order.
const STRATEGIES: [&str; 10] =
    ["sewa", "direct", "greedy", "soup", "twa", "lawa", "uniform", "ema0.5", "ema0.8", "ema0.9"];

struct Args {
    split: String,
    zoo: PathBuf,
    reference: PathBuf,
    methods: Vec<String>,
    warm: bool,
    cold: bool,
    only: Vec<String>,
    ids: Vec<String>,
    json: Option<PathBuf>,
    threads: usize,
    reference_only: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut raw = std::env::args().skip(1);
    let mut a = Args {
        split: "design".into(),
        zoo: "target/zoo".into(),
        reference: PathBuf::new(),
        methods: STRATEGIES.iter().map(|s| s.to_string()).collect(),
        warm: false,
        cold: true,
        only: Vec::new(),
        ids: Vec::new(),
        json: None,
        threads: 2,
        reference_only: false,
    };
    let list = |v: String| v.split(',').filter(|s| !s.is_empty()).map(String::from).collect();
    while let Some(flag) = raw.next() {
        let mut value = || raw.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--split" => a.split = value()?,
            "--zoo" => a.zoo = value()?.into(),
            "--reference" => a.reference = value()?.into(),
            "--methods" => a.methods = list(value()?),
            "--warm" => a.warm = true,
            "--no-cold" => a.cold = false,
            "--only" => a.only = list(value()?),
            "--id" => a.ids = list(value()?),
            "--json" => a.json = Some(value()?.into()),
            "--threads" => a.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--reference-only" => a.reference_only = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if let Some(bad) = a.methods.iter().find(|m| !STRATEGIES.contains(&m.as_str())) {
        return Err(format!("unknown method {bad:?}; known: {}", STRATEGIES.join(",")));
    }
    if a.reference.as_os_str().is_empty() {
        a.reference = format!("bench/zoo/reference-{}.json", a.split).into();
    }
    Ok(a)
}

const USAGE: &str = "usage: bench_zoo [--split design|report] [--methods sewa,direct,greedy,soup,\
twa,lawa,uniform,ema0.5,ema0.8,ema0.9] [--warm] [--no-cold] [--only FAMILY,..] [--id WINDOW,..] \
[--json FILE] [--threads N] [--reference-only] [--zoo DIR] [--reference FILE]";

fn main() {
    if let Err(e) = run(parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    })) {
        eprintln!("bench_zoo: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let root = args.zoo.join(&args.split);
    let index = read_index(&root.join("zoo.json"))?;
    if index.split != args.split {
        return Err(format!("{}: holds split {:?}", root.display(), index.split));
    }
    let entries: Vec<_> = index
        .windows
        .iter()
        .filter(|w| args.only.is_empty() || args.only.contains(&w.family))
        .filter(|w| args.ids.is_empty() || args.ids.contains(&w.id))
        .collect();
    if entries.is_empty() {
        let families: Vec<&String> = index.families.keys().collect();
        return Err(format!("no window matches; families: {families:?}"));
    }
    let mut refs = Refs {
        cache: Cache::read(&args.reference, &args.split)?,
        path: args.reference.clone(),
        threads: args.threads,
    };
    let (mut cold_rows, mut warm_rows) = (Vec::new(), Vec::new());
    println!(
        "{} windows of split {} ({}); losses re-evaluated from the published weights",
        entries.len(),
        args.split,
        root.display()
    );
    for entry in entries {
        let w = Window::load(&root, entry)?;
        let reference = refs.get(&w, 0)?;
        if args.reference_only {
            if entry.planted() {
                refs.get(&w, entry.members.len() - entry.window)?;
            }
            continue;
        }
        if args.cold {
            cold_rows.extend(cold_window(&w, &reference, &args.methods)?);
        }
        if args.warm {
            warm_rows.extend(warm_window(&w, &args.methods, &mut refs)?);
        }
    }
    if args.reference_only {
        println!("reference: {}", args.reference.display());
        return Ok(());
    }
    if args.cold {
        println!("\nsummary over {} windows (cold selections)", count_windows(&cold_rows));
        print!("{}", cold_summary(&cold_rows));
    }
    if args.warm {
        println!("\nwarm starts: each slide's warm selection vs a cold one on the same window");
        print!("{}", warm_summary(&warm_rows));
        let planted = planted_summary(&warm_rows);
        if planted.lines().count() > 1 {
            println!("\nplanted windows after the last slide: gap to the exhaustive best k-subset");
            print!("{planted}");
        }
    }
    if let Some(path) = &args.json {
        let dump = json!({ "split": args.split, "cold": cold_rows, "warm": warm_rows });
        let text = serde_json::to_string_pretty(&dump).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("rows: {}", path.display());
    }
    Ok(())
}

/// The exhaustive references: the committed cache, refreshed where stale.
struct Refs {
    cache: Cache,
    path: PathBuf,
    threads: usize,
}

impl Refs {
    /// The exhaustive answer on members `[start, start + window)` of `w`: cached when its hash
    /// matches the bytes on disk, else computed now and written back to the cache file.
    fn get(&mut self, w: &Window, start: usize) -> Result<Reference, String> {
        let (key, hash) = (key(w, start), content_hash(w, start)?);
        if let Some(r) = self.cache.windows.get(&key).filter(|r| r.hash == hash) {
            return Ok(r.clone());
        }
        let stale = self.cache.windows.contains_key(&key);
        let r = exhaustive(w, start, hash, self.threads)?;
        println!(
            "{key}: exhaustive reference {} ({} subsets, {:.1}s)",
            if stale { "was stale, recomputed" } else { "computed" },
            r.subsets,
            r.seconds
        );
        self.cache.windows.insert(key, r.clone());
        self.cache.write(&self.path)?;
        Ok(r)
    }
}

fn count_windows(rows: &[Row]) -> usize {
    let mut ids: Vec<&str> = rows.iter().map(|r| r.window.as_str()).collect();
    ids.dedup();
    ids.len()
}

/// A strategy's answer: published weights over the window, and what the selector reported.
struct Answer {
    weights: Vec<f64>,
    reported: Option<f64>,
    calls: usize,
    wall: f64,
    details: Value,
}

fn summaries(view: &[&Checkpoint]) -> Vec<MemberSummary> {
    view.iter()
        .map(|c| MemberSummary { path: c.path().to_path_buf(), step: c.step(), metric: None })
        .collect()
}

fn from_selection(sel: Selection, wall: f64) -> Answer {
    let calls = sel.details.total_calls();
    let details = sel.details.json();
    Answer { weights: sel.weights, reported: sel.loss, calls, wall, details }
}

/// Run `strategy` on `view`; model-based ones through `run_configured` with `memory`.
fn select(
    strategy: &str,
    view: &[&Checkpoint],
    k: usize,
    obj: &mut dyn Objective,
    memory: &mut Memory,
) -> Result<Answer, String> {
    let rule = |r: sewa_engine::Result<Selection>| r.map(|s| from_selection(s, 0.0));
    let members = summaries(view);
    let answer = match strategy {
        "lawa" => rule(rules::lawa(&members, k)),
        "uniform" => rule(rules::uniform(&members)),
        s if s.starts_with("ema") => {
            let decay: f64 = s[3..].parse().map_err(|e| format!("{s}: {e}"))?;
            rule(rules::ema(&members, decay))
        }
        _ => {
            let (method, sewa) = match strategy {
                "sewa" => (Method::Sewa, SewaConfig::default()),
                "direct" => {
                    (Method::Sewa, SewaConfig { strategy: Strategy::Direct, ..Default::default() })
                }
                "greedy" => (Method::Greedy, SewaConfig::default()),
                "soup" => (Method::Soup, SewaConfig::default()),
                "twa" => (Method::Twa, SewaConfig::default()),
                other => return Err(format!("unknown strategy {other}")),
            };
            let (soup, twa) = (SoupConfig::default(), TwaConfig::default());
            let opts = Options { sewa: &sewa, soup: &soup, twa: &twa };
            let t = Instant::now();
            let sel = run_configured(method, k, view, obj, opts, memory);
            sel.map(|s| from_selection(s, t.elapsed().as_secs_f64()))
        }
    };
    answer.map_err(|e| e.to_string())
}

fn uniform_on(n: usize, set: &[usize]) -> Vec<f64> {
    let mut w = vec![0.0; n];
    set.iter().for_each(|&i| w[i] = 1.0 / set.len() as f64);
    w
}

/// Scalar string and boolean fields of a selection's details (what a reader scans for: the
/// strategy, which rule won a guard...), `key=value`, for the per-window lines.
fn note(details: &Value) -> String {
    let Some(map) = details.as_object() else { return String::new() };
    map.iter()
        .filter(|(k, _)| k.as_str() != "objective")
        .filter_map(|(k, v)| match v {
            Value::String(s) if s.len() <= 40 => Some(format!("{k}={s}")),
            Value::Bool(b) => Some(format!("{k}={b}")),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn cold_window(w: &Window, reference: &Reference, methods: &[String]) -> Result<Vec<Row>, String> {
    let e = &w.entry;
    let (n, k) = (e.window, e.k);
    let mut sel_obj = w.objective(&e.select)?;
    let mut test_obj = w.objective(&e.test)?;
    let view = w.view(0);
    let lawa_w = uniform_on(n, &(n - k..n).collect::<Vec<_>>());
    let lawa_loss = loss_at(w, sel_obj.as_mut(), 0, &lawa_w);
    let test_lawa = loss_at(w, test_obj.as_mut(), 0, &lawa_w);
    let best = reference.best_loss;
    println!(
        "\n{} ({}, {} params, window {n}, k {k}): exhaustive {:.5} {:?}, LAWA-{k} {:.5} \
         (rank {} of {}), median subset {:.5}",
        e.id,
        e.family,
        e.params,
        best,
        reference.best,
        lawa_loss,
        reference.lawa_rank,
        reference.subsets,
        reference.median_loss
    );
    println!(
        "  {:<11} {:>9} {:>8} {:>5} {:>6} {:>7} {:>9} {:>8}  chosen / details",
        "strategy", "loss", "gap", ">lawa", "calls", "secs", "test", "vs lawa"
    );
    let mut rows = Vec::new();
    let ex_w = uniform_on(n, &reference.best);
    let ex = Answer {
        weights: ex_w,
        reported: Some(best),
        calls: reference.subsets,
        wall: reference.seconds,
        details: json!({ "best": reference.best, "top": reference.top }),
    };
    let mut answers = vec![("exhaustive".to_string(), Ok(ex))];
    for m in methods {
        answers.push((m.clone(), select(m, &view, k, sel_obj.as_mut(), &mut Memory::default())));
    }
    for (strategy, answer) in answers {
        let row = match answer {
            Ok(a) => {
                let loss = loss_at(w, sel_obj.as_mut(), 0, &a.weights);
                let test = loss_at(w, test_obj.as_mut(), 0, &a.weights);
                if let Some(r) = a.reported.filter(|r| ((r - loss) / loss).abs() > 1e-4) {
                    println!("  note: {strategy} reported loss {r:.6}, its weights give {loss:.6}");
                }
                Row {
                    window: e.id.clone(),
                    family: e.family.clone(),
                    strategy,
                    loss,
                    reported_loss: a.reported,
                    exhaustive_loss: best,
                    gap_pct: 100.0 * (loss - best) / best,
                    lawa_loss,
                    worse_than_lawa: loss > lawa_loss * (1.0 + 1e-9),
                    calls: a.calls,
                    wall_s: a.wall,
                    test_loss: test,
                    test_lawa,
                    test_vs_lawa_pct: 100.0 * (test - test_lawa) / test_lawa,
                    weights: a.weights,
                    details: a.details,
                    error: None,
                }
            }
            Err(err) => Row {
                window: e.id.clone(),
                family: e.family.clone(),
                strategy,
                loss: f64::NAN,
                reported_loss: None,
                exhaustive_loss: best,
                gap_pct: f64::NAN,
                lawa_loss,
                worse_than_lawa: false,
                calls: 0,
                wall_s: 0.0,
                test_loss: f64::NAN,
                test_lawa,
                test_vs_lawa_pct: f64::NAN,
                weights: Vec::new(),
                details: Value::Null,
                error: Some(err),
            },
        };
        print_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

fn print_row(r: &Row) {
    if let Some(err) = &r.error {
        println!("  {:<11} error: {err}", r.strategy);
        return;
    }
    let chosen: Vec<usize> = (0..r.weights.len()).filter(|&i| r.weights[i] > 0.0).collect();
    let chosen =
        if chosen.len() <= 8 { format!("{chosen:?}") } else { format!("{} members", chosen.len()) };
    println!(
        "  {:<11} {:>9.5} {:>7.3}% {:>5} {:>6} {:>7.2} {:>9.5} {:>+7.3}%  {chosen} {}",
        r.strategy,
        r.loss,
        r.gap_pct,
        if r.worse_than_lawa { "yes" } else { "" },
        r.calls,
        r.wall_s,
        r.test_loss,
        r.test_vs_lawa_pct,
        note(&r.details)
    );
}

/// Slide the window member by member: the first (cold) window primes one `Memory`, then every
/// slide is selected warm with it and cold with a fresh one. On planted windows the last slide
/// is also compared with its exhaustive best k-subset (cached like the cold windows').
fn warm_window(w: &Window, methods: &[String], refs: &mut Refs) -> Result<Vec<WarmRow>, String> {
    let e = &w.entry;
    let (n, k) = (e.window, e.k);
    let slides = e.members.len() - n;
    let last = if e.planted() && slides > 0 { Some(refs.get(w, slides)?) } else { None };
    let mut obj = w.objective(&e.select)?;
    let mut rows = Vec::new();
    let lawa_w = uniform_on(n, &(n - k..n).collect::<Vec<_>>());
    for m in methods.iter().filter(|m| matches!(m.as_str(), "sewa" | "direct")) {
        let mut memory = Memory::default();
        if let Err(err) = select(m, &w.view(0), k, obj.as_mut(), &mut memory) {
            println!("{} {m}: first window failed: {err}", e.id);
            continue;
        }
        for slide in 1..=slides {
            let view = w.view(slide);
            let warm = select(m, &view, k, obj.as_mut(), &mut memory);
            let cold = select(m, &view, k, obj.as_mut(), &mut Memory::default());
            let lawa_loss = loss_at(w, obj.as_mut(), slide, &lawa_w);
            let chosen = |a: &Answer| (0..n).filter(|&i| a.weights[i] > 0.0).collect();
            let row = match (warm, cold) {
                (Ok(wa), Ok(co)) => {
                    let warm_loss = loss_at(w, obj.as_mut(), slide, &wa.weights);
                    let cold_loss = loss_at(w, obj.as_mut(), slide, &co.weights);
                    let best = last.as_ref().filter(|_| slide == slides).map(|r| r.best_loss);
                    WarmRow {
                        window: e.id.clone(),
                        family: e.family.clone(),
                        strategy: m.clone(),
                        planted: e.planted(),
                        slide,
                        warm_loss,
                        cold_loss,
                        lawa_loss,
                        exhaustive_loss: best,
                        gap_pct: 100.0 * (warm_loss - cold_loss) / cold_loss,
                        warm_calls: wa.calls,
                        cold_calls: co.calls,
                        warm_chosen: chosen(&wa),
                        cold_chosen: chosen(&co),
                        warm_details: wa.details,
                        error: None,
                    }
                }
                (wa, co) => WarmRow {
                    window: e.id.clone(),
                    family: e.family.clone(),
                    strategy: m.clone(),
                    planted: e.planted(),
                    slide,
                    warm_loss: f64::NAN,
                    cold_loss: f64::NAN,
                    lawa_loss,
                    exhaustive_loss: None,
                    gap_pct: f64::NAN,
                    warm_calls: 0,
                    cold_calls: 0,
                    warm_chosen: Vec::new(),
                    cold_chosen: Vec::new(),
                    warm_details: Value::Null,
                    error: Some(format!(
                        "warm: {:?}; cold: {:?}",
                        wa.err().unwrap_or_default(),
                        co.err().unwrap_or_default()
                    )),
                },
            };
            println!(
                "{:<34} {m:<7} slide {slide:>2}: warm {:.5} ({} calls) cold {:.5} ({} calls) \
                 gap {:+.3}% lawa {:.5}{} warm {:?} cold {:?}{}",
                e.id,
                row.warm_loss,
                row.warm_calls,
                row.cold_loss,
                row.cold_calls,
                row.gap_pct,
                row.lawa_loss,
                row.exhaustive_loss.map_or(String::new(), |b| format!(" exhaustive {b:.5}")),
                row.warm_chosen,
                row.cold_chosen,
                row.error.as_deref().map_or(String::new(), |e| format!(" error: {e}"))
            );
            rows.push(row);
        }
    }
    Ok(rows)
}
