//! `[publish] tensorboard_dir`: each selection's figures as TensorBoard scalars, at the training
//! step of the window's newest member. The file is TensorBoard's own format, so its reader (and
//! anything reading TFRecords) takes it as a run: `events.out.tfevents.<secs>.<host>.<pid>.sewa`,
//! one per daemon start, a sequence of TFRecords (length, masked CRC-32C of the length, data,
//! masked CRC-32C of the data), each an `Event` protobuf — first `file_version:
//! "brain.Event:2"`, then one `Summary` of `simple_value`s per selection.
//!
//! Pure encoding (`Point::event`, `record`) apart from the file (`Board`). The board never
//! stops the daemon: a failure is one warning, the file is cut back to its last whole record
//! (or abandoned, and the next selection starts a new one), and the file stops growing at
//! `MAX_FILE_BYTES`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use tracing::warn;

/// The file stops growing here: ~100 bytes a selection, so hundreds of thousands of selections.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The first event of every file: the format version TensorBoard's reader expects.
const FILE_VERSION: &str = "brain.Event:2";

/// `tensorflow.Event` (only the fields sewa writes; `what` is a oneof: one of the two is set).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value` with its `simple_value` (optional: a 0.0 is written, not elided,
/// so the reader sees a scalar).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// One selection's figures. Losses that are unknown (a fixed rule has none) are left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Point {
    /// The window's newest member's training step.
    pub step: u64,
    /// The selection's loss on the selection data.
    pub selection_loss: Option<f64>,
    /// The loss of the model published after this selection (this one, or the one kept).
    pub published_loss: Option<f64>,
    /// The newest member's own loss.
    pub newest_member_loss: Option<f64>,
    /// Objective calls this selection made.
    pub oracle_calls: u64,
    /// Members with a non-zero weight.
    pub k: u64,
    /// Members in the window.
    pub window: u64,
}

impl Point {
    /// The scalars, by tag (under `sewa/`), in a fixed order.
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let losses = [
            ("sewa/selection_loss", self.selection_loss),
            ("sewa/published_loss", self.published_loss),
            ("sewa/newest_member_loss", self.newest_member_loss),
        ];
        let mut all: Vec<(&'static str, f64)> =
            losses.into_iter().filter_map(|(t, v)| v.map(|v| (t, v))).collect();
        all.push(("sewa/oracle_calls", self.oracle_calls as f64));
        all.push(("sewa/k", self.k as f64));
        all.push(("sewa/window_size", self.window as f64));
        all
    }

    /// The point as an `Event` at `wall_time` (seconds since the epoch).
    pub fn event(&self, wall_time: f64) -> Event {
        let value = self.scalars().into_iter().map(|(tag, v)| Value {
            tag: tag.to_string(),
            // TensorBoard's scalars are f32: the figures it plots are f32 too.
            simple_value: Some(v as f32),
        });
        Event {
            wall_time,
            step: i64::try_from(self.step).unwrap_or(i64::MAX),
            file_version: None,
            summary: Some(Summary { value: value.collect() }),
        }
    }
}

/// The file's first event.
pub fn version_event(wall_time: f64) -> Event {
    Event { wall_time, step: 0, file_version: Some(FILE_VERSION.into()), summary: None }
}

/// CRC-32C masked as TFRecord does (so a CRC of data holding CRCs is not itself a CRC).
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length, masked CRC of those 8 bytes, the data, masked CRC of the data
/// (all little-endian).
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The event as one framed record.
pub fn framed(event: &Event) -> Vec<u8> {
    record(&prost::Message::encode_to_vec(event))
}

/// The event file of this daemon start, opened on the first selection.
#[derive(Debug)]
pub struct Board {
    dir: PathBuf,
    file: Option<Open>,
    /// The file reached `MAX_FILE_BYTES` (warned once).
    full: bool,
}

#[derive(Debug)]
struct Open {
    path: PathBuf,
    file: File,
    /// Bytes of whole records in it.
    len: u64,
    /// A failed write could not be cut back: the file is given up.
    torn: bool,
}

impl Board {
    pub fn new(dir: PathBuf) -> Board {
        Board { dir, file: None, full: false }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append `point` (opening the file first if needed) and flush. A failure is one warning;
    /// the daemon carries on and the next selection tries again.
    pub fn write(&mut self, point: &Point) {
        if self.full {
            return;
        }
        let now = wall_time();
        let bytes = framed(&point.event(now));
        let opened = open_file(&mut self.file, &self.dir, now);
        let result = opened.and_then(|open| append(open, &bytes, &mut self.full));
        if self.file.as_ref().is_some_and(|o| o.torn) {
            self.file = None;
        }
        if let Err(e) = result {
            let dir = self.dir.display();
            warn!(error = %e, dir = %dir, "[publish] tensorboard_dir: cannot write the event file");
        }
    }
}

/// The open file, opened (and its version event written) if it is not yet.
fn open_file<'a>(
    file: &'a mut Option<Open>,
    dir: &Path,
    now: f64,
) -> std::io::Result<&'a mut Open> {
    if file.is_none() {
        std::fs::create_dir_all(dir)?;
        let name = format!(
            "events.out.tfevents.{}.{}.{}.sewa",
            now as u64,
            host_name(),
            std::process::id()
        );
        let path = dir.join(name);
        // A new file each time: never continue one this process gave up (or another wrote).
        let handle = File::options().create_new(true).append(true).open(&path)?;
        let mut open = Open { path, file: handle, len: 0, torn: false };
        append(&mut open, &framed(&version_event(now)), &mut false)?;
        *file = Some(open);
    }
    Ok(file.as_mut().expect("opened above"))
}

/// Append one whole record and flush; on failure cut the file back to its whole records (or
/// give it up, so the next write starts a new file rather than continue a torn one).
fn append(open: &mut Open, bytes: &[u8], full: &mut bool) -> std::io::Result<()> {
    let len = bytes.len() as u64;
    if open.len + len > MAX_FILE_BYTES {
        *full = true;
        warn!(
            path = %open.path.display(),
            "[publish] tensorboard_dir: the event file reached {MAX_FILE_BYTES} bytes; no more \
             scalars until the daemon restarts"
        );
        return Ok(());
    }
    let written = open.file.write_all(bytes).and_then(|()| open.file.flush());
    match written {
        Ok(()) => {
            open.len += len;
            Ok(())
        }
        Err(e) => {
            // Cut back to the whole records; if that fails too, the file is given up and the
            // next selection starts a new one (`Board::write`).
            open.torn = open.file.set_len(open.len).is_err();
            Err(e)
        }
    }
}

fn wall_time() -> f64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The machine's name for the file name (as TensorBoard's writers put it there), reduced to
/// characters safe in a file name.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let safe: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(64)
        .collect();
    if safe.is_empty() { "localhost".into() } else { safe }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Read a file's records back, checking every length and CRC.
    fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes), "length CRC at {at}");
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data), "data CRC at {at}");
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn crc32c_and_its_mask_match_tensorflow() {
        // CRC-32C's check value (RFC 3720), and TensorFlow's mask of the empty string's CRC (0).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }

    #[test]
    fn an_event_is_the_protobuf_tensorboard_reads() {
        // Byte by byte: wall_time (field 1, fixed64), step (2, varint), summary (5) holding one
        // value: tag (1, string) and simple_value (2, fixed32).
        let value = Value { tag: "sewa/k".into(), simple_value: Some(2.0) };
        let e = Event { summary: Some(Summary { value: vec![value] }), ..Event::default() };
        let e = Event { wall_time: 1.5, step: 300, ..e };
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]); // 300 as a varint
        want.extend_from_slice(&[0x2a, 15, 0x0a, 13, 0x0a, 6]);
        want.extend_from_slice(b"sewa/k");
        want.push(0x15);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(e.encode_to_vec(), want);
        let v = version_event(2.0).encode_to_vec();
        assert_eq!(&v[v.len() - 15..], b"\x1a\x0dbrain.Event:2");
    }

    #[test]
    fn zero_is_written_and_unknown_losses_are_left_out() {
        let p = Point {
            step: 7,
            selection_loss: Some(0.0),
            oracle_calls: 0,
            k: 1,
            window: 3,
            ..Point::default()
        };
        let tags: Vec<_> = p.scalars().into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            tags,
            ["sewa/selection_loss", "sewa/oracle_calls", "sewa/k", "sewa/window_size"]
        );
        let e = Event::decode(p.event(0.0).encode_to_vec().as_slice()).unwrap();
        let values = e.summary.unwrap().value;
        assert_eq!(values[0].simple_value, Some(0.0), "a zero is a scalar, not an absent value");
        assert_eq!(e.step, 7);
    }

    #[test]
    fn the_board_writes_a_version_event_then_one_record_per_selection() {
        let dir = tempfile::tempdir().unwrap();
        let mut board = Board::new(dir.path().join("tb"));
        for step in [10, 20] {
            board.write(&Point {
                step,
                selection_loss: Some(0.5),
                k: 2,
                window: 4,
                ..Point::default()
            });
        }
        let files: Vec<_> = std::fs::read_dir(dir.path().join("tb")).unwrap().collect();
        assert_eq!(files.len(), 1, "one file per daemon start");
        let path = files[0].as_ref().unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents.") && name.ends_with(".sewa"), "{name}");
        let recs = records(&std::fs::read(&path).unwrap());
        assert_eq!(recs.len(), 3);
        let first = Event::decode(recs[0].as_slice()).unwrap();
        assert_eq!(first.file_version.as_deref(), Some("brain.Event:2"));
        let steps: Vec<i64> =
            recs[1..].iter().map(|r| Event::decode(r.as_slice()).unwrap().step).collect();
        assert_eq!(steps, [10, 20]);
    }

    #[test]
    fn an_unwritable_directory_is_a_warning_not_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"a file where the directory should be").unwrap();
        let mut board = Board::new(blocker.join("tb"));
        board.write(&Point::default()); // warns, returns
        board.write(&Point::default());
        assert!(board.file.is_none());
    }
}
