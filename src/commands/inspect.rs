//! `sewa inspect`: describe one checkpoint for people (a table) or programs (`--json`).
//! Reads only the tensor list and metadata, never tensor bytes; for tensors stored in
//! pieces (DCP chunks) it shows how many and which ranks wrote them. JSON output escapes control
//! characters by itself (serde_json writes them as `\u001b`); the table escapes them here.

use std::fmt::Write;

use crate::cli::InspectArgs;
use sewa_checkpoint::Checkpoint;
use sewa_checkpoint::text::{self, escape, human_bytes};
use sewa_engine::error::Result;

/// Run `sewa inspect` and return the text to print.
pub fn run(args: &InspectArgs) -> Result<String> {
    let ckpt = Checkpoint::open(
        &args.input,
        &super::open_options(&args.strip_prefix, args.state_key.as_deref(), args.deepspeed_weights),
    )?;
    Ok(if args.json { json(&ckpt) } else { table(&ckpt) })
}

pub fn json(c: &Checkpoint) -> String {
    let v = serde_json::json!({
        // A name that is not UTF-8 cannot be a JSON string: lossless form, as in manifests.
        "path": sewa_engine::path_json::value(c.path()),
        "format": c.format(),
        "step": c.step(),
        "tensor_bytes": c.total_bytes(),
        "tensors": c.tensors(),
        "metadata": c.metadata(),
        "renamed_keys": c.renamed_keys(),
        "side_dir": c.side_dir().map(sewa_engine::path_json::value),
    });
    let mut v = v;
    let chunks: serde_json::Map<String, serde_json::Value> = (c.tensors().iter())
        .filter_map(|t| Some((t.name.clone(), serde_json::json!(c.chunks(&t.name)?))))
        .collect();
    if !chunks.is_empty() {
        v["chunks"] = serde_json::Value::Object(chunks);
    }
    serde_json::to_string_pretty(&v).expect("serialises") + "\n"
}

/// The table for people. Names, metadata and paths come from the file: each is escaped
/// (`sewa_checkpoint::text`) so a name holding terminal controls prints as text.
pub fn table(c: &Checkpoint) -> String {
    let mut s = String::new();
    let step = c.step().map_or("unknown".to_string(), |s| s.to_string());
    let _ = writeln!(s, "path:    {}", text::path(c.path()));
    let _ = writeln!(s, "format:  {}", sewa_engine::manifest::format_name(c.format()));
    let _ = writeln!(s, "step:    {step}");
    let _ = writeln!(s, "tensors: {} ({})", c.tensors().len(), human_bytes(c.total_bytes()));
    if let Some(d) = c.side_dir() {
        let _ = writeln!(s, "side files from: {}", text::path(d));
    }
    if !c.metadata().is_empty() {
        let _ = writeln!(s, "metadata:");
        for (k, v) in c.metadata() {
            let _ = writeln!(s, "  {}: {}", escape(k), escape(v));
        }
    }
    if !c.renamed_keys().is_empty() {
        let _ = writeln!(s, "renamed keys:");
        for (from, to) in c.renamed_keys() {
            let _ = writeln!(s, "  {} -> {}", escape(from), escape(to));
        }
    }
    let names: Vec<_> = c.tensors().iter().map(|t| escape(&t.name)).collect();
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(4).max(4);
    let pieces: Vec<Option<String>> = c.tensors().iter().map(|t| pieces(c, &t.name)).collect();
    let chunked = pieces.iter().any(Option::is_some);
    let head = if chunked { "  CHUNKS  RANKS      SHAPE" } else { "  SHAPE" };
    let _ = writeln!(s, "\n{:width$}  {:5}{head}", "NAME", "DTYPE");
    for ((t, name), pieces) in c.tensors().iter().zip(&names).zip(&pieces) {
        let dtype = format!("{:?}", t.dtype).to_lowercase();
        let pieces = match pieces {
            Some(p) => format!("  {p:17}"),
            None if chunked => format!("  {:17}", "-"),
            None => String::new(),
        };
        let _ = writeln!(s, "{name:width$}  {dtype:5}{pieces}  {:?}", t.shape);
    }
    s
}

/// `2       0,1`: how many chunks a tensor is stored in and which ranks wrote them.
fn pieces(c: &Checkpoint, name: &str) -> Option<String> {
    let chunks = c.chunks(name)?;
    let ranks: std::collections::BTreeSet<u32> = chunks.iter().filter_map(|c| c.rank).collect();
    let ranks: Vec<String> = ranks.iter().map(u32::to_string).collect();
    let ranks = if ranks.is_empty() { "?".to_string() } else { ranks.join(",") };
    Some(format!("{:<6}  {ranks}", chunks.len()))
}
