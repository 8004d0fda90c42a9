//! What a file name tells us: the training step it holds (`parse_step`) and whether it is a
//! writer's temporary file that must never be validated (`is_temp_name`). Pure string logic;
//! this module does not look at files. Names are untrusted: any UTF-8 (or, through `step_of`,
//! any bytes) must give an answer, never a panic.

use std::path::Path;

/// Extensions stripped before looking for a step number.
const EXTENSIONS: &[&str] =
    &[".safetensors.index.json", ".safetensors", ".index.json", ".ckpt", ".pth", ".pt", ".bin"];

/// [`parse_step`] of a path's file name. Names that are not UTF-8 are read lossily: the
/// replaced bytes are never digits, so the step is the same as their owner would read it.
pub fn step_of(path: &Path) -> Option<u64> {
    parse_step(&path.file_name()?.to_string_lossy())
}

/// Training step from a checkpoint file or directory name, e.g. `checkpoint-500`,
/// `step_0000500`, `step=500`, `epoch=3-step=500`, `global_step500`, `iter_0000500`,
/// `model_500.safetensors`, `500.pt`. `None` for names without a step (`last.ckpt`,
/// `model.safetensors`, `epoch=3.ckpt`, shard names `model-00001-of-00002.safetensors`).
pub fn parse_step(name: &str) -> Option<u64> {
    let mut stem = name.to_ascii_lowercase();
    for ext in EXTENSIONS {
        if let Some(s) = stem.strip_suffix(ext) {
            stem = s.to_string();
            break;
        }
    }
    // A keyword followed by a number wins over a bare trailing number.
    for key in ["step", "checkpoint", "ckpt", "iteration", "iter"] {
        if let Some(n) = number_after_keyword(&stem, key) {
            return Some(n);
        }
    }
    if stem.contains("-of-") {
        return None; // shard numbering, not a step
    }
    if stem.starts_with("pytorch_model_fsdp_") {
        return None; // Accelerate's model index (`pytorch_model_fsdp_0/`), not a step
    }
    trailing_number(&stem)
}

/// The number after the last occurrence of `key`, allowing one `=`, `_` or `-` between.
fn number_after_keyword(stem: &str, key: &str) -> Option<u64> {
    let bytes = stem.as_bytes();
    for (pos, _) in stem.rmatch_indices(key) {
        let mut i = pos + key.len();
        if i < bytes.len() && matches!(bytes[i], b'=' | b'_' | b'-') {
            i += 1;
        }
        let digits: &str = leading_digits(&stem[i..]);
        if !digits.is_empty() {
            return digits.parse().ok();
        }
    }
    None
}

fn leading_digits(s: &str) -> &str {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    &s[..end]
}

/// `model_500` / `model-500` / `500` → 500; not `epoch=3`, `last-v1`, `resnet50x`.
fn trailing_number(stem: &str) -> Option<u64> {
    // Count digit bytes from the end: an ASCII digit byte is never part of a multi-byte
    // character, so `start` is a char boundary whatever precedes it (`café_1`, `é1`).
    let digits_len = stem.bytes().rev().take_while(u8::is_ascii_digit).count();
    let start = stem.len() - digits_len;
    let digits = &stem[start..];
    if digits.is_empty() {
        return None;
    }
    let before = &stem[..start];
    if !(before.is_empty() || before.ends_with(['_', '-', '.'])) {
        return None;
    }
    let word = before.trim_end_matches(['_', '-', '.', '=']);
    if word.ends_with("epoch") {
        return None;
    }
    digits.parse().ok()
}

/// True for names writers use while a checkpoint is incomplete, which must be ignored until
/// renamed: hidden files (safetensors' `.tmpXXXXXX`), `tmp-checkpoint-N` (HF 4.36–4.38),
/// `*.tmp`, `*.part`, `*.partial`, `*.incomplete`, `*.crdownload`, editor backups (`~`, `.swp`)
/// and names with a `.tmp…` component (`model.safetensors.tmp8f2a`).
pub fn is_temp_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    if lower.starts_with('.') || lower.starts_with("tmp-") || lower.starts_with("tmp_") {
        return true;
    }
    if lower.ends_with('~') || lower.ends_with(".swp") {
        return true;
    }
    lower.split('.').skip(1).any(|part| {
        part.starts_with("tmp")
            || part.starts_with("temp")
            || matches!(part, "part" | "partial" | "incomplete" | "crdownload" | "download")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_table() {
        let table: &[(&str, Option<u64>)] = &[
            ("checkpoint-500", Some(500)),
            ("checkpoint-0", Some(0)),
            ("step_0000500", Some(500)),
            ("step_0000500.safetensors", Some(500)),
            ("step=500.ckpt", Some(500)),
            ("epoch=3-step=500.ckpt", Some(500)),
            ("epoch=03-step=000500-val_loss=0.25.ckpt", Some(500)),
            ("model_500.safetensors", Some(500)),
            ("model-500.pt", Some(500)),
            ("500.pt", Some(500)),
            ("global_step1200", Some(1200)),
            ("step-1000", Some(1000)),
            ("iter_0001000", Some(1000)),
            ("epoch=2-step=1000.ckpt", Some(1000)),
            ("pytorch_model_fsdp_0", None),
            ("iter_0000300", Some(300)),
            ("ckpt_42.pth", Some(42)),
            ("last.ckpt", None),
            ("last-v1.ckpt", None),
            ("model.safetensors", None),
            ("epoch=3.ckpt", None),
            ("model-00001-of-00002.safetensors", None),
            ("model.safetensors.index.json", None),
            ("resnet50x.pt", None),
        ];
        for (name, want) in table {
            assert_eq!(parse_step(name), *want, "{name}");
        }
    }

    /// `café.safetensors` used to panic (a byte index + 1 inside `é`) and crash-loop the daemon.
    #[test]
    fn non_ascii_and_non_utf8_names_never_panic() {
        use std::os::unix::ffi::OsStrExt;
        let table: &[(&str, Option<u64>)] = &[
            ("café.safetensors", None),
            ("modèle_final_é.safetensors", None),
            ("modèle_500.safetensors", Some(500)),
            ("é500.pt", None),
            ("step_é", None),
            ("ステップ_7.ckpt", Some(7)),
            ("ステップ=7.ckpt", None),
            ("checkpoint-3é", Some(3)),
        ];
        for (name, want) in table {
            assert_eq!(parse_step(name), *want, "{name}");
            let _ = is_temp_name(name);
        }
        let raw = Path::new(std::ffi::OsStr::from_bytes(b"model_\xfe\xff_42.safetensors"));
        assert_eq!(step_of(raw), Some(42));
        assert_eq!(step_of(Path::new(std::ffi::OsStr::from_bytes(b"\xfe.pt"))), None);
        // Every char boundary mix: suffixes of multi-byte text followed by digits and keywords.
        let pieces = ["é", "日本", "🦀", "_", "-", "=", "step", "ckpt", "1", "20", ".pt", "."];
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let name = format!("{a}{b}{c}");
                    let _ = (parse_step(&name), is_temp_name(&name));
                }
            }
        }
    }

    #[test]
    fn temp_names() {
        for name in [
            ".tmpA1b2C3",
            ".model.safetensors",
            "tmp-checkpoint-500",
            "model.safetensors.tmp",
            "model.safetensors.tmp8f2a",
            "model.pt.part",
            "model.pt.partial",
            "x.ckpt~",
        ] {
            assert!(is_temp_name(name), "{name}");
        }
        for name in ["checkpoint-500", "model.safetensors", "epoch=3-step=500.ckpt", "last.ckpt"] {
            assert!(!is_temp_name(name), "{name}");
        }
    }
}
