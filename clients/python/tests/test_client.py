"""The evaluator client (sewa_evaluator) driven over the protocol by real child processes:
per-batch backward (loss_fn returning an iterable of terms) answers what the one-scalar form
answers, forward-only and under torchrun too; the on_members hook sees what sewa adds."""

import math
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from _proto import HERE, PYTHON, Evaluator, env

SCRIPT = os.path.join(HERE, "mlp_eval.py")


def members(tmp_path, n=3, dim=8, hidden=16, classes=4):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        w = {"0.weight": torch.randn(hidden, dim, generator=g) * 0.5,
             "0.bias": torch.randn(hidden, generator=g) * 0.1,
             "2.weight": torch.randn(classes, hidden, generator=g) * 0.5,
             "2.bias": torch.randn(classes, generator=g) * 0.1}
        p = str(tmp_path / f"m{i}.safetensors")
        save_file(w, p)
        out.append((str(i), p, "safetensors"))
    return out


def run(argv, mem, requests):
    with Evaluator(argv) as ev:
        ev.hello()
        r = ev.members(mem)
        assert r == {"type": "ready", "members": len(mem)}, r
        return [ev.evaluate(w, grad=g, rid=i) for i, (w, g) in enumerate(requests)]


ALPHAS = [({"0": 0.5, "1": 0.25, "2": 0.25}, True), ({"1": 1.0}, True),
          ({"0": 0.3, "2": 0.7}, False)]


def close(a, b):
    assert a["type"] == b["type"] == "result", (a, b)
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    assert ("dots" in a) == ("dots" in b), (a, b)
    for k in a.get("dots", {}):
        assert math.isclose(a["dots"][k], b["dots"][k], rel_tol=1e-4, abs_tol=1e-6), (k, a, b)


@pytest.mark.parametrize("form", ["iter", "list"])
def test_iterable_terms_answer_what_the_scalar_answers(tmp_path, form):
    mem = members(tmp_path)
    base = [PYTHON, SCRIPT, "--uneven"]
    scalar = run(base + ["--form", "scalar"], mem, ALPHAS)
    terms = run(base + ["--form", form], mem, ALPHAS)
    for a, b in zip(scalar, terms):
        close(a, b)
    assert "dots" in terms[0] and "dots" not in terms[2]
    assert len(terms[0]["dots"]) == 3 and any(v != 0 for v in terms[0]["dots"].values())


def test_forward_only_evaluator_with_terms(tmp_path):
    mem = members(tmp_path)
    base = [PYTHON, SCRIPT]
    scalar = run(base + ["--form", "scalar"], mem, [(ALPHAS[0][0], False)])
    terms = run(base + ["--form", "iter", "--no-grad"], mem, [(ALPHAS[0][0], True)])
    # grad=False: the hello says so and a request asking for grad gets the loss alone.
    close(scalar[0], terms[0])


def test_terms_without_gradient_are_refused(tmp_path):
    # A loss that does not depend on the weights through autograd: the client says why.
    mem = members(tmp_path)
    script = tmp_path / "cut.py"
    script.write_text(
        "import torch, sewa_evaluator\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "def loss_fn(w):\n"
        "    return ((p * float(w['0.bias'].sum())).sum() for _ in range(3))\n"
        "sewa_evaluator.serve(loss_fn)\n")
    res = run([PYTHON, str(script)], mem, [(ALPHAS[0][0], True)])
    assert res[0]["type"] == "error" and "no weight received a gradient" in res[0]["message"]


def test_torchrun_shards_terms_like_one_process(tmp_path):
    if shutil.which("torchrun", path=os.path.dirname(PYTHON)) is None:
        pytest.skip("no torchrun beside this Python")
    mem = members(tmp_path)
    base = ["--uneven", "--batches", "5"]
    one = run([PYTHON, SCRIPT, "--form", "scalar"] + base, mem, ALPHAS)
    two = run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               SCRIPT, "--form", "iter"] + base, mem, ALPHAS)
    for a, b in zip(one, two):
        close(a, b)


def test_on_members_hook_sees_added_and_can_refuse(tmp_path):
    mem = members(tmp_path)
    script = tmp_path / "hook.py"
    script.write_text(
        "import sys, torch, sewa_evaluator\n"
        "def hook(added):\n"
        "    print('HOOK', added, file=sys.stderr, flush=True)\n"
        "    if any(i == '2' for i, _, _ in added):\n"
        "        raise ValueError('member 2 refused')\n"
        "def loss_fn(w):\n"
        "    return w['0.bias'].sum()\n"
        "sewa_evaluator.serve(loss_fn, on_members=hook)\n")
    with Evaluator([PYTHON, str(script)]) as ev:
        ev.hello()
        assert ev.members(mem[:2]) == {"type": "ready", "members": 2}
        r = ev.members(mem[2:])
        assert r["type"] == "error" and "member 2 refused" in r["message"], r
        # Nothing changed: still the first two.
        r = ev.evaluate({"0": 1.0}, rid=5)
        assert r["type"] == "result", r
        assert ev.members([], remove=["1"]) == {"type": "ready", "members": 1}
        err = ev.stderr()
    assert f"HOOK [('0', '{mem[0][1]}', 'safetensors'), ('1', '{mem[1][1]}', 'safetensors')]" \
        in err, err
    assert err.count("HOOK") == 2  # not called for a message that adds nothing


def test_shard_weight_is_the_share_of_the_total():
    code = ("import sewa_evaluator as s\n"
            "d = [3, 1, 1, 1]\n"
            "print(s.shard(d, weight=lambda x: x), s._shard_weight['w'])\n")
    outs = [subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True,
                           env=env({"RANK": str(r), "WORLD_SIZE": "2"})).stdout.strip()
            for r in (0, 1)]
    assert outs == ["[3, 1] 0.6666666666666666", "[1, 1] 0.3333333333333333"], outs
