"""`sewa.integrations.lightning.SewaCallback` with a real `lightning.Trainer`, a real `sewa watch`
daemon and the real evaluator process: checkpoints written by Lightning, sewa selecting, the
average loaded back, figures in the logger, the daemon gone afterwards. Run:

    PYTHONPATH=clients/python SEWA_BIN=/work/bin/sewa python -m pytest clients/python/tests/test_lightning.py -q
"""

import csv
import logging
import os
import tomllib

import pytest
import torch

lightning = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import test_lightning_model as tiny  # noqa: E402
from _proto import alive  # noqa: E402
from sewa.evaluators import _batches  # noqa: E402
from sewa.integrations.lightning import SewaCallback, checkpoint_pattern  # noqa: E402
from sewa.integrations.lightning import _val_loader  # noqa: E402

# The daemon settles a checkpoint after this quiet period (the default 2 s only slows the test).
FAST = {"watch": {"quiet_ms": 300}}


@pytest.fixture(autouse=True)
def sewa_binary(monkeypatch):
    if not os.environ.get("SEWA_BIN"):
        import sewa

        monkeypatch.setenv("SEWA_BIN", sewa.binary())




def processes_mentioning(text):
    """Live processes whose command line contains `text` (the evaluator, by its spec path)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmd and alive(int(pid)):
            found.append((int(pid), cmd))
    return found


def trainer(tmp_path, callbacks, max_steps=48, logger=True):
    return lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks,
        logger=CSVLogger(str(tmp_path / "logs"), name="run") if logger else False,
        default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=1)


def val_loss(module, batches):
    """The module's validation loss on saved batches, rows-weighted, in eval mode."""
    module.eval()
    total = sum(len(y) for _, y in batches)
    with torch.no_grad():
        return float(sum(torch.nn.functional.cross_entropy(module(x), y) * len(y)
                         for x, y in batches) / total)


def test_trainer_run_end_to_end(tmp_path, caplog):
    torch.manual_seed(0)
    train, val = tiny.loaders()
    module = tiny.TinyMLP(hidden=24)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4,
                           save_top_k=-1, save_last=True)
    cb = SewaCallback(k=3, window=8, work_dir=str(tmp_path / "sewa"), timeout_s=300,
                      threads=1, extra=FAST)
    t = trainer(tmp_path, [ckpt, cb])
    with caplog.at_level(logging.INFO):
        t.fit(module, train, val)

    # Lightning wrote the checkpoints (and its in-place last.ckpt, which sewa never watched).
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert "last.ckpt" in names and "epoch=2-step=48.ckpt" in names, names
    config = tomllib.loads((tmp_path / "sewa" / "sewa.toml").read_text())
    assert config["watch"]["pattern"] == "epoch=*-step=*.ckpt"
    assert config["watch"]["dir"] == str(tmp_path / "ckpt")
    assert "sewa.evaluators.lightning" in config["objective"]["command"]

    # sewa selected over a window that holds the last checkpoint, and published.
    s = cb.summary
    assert s["error"] is None and not s["timed_out"], s
    assert s["published"] == str(tmp_path / "sewa" / "average")
    assert s["newest_member_step"] == 48
    assert len(s["selected_steps"]) == 3 and set(s["selected_steps"]) <= set(range(4, 49, 4))
    assert s["oracle_calls"] and s["oracle_calls"] > 0

    # The module now holds exactly the published tensors.
    published = load_file(str(tmp_path / "sewa" / "average" / "model.safetensors"))
    own = module.state_dict()
    assert sorted(published) == sorted(own)
    for name, tensor in published.items():
        assert torch.equal(own[name].cpu(), tensor), name

    # Its loss on the saved batches is the one sewa reported for the average.
    saved, _ = _batches.load(str(tmp_path / "sewa" / "eval_batches.pt"))
    assert len(saved) == 4
    assert val_loss(module, saved) == pytest.approx(s["published_loss"], rel=1e-5)

    # The figures reached the logger, at training steps.
    with open(os.path.join(t.logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("sewa/published_loss")]
    assert logged, rows[:3]
    assert float(logged[-1]["sewa/published_loss"]) == pytest.approx(s["published_loss"])
    assert all(r["step"] for r in logged)

    # The one-line summary, and the daemon and its evaluator are gone.
    assert any("sewa: average of 3 checkpoints" in r.getMessage() and "vs the newest" in
               r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not alive(cb.sidecar.pid)
    assert processes_mentioning(str(tmp_path / "sewa" / "lightning_module.json")) == []


class Boom(RuntimeError):
    pass


class FailingMLP(tiny.TinyMLP):
    def training_step(self, batch, batch_idx):
        if self.global_step == 10:
            raise Boom("the training step failed")
        return super().training_step(batch, batch_idx)


def test_daemon_stopped_when_training_fails(tmp_path):
    train, val = tiny.loaders()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
    cb = SewaCallback(k=2, window=4, work_dir=str(tmp_path / "sewa"), threads=1, extra=FAST,
                      build_module="test_lightning_model:TinyMLP")
    with pytest.raises(Boom):
        trainer(tmp_path, [ckpt, cb], logger=False).fit(FailingMLP(), train, val)
    assert cb.sidecar is not None and not alive(cb.sidecar.pid)
    assert processes_mentioning(str(tmp_path / "sewa" / "lightning_module.json")) == []


def test_refused_at_fit_start_before_any_daemon(tmp_path):
    train, val = tiny.loaders()
    # No ModelCheckpoint at all.
    cb = SewaCallback(work_dir=str(tmp_path / "a"))
    t = lightning.Trainer(accelerator="cpu", max_steps=2, callbacks=[cb], logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="needs a ModelCheckpoint.*save_top_k=-1"):
        t.fit(tiny.TinyMLP(), train, val)
    assert cb.sidecar is None
    # One that saves nothing.
    cb = SewaCallback(work_dir=str(tmp_path / "b"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=0)
    with pytest.raises(ValueError, match="save_top_k=0"):
        trainer(tmp_path, [ckpt, cb], max_steps=2, logger=False).fit(tiny.TinyMLP(), train, val)
    assert cb.sidecar is None
    # Hyper-parameters the evaluator cannot rebuild the module from.
    m = tiny.TinyMLP()
    m.hparams["table"] = object()
    cb = SewaCallback(work_dir=str(tmp_path / "c"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"), every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(ValueError, match="save_hyperparameters"):
        trainer(tmp_path, [ckpt, cb], max_steps=2, logger=False).fit(m, train, val)
    assert cb.sidecar is None
    # No validation data.
    cb = SewaCallback(work_dir=str(tmp_path / "d"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt3"), every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(ValueError, match="needs validation data"):
        trainer(tmp_path, [ckpt, cb], max_steps=2, logger=False).fit(tiny.TinyMLP(), train)
    assert cb.sidecar is None


class Probe(lightning.Callback):
    """Records, at fit start (where SewaCallback looks), the validation loader it would save."""

    def on_fit_start(self, trainer, pl_module):
        self.loader = _val_loader(trainer)
        raise Boom("stop here: nothing else to run")


class WithValHook(tiny.TinyMLP):
    def val_dataloader(self):
        return VAL_HOOK


class DataModule(lightning.LightningDataModule):
    def train_dataloader(self):
        return tiny.loaders()[0]

    def val_dataloader(self):
        return VAL_DM


VAL_HOOK = tiny.loaders(batch=7)[1]
VAL_DM = tiny.loaders(batch=9)[1]


@pytest.mark.parametrize("source", ["fit argument", "module hook", "datamodule", "a list"])
def test_validation_data_found_where_the_user_gave_it(tmp_path, source):
    train, val = tiny.loaders()
    probe = Probe()
    t = lightning.Trainer(accelerator="cpu", max_steps=1, callbacks=[probe], logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          default_root_dir=str(tmp_path))
    with pytest.raises(Boom):
        if source == "fit argument":
            t.fit(tiny.TinyMLP(), train, val)
        elif source == "a list":
            t.fit(tiny.TinyMLP(), train, [val, VAL_DM])
        elif source == "module hook":
            t.fit(WithValHook(), train)
        else:
            t.fit(tiny.TinyMLP(), datamodule=DataModule())
    want = {"fit argument": val, "a list": val, "module hook": VAL_HOOK, "datamodule": VAL_DM}
    assert probe.loader is want[source]


def test_warns_about_a_checkpoint_history_sewa_cannot_see():
    ckpt = ModelCheckpoint(dirpath="/tmp/x", every_n_train_steps=5)  # save_top_k=1: newest only
    cb = SewaCallback()
    t = lightning.Trainer(accelerator="cpu", callbacks=[ckpt, cb], logger=False)
    with pytest.warns(UserWarning, match="save_top_k=1.*only the newest"):
        assert cb._checkpoint_callback(t) is ckpt


@pytest.mark.parametrize("kwargs,pattern,warns", [
    ({}, "epoch=*-step=*.ckpt", False),
    ({"save_last": True}, "epoch=*-step=*.ckpt", False),
    ({"filename": "model-{step:06d}"}, "model-step=*.ckpt", False),
    ({"filename": "{epoch}-{val_loss:.2f}"}, "epoch=*-val_loss=*.ckpt", False),
    ({"filename": "s{step}", "auto_insert_metric_name": False}, "s*.ckpt", False),
    # a bare field matches last.ckpt too: sewa skips that copy itself, and the user is told
    ({"filename": "{step}", "auto_insert_metric_name": False, "save_last": True}, "*.ckpt",
     True),
])
def test_checkpoint_pattern(kwargs, pattern, warns):
    glob, warning = checkpoint_pattern(ModelCheckpoint(dirpath="/tmp/x", **kwargs))
    assert glob == pattern
    assert (warning is not None) == warns, warning


def test_arguments_checked_when_built():
    with pytest.raises(ValueError, match="k must be at most window"):
        SewaCallback(k=5, window=3)
    with pytest.raises(ValueError, match="members_on"):
        SewaCallback(members_on="gpu")
    with pytest.raises(ValueError, match="threads"):
        SewaCallback(threads=0)
    with pytest.raises(ValueError, match="max_eval_batches"):
        SewaCallback(max_eval_batches=0)
    assert SewaCallback(max_eval_batches=None).max_eval_batches is None
