//! `sewa check-config` on the shipped example and on broken configs (exit 78, line, hint).

use std::process::Command;

fn check(path: &std::path::Path) -> (i32, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_sewa")).arg("check-config").arg(path).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn shipped_example_config_is_valid() {
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sewa.toml"));
    let (code, text) = check(path);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("lawa k=5"), "{text}");
}

#[test]
fn broken_configs_exit_78_with_position_and_hint() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sewa.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (shipped.replace("size = 20", "size = 0"), "at least 1"),
        (shipped.replace("quiet_ms = 2000", "quiet_ms = 2000\nquiet = 3"), "unknown field"),
        (shipped.replace("method = \"lawa\"", "method = \"lawaa\""), "lawaa"),
        (shipped.replace("k = 5", "k = 50"), "larger than [window] size"),
        (shipped.replace("policy = \"latest\"", "policy = \"best\""), "policy = \"best\""),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, out) = check(&path);
        assert_eq!(code, 78, "case {i}: {out}");
        assert!(out.contains(want) && out.contains(&format!("bad{i}.toml")), "case {i}: {out}");
        assert!(out.contains("sewa example-config"), "case {i} lacks the hint: {out}");
    }
    // The model-based tables are validated by their owners, through the same command.
    let bad_objective = shipped.replace("method = \"lawa\"", "method = \"sewa\"")
        + "\n[objective]\nkind = \"builtin\"\nmodle = \"mlp\"\n";
    let line = bad_objective.lines().position(|l| l.starts_with("modle")).unwrap() + 1;
    let path = dir.path().join("objective.toml");
    std::fs::write(&path, bad_objective).unwrap();
    let (code, out) = check(&path);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("modle") && out.contains(&format!("line {line}, column 1")), "{out}");
    let (code, out) = check(&dir.path().join("missing.toml"));
    assert_eq!(code, 78, "{out}");
}

/// `cargo install` copies no data files: the config the error hint points at must come from the
/// binary itself, and it must be the shipped, valid one.
#[test]
fn example_config_is_printed_by_the_binary_and_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_sewa")).arg("example-config").output().unwrap();
    assert!(out.status.success());
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sewa.toml")).unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), shipped);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sewa.toml");
    std::fs::write(&path, &shipped).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
    let (code, text) = check(&{
        std::fs::write(dir.path().join("bad.toml"), shipped.replace("size = 20", "size = 0"))
            .unwrap();
        dir.path().join("bad.toml")
    });
    assert_eq!(code, 78);
    assert!(text.contains("sewa example-config"), "the hint names the command: {text}");
}
