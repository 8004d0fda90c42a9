//! Writes torch.distributed.checkpoint directories without torch, laid out as
//! `FileSystemWriter` does (compared against the real fixtures of
//! `scripts/make_dcp_fixtures.py` with `pickletools.dis` and `python3 -m zipfile -l`): each
//! chunk a `torch.save` zip (`archive/data.pkl`, `byteorder`, `data/0`, `version`, stored),
//! appended to the rank's `__{rank}_0.distcp`, and `.metadata` a pickle of the same objects
//! (dataclasses as NEWOBJ + BUILD of their field dict, `TensorProperties` with a tuple state,
//! `torch.Size((...))` as a REDUCE), written to `.metadata.tmp` and renamed last. Shared by
//! `tests/it/dcp.rs` (hostile metadata) and `examples/bench_average.rs` (`#[path]`).
//! Tensors are f32.

use std::fs::{self, File};
use std::io::{Cursor, Write};
use std::path::Path;

const MD: &str = "torch.distributed.checkpoint.metadata";

/// One chunk as `.metadata` describes it (numbers are free: tests make them hostile).
#[derive(Clone, Debug)]
pub struct MdChunk {
    pub offsets: Vec<u64>,
    pub sizes: Vec<u64>,
    pub file: String,
    pub offset: u64,
    pub length: u64,
}

/// One tensor entry of `.metadata`: its dtype name (`float32`), size and chunks.
#[derive(Clone, Debug)]
pub struct MdTensor {
    pub fqn: String,
    pub dtype: String,
    pub size: Vec<u64>,
    pub chunks: Vec<MdChunk>,
}

/// Pickle opcodes, written by hand (protocol 2 subset).
struct Pk(Vec<u8>);

impl Pk {
    fn op(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }
    fn int(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&[0x8a, 8]); // LONG1 of 8 bytes: any u64 below 2^63
        self.op(&v.to_le_bytes())
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    /// `cls.__new__(cls)`: then a state and BUILD.
    fn new_obj(&mut self, module: &str, name: &str) -> &mut Self {
        self.global(module, name).op(b")\x81")
    }
    fn size(&mut self, v: &[u64]) -> &mut Self {
        self.global("torch", "Size").op(b"((");
        for &x in v {
            self.int(x);
        }
        self.op(b"ttR")
    }
}

/// The `.metadata` pickle for `tensors`.
pub fn metadata(tensors: &[MdTensor]) -> Vec<u8> {
    let mut p = Pk(b"\x80\x02".to_vec());
    p.new_obj(MD, "Metadata").op(b"}(").str("state_dict_metadata").op(b"}(");
    for t in tensors {
        p.str(&t.fqn).new_obj(MD, "TensorStorageMetadata").op(b"}(").str("properties");
        p.new_obj(MD, "TensorProperties").op(b"(").global("torch", &t.dtype);
        p.op(b"N\x89N\x89tb").str("size").size(&t.size).str("chunks").op(b"](");
        for c in &t.chunks {
            p.new_obj(MD, "ChunkStorageMetadata").op(b"}(").str("offsets").size(&c.offsets);
            p.str("sizes").size(&c.sizes).op(b"ub");
        }
        p.op(b"eub");
    }
    p.op(b"u").str("planner_data").op(b"N").str("storage_data").op(b"}(");
    for t in tensors {
        for c in &t.chunks {
            p.new_obj(MD, "MetadataIndex").op(b"}(").str("fqn").str(&t.fqn);
            p.str("offset").size(&c.offsets).str("index").op(b"Nub");
            p.new_obj("torch.distributed.checkpoint.filesystem", "_StorageInfo").op(b"}(");
            p.str("relative_path").str(&c.file).str("offset").int(c.offset);
            p.str("length").int(c.length).op(b"ub");
        }
    }
    p.op(b"u").str("version").str("1.0.0").op(b"ub.");
    p.0
}

/// [`metadata`] with the first tensor's first chunk repeated `n` more times by memo
/// references (`BINPUT` once, then `BINGET` per copy): 2 bytes per chunk in the file.
#[allow(dead_code)] // used by tests/it/dcp.rs, not by the bench example that includes this file
pub fn metadata_repeating_chunks(tensors: &[MdTensor], n: usize) -> Vec<u8> {
    let plain = metadata(tensors);
    // The first chunk object ends with its state's SETITEMS and BUILD (`ub`) right before
    // the next chunk's class reference: memoise it there, then push it `n` more times.
    let class = format!("c{MD}\nChunkStorageMetadata\n");
    let first = find(&plain, class.as_bytes(), 0);
    let second = find(&plain, class.as_bytes(), first + 1);
    let mut out = plain[..second].to_vec();
    out.extend_from_slice(b"q\x00");
    for _ in 0..n {
        out.extend_from_slice(b"h\x00");
    }
    out.extend_from_slice(&plain[second..]);
    out
}

#[allow(dead_code)]
fn find(hay: &[u8], needle: &[u8], from: usize) -> usize {
    from + hay[from..].windows(needle.len()).position(|w| w == needle).unwrap()
}

/// `torch.save(t)` of a contiguous f32 tensor of `shape` holding `data` (little-endian).
pub fn torch_save_f32(data: &[u8], shape: &[u64]) -> Vec<u8> {
    let numel: u64 = shape.iter().product();
    let mut strides = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let mut p = Pk(b"\x80\x02".to_vec());
    p.global("torch._utils", "_rebuild_tensor_v2").op(b"((").str("storage");
    p.global("torch", "FloatStorage").str("0").str("cpu").int(numel).op(b"tQ").int(0);
    p.op(b"(");
    for &s in shape {
        p.int(s);
    }
    p.op(b"t(");
    for &s in &strides {
        p.int(s);
    }
    p.op(b"t\x89").global("collections", "OrderedDict").op(b")RtR.");
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let entries: [(&str, &[u8]); 4] = [
        ("archive/data.pkl", &p.0),
        ("archive/byteorder", b"little"),
        ("archive/data/0", data),
        ("archive/version", b"3\n"),
    ];
    for (name, bytes) in entries {
        zip.start_file(name, stored).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Write a DCP directory of f32 tensors `(fqn, shape)`, each split along dim 0 into `ranks`
/// chunks (rank r's in `__{r}_0.distcp`); `rows(t, a..b)` gives tensor t's rows a..b as
/// little-endian bytes. Returns the metadata it wrote.
pub fn write(
    dir: &Path,
    tensors: &[(String, Vec<u64>)],
    ranks: u64,
    mut rows: impl FnMut(usize, std::ops::Range<u64>) -> Vec<u8>,
) -> Vec<MdTensor> {
    fs::create_dir_all(dir).unwrap();
    let mut md: Vec<MdTensor> = (tensors.iter())
        .map(|(fqn, size)| MdTensor {
            fqn: fqn.clone(),
            dtype: "float32".into(),
            size: size.clone(),
            chunks: vec![],
        })
        .collect();
    for r in 0..ranks {
        let file = format!("__{r}_0.distcp");
        let mut out = File::create(dir.join(&file)).unwrap();
        let mut offset = 0u64;
        for (i, (_, size)) in tensors.iter().enumerate() {
            let per = size[0].div_ceil(ranks);
            let (a, b) = ((r * per).min(size[0]), ((r + 1) * per).min(size[0]));
            if a == b {
                continue;
            }
            let mut sizes = size.clone();
            sizes[0] = b - a;
            let bytes = torch_save_f32(&rows(i, a..b), &sizes);
            out.write_all(&bytes).unwrap();
            let mut offsets = vec![0; size.len()];
            offsets[0] = a;
            let length = bytes.len() as u64;
            md[i].chunks.push(MdChunk { offsets, sizes, file: file.clone(), offset, length });
            offset += length;
        }
    }
    write_metadata(dir, &md);
    md
}

/// `.metadata` for `md`, renamed into place as FileSystemWriter does.
pub fn write_metadata(dir: &Path, md: &[MdTensor]) {
    fs::write(dir.join(".metadata.tmp"), metadata(md)).unwrap();
    fs::rename(dir.join(".metadata.tmp"), dir.join(".metadata")).unwrap();
}
