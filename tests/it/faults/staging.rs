//! Issue 12 item 3: protocol 1 stages every candidate (and its gradient) as files; a staging
//! filesystem without room for them is refused with the sizes and the option to change,
//! before anything is written, instead of failing the write half-way.

use std::path::Path;

use sewa_engine::objective::command::{CommandConfig, CommandObjective};
use sewa_engine::objective::{NamedTensor, Objective};

use super::publish::Tmpfs;

fn sleepy(staging: &Path) -> CommandConfig {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/evaluators/sleepy.py");
    CommandConfig {
        command: vec!["python3".into(), script.into()],
        timeout_s: 60.0,
        startup_timeout_s: 60.0,
        env: Default::default(),
        cwd: None,
        staging_dir: Some(staging.to_path_buf()),
        one_shot: true,
    }
}

#[test]
fn a_staging_directory_without_room_is_refused_naming_the_sizes_and_the_option() {
    let Some(fs) = Tmpfs::mount(256 << 10) else { return };
    let mut obj = CommandObjective::start(sleepy(fs.path())).unwrap();
    // 16 Ki parameters: a 64 KiB candidate fits; 64 Ki (256 KiB + its gradient) does not.
    let params =
        |n: usize| vec![NamedTensor { name: "w".into(), shape: vec![n], data: vec![0.5; n] }];
    let ok = obj.evaluate(&params(16 << 10), false).expect("a candidate with room");
    assert!(ok.loss.is_finite());
    let err = obj.evaluate(&params(64 << 10), false).unwrap_err().to_string();
    assert!(err.contains("staging needs 786432 bytes"), "{err}");
    assert!(err.contains("[objective] staging_dir") && err.contains("protocol 2"), "{err}");
    let staged: Vec<_> = walk(fs.path());
    assert!(staged.iter().all(|p| !p.contains("candidate-2")), "nothing written: {staged:?}");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}
