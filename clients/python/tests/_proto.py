"""Test helper: an evaluator process driven over sewa's protocol (JSON lines), as sewa would.

Replies are read by a thread into a queue, so every wait is bounded by a deadline; stderr goes
to a file that failures show."""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = os.path.dirname(HERE)  # clients/python: sewa and sewa_evaluator


def _from_checkout():
    """Whether this test process imports the client from the checkout (PYTHONPATH) rather than
    an installed package (scripts/test_python.sh tests the installed one): children follow."""
    import sewa_evaluator

    return os.path.dirname(os.path.dirname(os.path.abspath(sewa_evaluator.__file__))) == CLIENT


def pythonpath():
    """The PYTHONPATH a child evaluator needs to import the same client as the tests."""
    p = os.environ.get("PYTHONPATH", "")
    if _from_checkout():
        p = CLIENT + (os.pathsep + p if p else "")
    return p


def env(extra=None):
    e = dict(os.environ)
    if pythonpath():
        e["PYTHONPATH"] = pythonpath()
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(extra or {})
    return e


class Evaluator:
    def __init__(self, argv, extra_env=None, cwd=None):
        self.err = tempfile.NamedTemporaryFile("w+", prefix="sewa-test-eval-", suffix=".log")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, env=env(extra_env), cwd=cwd)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stderr(self):
        self.err.flush()
        with open(self.err.name) as f:
            return f.read()

    def ask(self, msg, timeout=60.0):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply to {msg['type']} in {timeout} s; stderr:\n"
                                 + self.stderr()) from None
        if line is None:
            raise AssertionError(f"evaluator exited ({self.proc.wait()}) on {msg['type']}; "
                                 f"stderr:\n" + self.stderr())
        return json.loads(line)

    def hello(self):
        r = self.ask({"type": "hello", "protocol": 2, "protocols": [1, 2]})
        assert r["type"] == "hello" and r["protocol"] == 2 and r["mix"], r
        return r

    def members(self, add, remove=()):
        return self.ask({"type": "members", "remove": list(remove),
                         "add": [{"id": str(i), "path": p, "format": f} for i, p, f in add]})

    def evaluate(self, weights, grad=True, rid=1, ints=None):
        req = {"type": "evaluate", "id": rid, "weights": {str(k): v for k, v in weights.items()},
               "grad": grad}
        if ints is not None:
            req["ints"] = str(ints)
        return self.ask(req)

    def pid_status(self, key):
        """A /proc/<pid>/status figure in KiB (VmHWM: the peak resident set)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def close(self, timeout=30.0):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"type": "shutdown"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


PYTHON = sys.executable


def alive(pid):
    """Whether `pid` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_for(cond, timeout=60.0, what="condition"):
    """Poll `cond` until it holds; fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
