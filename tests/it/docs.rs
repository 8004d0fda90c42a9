//! The user documentation against what it documents: `docs/config.md` lists exactly the keys of
//! `config/sewa.toml` (its commented-out optional keys included) under the same tables; the
//! relative links between `README.md` and `docs/` resolve, anchors included; the README fits on
//! a screen, opens with the two commands a newcomer runs, and its minimal config is accepted by
//! `sewa check-config`. The checks are pure functions over text, so the tests below also feed
//! them broken copies and watch them fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Keys by table name (`watch`, `select.sewa`, ...).
type Keys = BTreeMap<String, BTreeSet<String>>;

/// The README's size limit: "fits on a screen" (issue 20).
const README_MAX_BYTES: usize = 15 * 1024;

/// The two commands a newcomer runs first, in this order.
const FIRST_COMMANDS: [&str; 2] = ["cargo run --release -- demo", "cargo test"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn is_key(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `[table]` (optionally followed by a comment) as the table's name.
fn table_header(line: &str) -> Option<String> {
    let rest = line.strip_prefix('[').filter(|r| !r.starts_with('['))?;
    let (name, _) = rest.split_once(']')?;
    let valid = !name.is_empty() && name.split('.').all(is_key);
    (valid && toml::from_str::<toml::Table>(line).is_ok()).then(|| name.to_string())
}

/// `key = value` (optionally followed by a comment) as its key. Prose in comments may contain
/// `=`, but never parses as exactly one TOML key-value line.
fn key_line(line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let table = toml::from_str::<toml::Table>(line).ok()?;
    (is_key(key) && table.len() == 1 && table.contains_key(key)).then(|| key.to_string())
}

/// Every key of the example config by table. Its conventions: real tables and keys, plus
/// optional ones commented out as `# [table]` and `# key = value`, each on one line.
fn example_keys(text: &str) -> Result<Keys, String> {
    let mut keys = Keys::new();
    let mut table: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let body = line.strip_prefix('#').map_or(line, str::trim_start);
        if let Some(name) = table_header(body) {
            keys.entry(name.clone()).or_default();
            table = Some(name);
        } else if let Some(key) = key_line(body) {
            let Some(t) = &table else {
                return Err(format!("config/sewa.toml line {}: {key} before any table", n + 1));
            };
            keys.entry(t.clone()).or_default().insert(key);
        }
    }
    Ok(keys)
}

/// The live (uncommented) keys as the `toml` crate reads them, by table: the line scanner of
/// `example_keys` must find at least these.
fn parsed_keys(text: &str, tables: &Keys) -> Keys {
    fn walk(prefix: &str, t: &toml::Table, tables: &Keys, out: &mut Keys) {
        out.entry(prefix.to_string()).or_default();
        for (k, v) in t {
            let sub = format!("{prefix}.{k}");
            match v.as_table() {
                Some(inner) if tables.contains_key(&sub) => walk(&sub, inner, tables, out),
                _ => {
                    out.entry(prefix.to_string()).or_default().insert(k.clone());
                }
            }
        }
    }
    let doc: toml::Table = toml::from_str(text).expect("config/sewa.toml parses");
    let mut out = Keys::new();
    for (name, v) in &doc {
        walk(name, v.as_table().expect("top-level entries are tables"), tables, &mut out);
    }
    out
}

/// The cells of a Markdown table row (`\|` is a pipe inside a cell).
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                out.last_mut().unwrap().push(chars.next().unwrap())
            }
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out.iter().map(|c| c.trim().to_string()).collect()
}

/// Keys documented in `docs/config.md`: under a `## [table]` heading (anything after the `]` is
/// free text, e.g. `kind = "builtin"`: one table may have a section per variant), rows
/// `| `key` | type | default | meaning |`.
fn documented_keys(md: &str) -> Result<Keys, String> {
    let mut keys = Keys::new();
    let mut table: Option<String> = None;
    let mut section = BTreeSet::new();
    for (n, line) in md.lines().enumerate() {
        if let Some(heading) = line.strip_prefix("## ") {
            section.clear();
            table =
                heading.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(t, _)| t.into());
            if let Some(t) = &table {
                keys.entry(t.clone()).or_default();
            }
            continue;
        }
        if line.starts_with("# ") {
            table = None;
        }
        if !line.starts_with('|') {
            continue;
        }
        let row = cells(line);
        let Some(key) = row[0].strip_prefix('`').and_then(|k| k.strip_suffix('`')) else {
            continue; // the header row and the |---| separator
        };
        let at = format!("docs/config.md line {}", n + 1);
        let Some(t) = &table else {
            return Err(format!("{at}: `{key}` is not under a `## [table]` heading"));
        };
        if row.len() != 4 || row.iter().any(String::is_empty) {
            return Err(format!(
                "{at}: `{key}` needs four filled cells: key, type, default, meaning"
            ));
        }
        if !section.insert(key.to_string()) {
            return Err(format!("{at}: [{t}] {key} is documented twice"));
        }
        keys.entry(t.clone()).or_default().insert(key.to_string());
    }
    Ok(keys)
}

/// Everything that differs between the example config and the reference, one line each.
fn differences(example: &Keys, documented: &Keys) -> Vec<String> {
    let pairs = |k: &Keys| -> BTreeSet<(String, String)> {
        k.iter().flat_map(|(t, ks)| ks.iter().map(move |k| (t.clone(), k.clone()))).collect()
    };
    let (ex, doc) = (pairs(example), pairs(documented));
    let mut out = Vec::new();
    for t in example.keys().filter(|t| !documented.contains_key(*t)) {
        out.push(format!("table [{t}] of config/sewa.toml has no `## [{t}]` in docs/config.md"));
    }
    for t in documented.keys().filter(|t| !example.contains_key(*t)) {
        out.push(format!("docs/config.md documents table [{t}], which config/sewa.toml lacks"));
    }
    for (t, k) in ex.difference(&doc) {
        out.push(format!("config/sewa.toml [{t}] {k} is not documented in docs/config.md"));
    }
    for (t, k) in doc.difference(&ex) {
        out.push(format!("docs/config.md documents [{t}] {k}, which config/sewa.toml lacks"));
    }
    out
}

fn check_config_reference(toml_text: &str, md: &str) -> Vec<String> {
    match (example_keys(toml_text), documented_keys(md)) {
        (Ok(ex), Ok(doc)) => differences(&ex, &doc),
        (Err(e), _) | (_, Err(e)) => vec![e],
    }
}

/// The README's size and first commands: the first thing after the title is a fenced block
/// whose command lines (comments stripped) are `FIRST_COMMANDS`.
fn check_readme_head(readme: &str) -> Vec<String> {
    let mut out = Vec::new();
    if readme.len() > README_MAX_BYTES {
        out.push(format!("README.md is {} bytes, over {README_MAX_BYTES}", readme.len()));
    }
    let mut lines = readme.lines().skip_while(|l| l.trim().is_empty() || l.starts_with("# "));
    if !lines.next().is_some_and(|l| l.starts_with("```")) {
        out.push("README.md: the first thing after the title is not a code block".into());
        return out;
    }
    let commands: Vec<&str> = lines
        .take_while(|l| !l.starts_with("```"))
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect();
    if commands != FIRST_COMMANDS {
        out.push(format!("README.md's first commands are {commands:?}, not {FIRST_COMMANDS:?}"));
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Lines outside fenced code blocks.
fn prose(md: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fenced = false;
    md.lines().enumerate().filter(move |(_, l)| {
        if l.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// The anchors a Markdown file's headings define (repeated headings get `-1`, `-2`, ...).
fn anchors(md: &str) -> BTreeSet<String> {
    let mut seen = BTreeMap::<String, usize>::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose(md) {
        let text = line.trim_start_matches('#');
        if text.len() == line.len() || !text.starts_with(' ') {
            continue;
        }
        let base = slug(text);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
        *n += 1;
    }
    out
}

/// Relative link targets `](target)` outside code blocks, with their line numbers.
fn links(md: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose(md) {
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if !target.contains("://") && !target.starts_with("mailto:") {
                out.push((n + 1, target.to_string()));
            }
        }
    }
    out
}

/// Broken relative links of the Markdown files given (paths relative to the repository root):
/// a file that does not exist, or an anchor no heading of the target defines.
fn broken_links(files: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for file in files {
        let md = std::fs::read_to_string(root().join(file)).unwrap();
        for (line, target) in links(&md) {
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let dest = if path.is_empty() {
                root().join(file)
            } else {
                root().join(file).parent().unwrap().join(path)
            };
            let at = format!("{}:{line}: ({target})", file.display());
            if !dest.exists() {
                out.push(format!("{at}: {} does not exist", dest.display()));
            } else if !anchor.is_empty() && dest.extension().is_some_and(|e| e == "md") {
                let text = std::fs::read_to_string(&dest).unwrap();
                if !anchors(&text).contains(anchor) {
                    out.push(format!(
                        "{at}: no heading of {} has the anchor #{anchor}",
                        dest.display()
                    ));
                }
            }
        }
    }
    out
}

fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let name = entry.unwrap().file_name();
        if Path::new(&name).extension().is_some_and(|e| e == "md") {
            files.push(Path::new("docs").join(name));
        }
    }
    files.sort();
    files
}

#[test]
fn config_reference_documents_exactly_the_keys_of_the_example_config() {
    let (toml_text, md) = (read("config/sewa.toml"), read("docs/config.md"));
    let problems = check_config_reference(&toml_text, &md);
    assert!(
        problems.is_empty(),
        "docs/config.md and config/sewa.toml differ:\n{}",
        problems.join("\n")
    );
    // The line scanner sees every key the TOML parser sees, and the commented-out ones too.
    let example = example_keys(&toml_text).unwrap();
    for (t, ks) in parsed_keys(&toml_text, &example) {
        let missed: Vec<_> = ks.iter().filter(|k| !example[&t].contains(*k)).collect();
        assert!(missed.is_empty(), "the scanner missed [{t}] {missed:?}");
    }
    for (t, k) in [("watch", "state_key"), ("objective", "env"), ("select.sewa", "guard")] {
        assert!(example.get(t).is_some_and(|ks| ks.contains(k)), "commented [{t}] {k} not seen");
    }
}

#[test]
fn config_reference_check_fails_when_a_key_is_missing_from_either_file() {
    let (toml_text, md) = (read("config/sewa.toml"), read("docs/config.md"));
    // A commented-out optional key removed from the example config.
    let without: String = toml_text
        .lines()
        .filter(|l| !l.starts_with("# stall_s ="))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, toml_text);
    let problems = check_config_reference(&without, &md);
    assert_eq!(
        problems,
        ["docs/config.md documents [runtime] stall_s, which config/sewa.toml lacks"]
    );
    // A live key removed from the reference.
    let without: String =
        md.lines().filter(|l| !l.starts_with("| `quiet_ms` |")).map(|l| format!("{l}\n")).collect();
    assert_ne!(without, md);
    let problems = check_config_reference(&toml_text, &without);
    assert_eq!(problems, ["config/sewa.toml [watch] quiet_ms is not documented in docs/config.md"]);
    // A key documented under the wrong table, and a row with an empty cell.
    let moved = md.replacen("| `seed` |", "| `sead` |", 1);
    let problems = check_config_reference(&toml_text, &moved);
    assert_eq!(problems.len(), 2, "{problems:?}");
    let empty = md.replacen("| `rescan_s` | positive integer (s) |", "| `rescan_s` | |", 1);
    assert!(check_config_reference(&toml_text, &empty)[0].contains("four filled cells"));
}

#[test]
fn readme_fits_on_a_screen_and_opens_with_the_two_commands() {
    let readme = read("README.md");
    let problems = check_readme_head(&readme);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check can fail: commands swapped, or a README grown past the limit.
    let swapped = readme.replacen("cargo run --release -- demo", "cargo tset", 1);
    assert_eq!(check_readme_head(&swapped).len(), 1);
    let grown = format!("{readme}{}", "x".repeat(README_MAX_BYTES));
    assert!(check_readme_head(&grown)[0].contains("over"));
}

#[test]
fn readme_minimal_config_is_accepted_by_check_config() {
    let readme = read("README.md");
    let block: String = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README.md has a ```toml block")
        .to_string();
    assert!(block.contains("[watch]") && block.contains("[publish]"), "{block}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sewa.toml");
    std::fs::write(&path, &block).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_sewa")).arg("check-config").arg(&path).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
}

#[test]
fn relative_links_between_readme_and_docs_resolve() {
    let files = doc_files();
    assert!(files.len() > 5, "{files:?}");
    let broken = broken_links(&files);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert_eq!(slug("`sewa average` — one-shot averaging"), "sewa-average--one-shot-averaging");
    assert_eq!(slug("[objective] kind = \"builtin\""), "objective-kind--builtin");
}
