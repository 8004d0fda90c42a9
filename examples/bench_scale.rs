//! Scale benchmark (issue 12 item 4): `sewa watch` beside a trainer of an LLM-sized model.
//!
//! A writer saves 5 bf16 checkpoints of `--gib` GiB each (a LLaMA-like layout: embedding,
//! per layer q/k/v/o attention, gate/up/down MLP and two RMS norms, final norm, untied
//! lm_head — a few hundred tensors) into a fresh temp dir, the way safetensors ≥ 0.8 saves
//! (hidden temp file, then renamed in), waiting for each publication. The daemon is the
//! release binary, a child of this small process, with a window of 5 and, in turn, LAWA (k = 3:
//! the average slides by one member per save) and a uniform window (grows by one member per
//! save). Then the writer rotates like `save_total_limit = 2` (deletes steps 1-3).
//!
//! Reported per publication: time from hand-over (the rename plus `quiet_ms`, when the settler
//! hands the checkpoint over) to the manifest naming it, the daemon's own timing, and the bytes
//! it read meanwhile (`/proc/PID/io`: `rchar`, every byte read through a syscall — the new
//! checkpoint's validation included — and `read_bytes`, those that missed the page cache). Per
//! run: the daemon's peak RSS (`VmHWM`, the kernel's high-water mark — the counter
//! `getrusage`'s `ru_maxrss` reports at exit — read once before it is stopped), and the disk
//! it held after the rotation (the status file's `disk.held_bytes`, and the free space that
//! came back when it exited).
//!
//! Run: `cargo build --release && cargo run --release --example bench_scale -- --gib 2`
//! Options: `--gib F` (default 2), `--layers N` (default 32), `--dir DIR` (temp dir parent,
//! default $TMPDIR), `--sewa PATH` (default: `sewa` beside this example's binary), `--budget
//! auto|SIZE` (`[runtime] memory_budget`, default auto; `--budget 1` never keeps the running
//! average, so every publication streams its members). Needs
//! 6 × `--gib` of free disk (5 checkpoints and the published average) and about 5 × `--gib`
//! of RAM for today's f64 running average.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const WINDOW: u64 = 5;
const QUIET_MS: u64 = 500;
const DEADLINE: Duration = Duration::from_secs(1800);
const VOCAB: usize = 32_000;

struct Args {
    gib: f64,
    layers: usize,
    dir: PathBuf,
    sewa: PathBuf,
    /// `[runtime] memory_budget`, as TOML (`"auto"`, `1`: never keep the running average).
    budget: String,
}

fn parse_args() -> Result<Args, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let default_sewa = exe.parent().and_then(Path::parent).map(|d| d.join("sewa"));
    let mut a = Args {
        gib: 2.0,
        layers: 32,
        dir: std::env::temp_dir(),
        sewa: default_sewa.unwrap_or_else(|| PathBuf::from("sewa")),
        budget: "\"auto\"".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--gib" => a.gib = value.parse().map_err(|_| format!("--gib {value:?}"))?,
            "--layers" => a.layers = value.parse().map_err(|_| format!("--layers {value:?}"))?,
            "--dir" => a.dir = PathBuf::from(value),
            "--sewa" => a.sewa = PathBuf::from(value),
            "--budget" if value == "auto" => a.budget = "\"auto\"".into(),
            "--budget" => a.budget = format!("{:?}", value),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let layout = Layout::for_bytes((args.gib * (1u64 << 30) as f64) as u64, args.layers);
    println!(
        "model: {} tensors, hidden {}, intermediate {}, {} layers, {:.3} GiB bf16 per checkpoint",
        layout.tensors.len(),
        layout.hidden,
        layout.intermediate,
        args.layers,
        layout.bytes() as f64 / (1u64 << 30) as f64
    );
    println!("sewa: {}, memory_budget = {}", args.sewa.display(), args.budget);
    // (label, [select] table, the first step published: LAWA waits for k members).
    for (label, select, first) in
        [("LAWA k=3", "method = \"lawa\"\nk = 3", 3), ("uniform window", "method = \"uniform\"", 1)]
    {
        let work = tempfile::tempdir_in(&args.dir)?;
        let select = format!("{select}\n[runtime]\nmemory_budget = {}", args.budget);
        let run = measure(&args.sewa, work.path(), &layout, &select, first)?;
        run.print(label, layout.bytes());
    }
    Ok(())
}

/// The tensors of a LLaMA-like model, (name, shape), in file order.
struct Layout {
    hidden: usize,
    intermediate: usize,
    tensors: Vec<(String, Vec<usize>)>,
}

impl Layout {
    /// The largest hidden size (a multiple of 64) whose model fits in `bytes` of bf16.
    fn for_bytes(bytes: u64, layers: usize) -> Layout {
        let mut best = Layout::new(64, layers);
        let mut h = 64;
        loop {
            let l = Layout::new(h, layers);
            if l.bytes() > bytes {
                return best;
            }
            best = l;
            h += 64;
        }
    }

    fn new(hidden: usize, layers: usize) -> Layout {
        let inter = (8 * hidden / 3).div_ceil(256) * 256;
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, hidden])];
        for l in 0..layers {
            let p = format!("model.layers.{l}");
            for proj in ["q", "k", "v", "o"] {
                t.push((format!("{p}.self_attn.{proj}_proj.weight"), vec![hidden, hidden]));
            }
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]));
            t.push((format!("{p}.input_layernorm.weight"), vec![hidden]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![hidden]));
        }
        t.push(("model.norm.weight".to_string(), vec![hidden]));
        t.push(("lm_head.weight".to_string(), vec![VOCAB, hidden]));
        Layout { hidden, intermediate: inter, tensors: t }
    }

    fn bytes(&self) -> u64 {
        self.tensors.iter().map(|(_, s)| 2 * s.iter().product::<usize>() as u64).sum()
    }
}

/// Write `step_N.safetensors` tensor by tensor through an 8 MiB buffer of bf16 values that
/// depend on the step (this process stays small: the daemon's peak RSS is its own), as a hidden
/// temp file renamed into place. Returns the instant of the rename.
fn write_checkpoint(dir: &Path, layout: &Layout, step: u64) -> std::io::Result<Instant> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in &layout.tensors {
        let n = 2 * shape.iter().product::<usize>() as u64;
        let entry = serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]});
        header.insert(name.clone(), entry);
        offset += n;
    }
    let mut json = serde_json::to_vec(&Value::Object(header))?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let pattern: Vec<u8> = (0..4usize << 20)
        .flat_map(|i| {
            let v = 0.02 * ((i % 251) as f32 / 251.0 - 0.5) + step as f32 * 1e-3;
            half::bf16::from_f32(v).to_le_bytes()
        })
        .collect();
    let tmp = dir.join(format!(".tmp_step_{step}"));
    let mut f = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    f.write_all(&(json.len() as u64).to_le_bytes())?;
    f.write_all(&json)?;
    let mut left = offset as usize;
    while left > 0 {
        let n = left.min(pattern.len());
        f.write_all(&pattern[..n])?;
        left -= n;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_data()?;
    std::fs::rename(&tmp, dir.join(format!("step_{step}.safetensors")))?;
    Ok(Instant::now())
}

/// One publication as measured.
struct Publication {
    step: u64,
    /// Hand-over (rename + quiet period) to the manifest naming `step`.
    handover_to_published: Duration,
    /// The daemon's own figures (status `last_publish`): averaging, and selection + averaging +
    /// durable publish.
    average_ms: u64,
    millis: u64,
    reads: u64,
    rchar: u64,
    read_bytes: u64,
}

struct Run {
    publications: Vec<Publication>,
    peak_rss: u64,
    held_status: u64,
    held_freed: i128,
}

impl Run {
    fn print(&self, label: &str, model: u64) {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!(
            "\n{label}: peak RSS {:.2} GiB ({:.2}× the model)",
            gib(self.peak_rss),
            self.peak_rss as f64 / model as f64
        );
        for p in &self.publications {
            println!(
                "  step {}: hand-over → published {:.2} s (daemon: averaging {} ms, total {} ms, \
                 {} checkpoints read); read {:.2} GiB ({:.2} GiB from storage)",
                p.step,
                p.handover_to_published.as_secs_f64(),
                p.average_ms,
                p.millis,
                p.reads,
                gib(p.rchar),
                gib(p.read_bytes)
            );
        }
        println!(
            "  after rotation to 2 files: sewa held {:.2} GiB of deleted checkpoints (status), \
             {:.2} GiB came back when it exited",
            gib(self.held_status),
            self.held_freed as f64 / (1u64 << 30) as f64
        );
    }
}

/// Start the daemon over `work/runs`, write the window, rotate, stop; measure as described.
fn measure(
    sewa: &Path,
    work: &Path,
    layout: &Layout,
    select: &str,
    first: u64,
) -> Result<Run, Box<dyn std::error::Error>> {
    let runs = work.join("runs");
    std::fs::create_dir(&runs)?;
    let out = work.join("out/model.safetensors");
    let config = work.join("sewa.toml");
    std::fs::write(
        &config,
        format!(
            "[watch]\ndir = {runs:?}\nquiet_ms = {QUIET_MS}\n[window]\nsize = {WINDOW}\n\
             [select]\n{select}\n[publish]\nout = {out:?}\n"
        ),
    )?;
    let log = File::create(work.join("sewa.log"))?;
    let mut child = Command::new(sewa)
        .args(["watch", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let result = drive(&mut child, work, &runs, &out, layout, first);
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Write steps 1..=WINDOW, measuring each publication from `first` on.
fn drive(
    child: &mut Child,
    work: &Path,
    runs: &Path,
    out: &Path,
    layout: &Layout,
    first: u64,
) -> Result<Run, Box<dyn std::error::Error>> {
    let pid = child.id();
    let manifest = PathBuf::from(format!("{}.manifest.json", out.display()));
    let status = out.parent().unwrap().join(".sewa/status.json");
    let mut publications = Vec::new();
    for step in 1..=WINDOW {
        let before = io(pid)?;
        let renamed = write_checkpoint(runs, layout, step)?;
        let selects =
            |m: &Value| m["inputs"].as_array().is_some_and(|i| i.iter().any(|i| i["step"] == step));
        let in_window = |s: &Value| s["members"].as_array().is_some_and(|m| m.len() as u64 == step);
        if step < first {
            wait(child, work, &format!("step {step} loaded"), || {
                read(&status).is_some_and(|s| in_window(&s))
            })?;
            continue;
        }
        wait(child, work, &format!("step {step} published"), || {
            read(&manifest).is_some_and(|m| selects(&m))
        })?;
        let elapsed = renamed.elapsed().saturating_sub(Duration::from_millis(QUIET_MS));
        let after = io(pid)?;
        // The status is written after the manifest: wait for it to show this publication.
        wait(child, work, "the status of it", || {
            read(&status).is_some_and(|s| in_window(&s) && !s["last_publish"].is_null())
        })?;
        let p = read(&status).unwrap()["last_publish"].clone();
        publications.push(Publication {
            step,
            handover_to_published: elapsed,
            average_ms: p["average_ms"].as_u64().unwrap_or(0),
            millis: p["millis"].as_u64().unwrap_or(0),
            reads: p["reads"].as_u64().unwrap_or(0),
            rchar: after.0 - before.0,
            read_bytes: after.1 - before.1,
        });
    }
    rotate_and_stop(child, work, runs, &status, publications)
}

/// Delete steps 1-3 (the trainer keeps 2), read what sewa holds, stop it, see what comes back.
fn rotate_and_stop(
    child: &mut Child,
    work: &Path,
    runs: &Path,
    status: &Path,
    publications: Vec<Publication>,
) -> Result<Run, Box<dyn std::error::Error>> {
    for step in 1..=WINDOW - 2 {
        std::fs::remove_file(runs.join(format!("step_{step}.safetensors")))?;
    }
    let deleted = |s: &Value| {
        s["members"]
            .as_array()
            .map_or(0, |m| m.iter().filter(|m| m["on_disk"] == "deleted").count())
    };
    // Gone hints settle after the quiet period; the status written then shows them.
    wait(child, work, "the deletions in the status", || {
        read(status).is_some_and(|s| deleted(&s) as u64 == WINDOW - 2)
    })?;
    let held_status = read(status).unwrap()["disk"]["held_bytes"].as_u64().unwrap_or(0);
    let peak_rss = vm_hwm(child.id())?;
    let free_before = free_bytes(runs)?;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    child.wait()?;
    let held_freed = free_bytes(runs)? as i128 - free_before as i128;
    Ok(Run { publications, peak_rss, held_status, held_freed })
}

fn read(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Poll `done` every 20 ms; fail if the daemon exits or the deadline passes.
fn wait(
    child: &mut Child,
    work: &Path,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    while !done() {
        let log = || std::fs::read_to_string(work.join("sewa.log")).unwrap_or_default();
        if child.try_wait()?.is_some() {
            return Err(format!("sewa exited waiting for {what}:\n{}", log()).into());
        }
        if start.elapsed() > DEADLINE {
            return Err(format!("timed out waiting for {what}:\n{}", log()).into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// (rchar, read_bytes) of a process.
fn io(pid: u32) -> std::io::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((field("rchar:"), field("read_bytes:")))
}

/// Peak resident set in bytes (`VmHWM`).
fn vm_hwm(pid: u32) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    Ok(kib.unwrap_or(0) * 1024)
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail * st.f_frsize)
}
