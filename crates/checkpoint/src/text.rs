//! Untrusted text made safe to print. Tensor names, metadata values and file names come from
//! files anyone who can write the run directory controls; printed raw, `\x1b[…` or `\r` in
//! them would rewrite the operator's terminal or forge log lines. Everything sewa prints that
//! came from a file goes through [`escape`] (error messages do so in `Error`'s `Display`).
//! Also byte counts for people (`human_bytes`). This module only formats; it does not decide
//! what is printed.

use std::borrow::Cow;
use std::fmt::{self, Write};
use std::path::Path;

/// Characters a terminal or log viewer may act on: C0 and C1 controls, DEL, and the Unicode
/// bidirectional overrides that reorder what is displayed ("Trojan source").
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    let _ = match c {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    };
}

fn escape_where(s: &str, unsafe_char: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(&unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) { push_escaped(&mut out, c) } else { out.push(c) }
    }
    Cow::Owned(out)
}

/// `s` with every unsafe character written as `\x1b`, `\n`, `\u{9b}`…, so it prints on one
/// line and changes nothing on the terminal. Backslashes are left alone, so escaping twice
/// changes nothing more.
pub fn escape(s: &str) -> Cow<'_, str> {
    escape_where(s, is_unsafe)
}

/// Like [`escape`] but keeps line breaks and tabs: for messages sewa composes over several
/// lines (a config error with its snippet, an evaluator's last stderr lines).
pub fn escape_lines(s: &str) -> Cow<'_, str> {
    escape_where(s, |c| is_unsafe(c) && c != '\n' && c != '\t')
}

/// A path for messages and log fields: lossy for names that are not UTF-8, then escaped.
pub fn path(p: &Path) -> EscapedPath<'_> {
    EscapedPath(p)
}

/// See [`path`].
pub struct EscapedPath<'a>(&'a Path);

impl fmt::Display for EscapedPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(&self.0.to_string_lossy()))
    }
}

/// `1.50 GiB (1610612736 bytes)`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.2} {} ({b} bytes)", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_escaped_and_plain_text_is_borrowed() {
        assert_eq!(escape("\x1b[31mred\x07"), "\\x1b[31mred\\x07");
        assert_eq!(escape("a\r\nb\u{9b}c\u{202e}d\x7f"), "a\\r\\nb\\u{9b}c\\u{202e}d\\x7f");
        assert!(matches!(escape("layer.0.weight café"), Cow::Borrowed(_)));
        assert_eq!(escape(&escape("\x1b")), "\\x1b", "escaping is idempotent");
        assert_eq!(escape_lines("line 1\n\tline 2\x1b"), "line 1\n\tline 2\\x1b");
        use std::os::unix::ffi::OsStrExt;
        let p = std::ffi::OsStr::from_bytes(b"out_\xfe\x1b.pt");
        assert_eq!(path(Path::new(p)).to_string(), "out_\u{fffd}\\x1b.pt");
    }
}
