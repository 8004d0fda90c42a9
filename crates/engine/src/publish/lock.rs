//! One publisher per output: an exclusive `flock` on `<out dir>/.sewa/<out name>.lock`, holding
//! the holder's pid as text. `sewa watch` takes it at start-up, `sewa average` before it opens
//! its inputs; a second process that wants the same output fails at once with the holder's pid.
//!
//! The lock belongs to the process: once taken it is kept until the process exits (the kernel
//! drops it then, even after SIGKILL), and asking again from the same process (a reload, the
//! daemon's publish path) returns at once. The lock file itself is never deleted: deleting a
//! lock file lets two processes lock two different inodes. On a file system without `flock`
//! support the output is published unlocked, with a warning (see [`OutputLock::exclusive`]).
//!
//! This module does not publish and does not clean up; `recover` removes leftovers once the
//! lock is held.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::atomic::parent_dir;
use crate::error::{Error, Result, WithPath};

/// Proof that this process holds the lock of one output (or that the file system cannot lock).
#[derive(Clone, Debug)]
pub struct OutputLock {
    out: PathBuf,
    lock_file: PathBuf,
    exclusive: bool,
    /// True when this call took the lock; false when this process already held it.
    pub newly_taken: bool,
}

impl OutputLock {
    /// The output this lock is for.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.lock_file
    }

    /// False when the file system does not support locks: another process may publish too.
    pub fn exclusive(&self) -> bool {
        self.exclusive
    }
}

/// Locks taken by this process, kept open (and so held) until it exits.
struct Held {
    /// (device, inode) of the lock file.
    id: (u64, u64),
    /// False when the file system refused to lock it (warned once, when first asked).
    exclusive: bool,
    _file: File,
}

static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

/// Where the lock of output `out` lives: `<out dir>/.sewa/<out name>.lock`.
pub fn lock_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or(out.as_os_str()).to_owned();
    name.push(".lock");
    parent_dir(out).join(".sewa").join(name)
}

/// Take (or confirm that this process holds) the exclusive lock of output `out`. Another
/// process holding it is a [`Error::Usage`] naming its pid and the lock file.
pub fn hold(out: &Path) -> Result<OutputLock> {
    let lock_file = lock_path(out);
    let lock = |exclusive, newly_taken| OutputLock {
        out: out.to_path_buf(),
        lock_file: lock_file.clone(),
        exclusive,
        newly_taken,
    };
    // One caller at a time, so two threads of this process never race each other to the file.
    let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Ok(m) = fs::metadata(&lock_file)
        && let Some(h) = held.iter().find(|h| h.id == (m.dev(), m.ino()))
    {
        return Ok(lock(h.exclusive, false));
    }
    let dir = parent_dir(&lock_file);
    fs::create_dir_all(dir).with_path(dir)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&lock_file)
        .with_path(&lock_file)?;
    let exclusive = match file.try_lock() {
        Ok(()) => true,
        Err(std::fs::TryLockError::WouldBlock) => return Err(locked(out, &lock_file)),
        Err(std::fs::TryLockError::Error(e)) if unsupported(&e) => {
            tracing::warn!(lock = %lock_file.display(), error = %e, "this file system cannot \
                lock: publishing without protection from a second publisher");
            false
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_file, e)),
    };
    if exclusive {
        write_pid(&file).with_path(&lock_file)?;
    }
    let m = file.metadata().with_path(&lock_file)?;
    held.push(Held { id: (m.dev(), m.ino()), exclusive, _file: file });
    Ok(lock(exclusive, true))
}

fn write_pid(mut file: &File) -> std::io::Result<()> {
    file.set_len(0)?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
}

fn unsupported(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    e.kind() == std::io::ErrorKind::Unsupported
        || [Errno::NOLCK, Errno::OPNOTSUPP, Errno::NOSYS]
            .contains(&Errno::from_io_error(e).unwrap_or(Errno::INVAL))
}

/// The refusal: who holds the lock (its pid, written right after it locked; read again briefly
/// if it has not been written yet).
fn locked(out: &Path, lock_file: &Path) -> Error {
    let mut holder = None;
    for _ in 0..50 {
        holder = fs::read_to_string(lock_file).ok().and_then(|s| s.trim().parse::<u32>().ok());
        if holder.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let who = holder.map_or_else(|| "another process".to_string(), |pid| format!("pid {pid}"));
    Error::Usage(format!(
        "{}: another sewa process ({who}) is publishing to this output and holds its lock {}; \
         stop it or publish somewhere else",
        out.display(),
        lock_file.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_sits_in_dot_sewa_beside_the_output() {
        assert_eq!(
            lock_path(Path::new("a/m.safetensors")),
            Path::new("a/.sewa/m.safetensors.lock")
        );
        assert_eq!(lock_path(Path::new("avg")), Path::new("./.sewa/avg.lock"));
    }

    #[test]
    fn the_same_process_may_ask_again_and_the_pid_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.safetensors");
        let first = hold(&out).unwrap();
        assert!(first.newly_taken && first.exclusive());
        let again = hold(&dir.path().join(".").join("m.safetensors")).unwrap();
        assert!(!again.newly_taken, "a second hold by the same process is not a new lock");
        let pid = fs::read_to_string(first.path()).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
    }

    #[test]
    fn another_open_file_description_is_refused_naming_the_holder() {
        // flock conflicts between open file descriptions, so a second open of the file stands
        // in for a second process here (the integration tests use real processes).
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("avg");
        let path = lock_path(&out);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let other = File::create(&path).unwrap();
        other.try_lock().unwrap();
        fs::write(&path, "4242\n").unwrap();
        let err = hold(&out).unwrap_err().to_string();
        assert!(err.contains("pid 4242") && err.contains("avg.lock"), "{err}");
        drop(other);
        assert!(hold(&out).unwrap().newly_taken);
    }
}
