//! The kernel against its slow, obvious f64 twin, plus policies and error paths.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::kernel::{BLOCK, MIN_PARALLEL, SLAB, Stored};
use super::*;
use std::path::Path;

/// Encode f64 values as little-endian `dtype` bytes.
fn encode(values: &[f64], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for &v in values {
        match dtype {
            DType::F64 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            DType::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
            other => panic!("test encoder lacks {other:?}"),
        }
    }
    out
}

/// Decode little-endian `dtype` bytes to f64.
fn decode(bytes: &[u8], dtype: DType) -> Vec<f64> {
    bytes
        .chunks_exact(dtype.size())
        .map(|c| match dtype {
            DType::F64 => f64::from_le_bytes(c.try_into().unwrap()),
            DType::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
            DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
            DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
            DType::I64 => i64::from_le_bytes(c.try_into().unwrap()) as f64,
            other => panic!("test decoder lacks {other:?}"),
        })
        .collect()
}

/// The slow twin: per element, Σ w_i x_i / Σ w_i in f64 over the inputs' stored values.
fn reference(inputs: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    (0..inputs[0].len())
        .map(|e| inputs.iter().zip(weights).map(|(x, w)| w * x[e]).sum::<f64>() / total)
        .collect()
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-4.0..4.0)).collect()
}

/// Inputs with one float tensor "w" of `n` elements, values stored in `dtype` (then read
/// back, so the reference sees exactly the stored values).
fn float_inputs(dtype: DType, n: usize, k: usize, seed: u64) -> (Vec<Checkpoint>, Vec<Vec<f64>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ckpts = Vec::new();
    let mut stored = Vec::new();
    for i in 0..k {
        let bytes = encode(&random(&mut rng, n), dtype);
        stored.push(decode(&bytes, dtype));
        let t = vec![("w".to_string(), dtype, vec![n], bytes)];
        ckpts.push(
            Checkpoint::from_memory(format!("in{i}.safetensors"), Some(i as u64), t).unwrap(),
        );
    }
    (ckpts, stored)
}

fn average_one(ckpts: &[Checkpoint], weights: Option<&[f64]>, opts: AverageOptions) -> Vec<u8> {
    let plan = AveragePlan::new(ckpts.iter().collect(), weights, opts).unwrap();
    let mut ws = Workspace::default();
    plan.average_tensor(0, &mut ws).unwrap().to_vec()
}

fn assert_close(got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1.0);
        assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w} (tol {tol})");
    }
}

#[test]
fn matches_reference_for_each_float_dtype() {
    // Tolerance: f32 accumulation for 16/32-bit inputs, then rounding to the output dtype.
    let cases = [
        (DType::F32, 1e-6),
        (DType::BF16, 1.0 / 128.0),
        (DType::F16, 1.0 / 1024.0),
        (DType::F64, 1e-12),
    ];
    let weights = [0.5, 2.0, 1.0, 0.25];
    for (dtype, rel) in cases {
        let n = BLOCK * 2 + 17; // crosses blocks, ends on a partial one
        let (ckpts, stored) = float_inputs(dtype, n, 4, 7);
        let out = average_one(&ckpts, Some(&weights), AverageOptions::default());
        assert_eq!(out.len(), n * dtype.size(), "{dtype:?} keeps its dtype");
        assert_close(&decode(&out, dtype), &reference(&stored, &weights), rel);
    }
}

#[test]
fn uniform_by_default_and_weights_are_normalised() {
    let (ckpts, stored) = float_inputs(DType::F64, 100, 3, 1);
    let uniform = average_one(&ckpts, None, AverageOptions::default());
    assert_close(&decode(&uniform, DType::F64), &reference(&stored, &[1.0; 3]), 1e-12);
    let scaled = average_one(&ckpts, Some(&[3.0, 3.0, 3.0]), AverageOptions::default());
    assert_close(&decode(&scaled, DType::F64), &decode(&uniform, DType::F64), 1e-15);
}

#[test]
fn zero_weight_inputs_are_not_read() {
    let (mut ckpts, stored) = float_inputs(DType::F32, 10, 2, 3);
    let nan = encode(&[f64::NAN; 10], DType::F32);
    let t = vec![("w".to_string(), DType::F32, vec![10], nan)];
    ckpts.push(Checkpoint::from_memory("nan.safetensors", Some(9), t).unwrap());
    let out = average_one(&ckpts, Some(&[1.0, 1.0, 0.0]), AverageOptions::default());
    assert_close(&decode(&out, DType::F32), &reference(&stored, &[1.0, 1.0]), 1e-6);
}

#[test]
fn output_dtype_conversion() {
    let (ckpts, stored) = float_inputs(DType::F32, 1000, 3, 5);
    let want = reference(&stored, &[1.0; 3]);
    for (out, dtype, rel) in
        [(OutDType::BF16, DType::BF16, 1.0 / 128.0), (OutDType::F16, DType::F16, 1.0 / 1024.0)]
    {
        let opts = AverageOptions { dtype: out, ..Default::default() };
        let plan = AveragePlan::new(ckpts.iter().collect(), None, opts).unwrap();
        assert_eq!(plan.outputs()[0].dtype, dtype);
        let bytes = average_one(&ckpts, None, opts);
        assert_eq!(bytes.len(), 1000 * 2);
        assert_close(&decode(&bytes, dtype), &want, rel);
    }
    // bf16 in, f32 out: no rounding back to bf16.
    let (ckpts, stored) = float_inputs(DType::BF16, 1000, 3, 6);
    let opts = AverageOptions { dtype: OutDType::F32, ..Default::default() };
    let bytes = average_one(&ckpts, None, opts);
    assert_close(&decode(&bytes, DType::F32), &reference(&stored, &[1.0; 3]), 1e-6);
}

#[test]
fn thread_count_does_not_change_a_bit() {
    let n = MIN_PARALLEL * 3 + 12_345;
    let (ckpts, _) = float_inputs(DType::BF16, n, 5, 11);
    let one = average_one(&ckpts, Some(&[1.0, 2.0, 3.0, 4.0, 5.0]), AverageOptions::default());
    let three = AverageOptions { threads: 3, ..Default::default() };
    assert_eq!(one, average_one(&ckpts, Some(&[1.0, 2.0, 3.0, 4.0, 5.0]), three));
}

#[test]
fn unaligned_bytes_read_like_aligned_ones() {
    let values: Vec<f64> = (0..100).map(|i| i as f64 * 0.5 - 7.0).collect();
    let bytes = encode(&values, DType::F32);
    let mut shifted = vec![0u8];
    shifted.extend_from_slice(&bytes);
    let (mut a, mut b) = (vec![0f32; 100], vec![0f32; 100]);
    f32::add_block(&mut a, &bytes, DType::F32, 0.5, true);
    f32::add_block(&mut b, &shifted[1..], DType::F32, 0.5, true);
    assert_eq!(a, b);
    let mut c = vec![0f64; 100];
    let wide = encode(&values, DType::F64);
    let mut shifted = vec![0u8; 3];
    shifted.extend_from_slice(&wide);
    f64::add_block(&mut c, &shifted[3..], DType::F64, 2.0, true);
    assert_eq!(c, values.iter().map(|v| v * 2.0).collect::<Vec<_>>());
}

/// Input readers with their weights, as a pass sees them.
type Inputs<'a> = [(TensorReader<'a>, f32)];

/// Fold `groups` of inputs into one accumulator, pass by pass, and return the output bytes.
fn run_groups(groups: &[&Inputs<'_>], n: usize) -> Vec<u8> {
    let (mut acc, mut out, mut slabs) = (vec![0f32; n], vec![0u8; 4 * n], Vec::new());
    for (g, inputs) in groups.iter().enumerate() {
        let (init, last) = (g == 0, g + 1 == groups.len());
        let overflow = DtypeOverflow::Error;
        let pass = Pass { inputs, in_dtype: DType::F32, init, last, overflow };
        let stored = pass.run(&mut acc, &mut out, DType::F32, &mut slabs, 1).unwrap();
        assert_eq!(stored, Stored::default());
    }
    out
}

#[test]
fn unaligned_output_written_like_aligned() {
    let acc: Vec<f32> = (0..100).map(|i| i as f32 * 0.25 - 3.0).collect();
    let mut aligned = vec![0u8; 400];
    let mut shifted = vec![0u8; 401];
    let clean = Stored::default();
    assert_eq!(f32::store_block(&acc, &mut aligned, DType::F32, false), clean);
    assert_eq!(f32::store_block(&acc, &mut shifted[1..], DType::F32, false), clean);
    assert_eq!(aligned, shifted[1..]);
    assert_eq!(aligned, encode(&acc.iter().map(|&x| x as f64).collect::<Vec<_>>(), DType::F32));
    let mut bad = acc.clone();
    bad[7] = f32::INFINITY;
    assert!(f32::store_block(&bad, &mut aligned, DType::F32, false).non_finite);
    assert!(f32::store_block(&bad, &mut shifted[1..], DType::F32, false).non_finite);
}

#[test]
fn grouped_passes_equal_one_pass() {
    // Copied (pickle) inputs are folded in groups; the result must not depend on grouping.
    let (ckpts, _) = float_inputs(DType::F32, 5000, 3, 13);
    let inputs: Vec<(TensorReader<'_>, f32)> =
        ckpts.iter().map(|c| (c.reader("w").unwrap(), 1.0 / 3.0)).collect();
    let one = run_groups(&[&inputs], 5000);
    assert_eq!(one, run_groups(&[&inputs[..1], &inputs[1..2], &inputs[2..]], 5000));
}

fn int_inputs(steps: &[Option<u64>]) -> Vec<Checkpoint> {
    steps
        .iter()
        .enumerate()
        .map(|(i, &step)| {
            let t = vec![
                (
                    "count".to_string(),
                    DType::I64,
                    vec![2],
                    encode(&[i as f64, 100.0 + i as f64], DType::I64),
                ),
                ("w".to_string(), DType::F32, vec![1], encode(&[i as f64], DType::F32)),
            ];
            Checkpoint::from_memory(format!("c{i}.pt"), step, t).unwrap()
        })
        .collect()
}

fn int_result(ckpts: &[Checkpoint], weights: Option<&[f64]>, policy: IntPolicy) -> Vec<f64> {
    let opts = AverageOptions { int_policy: policy, ..Default::default() };
    let plan = AveragePlan::new(ckpts.iter().collect(), weights, opts).unwrap();
    assert_eq!(plan.outputs()[0].dtype, DType::I64, "integer tensors keep their dtype");
    decode(plan.average_tensor(0, &mut Workspace::default()).unwrap(), DType::I64)
}

#[test]
fn int_policy_latest_and_first_follow_steps() {
    // Given out of step order: the latest is input 1 (step 300), the first input 2 (step 100).
    let ckpts = int_inputs(&[Some(200), Some(300), Some(100)]);
    assert_eq!(int_result(&ckpts, None, IntPolicy::Latest), vec![1.0, 101.0]);
    assert_eq!(int_result(&ckpts, None, IntPolicy::First), vec![2.0, 102.0]);
    // Zero-weight inputs are not candidates.
    assert_eq!(int_result(&ckpts, Some(&[1.0, 0.0, 1.0]), IntPolicy::Latest), vec![0.0, 100.0]);
}

#[test]
fn int_policy_without_steps_uses_order_given() {
    let ckpts = int_inputs(&[Some(5), None, Some(1)]);
    assert_eq!(int_result(&ckpts, None, IntPolicy::Latest), vec![2.0, 102.0]);
    assert_eq!(int_result(&ckpts, None, IntPolicy::First), vec![0.0, 100.0]);
}

#[test]
fn int_policy_error_refuses_before_reading() {
    let ckpts = int_inputs(&[Some(1), Some(2)]);
    let opts = AverageOptions { int_policy: IntPolicy::Error, ..Default::default() };
    let err = AveragePlan::new(ckpts.iter().collect(), None, opts).err().unwrap();
    assert!(err.is_bad_input());
    assert!(err.to_string().contains("count") && err.to_string().contains("int_policy"), "{err}");
}

#[test]
fn non_finite_input_is_named() {
    for bad in [f64::NAN, f64::INFINITY] {
        let (mut ckpts, _) = float_inputs(DType::BF16, 50, 2, 17);
        let mut values = vec![1.0; 50];
        values[33] = bad;
        let t = vec![("w".to_string(), DType::BF16, vec![50], encode(&values, DType::BF16))];
        ckpts.insert(1, Checkpoint::from_memory("bad.safetensors", Some(1), t).unwrap());
        let plan = AveragePlan::new(ckpts.iter().collect(), None, Default::default()).unwrap();
        let err = plan.average_tensor(0, &mut Workspace::default()).err().unwrap();
        let msg = err.to_string();
        assert!(err.is_bad_input(), "{msg}");
        assert!(
            msg.starts_with("bad.safetensors:")
                && msg.contains("tensor w")
                && msg.contains("element 33"),
            "{msg}"
        );
    }
}

#[test]
fn bad_weights_are_usage_errors() {
    let (ckpts, _) = float_inputs(DType::F32, 4, 3, 19);
    for (w, needle) in [
        (&[1.0, 2.0][..], "2 weights given for 3 inputs"),
        (&[1.0, -1.0, 1.0][..], "non-negative"),
        (&[0.0, 0.0, 0.0][..], "all weights are zero"),
        (&[1.0, f64::NAN, 1.0][..], "finite"),
    ] {
        let err =
            AveragePlan::new(ckpts.iter().collect(), Some(w), Default::default()).err().unwrap();
        assert!(matches!(err, Error::Usage(_)) && err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn dtype_and_policy_names_parse() {
    assert_eq!("bf16".parse::<OutDType>(), Ok(OutDType::BF16));
    assert_eq!("KEEP".parse::<OutDType>(), Ok(OutDType::Keep));
    assert!("f8".parse::<OutDType>().is_err());
    assert_eq!("first".parse::<IntPolicy>(), Ok(IntPolicy::First));
    assert!("sum".parse::<IntPolicy>().is_err());
    assert_eq!(OutDType::F32.resolve(DType::I64), DType::I64);
    assert_eq!(OutDType::Keep.resolve(DType::F16), DType::F16);
}

#[test]
fn many_inputs_are_swept_in_slabs() {
    // 40 inputs of 130k f64: three slabs of 64k elements, two threads, pages released as the
    // sweep goes.
    let n = 130_000;
    let (ckpts, stored) = float_inputs(DType::F64, n, 40, 23);
    let weights: Vec<f64> = (1..=40).map(f64::from).collect();
    let opts = AverageOptions { threads: 2, ..Default::default() };
    let out = average_one(&ckpts, Some(&weights), opts);
    assert_close(&decode(&out, DType::F64), &reference(&stored, &weights), 1e-12);
    assert_eq!(out, average_one(&ckpts, Some(&weights), AverageOptions::default()));
}

/// Inputs whose average is `values` exactly (two equal f32 inputs).
fn equal_inputs(values: &[f64]) -> Vec<Checkpoint> {
    let t = || vec![("w".to_string(), DType::F32, vec![values.len()], encode(values, DType::F32))];
    (0..2)
        .map(|i| Checkpoint::from_memory(format!("in{i}.safetensors"), None, t()).unwrap())
        .collect()
}

#[test]
fn overflowing_a_narrower_dtype_is_refused_with_tensor_and_largest_value() {
    let f16 = AverageOptions { dtype: OutDType::F16, ..Default::default() };
    let cases = [
        (vec![1.0, 7.0e4, -2.0e5, 3.0], f16, "-2e5 at element 2"),
        (vec![1.0, 7.0e4, -2.0e5, 3.0], AverageOptions { dtype: OutDType::BF16, ..f16 }, ""),
        (
            vec![f32::MAX as f64, 1.0],
            AverageOptions { dtype: OutDType::BF16, ..f16 },
            "3.4028235e38 at element 0",
        ),
    ];
    for (values, opts, needle) in cases {
        let ckpts = equal_inputs(&values);
        let plan = AveragePlan::new(ckpts.iter().collect(), None, opts).unwrap();
        let mut ws = Workspace::default();
        let got = plan.average_tensor(0, &mut ws);
        if needle.is_empty() {
            assert!(got.is_ok(), "bf16 holds 2e5");
            continue;
        }
        let msg = got.err().unwrap().to_string();
        assert!(msg.contains("tensor w") && msg.contains(needle), "{msg}");
        assert!(msg.contains("dtype_overflow = \"saturate\""), "{msg}");
    }
    // f64 in, f32 out.
    let wide = vec![("w".to_string(), DType::F64, vec![2], encode(&[1.0, -1.0e39], DType::F64))];
    let ckpt = Checkpoint::from_memory("wide.safetensors", None, wide).unwrap();
    let opts = AverageOptions { dtype: OutDType::F32, ..Default::default() };
    let plan = AveragePlan::new(vec![&ckpt], None, opts).unwrap();
    let msg = plan.average_tensor(0, &mut Workspace::default()).err().unwrap().to_string();
    assert!(msg.contains("-1e39 at element 1") && msg.contains("f32"), "{msg}");
}

#[test]
fn saturate_clamps_overflow_to_the_dtype_max_on_every_path() {
    let values = [1.0e5, -2.0e5, 0.5, 65504.0, 65519.0];
    let (max, big) = (half::f16::MAX.to_f64(), MIN_PARALLEL * 2 + 5);
    let want = [max, -max, 0.5, max, max];
    // One slab, then enough elements for two threads.
    for n in [values.len(), big] {
        let v: Vec<f64> = (0..n).map(|i| values[i % values.len()]).collect();
        let ckpts = equal_inputs(&v);
        for threads in [1, 2] {
            let opts = AverageOptions {
                dtype: OutDType::F16,
                overflow: DtypeOverflow::Saturate,
                threads,
                ..Default::default()
            };
            let plan = AveragePlan::new(ckpts.iter().collect(), None, opts).unwrap();
            let out =
                decode(plan.average_tensor(0, &mut Workspace::default()).unwrap(), DType::F16);
            let expect: Vec<f64> = (0..n).map(|i| want[i % want.len()]).collect();
            assert_eq!(out, expect, "n {n}, threads {threads}");
        }
    }
    let wide =
        vec![("w".to_string(), DType::F64, vec![2], encode(&[1.0e39, -1.0e300], DType::F64))];
    let ckpt = Checkpoint::from_memory("wide.safetensors", None, wide).unwrap();
    for (dtype, max) in [
        (OutDType::F32, f32::MAX as f64),
        (OutDType::BF16, half::bf16::MAX.to_f64()),
        (OutDType::F16, half::f16::MAX.to_f64()),
    ] {
        let opts =
            AverageOptions { dtype, overflow: DtypeOverflow::Saturate, ..Default::default() };
        let plan = AveragePlan::new(vec![&ckpt], None, opts).unwrap();
        let d = plan.outputs()[0].dtype;
        let out = decode(plan.average_tensor(0, &mut Workspace::default()).unwrap(), d);
        assert_eq!(out, vec![max, -max], "{dtype}");
    }
}

#[test]
fn nan_is_blamed_on_its_input_even_when_saturating() {
    let mut ckpts = equal_inputs(&[1.0, 2.0]);
    let t = vec![("w".to_string(), DType::F32, vec![2], encode(&[1.0, f64::NAN], DType::F32))];
    ckpts.push(Checkpoint::from_memory("nan.safetensors", None, t).unwrap());
    let opts = AverageOptions {
        dtype: OutDType::F16,
        overflow: DtypeOverflow::Saturate,
        ..Default::default()
    };
    let plan = AveragePlan::new(ckpts.iter().collect(), None, opts).unwrap();
    let msg = plan.average_tensor(0, &mut Workspace::default()).err().unwrap().to_string();
    assert!(msg.starts_with("nan.safetensors:") && msg.contains("element 1"), "{msg}");
}

#[test]
fn dtype_overflow_names_parse() {
    assert_eq!("Saturate".parse::<DtypeOverflow>(), Ok(DtypeOverflow::Saturate));
    assert_eq!(DtypeOverflow::default().to_string(), "error");
    assert!("clamp".parse::<DtypeOverflow>().is_err());
}

// ---- streaming: window by window, bit for bit the whole-tensor path ---------------------

/// A small window (two slabs) and read-ahead for any tensor on file, so that small
/// tensors take every path the default streaming takes on large ones.
const SMALL: Streaming = Streaming { window: 2 * SLAB, read_ahead: true, prefetch_min: 0 };
/// Shorthand for the window the streaming tests use.
const WINDOW_T: usize = SMALL.window;
/// Elements of a tensor spanning one whole window, a slab more and a partial slab.
const STREAMED: usize = WINDOW_T + SLAB + 17;

/// The bytes `stream_tensor` hands on, concatenated, and how many pieces it handed.
fn streamed(plan: &AveragePlan<'_>, index: usize) -> Result<(Vec<u8>, usize)> {
    streamed_with(plan, index, SMALL)
}

fn streamed_with(plan: &AveragePlan<'_>, index: usize, how: Streaming) -> Result<(Vec<u8>, usize)> {
    let (mut out, mut pieces) = (Vec::new(), 0);
    plan.stream_with(how, index, &mut Workspace::default(), &mut |b| {
        out.extend_from_slice(b);
        pieces += 1;
        Ok(())
    })?;
    Ok((out, pieces))
}

/// Input `i` of the streaming tests: `n` values in `dtype`, also written to `dir` as a
/// safetensors file (so the same values can be averaged from memory and from files).
fn stream_input(dir: &Path, i: usize, dtype: DType, n: usize) -> (Checkpoint, Checkpoint) {
    let mut rng = ChaCha8Rng::seed_from_u64(100 + i as u64);
    let bytes = encode(&random(&mut rng, n), dtype);
    let st_dtype = match dtype {
        DType::F64 => safetensors::Dtype::F64,
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        other => panic!("{other:?}"),
    };
    let path = dir.join(format!("in{i}.safetensors"));
    let view = safetensors::tensor::TensorView::new(st_dtype, vec![n], &bytes).unwrap();
    safetensors::serialize_to_file([("w", view)], None, &path).unwrap();
    let file = Checkpoint::open(&path, &Default::default()).unwrap();
    let t = vec![("w".to_string(), dtype, vec![n], bytes)];
    let mem = Checkpoint::from_memory(format!("in{i}.safetensors"), Some(i as u64), t).unwrap();
    (mem, file)
}

#[test]
fn streamed_output_equals_whole_tensor_output_bit_for_bit() {
    // Every dtype the averager writes (keep, and each explicit output dtype), inputs in memory
    // (read in place), on file (one thread, with and without the reader thread; two threads:
    // positioned reads on each) and both mixed, weighted, with a zero-weight input skipped.
    let dir = tempfile::tempdir().unwrap();
    let weights = [0.5, 2.0, 0.0, 1.25];
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let (mem, file): (Vec<_>, Vec<_>) =
            (0..4).map(|i| stream_input(dir.path(), i, dtype, STREAMED)).unzip();
        let mixed = vec![&mem[0], &file[1], &mem[2], &file[3]];
        let outs = [OutDType::Keep, OutDType::F32, OutDType::BF16, OutDType::F16];
        for (inputs, threads, out) in [
            (mem.iter().collect::<Vec<_>>(), 1, OutDType::Keep),
            (file.iter().collect(), 1, OutDType::Keep),
            (file.iter().collect(), 2, OutDType::Keep),
            (mixed.clone(), 1, OutDType::Keep),
        ]
        .into_iter()
        .chain(outs.into_iter().map(|o| (mixed.clone(), 1, o)))
        {
            let opts = AverageOptions { threads, dtype: out, ..Default::default() };
            let plan = AveragePlan::new(inputs, Some(&weights), opts).unwrap();
            let whole = plan.average_tensor(0, &mut Workspace::default()).unwrap().to_vec();
            for read_ahead in [true, false] {
                let how = Streaming { read_ahead, ..SMALL };
                let (got, pieces) = streamed_with(&plan, 0, how).unwrap();
                assert_eq!(pieces, 2, "{dtype:?}: one whole window and the rest");
                let case = format!("{dtype:?} {threads} thread(s) as {out:?}, {how:?}");
                assert!(got == whole, "{case}: bytes differ");
            }
        }
    }
}

#[test]
fn streamed_mixed_input_dtypes_equal_whole_tensor() {
    // An f16 export beside f32 checkpoints (f32 accumulator), and beside an f64 one (f64).
    let dir = tempfile::tempdir().unwrap();
    for wide in [DType::F32, DType::F64] {
        let a = stream_input(dir.path(), 0, DType::F16, STREAMED).1;
        let b = stream_input(dir.path(), 1, wide, STREAMED).1;
        let c = stream_input(dir.path(), 2, DType::BF16, STREAMED).0;
        let opts = AverageOptions { dtype: OutDType::BF16, ..Default::default() };
        let plan = AveragePlan::new(vec![&a, &b, &c], None, opts).unwrap();
        let whole = plan.average_tensor(0, &mut Workspace::default()).unwrap().to_vec();
        assert!(streamed(&plan, 0).unwrap().0 == whole, "f16 + {wide:?} + bf16");
    }
}

#[test]
fn streamed_int_tensor_equals_whole_tensor() {
    let values: Vec<f64> = (0..WINDOW_T / 4 + 3).map(|i| i as f64).collect(); // > one window of bytes
    let t = |k: f64| {
        let v: Vec<f64> = values.iter().map(|x| x + k).collect();
        vec![("n".to_string(), DType::I64, vec![v.len()], encode(&v, DType::I64))]
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("step_2.safetensors");
    let bytes = encode(&values.iter().map(|x| x + 2.0).collect::<Vec<_>>(), DType::I64);
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![values.len()], &bytes);
    safetensors::serialize_to_file([("n", view.unwrap())], None, &path).unwrap();
    let a = Checkpoint::from_memory("step_1.safetensors", Some(1), t(1.0)).unwrap();
    let b = Checkpoint::open(&path, &Default::default()).unwrap();
    for policy in [IntPolicy::First, IntPolicy::Latest] {
        let opts = AverageOptions { int_policy: policy, ..Default::default() };
        let plan = AveragePlan::new(vec![&a, &b], None, opts).unwrap();
        let whole = plan.average_tensor(0, &mut Workspace::default()).unwrap().to_vec();
        assert!(streamed(&plan, 0).unwrap().0 == whole, "{policy:?}");
    }
}

#[test]
fn streamed_refusals_are_the_whole_tensors_and_stop_the_bytes() {
    // A NaN in the second window: the same error, and the window holding it is never handed
    // on. An overflow in both windows, the larger in the second: the same largest value and
    // element as the whole-tensor path reports.
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = stream_input(dir.path(), 0, DType::F32, STREAMED);
    let mut values = vec![1.0; STREAMED];
    values[WINDOW_T + 5] = f64::NAN;
    let path = dir.path().join("bad.safetensors");
    let bytes = encode(&values, DType::F32);
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![STREAMED], &bytes);
    safetensors::serialize_to_file([("w", view.unwrap())], None, &path).unwrap();
    let bad = Checkpoint::open(&path, &Default::default()).unwrap();
    let plan = AveragePlan::new(vec![&good, &bad], None, Default::default()).unwrap();
    let whole = plan.average_tensor(0, &mut Workspace::default()).err().unwrap().to_string();
    let mut handed = 0;
    let err = plan.stream_with(SMALL, 0, &mut Workspace::default(), &mut |b| {
        handed += b.len();
        Ok(())
    });
    assert_eq!(err.err().unwrap().to_string(), whole);
    assert!(whole.contains(&format!("element {}", WINDOW_T + 5)), "{whole}");
    assert_eq!(handed, WINDOW_T * 4, "only the clean first window");

    let mut values = vec![1.0; STREAMED];
    (values[7], values[WINDOW_T + 9], values[WINDOW_T + 11]) = (7e4, 9e4, 9e4);
    let ckpts = equal_inputs(&values);
    for threads in [1, 2] {
        let opts = AverageOptions { dtype: OutDType::F16, threads, ..Default::default() };
        let plan = AveragePlan::new(ckpts.iter().collect(), None, opts).unwrap();
        let whole = plan.average_tensor(0, &mut Workspace::default()).err().unwrap().to_string();
        assert!(whole.contains(&format!("at element {}", WINDOW_T + 11)), "{whole}");
        assert_eq!(streamed(&plan, 0).err().unwrap().to_string(), whole);
    }
}

#[test]
fn fast_bf16_store_writes_what_half_writes() {
    // Every kind of f32: random bit patterns, and the edges (±0, subnormals, ties, the
    // largest values that round to bf16::MAX or overflow to inf, infinities, NaNs).
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    let mut values: Vec<f32> = (0..200_000).map(|_| f32::from_bits(rng.random())).collect();
    let edges = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-40,
        f32::MAX,
        f32::MIN,
        3.3895e38,
        3.3896e38,
        3.3961e38,
        -3.3961e38,
        3.4e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0xFFFF_FFFF),
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        f32::from_bits(0x3F80_8001),
        f32::from_bits(0x7F7F_8000),
    ];
    values.extend(edges);
    for chunk in values.chunks(1000) {
        for saturate in [false, true] {
            let (mut fast, mut slow) = (vec![0u8; 2 * chunk.len() + 1], vec![0u8; 2 * chunk.len()]);
            let want = super::kernel::store_narrow(chunk, &mut slow, saturate, |a: f32| {
                (half::bf16::from_f32(a), a.is_finite(), a > 0.0)
            });
            // Aligned (the fast path) and shifted by a byte (the fallback).
            for at in [0, 1] {
                let got =
                    f32::store_block(chunk, &mut fast[at..at + slow.len()], DType::BF16, saturate);
                assert_eq!(got, want, "saturate {saturate}");
                assert!(fast[at..at + slow.len()] == slow[..], "saturate {saturate}, offset {at}");
            }
        }
    }
}
