//! Bounded line reading from an evaluator's pipes, shared by the protocol reader (stdout) and
//! the stderr relay: a line is kept up to a byte bound and the rest of it read and dropped, so
//! an evaluator printing without newlines cannot make sewa buffer without bound.

use std::io::BufRead;

/// The next line of `r` without its newline (a `\r\n` ending is an ordinary line end),
/// keeping at most `max` bytes (the rest is read and dropped; `true` says so); `None` at end of
/// stream. With `last_segment`, only what follows the line's last carriage return is kept, as a
/// terminal would leave it (a progress bar redrawn with `\r` is its final frame, not every
/// frame).
pub fn read_bounded(
    r: &mut impl BufRead,
    max: usize,
    last_segment: bool,
) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    Ok(read_line(r, max, last_segment)?.map(|l| (l.bytes, l.cut)))
}

/// A line as [`read_line`] reads it.
pub struct Line {
    pub bytes: Vec<u8>,
    /// Bytes past the bound were dropped.
    pub cut: bool,
    /// Earlier frames were redrawn over by carriage returns (a progress bar's last frame).
    pub redrawn: bool,
}

/// [`read_bounded`], also saying whether the line was redrawn.
pub fn read_line(
    r: &mut impl BufRead,
    max: usize,
    last_segment: bool,
) -> std::io::Result<Option<Line>> {
    let (mut line, mut cut, mut any, mut redrawn) = (Vec::new(), false, false, false);
    // A `\r` ending the previous buffer fill: a line end if `\n` follows, else a redraw.
    let mut pending_cr = false;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        any = true;
        let (mut chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if last_segment {
            if pending_cr && !chunk.is_empty() {
                line.clear();
                cut = false;
                redrawn = true;
            }
            pending_cr = false;
            if let Some(rest) = chunk.strip_suffix(b"\r") {
                chunk = rest;
                pending_cr = done.is_none();
            }
            if let Some(i) = chunk.iter().rposition(|b| *b == b'\r') {
                line.clear();
                cut = false;
                redrawn = true;
                chunk = &chunk[i + 1..];
            }
        }
        let room = max.saturating_sub(line.len());
        cut |= chunk.len() > room;
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(buf.len());
        r.consume(used);
        if done.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if !last_segment && line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(Line { bytes: line, cut, redrawn }))
}
