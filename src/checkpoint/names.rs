//! What a file name tells us: the training step it holds (`parse_step`) and whether it is a
//! writer's temporary file that must never be validated (`is_temp_name`). Pure string logic;
//! this module does not look at files.

/// Extensions stripped before looking for a step number.
const EXTENSIONS: &[&str] =
    &[".safetensors.index.json", ".safetensors", ".index.json", ".ckpt", ".pth", ".pt", ".bin"];

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
    let start = stem.rfind(|c: char| !c.is_ascii_digit()).map_or(0, |i| i + 1);
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
