"""SewaCallback with a real (tiny) Hugging Face Trainer run on the CPU, the real `sewa` binary and
a real evaluator process. Run:

    PYTHONPATH=clients/python SEWA_BIN=/work/bin/sewa python -m pytest clients/python/tests/test_transformers.py -q

The evaluator is `python -m sewa.evaluators.hf` when that module is installed, else the
stand-in beside this file (same command line).
"""

import glob
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from _proto import alive, wait_for  # noqa: E402
from sewa.integrations import transformers as sewa_hf  # noqa: E402
from sewa.integrations.transformers import SewaCallback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)


def evaluator():
    """The evaluator command prefix: the shipped module when present, else the stand-in."""
    if importlib.util.find_spec("sewa.evaluators.hf") is not None:
        return None  # the callback's default
    return [sys.executable, os.path.join(HERE, "_hf_eval_standin.py")]






class Tokens(torch.utils.data.Dataset):
    """Synthetic token sequences with a learnable rule (each token is the previous plus a
    per-sequence stride, mod the vocabulary), plus an `idx` column the model's forward does not
    take (the Trainer's column removal must drop it)."""

    def __init__(self, n, seq=16, vocab=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(seq)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "idx": i}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                 bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def make_trainer(out, callbacks, max_steps=20, save_total_limit=3, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=3e-3, save_steps=4,
        save_total_limit=save_total_limit, logging_steps=4, report_to=["tensorboard"],
        use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **kw)
    return transformers.Trainer(model=tiny_model(), args=args, train_dataset=Tokens(256),
                                eval_dataset=Tokens(64, seed=1), callbacks=callbacks)


def test_a_trainer_run_selects_publishes_and_loads_the_average(tmp_path, capsys):
    t0 = time.monotonic()
    cb = SewaCallback(k=2, window=20, max_eval_batches=2, threads=1, evaluator=evaluator(),
                      extra={"watch": {"quiet_ms": 300}}, timeout_s=120)
    trainer = make_trainer(tmp_path / "out", [cb])
    trainer.train()
    out = tmp_path / "out"
    assert os.path.isdir(out / "checkpoint-20")
    assert len(glob.glob(str(out / "checkpoint-*"))) == 3  # save_total_limit
    r = cb.result
    assert r is not None and r["error"] is None and not r["timed_out"], r
    assert r["newest_member_step"] == 20
    assert r["published"] == str(out / "sewa" / "average")
    assert 1 <= len(r["selected_steps"]) <= 2
    # the window followed save_total_limit
    cfg = (out / "sewa" / "sewa.toml").read_text()
    assert "size = 3" in cfg and "keep_deleted = false" in cfg and 'pattern = "checkpoint-*"' in cfg
    # the model holds the published tensors
    sd = load_file(os.path.join(r["published"], "model.safetensors"))
    own = trainer.model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k].cpu(), v.to(own[k].dtype)), k
    assert torch.equal(own["lm_head.weight"], own["transformer.wte.weight"])  # still tied
    manifest = json.load(open(os.path.join(r["published"], "manifest.json")))
    assert sorted(i["step"] for i in manifest["inputs"]) == r["selected_steps"]
    # the one line
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sewa: average")]
    assert line and "last checkpoint (step 20)" in line[0], line
    # figures in the Trainer's log history ...
    hist = [h for h in trainer.state.log_history if "sewa/published_loss" in h]
    assert hist, trainer.state.log_history
    assert any("sewa/final_published_loss" in h for h in trainer.state.log_history)
    assert hist[-1]["sewa/published_loss"] == pytest.approx(r["published_loss"])
    # ... and in TensorBoard's event files, read by TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for d in {os.path.dirname(p) for p in glob.glob(str(out / "**" / "events.out.*"),
                                                    recursive=True)}:
        acc = EventAccumulator(d)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train/sewa/published_loss" in tags or "sewa/published_loss" in tags, tags
    assert any(t.endswith("sewa/final_published_loss") for t in tags), tags
    # the daemon is gone
    assert not alive(_pid_of(out))
    print(f"trainer run with the callback: {time.monotonic() - t0:.1f} s")


def _pid_of(out):
    return json.load(open(out / "sewa" / "status.json"))["pid"]


def test_no_eval_dataset_is_a_clear_error_at_train_begin(tmp_path):
    cb = SewaCallback(k=2, window=4, evaluator=evaluator())
    trainer = make_trainer(tmp_path / "out", [cb], max_steps=2)
    trainer.eval_dataset = None
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.train()
    assert cb.sidecar is None


def test_other_ranks_start_nothing(tmp_path):
    cb = SewaCallback(k=2, window=4, evaluator=evaluator())
    args = SimpleNamespace(output_dir=str(tmp_path), save_total_limit=None)
    cb.on_train_begin(args, SimpleNamespace(is_world_process_zero=False), None)
    assert cb.sidecar is None and not os.path.exists(tmp_path / "sewa")


def test_window_follows_save_total_limit_unless_asked(caplog):
    args = SimpleNamespace(save_total_limit=3)
    with caplog.at_level(logging.INFO, logger="sewa.integrations"):
        assert SewaCallback(k=5, window=20)._window(args) == (3, 3, False)
    assert "save_total_limit=3" in caplog.text
    assert SewaCallback(k=5, window=20, keep_deleted=True)._window(args) == (20, 5, True)
    assert SewaCallback(k=5, window=20)._window(SimpleNamespace(save_total_limit=None)) == \
        (20, 5, None)


def test_load_average_is_strict_but_allows_tied_weights(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(seed=1)
    sd = {k: v.clone() + 1 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert sewa_hf.load_average(model, str(tmp_path)) == len(sd)
    assert torch.equal(model.lm_head.weight, sd["transformer.wte.weight"])
    bad = dict(sd)
    bad.pop("transformer.h.0.mlp.c_fc.weight")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(RuntimeError, match="c_fc"):
        sewa_hf.load_average(model, str(tmp_path / "bad.safetensors"))


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    import transformers
    from test_transformers import make_trainer, evaluator
    from sewa.integrations.transformers import SewaCallback
    import pathlib

    class Boom(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 10:
                raise RuntimeError("the training loop failed")

    cb = SewaCallback(k=2, window=4, max_eval_batches=1, threads=1, evaluator=evaluator())
    out = pathlib.Path(sys.argv[1])
    trainer = make_trainer(out, [cb, Boom()])
    try:
        trainer.train()
    finally:
        print(cb.sidecar.pid if cb.sidecar else -1, flush=True)
""")


def test_a_training_loop_that_raises_leaves_no_daemon(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_ROOT, HERE]))
    child = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), HERE], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 1 and "the training loop failed" in child.stderr, child.stderr
    pid = int(child.stdout.strip().splitlines()[-1])
    assert pid > 0
    wait_for(lambda: not alive(pid), timeout=30, what=f"daemon {pid} gone")
