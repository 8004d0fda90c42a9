//! The async loop's pieces that need no daemon: what a panic leaves, the pipeline's state.

use super::*;

fn pipeline(dir: &std::path::Path) -> Pipeline {
    let out = dir.join("out/model.safetensors");
    let text = format!("[watch]\ndir = {dir:?}\n[publish]\nout = {out:?}\n");
    let cfg = Config::parse(&text, &dir.join("sewa.toml")).unwrap();
    std::fs::create_dir_all(cfg.status_file().parent().unwrap()).unwrap();
    Pipeline::new(cfg)
}

#[test]
fn a_panic_outside_one_checkpoint_stops_with_its_message_recorded_in_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path());
    let status_file = p.cfg.status_file();
    let err = contain(p, |_| panic!("index out of bounds: the len is 2 but the index is 7"));
    let msg = err.err().expect("a panic is an error").to_string();
    assert!(msg.contains("index out of bounds") && msg.contains("bug"), "{msg}");
    assert!(msg.contains("out/model.safetensors"), "names what stays published: {msg}");
    let status = crate::status::Status::read(&status_file).unwrap();
    assert_eq!(status.state, State::Failed);
    assert!(status.errors.iter().any(|e| e.message.contains("index out of bounds")));
    // A job that returns hands the pipeline back.
    let p = contain(pipeline(dir.path()), |p| p.set_state(State::Watching)).unwrap();
    assert_eq!(p.status.state, State::Watching);
}
