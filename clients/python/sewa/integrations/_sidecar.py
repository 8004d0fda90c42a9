"""One `sewa watch` daemon beside a training run, started and stopped by a callback.

The trainer-side callbacks (`sewa.integrations.transformers`, `sewa.integrations.lightning`)
share this class. It writes `work_dir/sewa.toml`, has `sewa check-config` judge it, starts
`sewa watch` in its own session (stderr to `work_dir/sewa.log`) and returns at once. A
background thread reads the daemon's status file and, when a publication appears, its manifest;
`poll()` only hands over what that thread already parsed, so a training step never waits on the
daemon. `finish()` waits, bounded, for the publication over the last checkpoint, then stops the
daemon. `stop()` is idempotent, runs at interpreter exit, and the daemon is told by the kernel
(PR_SET_PDEATHSIG) to stop when the thread that started it ends, which for a trainer's main
thread is when its process dies (a trainer killed by SIGTERM or SIGKILL runs no atexit
handler); so call `start()` from a thread that lives as long as the daemon should.

Layout of `work_dir`: `sewa.toml`, `sewa.log`, `status.json` (with `status.history.jsonl`
beside it), `.sewa/` (the daemon's private state) and `average/`, the published average as an
HF-layout directory (`model.safetensors` or shards with their index, the checkpoint's
`config.json` and other side files, and `manifest.json`), loadable with `from_pretrained` or
`safetensors.torch.load_file`.
"""

import atexit
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref

log = logging.getLogger("sewa.integrations")

# How often the background thread reads the status file: cheap (one small JSON file), and the
# lag it adds to `poll()` is nothing next to a selection's seconds.
POLL_INTERVAL_S = 0.25
# Lines of sewa.log quoted when the daemon fails.
LOG_TAIL_LINES = 20


def find_binary(binary=None):
    """The `sewa` binary: `binary` if given, else `$SEWA_BIN`, else `sewa.binary()` (the one
    installed with this package, else PATH). A FileNotFoundError that says how to get one."""
    for cand, origin in ((binary, "binary="), (os.environ.get("SEWA_BIN"), "SEWA_BIN")):
        if cand:
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return os.path.abspath(cand)
            raise FileNotFoundError(f"{origin} names {cand!r}, which is not an executable file")
    from .. import binary as installed

    try:
        return installed()
    except FileNotFoundError:
        raise FileNotFoundError(
            "no sewa binary: `pip install` sewa (the wheel carries it), put `sewa` on PATH, or "
            "set SEWA_BIN to its path") from None


# ---------------------------------------------------------------------------------------------
# TOML writing (the standard library reads TOML but does not write it)

def _toml_str(s):
    out = ['"']
    for ch in str(s):
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04X}")
        elif 0xD800 <= o <= 0xDFFF:
            # a lone surrogate (a path decoded with surrogateescape): TOML cannot carry it
            raise ValueError(f"{s!r} cannot be written to TOML (not valid Unicode)")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(k):
    k = str(k)
    if k and all(c.isalnum() and c.isascii() or c in "-_" for c in k):
        return k
    return _toml_str(k)


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v!r} is not a finite number")
        return repr(v)
    if isinstance(v, (str, os.PathLike)):
        return _toml_str(os.fspath(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write a {type(v).__name__} to TOML: {v!r}")


def to_toml(tables):
    """`{table: {key: value}}` as TOML text; a table name may be dotted (`select.sewa`)."""
    lines = []
    for name, keys in tables.items():
        if not keys:
            continue
        lines.append("[" + ".".join(_toml_key(p) for p in str(name).split(".")) + "]")
        for k, v in keys.items():
            if v is None:
                continue
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def merge_tables(base, extra):
    """`base` with `extra`'s keys laid over it, table by table (a value of None removes a key)."""
    out = {t: dict(keys) for t, keys in base.items()}
    for t, keys in (extra or {}).items():
        if not isinstance(keys, dict):
            raise TypeError(f"extra[{t!r}] must be a dict of keys for the [{t}] table")
        table = out.setdefault(t, {})
        for k, v in keys.items():
            if v is None:
                table.pop(k, None)
            else:
                table[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Reading what the daemon wrote (pure functions of the parsed JSON)

def _read_json(path):
    """The parsed JSON at `path`, or None while it is missing or unreadable (the daemon replaces
    it atomically, so a parse error means something else wrote it: treat it as absent)."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 20)
        return json.loads(data)
    except (OSError, ValueError):
        return None


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def publication_summary(status, manifest):
    """What one publication says, from the status file and its manifest (either may lack a
    field): published_loss, selected_steps, window_steps, newest_member_step/_loss,
    oracle_calls (this selection's), oracle_calls_total (the run's), at, why."""
    status = status if isinstance(status, dict) else {}
    manifest = manifest if isinstance(manifest, dict) else {}
    pub = status.get("published") if isinstance(status.get("published"), dict) else {}
    sel = manifest.get("selection") if isinstance(manifest.get("selection"), dict) else {}
    det = sel.get("details") if isinstance(sel.get("details"), dict) else {}

    selected = [m.get("step") for m in manifest.get("inputs") or [] if isinstance(m, dict)]
    if not selected:
        selected = [m.get("step") for m in pub.get("members") or [] if isinstance(m, dict)]
    selected = sorted(s for s in selected if isinstance(s, int))

    window = [m.get("step") for m in det.get("members") or [] if isinstance(m, dict)]
    losses = det.get("member_losses") if isinstance(det.get("member_losses"), list) else []
    newest_step = newest_loss = None
    for i, s in enumerate(window):
        if isinstance(s, int) and (newest_step is None or s > newest_step):
            newest_step = s
            newest_loss = _num(losses[i]) if i < len(losses) else None
    if newest_step is None and selected:
        newest_step = selected[-1]

    loss = _num(sel.get("loss"))
    if loss is None:
        loss = _num(pub.get("loss"))
    counters = status.get("counters") if isinstance(status.get("counters"), dict) else {}
    return {
        "published_loss": loss,
        "selected_steps": selected,
        "window_steps": sorted(s for s in window if isinstance(s, int)),
        "newest_member_step": newest_step,
        "newest_member_loss": newest_loss,
        "oracle_calls": _num(det.get("oracle_calls")),
        "oracle_calls_total": _num(counters.get("oracle_calls")),
        "at": pub.get("at") or manifest.get("finished"),
        "why": sel.get("why") or pub.get("why"),
    }


def figures(summary):
    """A publication summary as the flat dict of numbers `poll()` returns (only those known)."""
    window = summary.get("window_steps") or []
    selected = summary.get("selected_steps") or []
    out = {
        "sewa/published_loss": summary.get("published_loss"),
        "sewa/newest_member_loss": summary.get("newest_member_loss"),
        "sewa/oracle_calls": summary.get("oracle_calls"),
        "sewa/oracle_calls_total": summary.get("oracle_calls_total"),
        "sewa/k": len(selected) if selected else None,
        "sewa/window": len(window) if window else None,
        "sewa/selected_first_step": selected[0] if selected else None,
        "sewa/selected_last_step": selected[-1] if selected else None,
        "sewa/newest_member_step": summary.get("newest_member_step"),
    }
    return {k: v for k, v in out.items() if _num(v) is not None}


def log_tail(path, lines=LOG_TAIL_LINES):
    """The last `lines` lines of a log file (at most 64 KiB of it read), or '' if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# The daemon

def _preexec(nice):
    """A preexec_fn that lowers the child's CPU priority by `nice` (inherited by the evaluator
    it starts, so that on shared cores the trainer's steps come first) and, on Linux, asks the
    kernel to SIGTERM the child when its parent thread dies. Resolved before the fork so the
    child only makes system calls."""
    def lower():
        if nice:
            try:
                os.nice(nice)
            except OSError:
                pass

    if not sys.platform.startswith("linux"):
        return lower if nice else None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lower if nice else None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]

    def preexec():
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        lower()

    return preexec


def _stop_at_exit(ref):
    sidecar = ref()
    if sidecar is not None:
        sidecar.stop()


class Sidecar:
    """One `sewa watch` daemon beside a training run, started and stopped by a callback."""

    def __init__(self, watch_dir, work_dir, *, evaluator_command, k=5, window=20,
                 pattern="*", keep_deleted=None, env=None, binary=None, extra=None,
                 nice=10):
        if not evaluator_command or not all(isinstance(a, (str, os.PathLike))
                                            for a in evaluator_command):
            raise ValueError("evaluator_command must be a non-empty list of strings")
        if int(k) < 1 or int(window) < 1:
            raise ValueError(f"k ({k}) and window ({window}) must be at least 1")
        if int(k) > int(window):
            raise ValueError(f"k ({k}) must be at most window ({window})")
        self.watch_dir = os.path.abspath(os.fspath(watch_dir))
        self.work_dir = os.path.abspath(os.fspath(work_dir))
        self.evaluator_command = [os.fspath(a) for a in evaluator_command]
        self.k = int(k)
        self.window = int(window)
        self.pattern = pattern
        self.keep_deleted = keep_deleted
        self.env = dict(env or {})
        self.binary = binary
        self.extra = extra or {}
        # CPU priority of the daemon and its evaluator below the trainer's (0: the same)
        self.nice = max(0, int(nice))
        self.config_path = os.path.join(self.work_dir, "sewa.toml")
        self.log_path = os.path.join(self.work_dir, "sewa.log")
        self.status_path = os.path.join(self.work_dir, "status.json")
        self.out_path = os.path.join(self.work_dir, "average")
        self.proc = None
        self._lock = threading.Condition()
        self._pending = None        # figures of publications not yet handed out by poll()
        self._last = None           # the newest publication's summary
        self._seen_pub = None       # (publishes counter, published.at) last parsed
        self._status = None
        self._exit_error = None     # set once when the daemon exited on its own
        self._stopping = False
        self._stopped = False
        self._thread = None
        self._log_file = None

    # -- configuration ------------------------------------------------------------------------

    def tables(self):
        """The config as `{table: {key: value}}`, the user's `extra` laid over it."""
        env = dict(self.env)
        # The evaluator runs with cwd = work_dir: make this package importable there even when
        # it is found through a relative PYTHONPATH or the trainer's working directory.
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        paths = [pkg_root] + [os.path.abspath(p) for p in
                              env.get("PYTHONPATH", os.environ.get("PYTHONPATH", "")).split(
                                  os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        base = {
            "watch": {"dir": self.watch_dir, "pattern": self.pattern},
            "window": {"size": self.window, "keep_deleted": self.keep_deleted},
            "select": {"method": "sewa", "k": self.k},
            "objective": {"kind": "command", "command": self.evaluator_command, "env": env,
                          # torch's import and the first members' load take a while on a
                          # loaded machine; one request is bounded by timeout_s (300)
                          "startup_timeout_s": 600},
            "publish": {"out": self.out_path},
            # one thread: the trainer owns the cores; the output is bit-identical for any value
            "runtime": {"threads": 1, "status_file": self.status_path},
        }
        return merge_tables(base, self.extra)

    def config_text(self):
        return ("# Written by sewa.integrations (Sidecar); `sewa check-config` reads it.\n"
                + to_toml(self.tables()))

    # -- life cycle ---------------------------------------------------------------------------

    def start(self):
        """Write sewa.toml, check it (RuntimeError with sewa's message if refused), start
        `sewa watch` and return at once."""
        if self.proc is not None:
            raise RuntimeError("this Sidecar was already started")
        exe = find_binary(self.binary)
        os.makedirs(self.work_dir, exist_ok=True)
        tmp = self.config_path + f".tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.config_text())
        os.replace(tmp, self.config_path)
        for stale in (self.status_path,):
            # a status file from an earlier run would read as this run's publications
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        check = subprocess.run([exe, "check-config", self.config_path], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, errors="replace", timeout=120)
        if check.returncode != 0:
            msg = "\n".join(s.strip() for s in (check.stderr, check.stdout) if s.strip())
            raise RuntimeError(f"sewa check-config refused {self.config_path} (exit "
                               f"{check.returncode}):\n{msg}")
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [exe, "watch", "--config", self.config_path], stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=self._log_file, cwd=self.work_dir,
            start_new_session=True, preexec_fn=_preexec(self.nice), close_fds=True)
        atexit.register(_stop_at_exit, weakref.ref(self))
        self._thread = threading.Thread(target=self._watch, name="sewa-sidecar", daemon=True)
        self._thread.start()
        log.info("sewa: watching %s (pid %d); config %s, log %s", self.watch_dir, self.proc.pid,
                 self.config_path, self.log_path)

    @property
    def pid(self):
        return None if self.proc is None else self.proc.pid

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def published_path(self):
        """The published average's path (a directory), once a publication exists."""
        if os.path.isfile(os.path.join(self.out_path, "manifest.json")):
            return self.out_path
        return None

    def _watch(self):
        """Background thread: parse the status file (and a new publication's manifest) until
        the daemon exits; note an exit nobody asked for."""
        while True:
            exited = self.proc.poll() is not None
            self._read_status()
            if exited:
                with self._lock:
                    if not self._stopping:
                        tail = log_tail(self.log_path)
                        self._exit_error = (f"sewa watch exited on its own (status "
                                            f"{self.proc.returncode}); training goes on without "
                                            f"it. Last lines of {self.log_path}:\n{tail}")
                        log.error("sewa: %s", self._exit_error)
                    self._lock.notify_all()
                return
            time.sleep(POLL_INTERVAL_S)

    def _read_status(self):
        status = _read_json(self.status_path)
        if not isinstance(status, dict) or status.get("pid") != self.proc.pid:
            return
        counters = status.get("counters") if isinstance(status.get("counters"), dict) else {}
        pub = status.get("published") if isinstance(status.get("published"), dict) else None
        key = (counters.get("publishes"), pub.get("at") if pub else None)
        summary = None
        if pub is not None and key != self._seen_pub:
            last = status.get("last_publish") if isinstance(status.get("last_publish"),
                                                            dict) else {}
            manifest = _read_json(last.get("manifest") or
                                  os.path.join(self.out_path, "manifest.json"))
            summary = publication_summary(status, manifest)
        with self._lock:
            self._status = status
            if summary is not None:
                self._seen_pub = key
                self._last = summary
                self._pending = figures(summary)
            elif self._last is not None and _num(counters.get("oracle_calls")) is not None:
                # the run's total moves on after the publication (member losses, later tries)
                self._last["oracle_calls_total"] = counters["oracle_calls"]
            self._lock.notify_all()

    def poll(self):
        """Never blocks: the figures of the publications that appeared since the last call (the
        newest one's), or None when nothing is new."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            out, self._pending = self._pending, None
            return out
        finally:
            self._lock.release()

    def _covered(self, newest_step):
        """Whether the newest publication's window holds `newest_step` (any publication when
        it is None)."""
        last = self._last
        if last is None:
            return False
        if newest_step is None:
            return True
        steps = last.get("window_steps") or last.get("selected_steps") or []
        return any(s >= newest_step for s in steps)

    def _selection_failed(self, baseline):
        """An error string when a selection failed after the window came to hold the newest
        step (`baseline`: the run's failed selections at that moment), else None."""
        status = self._status or {}
        counters = status.get("counters") if isinstance(status.get("counters"), dict) else {}
        failed = counters.get("failed_selections")
        if baseline is None or not isinstance(failed, int) or failed <= baseline:
            return None
        errors = status.get("errors") or []
        last = errors[-1] if errors else {}
        msg = last.get("message") if isinstance(last, dict) else str(last)
        return f"the selection over the last checkpoint failed: {msg or 'see ' + self.log_path}"

    def finish(self, newest_step=None, timeout_s=600.0):
        """Wait (at most `timeout_s`) until a publication's window holds `newest_step` (with
        None: until any publication exists), or the daemon fails or exits; then stop it. Returns
        the summary dict (see module doc)."""
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        timed_out = False
        error = None
        baseline = None  # failed selections when newest_step was first seen in the window
        if self.proc is None:
            error = "the sidecar was never started"
        else:
            with self._lock:
                while True:
                    if self._covered(newest_step):
                        break
                    if self._exit_error is not None or not self._thread.is_alive():
                        error = self._exit_error or "sewa watch stopped"
                        break
                    status = self._status or {}
                    if status.get("state") == "failed":
                        errs = status.get("errors") or []
                        error = f"sewa watch failed: {errs[-1] if errs else 'see ' + self.log_path}"
                        break
                    members = status.get("members") or []
                    if baseline is None and newest_step is not None and any(
                            isinstance(m, dict) and m.get("step") == newest_step
                            for m in members):
                        counters = status.get("counters")
                        baseline = (counters or {}).get("failed_selections", 0) if isinstance(
                            counters, dict) else 0
                    error = self._selection_failed(baseline)
                    if error is not None:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        timed_out = True
                        error = (f"no publication over step {newest_step} within {timeout_s} s"
                                 f" (see {self.log_path})")
                        break
                    self._lock.wait(min(left, 1.0))
        self.stop()
        last = self._last or {}
        return {
            "published": self.published_path,
            "published_loss": last.get("published_loss"),
            "newest_member_step": last.get("newest_member_step"),
            "newest_member_loss": last.get("newest_member_loss"),
            "selected_steps": list(last.get("selected_steps") or []),
            "window_steps": list(last.get("window_steps") or []),
            "oracle_calls": last.get("oracle_calls"),
            "oracle_calls_total": last.get("oracle_calls_total"),
            "why": last.get("why"),
            "timed_out": timed_out,
            "error": error,
        }

    def stop(self, timeout_s=30.0):
        """SIGTERM the daemon, wait up to `timeout_s`, then SIGKILL its process group.
        Idempotent; safe from atexit and from any thread."""
        with self._lock:
            if self._stopped or self.proc is None:
                return
            self._stopping = True
        proc = self.proc
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("sewa: the daemon (pid %d) did not stop within %s s of SIGTERM; "
                            "killing it", proc.pid, timeout_s)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            except ProcessLookupError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._read_status()
        with self._lock:
            self._stopped = True
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            self._lock.notify_all()

    def summary(self):
        """The newest publication's summary (None before the first)."""
        with self._lock:
            return None if self._last is None else dict(self._last)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
