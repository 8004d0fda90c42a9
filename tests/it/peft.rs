//! PEFT LoRA adapter directories saved by real peft (scripts/make_ds_peft_fixtures.py: a tiny
//! module, r = 4, alpha = 8, targets q and v; `mismatch-r8` has r = 8), averaged by `sewa
//! average` and `sewa watch` into an adapter directory and compared with the averages torch
//! computed (tests/fixtures/peft/expected.safetensors).

use std::fs;
use std::path::{Path, PathBuf};

use crate::deepspeed::{assert_matches, copy_dir, fixture, s, sewa, stderr};
use crate::watch::Daemon;

fn adapter(name: &str) -> PathBuf {
    fixture(&format!("peft/{name}"))
}

fn expected() -> PathBuf {
    fixture("peft/expected.safetensors")
}

#[test]
fn averaged_adapters_are_published_as_an_adapter_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("avg");
    let o = sewa(&[
        "average",
        "--out",
        s(&out),
        s(&adapter("checkpoint-100")),
        s(&adapter("checkpoint-200")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    // What PeftModel.from_pretrained(base, out) reads: the weights and the config, as saved.
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]);
    assert_eq!(
        fs::read(out.join("adapter_config.json")).unwrap(),
        fs::read(adapter("checkpoint-200").join("adapter_config.json")).unwrap()
    );
    assert_matches(&out.join("adapter_model.safetensors"), &expected(), "adapter", 1e-6);
    let o = sewa(&["inspect", "--json", s(&adapter("checkpoint-100"))]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["format"].as_str(), v["metadata"]["peft_r"].as_str()),
        (Some("peft-adapter"), Some("4"))
    );
}

fn refused(inputs: &[&Path]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("avg");
    let mut args = vec!["average", "--out", s(&out)];
    args.extend(inputs.iter().map(|p| s(p)));
    let o = sewa(&args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!out.exists(), "nothing is written");
    stderr(&o)
}

#[test]
fn mismatched_lora_ranks_are_refused_naming_both_adapters() {
    let (a, b) = (adapter("checkpoint-100"), adapter("mismatch-r8"));
    let err = refused(&[&a, &b]);
    assert!(err.contains("differ in r") && err.contains(s(&a)) && err.contains(s(&b)), "{err}");
}

#[test]
fn mismatched_lora_alpha_is_refused_although_shapes_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("checkpoint-300");
    copy_dir(&adapter("checkpoint-200"), &b);
    let cfg = fs::read_to_string(b.join("adapter_config.json")).unwrap();
    fs::write(
        b.join("adapter_config.json"),
        cfg.replace("\"lora_alpha\": 8", "\"lora_alpha\": 16"),
    )
    .unwrap();
    let err = refused(&[&adapter("checkpoint-100"), &b]);
    assert!(err.contains("differ in lora_alpha") && err.contains(s(&b)), "{err}");
}

#[test]
fn an_adapter_and_a_full_model_are_refused() {
    let err = refused(&[&adapter("checkpoint-100"), &adapter("base")]);
    assert!(err.contains("full model") && err.contains(s(&adapter("base"))), "{err}");
}

#[test]
fn watch_publishes_averaged_adapters_as_an_adapter_directory() {
    let mut d = Daemon::start_with_out("[select]\nmethod = \"uniform\"\n", "averaged");
    for name in ["checkpoint-100", "checkpoint-200"] {
        let staged = d.tmp.path().join(name);
        copy_dir(&adapter(name), &staged);
        fs::rename(&staged, d.runs.join(name)).unwrap();
    }
    d.wait_published(&[100, 200]);
    assert!(d.out.join("adapter_config.json").is_file());
    assert_matches(&d.out.join("adapter_model.safetensors"), &expected(), "adapter", 1e-6);
}

#[test]
fn merge_delta_adds_the_average_merged_delta_to_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (a, b, base) = (adapter("checkpoint-100"), adapter("checkpoint-200"), adapter("base"));
    let o = sewa(&[
        "average",
        "--lora",
        "merge-delta",
        "--base",
        s(&base),
        "--out",
        s(&out),
        s(&a),
        s(&b),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A full model in the base's layout, its side files copied, no adapter files.
    assert!(out.join("config.json").is_file() && !out.join("adapter_config.json").exists());
    let merged = out.join("model.safetensors");
    assert_matches(&merged, &expected(), "merged", 1e-6);
    // The caveat: merging the averaged adapter (base + s·avg(B)·avg(A)) is another model.
    let e = crate::average::read_tensors(&expected());
    let f = |k: &str| -> Vec<f32> {
        e[k].1.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let (qa, qb) = (
        f("adapter.base_model.model.q.lora_A.weight"),
        f("adapter.base_model.model.q.lora_B.weight"),
    );
    let (w, m) =
        (f("merged.q.weight"), crate::average::read_tensors(&merged)["q.weight"].1.clone());
    let m: Vec<f32> =
        m.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let base_q: Vec<f32> =
        crate::average::read_tensors(&base.join("model.safetensors"))["q.weight"]
            .1
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
    let (r, inp) = (4, 6);
    let naive = |o: usize, i: usize| {
        base_q[o * inp + i] + 2.0 * (0..r).map(|k| qb[o * r + k] * qa[k * inp + i]).sum::<f32>()
    };
    let gap = (0..5)
        .flat_map(|o| (0..inp).map(move |i| (o, i)))
        .map(|(o, i)| (naive(o, i) - m[o * inp + i]).abs())
        .fold(0.0, f32::max);
    assert!(gap > 1e-3, "avg(B)·avg(A) should differ from avg(B·A) here (gap {gap})");
    assert_eq!(w.len(), m.len());
}

#[test]
fn merge_delta_refuses_a_base_without_the_target_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let (a, other) = (adapter("checkpoint-100"), fixture("state_dict.safetensors"));
    let o =
        sewa(&["average", "--lora", "merge-delta", "--base", s(&other), "--out", s(&out), s(&a)]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(s(&a)) && stderr(&o).contains("q.weight"), "{}", stderr(&o));
    assert!(!out.exists());
    let o = sewa(&["average", "--lora", "merge-delta", "--out", s(&out), s(&a)]);
    assert!(!o.status.success() && stderr(&o).contains("--base"), "{}", stderr(&o));
}

#[test]
fn quick_check_needs_a_config_and_complete_weights() {
    use sewa_checkpoint::quick_check;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoint-100");
    copy_dir(&adapter("checkpoint-100"), &dir);
    assert!(quick_check(&dir, "trainer_state.json").is_ok(), "the HF marker is not needed");
    let weights = dir.join("adapter_model.safetensors");
    let full = fs::read(&weights).unwrap();
    fs::write(&weights, &full[..full.len() - 8]).unwrap();
    let err = quick_check(&dir, "").unwrap_err().to_string();
    assert!(err.contains(s(&weights)), "{err}");
    fs::write(&weights, &full).unwrap();
    fs::write(dir.join("adapter_config.json"), "{\"r\": 4").unwrap(); // half written
    assert!(quick_check(&dir, "").is_err());
}

#[test]
fn adapter_model_bin_averages_with_safetensors_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("avg");
    let (a, b) = (adapter("checkpoint-100"), adapter("bin-300"));
    let o = sewa(&["average", "--out", s(&out), s(&a), s(&b)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_matches(&out.join("adapter_model.safetensors"), &expected(), "with_bin", 1e-6);
}

#[test]
fn watch_quarantines_an_adapter_with_other_lora_settings() {
    let mut d = Daemon::start_with_out("[select]\nmethod = \"uniform\"\n", "averaged");
    let first = d.tmp.path().join("checkpoint-100");
    copy_dir(&adapter("checkpoint-100"), &first);
    fs::rename(&first, d.runs.join("checkpoint-100")).unwrap();
    d.wait_published(&[100]);
    let other = d.tmp.path().join("checkpoint-200");
    copy_dir(&adapter("checkpoint-200"), &other);
    let cfg = fs::read_to_string(other.join("adapter_config.json")).unwrap();
    fs::write(
        other.join("adapter_config.json"),
        cfg.replace("\"lora_alpha\": 8", "\"lora_alpha\": 16"),
    )
    .unwrap();
    fs::rename(&other, d.runs.join("checkpoint-200")).unwrap();
    let start = std::time::Instant::now();
    loop {
        let status = d.status().map(|s| s["quarantined"].to_string()).unwrap_or_default();
        if status.contains("lora_alpha") {
            break;
        }
        assert!(d.alive(), "sewa exited:\n{}", d.log());
        assert!(
            start.elapsed() < crate::watch::DEADLINE,
            "never quarantined: {status}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(crate::watch::input_steps(&d.manifest().unwrap()), [100], "still the first alone");
}
