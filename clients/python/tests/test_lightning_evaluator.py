"""`python -m sewa.evaluators.lightning`: the module spec, and the evaluator over sewa's protocol
against an in-process computation of the same loss and dot products.

Run: PYTHONPATH=clients/python SEWA_BIN=/work/bin/sewa python -m pytest clients/python/tests -q
"""

import json
import os
import selectors
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

lightning = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import test_lightning_model as tiny  # noqa: E402
from sewa.evaluators import _batches  # noqa: E402
from sewa.evaluators import lightning as ev  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)


def sewa_bin():
    if os.environ.get("SEWA_BIN"):
        return os.environ["SEWA_BIN"]
    import sewa

    return sewa.binary()


def quiet_trainer(**kw):
    return lightning.Trainer(accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real Lightning run: six checkpoints of TinyMLP, the saved validation batches and the
    module spec, as the callback writes them."""
    d = tmp_path_factory.mktemp("lightning_run")
    torch.manual_seed(0)
    train, val = tiny.loaders()
    module = tiny.TinyMLP(hidden=24)
    ckpt = ModelCheckpoint(dirpath=str(d / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    quiet_trainer(max_steps=18, callbacks=[ckpt]).fit(module, train, val)
    paths = sorted((d / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
    assert len(paths) == 6, paths
    ev.write_spec(str(d / "spec.json"), ev.module_spec(module))
    assert _batches.save(str(d / "batches.pt"), val) == 4  # 32, 32, 32, 4 rows
    return {"dir": d, "paths": [str(p) for p in paths], "val": val}


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([PKG] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    return e


class Evaluator:
    """The evaluator process, spoken to as sewa does (JSON lines), every read bounded."""

    def __init__(self, *args):
        # stderr to a file: a pipe nobody reads could fill and block the evaluator
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sewa.evaluators.lightning", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env(),
            text=True)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def ask(self, msg, timeout=120.0):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sel.select(timeout=0.5):
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"evaluator exited: {self.stderr()}")
                return json.loads(line)
        raise AssertionError(f"no reply to {msg['type']} within {timeout}s")

    def stderr(self):
        self.close()
        self.err.seek(0)
        return self.err.read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def members_msg(paths):
    return {"type": "members", "remove": [],
            "add": [{"id": str(i), "path": p, "format": "torch", "tensors": 9}
                    for i, p in enumerate(paths)]}


def reference(paths, alphas, ints, val, loss="ce", hidden=24):
    """The loss and ⟨∇F, w_i⟩ computed here, independently of the evaluator: the members
    mixed in float32, integer buffers from member `ints`, a plain forward in eval mode, the
    rows-weighted mean over the validation batches, gradients for the parameters only."""
    sds = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    model = tiny.TinyMLP(hidden=hidden).eval()
    params = {n for n, _ in model.named_parameters()}
    mixed = {}
    for n, t in sds[ints].items():
        if t.is_floating_point():
            acc = torch.zeros_like(t, dtype=torch.float32)
            for a, sd in zip(alphas, sds):
                acc += a * sd[n].float()
            mixed[n] = acc.requires_grad_(n in params)
        else:
            mixed[n] = t
    total = sum(len(y) for _, y in val)
    out = 0.0
    for x, y in val:
        pred = torch.func.functional_call(model, mixed, (x,))
        if loss == "ce":
            part = torch.nn.functional.cross_entropy(pred, y)
        else:
            part = ((pred - torch.nn.functional.one_hot(y, 3).float()) ** 2).mean()
        out = out + part * (len(y) / total)
    names = sorted(params)
    grads = torch.autograd.grad(out, [mixed[n] for n in names])
    dots = [sum(float((g.double() * sd[n].double()).sum()) for n, g in zip(names, grads))
            for sd in sds]
    return float(out), dots


@pytest.mark.parametrize("loss", ["validation_step", "loss_fn"])
def test_evaluator_matches_in_process(run, loss):
    d = run["dir"]
    spec = json.loads((d / "spec.json").read_text())
    if loss == "loss_fn":
        spec = ev.module_spec(tiny.TinyMLP(hidden=24),
                              loss_fn="test_lightning_model:loss_sum_of_squares")
        ev.write_spec(str(d / "spec_fn.json"), spec)
    spec_path = str(d / ("spec.json" if loss == "validation_step" else "spec_fn.json"))
    e = Evaluator("--spec", spec_path, "--batches", str(d / "batches.pt"), "--threads", "1")
    try:
        hello = e.ask({"type": "hello", "protocol": 2, "protocols": [1, 2]})
        assert hello["protocol"] == 2 and hello["mix"] and hello["grad"]
        assert "torch" in hello["formats"]
        paths = run["paths"][-4:]
        ready = e.ask(members_msg(paths))
        assert ready == {"type": "ready", "members": 4}, ready
        for rid, alphas, ints in ((1, [0.25, 0.25, 0.25, 0.25], 3), (2, [0.0, 0.5, 0.0, 0.5], 3),
                                  (3, [0.0, 0.0, 0.0, 1.0], 3)):
            weights = {str(i): a for i, a in enumerate(alphas) if a > 0}
            got = e.ask({"type": "evaluate", "id": rid, "weights": weights, "grad": True,
                         "ints": str(ints)})
            assert got["type"] == "result", got
            want_loss, want_dots = reference(paths, alphas, ints, run["val"],
                                             loss="ce" if loss == "validation_step" else "mse")
            assert got["loss"] == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
            assert [got["dots"][str(i)] for i in range(4)] == pytest.approx(want_dots, rel=1e-4,
                                                                           abs=1e-5)
        # Forward only: the same loss, no dots.
        got = e.ask({"type": "evaluate", "id": 9, "weights": {"3": 1.0}, "grad": False,
                     "ints": "3"})
        assert "dots" not in got
        assert got["loss"] == pytest.approx(reference(paths, [0, 0, 0, 1.0], 3, run["val"],
                                                      loss="ce" if loss == "validation_step"
                                                      else "mse")[0], rel=1e-5)
    finally:
        e.close()
    assert e.proc.returncode == 0, e.stderr()


def test_sewa_average_select_with_the_evaluator(run, tmp_path):
    """sewa itself drives the evaluator (the config a callback would write, by hand)."""
    d = run["dir"]
    cfg = tmp_path / "sewa.toml"
    command = [sys.executable, "-m", "sewa.evaluators.lightning", "--spec", str(d / "spec.json"),
               "--batches", str(d / "batches.pt"), "--threads", "1"]
    cfg.write_text(textwrap.dedent(f"""\
        [watch]
        dir = "{d / 'ckpt'}"
        [publish]
        out = "{tmp_path / 'out'}"
        [objective]
        kind = "command"
        command = {json.dumps(command)}
        env = {{ PYTHONPATH = {json.dumps(PKG)} }}
        """))
    out = tmp_path / "avg.safetensors"
    r = subprocess.run([sewa_bin(), "average", "--config", str(cfg), "--select", "sewa", "--k",
                        "3", "--out", str(out), *run["paths"]], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluator=sewa.evaluators.lightning" in r.stderr
    manifest = json.loads((tmp_path / "avg.safetensors.manifest.json").read_text())
    chosen = [i for i in manifest["inputs"] if i["weight"] > 0]
    assert len(chosen) == 3
    # The published tensors carry the module's own names and load into it.
    from safetensors.torch import load_file

    tiny.TinyMLP(hidden=24).load_state_dict(load_file(str(out)), strict=True)


def test_spec_refuses_what_cannot_be_rebuilt():
    class Local(tiny.TinyMLP):  # a class inside a function: not importable
        pass

    with pytest.raises(ValueError, match="cannot be imported"):
        ev.module_spec(Local())
    with pytest.raises(ValueError, match="cannot be imported"):
        ev.module_spec(tiny.TinyMLP(), loss_fn=lambda m, b: m(b[0]).sum())
    m = tiny.TinyMLP()
    m.hparams["data"] = torch.zeros(2)  # not JSON
    with pytest.raises(ValueError, match="save_hyperparameters.*build_module"):
        ev.module_spec(m)
    # A factory replaces hparams entirely.
    spec = ev.module_spec(m, build_module="test_lightning_model:TinyMLP")
    assert spec["factory"]["qualname"] == "TinyMLP" and spec["class"] is None
    m = tiny.TinyMLP()
    m.hparams["extra"] = 1  # not an __init__ argument
    with pytest.raises(ValueError, match="would fail"):
        ev.module_spec(m)
    with pytest.raises(ValueError, match="package.module:name"):
        ev.module_spec(tiny.TinyMLP(), loss_fn="no_colon_here")
    with pytest.raises(ValueError, match="does not import here"):
        ev.module_spec(tiny.TinyMLP(), loss_fn="test_lightning_model:nope")


SCRIPT = """
import sys
import lightning as L
import torch

class Script(L.LightningModule):
    def __init__(self, width=4):
        super().__init__()
        self.save_hyperparameters()
        self.lin = torch.nn.Linear(3, width)

    def validation_step(self, batch, batch_idx):
        pass  # logs only, returns nothing

if __name__ == "__main__":
    from sewa.evaluators import lightning as ev
    ev.write_spec(sys.argv[1], ev.module_spec(Script(width=5)))
    print("TRAINED")  # the evaluator must never run this block
"""


def test_script_module_rebuilt_without_running_its_main_block(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    spec_path = tmp_path / "spec.json"
    r = subprocess.run([sys.executable, str(script), str(spec_path)], capture_output=True,
                       text=True, env=env(), timeout=120)
    assert r.returncode == 0 and "TRAINED" in r.stdout, r.stderr
    spec = ev.read_spec(str(spec_path))
    assert spec["class"]["file"] == str(script) and spec["class"]["module"] == "__main__"
    assert spec["hparams"] == {"width": 5}
    module = ev.build(spec)
    assert type(module).__module__ == ev.SCRIPT_MODULE and module.lin.out_features == 5
    # Its validation_step returns nothing: the error says what to do.
    loss = ev.make_loss_fn(module, [torch.zeros(2, 3)])
    with pytest.raises(TypeError, match="return the loss.*loss_fn"):
        list(loss({n: t for n, t in module.state_dict().items()}))


def test_one_term_per_batch(run):
    """The loss comes as one term per batch (the client back-propagates each as it comes, so
    one batch's graph is alive at a time); the terms sum to the rows-weighted mean."""
    module = tiny.TinyMLP(hidden=24).eval()
    batches = list(run["val"])
    terms = list(ev.make_loss_fn(module, batches)(dict(module.state_dict())))
    assert len(terms) == len(batches) == 4
    want = val_mean(module, batches)
    assert float(sum(t.detach() for t in terms)) == pytest.approx(want, rel=1e-6)


def val_mean(module, batches):
    total = sum(len(y) for _, y in batches)
    with torch.no_grad():
        return float(sum(torch.nn.functional.cross_entropy(module(x), y) * len(y)
                         for x, y in batches) / total)


def test_state_dict_mismatch_is_named(run):
    module = tiny.TinyMLP(hidden=24).eval()
    loss = ev.make_loss_fn(module, [b for b in run["val"]])
    sd = dict(module.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["net.0.bias"]
    with pytest.raises(KeyError, match=r"unknown \['extra.weight'\], missing \['net.0.bias'\]"):
        list(loss(sd))


def test_batch_rows():
    assert ev.batch_rows(torch.zeros(5, 2)) == 5
    assert ev.batch_rows({"ids": torch.zeros(3, 7), "y": torch.zeros(3)}) == 3
    assert ev.batch_rows([None, (torch.zeros(4),)]) == 4
    assert ev.batch_rows(torch.tensor(1.0)) == 1
    assert ev.batch_rows({"a": "text"}) is None
