"""Per-batch backward bounds the evaluator's memory: with loss_fn yielding one term per batch,
the peak resident set of the evaluator process grows by about one batch's activations during
a gradient request; summed into one scalar first, it grows by every batch's.

The figure is the child's own VmHWM (peak RSS, /proc/PID/status) read before and after one
gradient request. 24 batches of 256 rows through a 4096-wide hidden layer: each batch keeps
~8-12 MB of activations for backward, so the summed form needs ~200-300 MB more than the
iterable form."""

import os

import torch
from safetensors.torch import save_file

from _proto import HERE, PYTHON, Evaluator

SCRIPT = os.path.join(HERE, "mlp_eval.py")
# SEWA_TEST_MEM_BATCHES changes the batch count, to measure how the figures scale.
BATCHES = int(os.environ.get("SEWA_TEST_MEM_BATCHES", "24"))
SHAPE = ["--batches", str(BATCHES), "--rows", "256", "--dim", "32", "--hidden", "4096", "--classes", "8"]


def member(tmp_path):
    g = torch.Generator().manual_seed(7)
    w = {"0.weight": torch.randn(4096, 32, generator=g) * 0.1,
         "0.bias": torch.zeros(4096),
         "2.weight": torch.randn(8, 4096, generator=g) * 0.01,
         "2.bias": torch.zeros(8)}
    p = str(tmp_path / "m.safetensors")
    save_file(w, p)
    return [("0", p, "safetensors")]


def growth(form, mem):
    """(KiB the peak RSS grew by during one gradient request, the loss)."""
    with Evaluator([PYTHON, SCRIPT, "--form", form] + SHAPE) as ev:
        ev.hello()
        assert ev.members(mem)["type"] == "ready"
        # A forward-only request first: allocator pools, the autograd engine and the threads
        # are then warm, so the figure below is what the gradient's graph costs.
        assert ev.evaluate({"0": 1.0}, grad=False, rid=1)["type"] == "result"
        before = ev.pid_status("VmHWM")
        r = ev.evaluate({"0": 1.0}, grad=True, rid=2)
        assert r["type"] == "result" and "dots" in r, r
        after = ev.pid_status("VmHWM")
    return after - before, r


def test_per_batch_backward_bounds_peak_memory(tmp_path):
    mem = member(tmp_path)
    summed, a = growth("scalar", mem)
    per_batch, b = growth("iter", mem)
    print(f"peak RSS growth during one gradient request, {BATCHES} batches: summed {summed} KiB, "
          f"per-batch {per_batch} KiB")
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    # One batch's activations (~8-12 MB plus a gradient) against all 24 batches'.
    assert per_batch < 80 * 1024, (summed, per_batch)
    assert summed > 150 * 1024, (summed, per_batch)
    assert summed > 4 * per_batch, (summed, per_batch)
