//! What `sewa watch` checks on disk before it starts, shared with `sewa check-config` so that a
//! config one accepts the other accepts too: the watched directory (there, or able to appear),
//! the output (a destination sewa may replace, its directories creatable), and the objective's
//! files (the evaluator program, resolved exactly as it will be started; the builtin's data,
//! only noted when missing, since it is read at the first selection), and the file descriptors
//! a full window needs against the limit (noted when tight, refused when not even one
//! checkpoint fits).
//! It starts nothing and creates nothing that stays (the evaluator's `staging_dir` is proved
//! writable by creating and removing an empty directory in it: as root, `access()` says yes
//! to `/proc`); `watch` creates the output's directories once these pass.
//! The config's own rules (values, cross-field) are `config`'s.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use sewa_engine::config::Config;
use sewa_engine::error::{Error, Result};
use sewa_engine::objective::config::Kind;

/// Run every start-up check on `cfg`, read from `file` (named in errors, all of them config
/// errors: exit 78). Returns notes for people: facts that are fine but worth saying.
pub fn check(cfg: &Config, file: &Path) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    notes.extend(watch_dir(&cfg.watch.dir, &cfg.publish.out).map_err(|m| Error::config(file, m))?);
    output(cfg).map_err(|m| Error::config(file, m))?;
    notes.extend(threads(cfg.runtime.threads.get()));
    notes.extend(descriptors(cfg).map_err(|m| Error::config(file, m))?);
    // An [objective] beside a fixed rule (lawa, ema, ...) is never started: nothing to check.
    let used = cfg.objective.as_ref().filter(|_| cfg.select.method.needs_objective());
    if let Some(oc) = used {
        let base = cfg.base_dir();
        match &oc.kind {
            Kind::Builtin(b) => {
                notes.extend(data_file(&b.data_path(&base)));
                if let Some(acc) = &b.acceptance_data {
                    let path = if acc.is_absolute() { acc.clone() } else { base.join(acc) };
                    notes
                        .extend(data_file(&path).map(|n| n.replacen("data", "acceptance_data", 1)));
                }
            }
            Kind::Command(e) => {
                let c = e.command_config(&base);
                if let Some(dir) = &c.staging_dir {
                    staging_dir(dir).map_err(|m| Error::config(file, m))?;
                }
                let cwd = c.cwd.unwrap_or(base);
                // The acceptance evaluator starts the same way, with its own program.
                for command in [&c.command, &e.acceptance_command] {
                    let Some(program) = command.first() else { continue };
                    evaluator_program(program, &cwd, c.env.get("PATH"))
                        .map_err(|m| Error::config(file, m))?;
                    evaluator_script(command, &cwd).map_err(|m| Error::config(file, m))?;
                }
            }
        }
    }
    Ok(notes)
}

/// The file descriptors a full window needs, estimated from the newest checkpoint already in
/// the watched directory (none there: nothing to estimate), against the limit sewa can raise
/// itself to. A note when the window will hold fewer members; an error when not one fits.
pub fn descriptors(cfg: &Config) -> std::result::Result<Option<String>, String> {
    use sewa_engine::daemon::descriptors::{self, Verdict};
    let Ok(candidates) = sewa_engine::watch::Filter::new(cfg).scan() else { return Ok(None) };
    let newest = candidates.iter().max_by_key(|p| (sewa_checkpoint::step_of(p), p.as_path()));
    let Some(newest) = newest else { return Ok(None) };
    let files = descriptors::files_of(newest);
    let size = cfg.window.size.get() as u64;
    match descriptors::judge(size, files, descriptors::current()) {
        Verdict::Fine => Ok(None),
        Verdict::Tight(msg) => Ok(Some(format!("file descriptors: {msg}"))),
        Verdict::Impossible(msg) => Err(format!("file descriptors: {msg}")),
    }
}

/// The watched directory: a readable directory, or missing with nothing in the way of its
/// creation (then `watch` waits for it: the sidecar may start before the trainer).
fn watch_dir(dir: &Path, out: &Path) -> std::result::Result<Option<String>, String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            std::fs::read_dir(dir).map_err(|e| format!("[watch] dir {}: {e}", dir.display()))?;
            Ok(None)
        }
        Ok(_) => Err(format!(
            "[watch] dir {} is not a directory; fix the path or remove what is there",
            dir.display()
        )),
        // ENOTDIR: a file where a parent directory should be (reported just below).
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            let (ancestor, _) = nearest_existing(dir);
            if !ancestor.is_dir() {
                return Err(format!(
                    "[watch] dir {} can never appear: {} is not a directory",
                    dir.display(),
                    ancestor.display()
                ));
            }
            // `sewa watch` creates the output's missing parents at start: the dir with them.
            let created = out.starts_with(dir);
            Ok(Some(if created {
                format!(
                    "[watch] dir {} does not exist yet; `sewa watch` creates it at start, as \
                     [publish] out ({}) lies inside it",
                    dir.display(),
                    out.display()
                )
            } else {
                format!(
                    "[watch] dir {} does not exist yet; `sewa watch` waits for it to appear",
                    dir.display()
                )
            }))
        }
        Err(e) => Err(format!("[watch] dir {}: {e}", dir.display())),
    }
}

/// The output: a destination `publish` may replace, and its directory and the state
/// directory writable or creatable by this user.
fn output(cfg: &Config) -> std::result::Result<(), String> {
    // Its messages name the command-line flag; here the value came from the file.
    sewa_engine::publish::check_destination(&cfg.publish.out)
        .map_err(|e| e.to_string().replacen("--out ", "[publish] out ", 1))?;
    let out_dir = cfg.publish.out.parent().filter(|p| !p.as_os_str().is_empty());
    let out_dir = out_dir.unwrap_or(Path::new("."));
    for (what, dir) in [("[publish] out", out_dir), ("the state directory", &cfg.state_dir())] {
        let (ancestor, exists) = nearest_existing(dir);
        let verb = if exists { "written" } else { "created" };
        if !ancestor.is_dir() || !accessible(&ancestor, rustix::fs::Access::WRITE_OK) {
            return Err(format!(
                "{what}: {} cannot be {verb}: {} is not a directory this user may write to",
                dir.display(),
                ancestor.display()
            ));
        }
    }
    Ok(())
}

/// `[objective] staging_dir`: a directory where sewa can create the evaluator's private
/// directory — tried for real (created, then removed), since `access()` answers yes to root
/// for `/proc` and for directories of read-only file systems mounted read-write.
fn staging_dir(dir: &Path) -> std::result::Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(format!("[objective] staging_dir {} is not a directory", dir.display()));
        }
        Err(e) => return Err(format!("[objective] staging_dir {}: {e}", dir.display())),
    }
    let probe = tempfile::Builder::new().prefix(".sewa-check-").tempdir_in(dir);
    let probe = probe.map_err(|e| {
        format!(
            "[objective] staging_dir {} is not a directory sewa can write to ({e}); the \
             evaluator's candidate and member files are written there",
            dir.display()
        )
    })?;
    probe.close().map_err(|e| format!("[objective] staging_dir {}: {e}", dir.display()))
}

/// More compute threads than CPUs only makes sewa compete with the trainer: said, not refused
/// (the bound is `config::MAX_THREADS`).
fn threads(n: usize) -> Option<String> {
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    (n > cpus).then(|| {
        format!(
            "[runtime] threads = {n} is more than the {cpus} CPUs sewa may use here: the extra \
             threads only compete with the trainer"
        )
    })
}

/// The builtin objective's data, read at the first selection (not at start-up: a trainer may
/// write it after sewa starts): a note when it is not a readable file now.
fn data_file(path: &Path) -> Option<String> {
    let why = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => return None,
        Ok(_) => "is not a file".to_string(),
        Err(e) => e.to_string(),
    };
    Some(format!(
        "[objective] data {}: {why}; selections fail (and are retried) until it is there",
        path.display()
    ))
}

/// A Python evaluator's script (`python3 eval.py ...`: the first argument when it is not an
/// option) must exist where the interpreter will look, relative to the evaluator's `cwd`:
/// otherwise the check passes and the first selection fails. `python -m module` is not a path.
fn evaluator_script(command: &[String], cwd: &Path) -> std::result::Result<(), String> {
    let interpreter = command.first().and_then(|p| Path::new(p).file_name());
    let python = interpreter.is_some_and(|n| n.to_string_lossy().starts_with("python"));
    let Some(script) = command.get(1).filter(|a| python && !a.starts_with('-')) else {
        return Ok(());
    };
    let path = cwd.join(script);
    if path.is_file() {
        return Ok(());
    }
    Err(format!(
        "[objective] command script {script:?}: {} is not a file (a relative script is found \
         from the evaluator's cwd, {}; an installed module runs as [\"python3\", \"-m\", ...])",
        path.display(),
        cwd.display()
    ))
}

/// Where the evaluator program is, found as the operating system will find it when the
/// evaluator starts in `cwd`: a name with a '/' relative to `cwd`, a bare name on `PATH` (the
/// evaluator's own `env` PATH if configured, else sewa's; relative entries against `cwd`).
pub fn evaluator_program(
    program: &str,
    cwd: &Path,
    env_path: Option<&String>,
) -> std::result::Result<PathBuf, String> {
    if !cwd.is_dir() {
        return Err(format!("[objective] cwd {} is not a directory", cwd.display()));
    }
    if program.contains('/') {
        let path = cwd.join(program);
        return match executable(&path) {
            Ok(()) => Ok(path),
            Err(why) => {
                let rel = if Path::new(program).is_relative() {
                    format!(
                        " (a relative program starts at the evaluator's cwd, {})",
                        cwd.display()
                    )
                } else {
                    String::new()
                };
                Err(format!(
                    "[objective] command program {program:?}: {} {why}{rel}",
                    path.display()
                ))
            }
        };
    }
    let search: OsString = match env_path {
        Some(p) => p.into(),
        None => std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into()),
    };
    let mut seen = Vec::new();
    for dir in std::env::split_paths(&search) {
        let path = cwd.join(dir).join(program);
        match executable(&path) {
            Ok(()) => return Ok(path),
            Err(why) if path.exists() => seen.push(format!("{} {why}", path.display())),
            Err(_) => {}
        }
    }
    let found = if seen.is_empty() { String::new() } else { format!(" ({})", seen.join("; ")) };
    Err(format!(
        "[objective] command program {program:?} is not an executable on PATH{found}; give its \
         path (relative paths start at the evaluator's cwd, {}) or fix PATH",
        cwd.display()
    ))
}

/// Why `path` cannot be executed by this user, if it cannot.
fn executable(path: &Path) -> std::result::Result<(), &'static str> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            accessible(path, rustix::fs::Access::EXEC_OK).then_some(()).ok_or("is not executable")
        }
        Ok(_) => Err("is not a file"),
        Err(_) => Err("does not exist"),
    }
}

fn accessible(path: &Path, how: rustix::fs::Access) -> bool {
    rustix::fs::access(path, how).is_ok()
}

/// The longest existing prefix of `path` (made absolute), and whether that is `path` itself.
fn nearest_existing(path: &Path) -> (PathBuf, bool) {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut p = abs.as_path();
    loop {
        if p.symlink_metadata().is_ok() {
            return (p.to_path_buf(), p == abs);
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return (PathBuf::from("/"), false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_python_evaluators_script_must_exist_from_its_cwd() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("eval.py"), "").unwrap();
        let cmd = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let cwd = dir.path();
        assert_eq!(evaluator_script(&cmd(&["python3", "eval.py", "x.safetensors"]), cwd), Ok(()));
        assert_eq!(evaluator_script(&cmd(&["/usr/bin/python3.11", "-m", "sewa.x"]), cwd), Ok(()));
        assert_eq!(evaluator_script(&cmd(&["./eval.sh", "gone.py"]), cwd), Ok(()), "not python");
        let err = evaluator_script(&cmd(&["python3", "examples/eval.py"]), cwd).unwrap_err();
        assert!(err.contains("examples/eval.py") && err.contains("cwd"), "{err}");
    }

    #[test]
    fn evaluator_programs_resolve_against_cwd_and_path_as_exec_does() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let prog = bin.join("eval");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("plain.py");
        std::fs::write(&plain, "").unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cwd = dir.path();
        assert_eq!(evaluator_program("bin/eval", cwd, None), Ok(prog.clone()));
        assert_eq!(evaluator_program("./bin/eval", cwd, None).unwrap(), cwd.join("./bin/eval"));
        assert_eq!(
            evaluator_program("eval", cwd, Some(&"bin".to_string())),
            Ok(cwd.join("bin/eval"))
        );
        assert!(evaluator_program("sh", cwd, None).is_ok(), "found on sewa's PATH");
        let err = evaluator_program("eval", cwd, None).unwrap_err();
        assert!(err.contains("not an executable on PATH"), "{err}");
        let err = evaluator_program("./plain.py", cwd, None).unwrap_err();
        assert!(err.contains("is not executable"), "{err}");
        let err = evaluator_program("./nope.py", cwd, None).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        let err = evaluator_program("sh", &cwd.join("missing"), None).unwrap_err();
        assert!(err.contains("cwd"), "{err}");
    }

    #[test]
    fn a_missing_watch_dir_is_a_note_unless_it_can_never_appear() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("out/model.safetensors");
        let runs = dir.path().join("later/runs");
        let note = watch_dir(&runs, &elsewhere).unwrap().unwrap();
        assert!(note.contains("waits for it"), "{note}");
        // The output inside the watched dir: `sewa watch` creates both at start.
        let note = watch_dir(&runs, &runs.join("averaged/model.safetensors")).unwrap().unwrap();
        assert!(note.contains("creates it at start") && !note.contains("waits"), "{note}");
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(watch_dir(&file, &elsewhere).unwrap_err().contains("not a directory"));
        assert!(
            watch_dir(&file.join("runs"), &elsewhere).unwrap_err().contains("can never appear")
        );
        assert_eq!(watch_dir(dir.path(), &elsewhere), Ok(None));
    }
}
