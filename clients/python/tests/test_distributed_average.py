"""`sewa average --distributed` launched by the real torchrun (`--no-python`, one sewa process
per rank): the sharded output loads with transformers' `from_pretrained`, equals sewa's
single-process average bit for bit, and equals torch's own weighted mean of the inputs.

Run: PYTHONPATH=clients/python SEWA_BIN=target/debug/sewa python -m pytest \
    clients/python/tests/test_distributed_average.py -q
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

PYTHON = sys.executable


def sewa_bin():
    if os.environ.get("SEWA_BIN"):
        return os.path.abspath(os.environ["SEWA_BIN"])
    import sewa

    return sewa.binary()


def checkpoints(root, n=3):
    """`n` GPT-2 checkpoints as the Trainer saves them, with different weights."""
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)
    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        model = transformers.GPT2LMHeadModel(cfg)
        d = root / f"checkpoint-{(i + 1) * 100}"
        model.save_pretrained(d)
        dirs.append(d)
    return dirs


def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(d / f))
    return out


def test_torchrun_ranks_publish_the_single_process_average(tmp_path):
    if shutil.which("torchrun", path=os.path.dirname(PYTHON)) is None:
        pytest.skip("no torchrun beside this Python")
    ins = [str(d) for d in checkpoints(tmp_path)]
    weights = ["--weights", "1,2,5"]
    shard = ["--max-shard-size", "100KiB"]
    single = tmp_path / "single"
    r = subprocess.run([sewa_bin(), "average", *weights, *shard, "--out", str(single), *ins],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "avg"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           "--no-python", sewa_bin(), "average", "--distributed", *weights, *shard,
           "--out", str(out), *ins]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["distributed"]["world_size"] == 3
    assert len(manifest["distributed"]["ranks"]) == 3
    got, want = tensors(out), tensors(single)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k

    # What users load: the sharded directory through its index, equal to torch's weighted mean.
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    members = [transformers.GPT2LMHeadModel.from_pretrained(d).state_dict() for d in ins]
    w = torch.tensor([1.0, 2.0, 5.0]) / 8
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            mean = sum(wi * m[k].double() for wi, m in zip(w.double(), members))
            torch.testing.assert_close(v.double(), mean, rtol=1e-6, atol=1e-7, msg=k)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".sewa-dist")]
