//! Numbers from the command line, configs and selection files that used to panic: each is a
//! validated error with its exit code (2 for usage, 78 for config), never a crash.

use std::process::{Command, Output};

use safetensors::Dtype;

use crate::average::{f32_bytes, write_st};

fn sewa(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sewa")).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `--weights 1e308,1e308`: the weights' sum overflowed to inf, every normalised weight became 0
/// and picking the integer-tensor source indexed an empty list (exit 101).
#[test]
fn overflowing_weights_are_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let inputs: Vec<_> = (1..=2)
        .map(|n| {
            let p = dir.path().join(format!("step_{n}.safetensors"));
            let n_bytes = (n as i64).to_le_bytes().to_vec();
            write_st(
                &p,
                &[
                    ("w", Dtype::F32, vec![2], f32_bytes(&[n as f32; 2])),
                    ("n", Dtype::I64, vec![1], n_bytes),
                ],
            );
            p
        })
        .collect();
    let out = dir.path().join("avg.safetensors");
    let o = sewa(&[
        "average".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--weights".as_ref(),
        "1e308,1e308".as_ref(),
        inputs[0].as_os_str(),
        inputs[1].as_os_str(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("too large"), "{}", text(&o));
    assert!(!out.exists(), "nothing may be written");
}

/// `timeout_s = 1e300` made `Duration::from_secs_f64` panic on the first request.
#[test]
fn huge_evaluator_timeout_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    for key in ["timeout_s", "startup_timeout_s"] {
        let config = dir.path().join(format!("{key}.toml"));
        let text_cfg = format!(
            "[watch]\ndir = {:?}\n[select]\nmethod = \"greedy\"\nk = 2\n[publish]\nout = {:?}\n\
             [objective]\nkind = \"command\"\ncommand = [\"python3\", \"eval.py\"]\n{key} = 1e300\n",
            dir.path(),
            dir.path().join("avg.safetensors")
        );
        std::fs::write(&config, text_cfg).unwrap();
        let o = sewa(&["check-config".as_ref(), config.as_os_str()]);
        assert_eq!(o.status.code(), Some(78), "{key}: {}", text(&o));
        assert!(text(&o).contains(key) && text(&o).contains("at most"), "{}", text(&o));
    }
}

/// A selection JSON whose `chosen` indices lie outside its window: exit 2 naming the file.
#[test]
fn report_of_a_hostile_selection_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sel = dir.path().join("sel.json");
    let json = r#"{"weights": [1.0], "selection": {"method": "sewa",
        "details": {"members": [{"step": 1}, {"step": 2}], "chosen": [99]}}}"#;
    std::fs::write(&sel, json).unwrap();
    let svg = dir.path().join("w.svg");
    let o = sewa(&["report".as_ref(), sel.as_os_str(), "--out".as_ref(), svg.as_os_str()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("sel.json") && text(&o).contains("outside the window"),
        "{}",
        text(&o)
    );
}
