"""The shared sidecar (sewa.integrations._sidecar) against the real `sewa` binary and a real
evaluator process. Run:

    PYTHONPATH=clients/python SEWA_BIN=/work/bin/sewa python -m pytest clients/python/tests/test_sidecar.py -q
"""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from _proto import alive, wait_for  # noqa: E402
from sewa.integrations import _sidecar  # noqa: E402
from sewa.integrations._sidecar import Sidecar  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Where `sewa` is imported from: the checkout's clients/python (PYTHONPATH), or site-packages
# when the tests run against the installed wheel (scripts/test_python.sh).
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(_sidecar.__file__))))

# An evaluator: the loss is the squared distance of the weights from 1, so the
# checkpoints below (weights s/3 and s/4 for step s) have distinct losses and an average beats
# every member.
EVALUATOR = textwrap.dedent("""
    from sewa_evaluator import serve

    def loss_fn(w):
        return sum(((t.float() - 1.0) ** 2).sum() for t in w.values())

    serve(loss_fn)
""")






def write_steps(d, steps):
    os.makedirs(d, exist_ok=True)
    for s in steps:
        save_file({"a.weight": torch.full((3, 3), s / 3.0), "a.bias": torch.full((3,), s / 4.0)},
                  os.path.join(d, f"step_{s}.safetensors"))


@pytest.fixture
def evaluator(tmp_path):
    p = tmp_path / "ev.py"
    p.write_text(EVALUATOR)
    return [sys.executable, str(p)]


def make(tmp_path, evaluator, work="work", **kw):
    kw.setdefault("k", 2)
    kw.setdefault("window", 4)
    extra = kw.pop("extra", {})
    extra.setdefault("watch", {}).setdefault("quiet_ms", 200)
    return Sidecar(tmp_path / "ck", tmp_path / work, evaluator_command=evaluator,
                   pattern="step_*.safetensors", extra=extra, **kw)


def test_toml_writer_round_trips_through_tomllib():
    tables = {"watch": {"dir": 'a "b"\\c\n\x7f\x01 é', "pattern": "checkpoint-*"},
              "select.sewa": {"seed": 3, "lr": 0.25, "guard": False},
              "objective": {"command": ["py", "-m", "x"], "env": {"A B": "1", "C": "2"}},
              "empty": {}}
    parsed = tomllib.loads(_sidecar.to_toml(tables))
    assert parsed["watch"] == tables["watch"]
    assert parsed["select"]["sewa"] == tables["select.sewa"]
    assert parsed["objective"] == tables["objective"]
    assert "empty" not in parsed
    with pytest.raises(ValueError):
        _sidecar.to_toml({"t": {"x": float("nan")}})


def test_extra_overrides_and_removes_keys(tmp_path, evaluator):
    s = make(tmp_path, evaluator, extra={"select": {"method": "lawa"}, "window": {"size": None},
                                         "publish": {"policy": "best"}})
    t = s.tables()
    assert t["select"] == {"method": "lawa", "k": 2}
    assert "size" not in t["window"]
    assert t["publish"]["policy"] == "best"
    assert t["runtime"]["threads"] == 1
    # the package is importable by the evaluator whatever its cwd
    assert PKG_ROOT in t["objective"]["env"]["PYTHONPATH"].split(os.pathsep)


def test_publication_figures_finish_and_the_daemon_is_gone(tmp_path, evaluator):
    write_steps(tmp_path / "ck", [1, 2, 3])
    s = make(tmp_path, evaluator)
    s.start()
    pid = s.pid
    assert alive(pid)
    cfg = tomllib.loads((tmp_path / "work" / "sewa.toml").read_text())
    assert cfg["select"] == {"method": "sewa", "k": 2}
    assert cfg["objective"]["kind"] == "command"
    # a later checkpoint, written while the daemon runs
    write_steps(tmp_path / "ck", [4, 5])
    got = {}

    def polled():
        f = s.poll()
        if f:
            got.update(f)
        return got.get("sewa/newest_member_step") == 5

    wait_for(polled, what="figures of a publication over step 5")
    for key in ("sewa/published_loss", "sewa/newest_member_loss", "sewa/oracle_calls", "sewa/k",
                "sewa/window", "sewa/selected_first_step", "sewa/selected_last_step"):
        assert isinstance(got[key], (int, float)), key
    assert got["sewa/k"] == 2 and got["sewa/window"] == 4
    assert s.poll() is None  # nothing new since
    r = s.finish(newest_step=5, timeout_s=60)
    assert r["error"] is None and not r["timed_out"], r
    assert r["published"] == str(tmp_path / "work" / "average") == s.published_path
    assert len(r["selected_steps"]) == 2 and 5 in r["window_steps"]
    assert r["newest_member_step"] == 5
    # the published loss is the evaluator's loss of the published tensors
    sd = load_file(os.path.join(r["published"], "model.safetensors"))
    want = sum(float(((t.float() - 1.0) ** 2).sum()) for t in sd.values())
    assert r["published_loss"] == pytest.approx(want, rel=1e-5)
    manifest = json.load(open(os.path.join(r["published"], "manifest.json")))
    assert sorted(i["step"] for i in manifest["inputs"]) == r["selected_steps"]
    assert not alive(pid)
    s.stop()  # idempotent
    s.stop()
    assert s.proc.returncode is not None


def test_check_config_refusal_raises_with_sewas_message(tmp_path, evaluator):
    s = make(tmp_path, evaluator, extra={"select": {"bogus_key": 1}})
    with pytest.raises(RuntimeError) as e:
        s.start()
    assert "bogus_key" in str(e.value) and "sewa.toml" in str(e.value)
    assert s.proc is None  # nothing started


def test_no_binary_is_a_clear_error(tmp_path, evaluator, monkeypatch):
    monkeypatch.setenv("SEWA_BIN", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="SEWA_BIN"):
        make(tmp_path, evaluator).start()


def test_a_daemon_that_dies_early_is_an_error_not_a_stop(tmp_path, evaluator, caplog):
    # A second daemon publishing to the first one's output exits at start-up (the output's lock):
    # a real early exit, after check-config passed.
    write_steps(tmp_path / "ck", [1, 2, 3])
    a = make(tmp_path, evaluator)
    a.start()
    try:
        wait_for(lambda: os.path.exists(tmp_path / "work" / "status.json"), what="a's status")
        b = make(tmp_path, evaluator, work="work2", extra={"publish": {"out": a.out_path}})
        with caplog.at_level(logging.ERROR, logger="sewa.integrations"):
            b.start()
            wait_for(lambda: b.proc.poll() is not None, what="b's exit")
            assert b.poll() is None  # never raises, never blocks
            t0 = time.monotonic()
            r = b.finish(newest_step=3, timeout_s=60)
        assert time.monotonic() - t0 < 10  # no waiting for a dead daemon
        assert not r["timed_out"] and r["published"] is None
        assert "exited on its own" in r["error"] and "lock" in r["error"], r["error"]
        assert any("exited on its own" in rec.getMessage() and "lock" in rec.getMessage()
                   for rec in caplog.records if rec.levelno == logging.ERROR)
        # a keeps running and publishing
        assert a.running
        assert a.finish(newest_step=3, timeout_s=60)["error"] is None
    finally:
        a.stop()


def test_finish_is_bounded(tmp_path, evaluator):
    write_steps(tmp_path / "ck", [1])  # fewer than k: no selection ever
    s = make(tmp_path, evaluator)
    s.start()
    t0 = time.monotonic()
    r = s.finish(newest_step=1, timeout_s=2)
    assert r["timed_out"] and r["published"] is None and "within 2" in r["error"]
    assert time.monotonic() - t0 < 40
    assert not alive(s.pid)


CHILD = textwrap.dedent("""
    import sys, time
    from sewa.integrations._sidecar import Sidecar
    s = Sidecar(sys.argv[1], sys.argv[2], evaluator_command=[sys.executable, sys.argv[3]], k=2,
                window=4, pattern="step_*.safetensors")
    s.start()
    print(s.pid, flush=True)
    sys.stdin.readline()  # the test has seen the daemon alive
    if sys.argv[4] == "raise":
        raise RuntimeError("the training loop failed")
    time.sleep(600)  # killed by the test
""")


@pytest.mark.parametrize("how", ["raise", "sigterm", "sigkill"])
def test_no_daemon_outlives_its_trainer(tmp_path, evaluator, how):
    write_steps(tmp_path / "ck", [1, 2, 3])
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=PKG_ROOT)
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck"),
                              str(tmp_path / "work"), evaluator[1], how],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True)
    try:
        pid = int(child.stdout.readline())
        assert alive(pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        if how != "raise":
            child.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        child.wait(timeout=60)
        err = child.stderr.read()
        if how == "raise":
            assert child.returncode == 1 and "the training loop failed" in err
        wait_for(lambda: not alive(pid), timeout=30, what=f"daemon {pid} gone")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_failed_selection_over_the_last_checkpoint_ends_the_wait(tmp_path):
    # an evaluator that exits at once: every selection fails (and sewa would retry in 60 s)
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('no held-out data here', file=sys.stderr)\nsys.exit(3)\n")
    write_steps(tmp_path / "ck", [1, 2, 3])
    s = make(tmp_path, [sys.executable, str(bad)])
    s.start()
    t0 = time.monotonic()
    r = s.finish(newest_step=3, timeout_s=120)
    assert time.monotonic() - t0 < 60
    assert not r["timed_out"] and r["published"] is None
    assert "failed" in r["error"] and "no held-out data here" in r["error"], r["error"]
    assert not alive(s.pid)


def test_the_daemon_and_its_evaluator_run_niced(tmp_path, evaluator):
    write_steps(tmp_path / "ck", [1, 2, 3])
    s = make(tmp_path, evaluator)
    s.start()
    try:
        def nice_of(pid):
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[16])
        base = os.nice(0)
        assert nice_of(s.pid) == min(19, base + 10)

        def evaluator_pids():
            out = []
            for d in os.listdir("/proc"):
                if d.isdigit():
                    try:
                        with open(f"/proc/{d}/stat") as f:
                            if int(f.read().rsplit(")", 1)[1].split()[1]) == s.pid:
                                out.append(int(d))
                    except (OSError, ValueError, IndexError):
                        pass
            return out

        wait_for(lambda: evaluator_pids(), what="the evaluator process")
        assert all(nice_of(p) == min(19, base + 10) for p in evaluator_pids())
    finally:
        s.stop()
