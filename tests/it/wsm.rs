//! WSM merge weights (issue 22 item 4) against Megatron-LM's own weighted checkpoint merge
//! (NVIDIA/Megatron-LM PR #5114, `tools/checkpoint/weighted_merge.py` at commit
//! 812d36dbc43ccc404ed50f94896b5374f0bf767d): the coefficients it computes, bit for bit, and
//! the tensors its merge wrote, through `sewa average --method wsm` and `sewa watch` with
//! `method = "wsm"`. `tests/fixtures/wsm/` was made once by running that tool on CPU
//! (`scripts/make_wsm_fixtures.py`); cosine and exponential are the WSD decay styles of
//! `megatron/core/optimizer_param_scheduler.py` put through the tool's own conversion.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use sewa_engine::select::WsmShape;
use sewa_engine::select::wsm::coefficients;

use super::watch::Daemon;

const STEPS: [u64; 5] = [100, 200, 300, 400, 500];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wsm")
}

fn megatron() -> Value {
    let text = std::fs::read_to_string(fixtures().join("coefficients.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The merge's inputs in a scrambled order: WSM weighs them oldest first by step, whatever the
/// order on the command line.
fn inputs() -> Vec<PathBuf> {
    [300, 500, 100, 400, 200]
        .iter()
        .map(|s| fixtures().join(format!("inputs/step_{s}.safetensors")))
        .collect()
}

/// Every tensor of a safetensors file as f32 values, with its dtype.
fn values(path: &Path) -> Vec<(String, safetensors::Dtype, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let vals = match v.dtype() {
                safetensors::Dtype::F32 => {
                    d.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
                }
                safetensors::Dtype::BF16 => d
                    .chunks(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
                other => panic!("{name}: unexpected {other:?}"),
            };
            (name, v.dtype(), vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `got` is Megatron's merge up to the rounding of one fp32 accumulation order against
/// another (both accumulate in fp32 and cast to the tensor's dtype): f32 within a few ulps of
/// the tensor's scale, bf16 within one bf16 ulp.
fn assert_close(got: &Path, expected: &Path) {
    let (g, e) = (values(got), values(expected));
    assert_eq!(g.len(), e.len(), "tensor names differ");
    for ((gn, gd, gv), (en, ed, ev)) in g.iter().zip(&e) {
        assert_eq!((gn, gd), (en, ed));
        assert_eq!(gv.len(), ev.len(), "{gn}");
        let scale = ev.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (i, (a, b)) in gv.iter().zip(ev).enumerate() {
            let ok = match gd {
                safetensors::Dtype::BF16 => {
                    (a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1 << 16
                }
                _ => (a - b).abs() <= 8.0 * f32::EPSILON * scale,
            };
            assert!(ok, "{gn}[{i}]: sewa {a} vs Megatron {b} ({})", got.display());
        }
    }
}

/// Every shape, every window of 1 to 16 checkpoints: the same f64 bits as Megatron's tool.
#[test]
fn coefficients_are_megatrons_bit_for_bit() {
    let doc = megatron();
    assert!(doc["source"].as_str().unwrap().contains("812d36dbc43ccc404ed50f94896b5374f0bf767d"));
    let mut checked = 0;
    for shape in WsmShape::ALL {
        // The exact bits (as integers: serde_json may round a decimal an ulp off).
        let per_n = doc["bits"][shape.name()].as_object().unwrap();
        assert_eq!(per_n.len(), 16, "{shape}");
        for (n, want) in per_n {
            let want: Vec<f64> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| f64::from_bits(v.as_u64().unwrap()))
                .collect();
            let got = coefficients(shape, n.parse().unwrap());
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{shape} n={n}: {got:?} vs Megatron {want:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 64);
}

/// `sewa average --method wsm`: inputs ordered by step, Megatron's weights in the manifest with
/// the shape and the source, and Megatron's merged tensors.
#[test]
fn average_method_wsm_matches_megatrons_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let doc = megatron();
    for shape in WsmShape::ALL {
        let out = tmp.path().join(format!("{shape}.safetensors"));
        let run = Command::new(env!("CARGO_BIN_EXE_sewa"))
            .args(["average", "--method", "wsm", "--wsm-shape", shape.name(), "--out"])
            .arg(&out)
            .args(inputs())
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        assert_close(&out, &fixtures().join(format!("expected/{shape}.safetensors")));

        let manifest = std::fs::read_to_string(format!("{}.manifest.json", out.display()));
        let m: Value = serde_json::from_str(&manifest.unwrap()).unwrap();
        let sel = &m["selection"];
        assert_eq!(sel["method"], "wsm");
        assert_eq!(sel["details"]["shape"], shape.name());
        assert!(sel["details"]["source"].as_str().unwrap().contains("812d36dbc43c"));
        let want = doc["bits"][shape.name()]["5"].as_array().unwrap();
        let want: Vec<f64> = want.iter().map(|b| f64::from_bits(b.as_u64().unwrap())).collect();
        let inputs = m["inputs"].as_array().unwrap();
        let steps: Vec<u64> = inputs.iter().map(|i| i["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, STEPS, "oldest first by step");
        // The plan normalises again (the coefficients' sum is 1 within an ulp).
        for (i, b) in inputs.iter().zip(&want) {
            let a = i["weight"].as_f64().unwrap();
            assert!((a - b).abs() <= 1e-15, "{shape}: weight {a} vs Megatron's {b}");
        }
        let recorded: Vec<f64> = sel["details"]["coefficients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(recorded.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-16), "{recorded:?}");
    }
}

/// A bad shape is one error naming the flag; `--wsm-shape` means nothing without `--method wsm`.
#[test]
fn average_refuses_bad_wsm_flags_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.safetensors");
    let run = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_sewa"))
            .arg("average")
            .args(extra)
            .arg("--out")
            .arg(&out)
            .args(inputs())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(&["--method", "wsm", "--wsm-shape", "inverse-square-root"]);
    assert!(e.contains("--wsm-shape") && e.contains("minus-sqrt"), "{e}");
    let e = run(&["--method", "uniform", "--wsm-shape", "cosine"]);
    assert!(e.contains("--wsm-shape is for --method wsm"), "{e}");
    let e = run(&["--method", "wsm", "--weights", "1,2,3,4,5"]);
    assert!(e.contains("--method") && e.contains("--weights"), "{e}");
    let e = run(&["--method", "wsm-ish"]);
    assert!(e.contains("--method") && e.contains("wsm"), "{e}");
    assert!(!out.exists(), "nothing is written for a bad flag");
}

/// `sewa watch` with `method = "wsm"` publishes Megatron's minus-sqrt merge of the window's 5
/// members, and with `method = "weights"` the configured weights over the newest members.
#[test]
fn watch_publishes_wsm_and_configured_weights() {
    let cases = [
        (
            "[window]\nsize = 5\n[select]\nmethod = \"wsm\"\nk = 5\nwsm_shape = \"minus-sqrt\"\n",
            "wsm",
        ),
        ("[window]\nsize = 5\n[select]\nmethod = \"weights\"\nweights = [0, 1, 3]\n", "weights"),
    ];
    for (cfg, method) in cases {
        let mut d = Daemon::start(cfg);
        // Renamed in from beside the watched dir: the watcher sees each file whole.
        for path in inputs() {
            let staged = d.tmp.path().join(path.file_name().unwrap());
            std::fs::copy(&path, &staged).unwrap();
            std::fs::rename(&staged, d.runs.join(path.file_name().unwrap())).unwrap();
        }
        let m = match method {
            "wsm" => d.wait_published(&STEPS),
            _ => d.wait_published(&[400, 500]), // the zero weight leaves step 300 out
        };
        assert_eq!(m["selection"]["method"], method, "{m:#}");
        let weights: Vec<f64> =
            m["inputs"].as_array().unwrap().iter().map(|i| i["weight"].as_f64().unwrap()).collect();
        if method == "wsm" {
            assert_eq!(m["selection"]["details"]["shape"], "minus-sqrt");
            assert_close(&d.model_file(), &fixtures().join("expected/minus-sqrt.safetensors"));
            let want = coefficients(WsmShape::MinusSqrt, 5);
            assert!(weights.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-15), "{weights:?}");
            // The window slides: every member's weight changes (the daemon's running average
            // must not keep the old ones). Step 600 holds step 100's tensors.
            let staged = d.tmp.path().join("step_600.safetensors");
            std::fs::copy(fixtures().join("inputs/step_100.safetensors"), &staged).unwrap();
            std::fs::rename(&staged, d.runs.join("step_600.safetensors")).unwrap();
            let m = d.wait_published(&[200, 300, 400, 500, 600]);
            let got: Vec<f64> = m["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["weight"].as_f64().unwrap())
                .collect();
            assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-15), "{got:?}");
            let members: Vec<_> = [200, 300, 400, 500, 100]
                .iter()
                .map(|s| values(&fixtures().join(format!("inputs/step_{s}.safetensors"))))
                .collect();
            for (t, (name, dtype, out)) in values(&d.model_file()).into_iter().enumerate() {
                let scale = members.iter().flat_map(|m| &m[t].2).fold(0f32, |a, x| a.max(x.abs()));
                for (i, v) in out.iter().enumerate() {
                    let exact: f64 =
                        members.iter().zip(&want).map(|(m, w)| w * m[t].2[i] as f64).sum();
                    let tol = match dtype {
                        safetensors::Dtype::BF16 => exact.abs() / 128.0,
                        _ => 8.0 * f32::EPSILON as f64 * scale as f64,
                    };
                    assert!((*v as f64 - exact).abs() <= tol, "{name}[{i}]: {v} vs {exact}");
                }
            }
        } else {
            assert_eq!(weights, [0.25, 0.75]);
        }
        d.terminate();
    }
}
