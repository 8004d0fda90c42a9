//! torch.distributed.checkpoint directories (issue 11, part 1), on fixtures written by real
//! PyTorch (`scripts/make_dcp_fixtures.py`: single-process, 2-process gloo with DTensors split
//! along dims 0 and 1 and replicated, torchtitan / Lightning / Accelerate key layouts) and
//! compared with the averages torch computed (`tests/fixtures/dcp/expected/`). Broken and
//! hostile directories are copies of those with one thing changed, or `.metadata` pickles
//! written by `tests/writers/dcp.rs` (no torch needed).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::average::read_tensors;
use crate::watch::Daemon;

#[path = "../writers/dcp.rs"]
#[allow(dead_code)]
mod writer;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dcp").join(rel)
}

const TITAN_10: &str = "torchtitan/step-10";
const TITAN_20: &str = "torchtitan/step-20";
const LIGHTNING_5: &str = "lightning/epoch=0-step=5.ckpt";
const LIGHTNING_10: &str = "lightning/epoch=0-step=10.ckpt";
const ACCELERATE: &str = "accelerate/checkpoint-10";

pub(crate) fn sewa(args: &[&str], paths: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sewa")).args(args).args(paths).output().unwrap()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn inspect_json(path: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["inspect", "--json"];
    args.extend_from_slice(extra);
    let o = sewa(&args, &[path]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A copy of a fixture directory to break.
fn copy(rel: &str, into: &Path) -> PathBuf {
    let to = into.join(Path::new(rel).file_name().unwrap());
    fs::create_dir_all(&to).unwrap();
    for e in fs::read_dir(fixture(rel)).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

/// `sewa average --out out inputs...`, which must succeed.
pub(crate) fn average(out: &Path, inputs: &[&Path]) {
    let mut args = vec!["average", "--out"];
    args.push(out.to_str().unwrap());
    let o = sewa(&args, inputs);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Same names, dtypes, shapes and bytes as what torch computed.
fn assert_same_as_torch(made: &Path, expected: &str) {
    assert_same_tensors(made, &fixture("expected").join(expected));
}

/// Same names, dtypes, shapes and bytes in `made` as in the safetensors file `want`.
pub(crate) fn assert_same_tensors(made: &Path, want: &Path) {
    let (got, expected) = (read_tensors(made), read_tensors(want));
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    for (name, w) in &expected {
        assert_eq!(&got[name], w, "{name} differs from torch's {}", want.display());
    }
}

#[test]
fn inspect_shows_the_model_tensors_chunks_and_ranks_of_each_layout() {
    let names: Vec<String> =
        read_tensors(&fixture("expected/accelerate.safetensors")).into_keys().collect();
    for (rel, step, ranks) in
        [(TITAN_10, Some(10), 2), (LIGHTNING_5, Some(5), 1), (ACCELERATE, Some(10), 1)]
    {
        let v = inspect_json(&fixture(rel), &[]);
        assert_eq!(v["format"], "dcp", "{rel}");
        assert_eq!(v["step"].as_u64(), step, "{rel}");
        let got: Vec<&str> =
            v["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(got, names, "{rel}: the model's tensors, model. stripped, nothing else");
        assert_eq!(v["metadata"]["dcp_ranks"], ranks.to_string(), "{rel}");
    }
    let v = inspect_json(&fixture(TITAN_10), &[]);
    let chunks = |name: &str| v["chunks"][name].as_array().unwrap().clone();
    // Split along dim 0 unevenly (5 rows: 3 + 2), along dim 1, and replicated (written once).
    let emb = chunks("tok_embeddings.weight");
    assert_eq!(emb.len(), 2);
    assert_eq!(
        (emb[1]["offsets"].clone(), emb[1]["sizes"].clone()),
        (serde_json::json!([3, 0]), serde_json::json!([2, 6]))
    );
    let wq = chunks("layers.0.attention.wq.weight");
    assert_eq!(wq[1]["offsets"], serde_json::json!([0, 3]));
    assert_eq!(chunks("layers.0.attention_norm.weight").len(), 1);
    let ranks: Vec<u64> = emb.iter().map(|c| c["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [0, 1]);
    let o = sewa(&["inspect"], &[&fixture(TITAN_10)]);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(table.contains("CHUNKS  RANKS"), "{table}");
    let row = table.lines().find(|l| l.starts_with("tok_embeddings.weight")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["tok_embeddings.weight", "f32", "2", "0,1", "[5,", "6]"]
    );
}

#[test]
fn averages_of_dcp_checkpoints_match_torch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("titan.safetensors");
    average(&out, &[&fixture(TITAN_10), &fixture(TITAN_20)]);
    assert_same_as_torch(&out, "torchtitan_avg.safetensors");
    let out = tmp.path().join("lightning.safetensors");
    average(&out, &[&fixture(LIGHTNING_5), &fixture(LIGHTNING_10)]);
    assert_same_as_torch(&out, "lightning_avg.safetensors");
}

/// One input is a conversion: DCP → one safetensors file, or an HF directory.
#[test]
fn one_dcp_input_converts_to_safetensors_or_an_hf_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model.safetensors");
    average(&out, &[&fixture(ACCELERATE)]);
    assert_same_as_torch(&out, "accelerate.safetensors");
    let dir = tmp.path().join("hf");
    average(&dir, &[&fixture(TITAN_20)]);
    let single = tmp.path().join("titan20.safetensors");
    average(&single, &[&fixture(TITAN_20)]);
    assert_eq!(read_tensors(&dir.join("model.safetensors")), read_tensors(&single));
}

#[test]
fn state_key_picks_another_entry_and_an_absent_one_lists_the_keys() {
    let v = inspect_json(&fixture(LIGHTNING_5), &["--state-key", "optimizer_0"]);
    let names: Vec<&str> =
        v["tensors"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"state.exp_avg.norm.weight"), "{names:?}");
    let o = sewa(&["inspect", "--state-key", "nope"], &[&fixture(LIGHTNING_5)]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("\"nope\"")
            && err.contains("\"model\" (7 tensors)")
            && err.contains("optimizer_0"),
        "{err}"
    );
}

#[test]
fn watch_publishes_the_average_of_dcp_directories_once_their_metadata_lands() {
    let mut d = Daemon::start("[select]\nmethod = \"lawa\"\nk = 2\n");
    for rel in [TITAN_10, TITAN_20] {
        // As FileSystemWriter does: data files first, `.metadata` renamed in last.
        let dir = d.runs.join(Path::new(rel).file_name().unwrap());
        fs::create_dir(&dir).unwrap();
        for e in fs::read_dir(fixture(rel)).unwrap() {
            let e = e.unwrap();
            if e.file_name() != ".metadata" {
                fs::copy(e.path(), dir.join(e.file_name())).unwrap();
            }
        }
        fs::copy(fixture(rel).join(".metadata"), dir.join(".metadata.tmp")).unwrap();
        fs::rename(dir.join(".metadata.tmp"), dir.join(".metadata")).unwrap();
    }
    d.wait_published(&[10, 20]);
    assert_same_as_torch(&d.model_file(), "torchtitan_avg.safetensors");
    d.terminate();
}

/// Exit 2 and the file named, for `inspect` and `average`; no panic, no output written.
pub(crate) fn refused(path: &Path, names: &str, says: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never.safetensors");
    for args in [vec!["inspect"], vec!["average", "--out", out.to_str().unwrap()]] {
        let o = sewa(&args, &[path]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(names) && err.contains(says),
            "{args:?}: want {names:?} and {says:?} in: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!out.exists());
}

#[test]
fn missing_short_and_linked_data_files_are_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let gone = copy(TITAN_10, &tmp.path().join("gone"));
    fs::remove_file(gone.join("__1_0.distcp")).unwrap();
    refused(&gone, "__1_0.distcp", "missing");
    let short = copy(TITAN_10, &tmp.path().join("short"));
    let f = fs::OpenOptions::new().write(true).open(short.join("__1_0.distcp")).unwrap();
    f.set_len(10_000).unwrap(); // into the model's chunks (optimizer states come last)
    refused(&short, "__1_0.distcp", "truncated");
    let linked = copy(TITAN_10, &tmp.path().join("linked"));
    fs::remove_file(linked.join("__0_0.distcp")).unwrap();
    std::os::unix::fs::symlink(fixture(TITAN_10).join("__0_0.distcp"), linked.join("__0_0.distcp"))
        .unwrap();
    refused(&linked, "__0_0.distcp", "symbolic link");
    // quick_check (the watcher's test) says the same before anything is opened.
    for dir in [&gone, &short] {
        let err = sewa_checkpoint::quick_check(dir, "trainer_state.json").unwrap_err().to_string();
        assert!(err.contains("__1_0.distcp"), "{err}");
    }
}

#[test]
fn unknown_classes_transformed_items_and_escaping_paths_are_refused() {
    refused(&fixture("errors/unknown_class"), ".metadata", "argparse.Namespace");
    refused(&fixture("errors/transformed"), ".metadata", "transformed (zstd");
    refused(&fixture("errors/escape"), "escape.distcp", "not a plain name");
}

/// A chunk whose `torch.save` stream is damaged: found when the tensor is read, naming the
/// `.distcp` file (the `.metadata` ranges are all fine).
#[test]
fn a_damaged_chunk_is_refused_when_read_naming_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = copy(TITAN_10, tmp.path());
    let path = bad.join("__0_0.distcp");
    let mut bytes = fs::read(&path).unwrap();
    bytes[..4].copy_from_slice(b"JUNK"); // the first chunk's zip local header
    fs::write(&path, bytes).unwrap();
    let o = sewa(&["average", "--out"], &[&tmp.path().join("o.safetensors"), &bad]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("__0_0.distcp"), "{}", stderr(&o));
}

/// A small DCP written by `tests/writers/dcp.rs`: `w` [4, 3] and `b` [5] split over 2 ranks,
/// values 0, 1, 2, ... per tensor.
fn written(dir: &Path) -> Vec<writer::MdTensor> {
    let tensors = vec![("w".to_string(), vec![4, 3]), ("b".to_string(), vec![5])];
    let widths = [3u64, 1];
    writer::write(dir, &tensors, 2, |t, rows| {
        let r = rows.start * widths[t]..rows.end * widths[t];
        r.flat_map(|v| (v as f32).to_le_bytes()).collect()
    })
}

#[test]
fn the_stdlib_writer_makes_what_sewa_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("step-1");
    written(&dir);
    let out = tmp.path().join("o.safetensors");
    average(&out, &[&dir]);
    let got = read_tensors(&out);
    let f32s = |n: usize| (0..n).flat_map(|v| (v as f32).to_le_bytes()).collect::<Vec<u8>>();
    assert_eq!(got["w"], ("F32 [4, 3]".to_string(), f32s(12)));
    assert_eq!(got["b"], ("F32 [5]".to_string(), f32s(5)));
}

/// Numbers in `.metadata` are claims: sizes, offsets and lengths that the files cannot back
/// are refused with exit 2 naming the file, before anything sized by them is allocated (a
/// claimed petabyte tensor must fail fast, not abort on allocation).
#[test]
fn hostile_metadata_numbers_are_refused_before_allocating() {
    type Edit = fn(&mut Vec<writer::MdTensor>);
    let cases: Vec<(&str, Edit, &str, &str)> = vec![
        (
            "petabyte tensor",
            |md| {
                md[0].size = vec![1 << 40, 1 << 20];
                md[0].chunks.truncate(1);
                md[0].chunks[0].sizes = vec![1 << 40, 1 << 20];
            },
            ".metadata",
            "too few",
        ),
        ("overflowing size", |md| md[0].size = vec![1 << 62, 1 << 62], ".metadata", "overflows"),
        (
            "chunk outside the tensor",
            |md| md[0].chunks[1].offsets = vec![3, 0],
            ".metadata",
            "outside",
        ),
        ("chunk of another rank", |md| md[1].chunks[0].offsets = vec![3], ".metadata", "outside"),
        (
            "shared byte range",
            |md| {
                let first = md[0].chunks[0].clone();
                md[0].chunks[1].file = first.file;
                md[0].chunks[1].offset = first.offset;
            },
            "__0_0.distcp",
            "overlap",
        ),
        ("range past the end", |md| md[0].chunks[0].offset = 1 << 40, "__0_0.distcp", "truncated"),
        (
            "negative length",
            |md| md[0].chunks[0].length = u64::MAX - 4,
            ".metadata",
            "no valid length",
        ),
        (
            "absolute path",
            |md| md[0].chunks[0].file = "/etc/passwd".into(),
            "/etc/passwd",
            "not a plain name",
        ),
        ("unknown dtype", |md| md[0].dtype = "complex64".into(), ".metadata", "complex64"),
        ("not a dtype", |md| md[0].dtype = "system".into(), ".metadata", "torch.system"),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (i, (what, edit, names, says)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("case-{i}"));
        let mut md = written(&dir);
        edit(&mut md);
        writer::write_metadata(&dir, &md);
        let o = sewa(&["inspect"], &[&dir]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains(names) && err.contains(says),
            "{what}: want {names:?}, {says:?}: {err}"
        );
    }
}

/// Chunks that are each inside the tensor and add up to its size, yet overlap (and so leave
/// a gap): caught when the tensor is read, never averaged.
#[test]
fn overlapping_chunks_are_refused_when_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("step-1");
    let mut md = written(&dir);
    // `w` is rows 0..2 and 2..4; claim 0..2 and 1..3 instead (same element count).
    md[0].chunks[1].offsets = vec![1, 0];
    writer::write_metadata(&dir, &md);
    let o = sewa(&["average", "--out"], &[&tmp.path().join("o.safetensors"), &dir]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("tensor w: its chunks overlap"), "{}", stderr(&o));
}

/// The HF Trainer with FSDP's sharded state dict: `checkpoint-N/pytorch_model_fsdp_0/` (a DCP
/// directory written by Accelerate) beside `trainer_state.json`, which the Trainer writes last.
#[test]
fn accelerate_inside_an_hf_checkpoint_is_read_with_its_step_and_marker() {
    let v = inspect_json(&fixture(ACCELERATE), &[]);
    assert_eq!(v["side_dir"].as_str().map(|p| p.ends_with("checkpoint-10")), Some(true), "{v}");
    let inner = inspect_json(&fixture(ACCELERATE).join("pytorch_model_fsdp_0"), &[]);
    assert_eq!((inner["format"].as_str(), inner["step"].as_u64()), (Some("dcp"), None));
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("checkpoint-10");
    copy(&format!("{ACCELERATE}/pytorch_model_fsdp_0"), &ck);
    let err = sewa_checkpoint::quick_check(&ck, "trainer_state.json").unwrap_err().to_string();
    assert!(err.contains("no trainer_state.json yet"), "{err}");
    fs::copy(fixture(ACCELERATE).join("trainer_state.json"), ck.join("trainer_state.json"))
        .unwrap();
    sewa_checkpoint::quick_check(&ck, "trainer_state.json").unwrap();
}

/// `.metadata` for `w` [8192, 4] (f32) as two [8192, 2] chunks at columns `a` and `b`, each
/// a `torch.save` stream of values 0, 1, 2, ... in `__0_0.distcp`. Column chunks cut the
/// tensor into 8-byte runs, so it is assembled in memory when read (`DcpStore::assembled`).
fn column_chunks(dir: &Path, a: u64, b: u64) {
    fs::create_dir_all(dir).unwrap();
    let (rows, half) = (8192u64, 8192 * 2);
    let data: Vec<u8> = (0..half).flat_map(|v| (v as f32).to_le_bytes()).collect();
    let stream = writer::torch_save_f32(&data, &[rows, 2]);
    let len = stream.len() as u64;
    fs::write(dir.join("__0_0.distcp"), [stream.clone(), stream].concat()).unwrap();
    let chunk = |col: u64, offset: u64| writer::MdChunk {
        offsets: vec![0, col],
        sizes: vec![rows, 2],
        file: "__0_0.distcp".into(),
        offset,
        length: len,
    };
    let w = writer::MdTensor {
        fqn: "w".into(),
        dtype: "float32".into(),
        size: vec![rows, 4],
        chunks: vec![chunk(a, 0), chunk(b, len)],
    };
    writer::write_metadata(dir, &[w]);
}

/// Issue 19, item 1: chunks at columns 0 and 1 overlap on column 1 and never write column 3,
/// though their element counts add up. Cut into runs under 64 bytes, the tensor is assembled
/// in memory, and that path used to fill the gap with zeros (exit 0): now it checks the
/// tiling too. The same tensor tiled at columns 0 and 2 averages to its values.
#[test]
fn issue19_overlapping_column_chunks_of_an_assembled_tensor_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    column_chunks(&good, 0, 2);
    let out = tmp.path().join("good.safetensors");
    average(&out, &[&good]);
    let (desc, bytes) = &read_tensors(&out)["w"];
    assert_eq!(desc, "F32 [8192, 4]");
    let at = |row: usize, col: usize| {
        let i = (row * 4 + col) * 4;
        f32::from_le_bytes(bytes[i..i + 4].try_into().unwrap())
    };
    assert_eq!([at(1, 0), at(1, 1), at(1, 2), at(1, 3)], [2.0, 3.0, 2.0, 3.0]);
    let bad = tmp.path().join("bad");
    column_chunks(&bad, 0, 1);
    let o = sewa(&["average", "--out"], &[&tmp.path().join("o.safetensors"), &bad]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("tensor w: its chunks overlap at byte 4"), "{}", stderr(&o));
    assert!(!tmp.path().join("o.safetensors").exists());
}

/// Issue 19, item 5: one file's bytes backing two items through another name of the file
/// (`__0_0.distcp/`, `//`, `/.`) or a hard link used to pass the per-name disjointness check,
/// so a small directory could claim tensors of any size. Spellings that are not canonical
/// are refused, and ranges are disjoint per file identity (device, inode).
#[test]
fn issue19_aliases_of_one_data_file_cannot_back_two_items() {
    let tmp = tempfile::tempdir().unwrap();
    let alias = |dir: &Path, name: &str| {
        let mut md = written(dir);
        // `w`'s second chunk (rank 1's file) now reads the bytes of its first.
        let first = md[0].chunks[0].clone();
        md[0].chunks[1].file = name.into();
        md[0].chunks[1].offset = first.offset;
        writer::write_metadata(dir, &md);
    };
    for (i, name) in ["__0_0.distcp/", "__0_0.distcp//", "__0_0.distcp/.", "./__0_0.distcp"]
        .into_iter()
        .enumerate()
    {
        let dir = tmp.path().join(format!("spelled-{i}"));
        alias(&dir, name);
        refused(&dir, "__0_0.distcp", "not a plain name");
    }
    let linked = tmp.path().join("linked");
    alias(&linked, "alias.distcp");
    fs::hard_link(linked.join("__0_0.distcp"), linked.join("alias.distcp")).unwrap();
    refused(&linked, "distcp", "same file (a hard link)");
    // A hard link whose ranges stay apart from the other name's is just a second name.
    let apart = tmp.path().join("apart");
    let mut md = written(&apart);
    fs::hard_link(apart.join("__1_0.distcp"), apart.join("alias.distcp")).unwrap();
    md[1].chunks[1].file = "alias.distcp".into();
    writer::write_metadata(&apart, &md);
    average(&tmp.path().join("apart.safetensors"), &[&apart]);
}

/// Issue 19, item 10: a tensor with no elements whose other dimensions overflow
/// (`[2^40, 2^40, 0]`) was accepted at open and failed every publication with an internal
/// error; it is refused at open, as the safetensors reader refuses it.
#[test]
fn issue19_empty_tensors_with_overflowing_dimensions_are_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (size, says)) in [
        (vec![1 << 40, 1 << 40, 0], "overflows"),
        (vec![0, 1 << 40, 1 << 40], "overflows"),
        (vec![1 << 62, 0], "absurd"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("case-{i}"));
        let mut md = written(&dir);
        md[0].size = size.clone();
        md[0].chunks.truncate(1);
        md[0].chunks[0].offsets = vec![0; size.len()];
        md[0].chunks[0].sizes = size;
        writer::write_metadata(&dir, &md);
        refused(&dir, ".metadata", says);
    }
}

/// Issue 19, item 11: `.metadata` is capped at what real files need (refused by its size,
/// before any of it is read), and a chunk list longer than the file's size can describe
/// (one memoised chunk repeated by 2-byte references) is refused before it is decoded.
#[test]
fn issue19_oversized_metadata_and_repeated_chunks_are_refused_cheaply() {
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big");
    written(&big);
    let f = fs::OpenOptions::new().write(true).open(big.join(".metadata")).unwrap();
    f.set_len(64 << 20).unwrap(); // sparse: nothing of it is read
    refused(&big, ".metadata", "larger than");
    let repeated = tmp.path().join("repeated");
    let md = written(&repeated);
    fs::write(repeated.join(".metadata"), writer::metadata_repeating_chunks(&md, 1_000_000))
        .unwrap();
    refused(&repeated, ".metadata", "more chunks than");
}
