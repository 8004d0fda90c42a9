"""Members held sharded across ranks, driven over the protocol by real child processes: a 2-rank
gloo torchrun on CPU, with plain per-rank slices (`serve(..., shard_members=True)`) or an FSDP2
module's shards (`serve(..., module=m)`), answers the losses and dots that one process holding
whole members answers, and each rank holds ~1/2 of the members' bytes."""

import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from _proto import HERE, PYTHON, Evaluator

SCRIPT = os.path.join(HERE, "mlp_eval.py")
DIM, HIDDEN, CLASSES = 8, 33, 3  # odd sizes: slices that need padding


def members(tmp_path, n=3):
    out, total = [], 0
    for i in range(n):
        g = torch.Generator().manual_seed(200 + i)
        w = {"0.weight": torch.randn(HIDDEN, DIM, generator=g) * 0.5,
             "0.bias": torch.randn(HIDDEN, generator=g) * 0.1,
             "2.weight": torch.randn(CLASSES, HIDDEN, generator=g) * 0.5,
             "2.bias": torch.randn(CLASSES, generator=g) * 0.1,
             # Not floating: held whole by every rank, taken from the `ints` member.
             "step": torch.tensor([1000 + i], dtype=torch.int64)}
        total += sum(t.numel() * t.element_size() for t in w.values())
        p = str(tmp_path / f"m{i}.safetensors")
        save_file(w, p)
        out.append((str(i), p, "safetensors"))
    return out, total


ALPHAS = [({"0": 0.5, "1": 0.25, "2": 0.25}, True), ({"1": 1.0}, True),
          ({"0": 0.3, "2": 0.7}, False), ({"0": -0.5, "1": 1.5}, True)]


def run(argv, mem, requests, remove_then=None):
    """The replies to `requests`; then, if given, the replies after removing members
    `remove_then`; and the evaluator's stderr."""
    with Evaluator(argv) as ev:
        ev.hello()
        r = ev.members(mem)
        assert r == {"type": "ready", "members": len(mem)}, (r, ev.stderr())
        out = [ev.evaluate(w, grad=g, rid=i) for i, (w, g) in enumerate(requests)]
        if remove_then is not None:
            r = ev.members([], remove=remove_then)
            assert r["type"] == "ready", (r, ev.stderr())
            out.append(ev.evaluate({"2": 1.0}, rid=99))
        return out, ev.stderr()


def close(a, b):
    assert a["type"] == b["type"] == "result", (a, b)
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    assert ("dots" in a) == ("dots" in b), (a, b)
    assert set(a.get("dots", {})) == set(b.get("dots", {})), (a, b)
    for k in a.get("dots", {}):
        assert math.isclose(a["dots"][k], b["dots"][k], rel_tol=1e-4, abs_tol=1e-6), (k, a, b)


def held_bytes(stderr):
    """{rank: bytes held} from the client's log line after the first `members` message."""
    out = {}
    for m in re.finditer(r"holding \d+ \((\d+) bytes(?: on rank (\d+))?\)", stderr):
        out.setdefault(int(m.group(2) or 0), int(m.group(1)))
    return out


def torchrun(n):
    if shutil.which("torchrun", path=os.path.dirname(PYTHON)) is None:
        pytest.skip("no torchrun beside this Python")
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]


def test_two_sharded_ranks_answer_what_one_whole_process_answers(tmp_path):
    mem, total = members(tmp_path)
    base = [SCRIPT, "--uneven", "--batches", "5", "--hidden", str(HIDDEN),
            "--classes", str(CLASSES)]
    one, one_err = run([PYTHON] + base + ["--form", "scalar"], mem, ALPHAS, remove_then=["0"])
    two, two_err = run(torchrun(2) + base + ["--form", "iter", "--shard-members"], mem, ALPHAS,
                       remove_then=["0"])
    for a, b in zip(one, two):
        close(a, b)
    assert len(two[0]["dots"]) == 3 and any(v != 0 for v in two[0]["dots"].values())
    assert set(two[-1]["dots"]) == {"1", "2"}

    # Memory: each rank holds its half of every floating tensor (a slice padded to ceil(n/2)
    # elements) plus the small int tensors whole; the whole process holds everything.
    assert held_bytes(one_err) == {0: total}, one_err
    per_rank = held_bytes(two_err)
    assert set(per_rank) == {0, 1}, two_err
    ints = 3 * 8
    pad = 3 * 4 * 4  # at most one float32 element of padding per tensor and member
    for rank, b in per_rank.items():
        assert (total - ints) / 2 + ints <= b <= (total - ints) / 2 + ints + pad, (rank, b, total)
    print(f"held bytes: one process {total}; per rank with 2 ranks {per_rank}")


def test_one_process_sharded_is_whole(tmp_path):
    # shard_members=True without torchrun: one slice of everything, the same answers.
    mem, total = members(tmp_path)
    base = [SCRIPT, "--hidden", str(HIDDEN), "--classes", str(CLASSES), "--form", "list"]
    whole, _ = run([PYTHON] + base, mem, ALPHAS)
    sharded, err = run([PYTHON] + base + ["--shard-members"], mem, ALPHAS)
    for a, b in zip(whole, sharded):
        close(a, b)
    assert held_bytes(err) == {0: total}, err


def test_a_rank_that_fails_gives_one_error_and_the_ranks_keep_serving(tmp_path):
    # Rank 1's loss_fn raises on the first request only: that request gets one error reply (no
    # rank stuck in the gradient's all_reduce), the next one a result.
    mem, _ = members(tmp_path)
    script = tmp_path / "flaky.py"
    script.write_text(
        "import os, torch, sewa_evaluator\n"
        "calls = [0]\n"
        "x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))\n"
        "def loss_fn(w):\n"
        "    calls[0] += 1\n"
        "    if os.environ['RANK'] == '1' and calls[0] == 1:\n"
        "        raise RuntimeError('rank 1 fails once')\n"
        "    return (torch.relu(x @ w['0.weight'].T + w['0.bias'])).square().mean()\n"
        "sewa_evaluator.serve(loss_fn, shard_members=True)\n")
    res, err = run(torchrun(2) + [str(script)], mem, ALPHAS[:2])
    assert res[0]["type"] == "error", (res, err)
    assert res[1]["type"] == "result" and len(res[1]["dots"]) == 3, (res, err)


FSDP_EVAL = """
import torch, torch.distributed as dist, sewa_evaluator
from torch.distributed.fsdp import fully_shard

# mlp_eval.py's held-out data (--uneven, 4 batches): the same generator calls in the same order.
g = torch.Generator().manual_seed(1234)
data = []
for i in range(4):
    n = 16 * (i % 3 + 1)
    data.append((torch.randn(n, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)))
data = sewa_evaluator.shard(data, weight=lambda b: len(b[1]))
rows = sum(len(y) for _, y in data)
dist.init_process_group("gloo")
model = torch.nn.Sequential(torch.nn.Linear(8, HIDDEN), torch.nn.ReLU(),
                            torch.nn.Linear(HIDDEN, CLASSES))
fully_shard(model[0])
fully_shard(model[2])
fully_shard(model)

def loss_fn(weights):  # the module's own (mixed) parameters: weights is not needed
    for x, y in data:
        yield torch.nn.functional.cross_entropy(model(x), y, reduction="sum") / rows

sewa_evaluator.serve(loss_fn, module=model)
"""


def test_fsdp2_module_shards_answer_what_one_whole_process_answers(tmp_path):
    mem, total = members(tmp_path)
    script = tmp_path / "fsdp_eval.py"
    script.write_text(f"HIDDEN, CLASSES = {HIDDEN}, {CLASSES}\n" + FSDP_EVAL)
    one, _ = run([PYTHON, SCRIPT, "--uneven", "--batches", "4", "--hidden", str(HIDDEN),
                  "--classes", str(CLASSES), "--form", "scalar"], mem, ALPHAS, remove_then=["0"])
    two, err = run(torchrun(2) + [str(script)], mem, ALPHAS, remove_then=["0"])
    for a, b in zip(one, two):
        close(a, b)
    # FSDP2 chunks dim 0: rank 0 holds ceil(rows / 2) rows of each parameter, rank 1 the rest.
    per_rank = held_bytes(err)
    assert set(per_rank) == {0, 1}, err
    ints = 3 * 8
    assert sum(per_rank.values()) == (total - ints) + 2 * ints, (per_rank, total)
    for b in per_rank.values():
        assert b <= (total - ints) * 0.6 + ints, (per_rank, total)
    print(f"FSDP2 held bytes: one process {total}; per rank with 2 ranks {per_rank}")
