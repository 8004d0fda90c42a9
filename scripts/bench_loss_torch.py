#!/usr/bin/env python3
"""PyTorch's cost for what one builtin-objective oracle call of sewa does, as the bar for it.

    python scripts/bench_loss_torch.py [--threads N] [--reps R] DATA CKPT [MEMBER ...]

DATA is a selection-data file (`inputs` f32 [N, D], `targets` class ids), CKPT an MLP checkpoint
(`net.0.weight`, `net.0.bias`, ... as nn.Sequential saves them, ReLU between layers); both as
`examples/bench_loss.rs` writes them (it runs this script). Prints, per call over R calls, the median wall time and the mean CPU time of:
  torch forward+backward   mean cross-entropy over all rows, gradient w.r.t. every weight
  torch mix+fwd+bwd+dots   the same plus, given MEMBERs, the mix of all members and the K dot
                           products <G, w_i> (members held in memory as torch tensors)
Exits 1 with a message on stderr when torch is not installed.
"""

import argparse
import statistics
import sys
import time

try:
    import torch
    from safetensors.torch import load_file
except ImportError as e:  # the Rust bench prints this line and goes on without torch
    sys.exit(f"torch not installed: {e}")


def mlp_from(state):
    """The nn.Sequential (Linear, ReLU, ..., Linear) whose state dict is `state`."""
    idx = sorted({int(k.split(".")[1]) for k in state if k.endswith(".weight")})
    layers = []
    for n, i in enumerate(idx):
        out_f, in_f = state[f"net.{i}.weight"].shape
        layers.append(torch.nn.Linear(in_f, out_f))
        if n + 1 < len(idx):
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    model.load_state_dict({f"{2 * n}.{k.split('.')[2]}": state[k]
                           for n, i in enumerate(idx) for k in (f"net.{i}.weight", f"net.{i}.bias")})
    return model


def measure(reps, f):
    """Median wall time and mean CPU time (all threads) per call, in ms, as the Rust bench."""
    f()
    f()
    times = []
    cpu0 = time.process_time_ns()
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    cpu = (time.process_time_ns() - cpu0) / 1e6 / reps
    return f"wall {statistics.median(times):7.3f} ms  cpu {cpu:7.3f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("data")
    ap.add_argument("ckpt")
    ap.add_argument("members", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = load_file(a.data)
    x, y = d["inputs"], d["targets"].long()
    model = mlp_from(load_file(a.ckpt))
    params = list(model.parameters())

    def fwd_bwd():
        for p in params:
            p.grad = None
        torch.nn.functional.cross_entropy(model(x), y).backward()

    print(f"torch {torch.__version__}, {a.threads} thread(s), {x.shape[0]} rows")
    print(f"  torch forward+backward           {measure(a.reps, fwd_bwd)}")
    if not a.members:
        return
    members = [load_file(m) for m in a.members]
    stacked = {n: torch.stack([m[f"net.{n}"] for m in members])
               for n in (k[len("net."):] for k in members[0])}
    mask = torch.linspace(0.2, 0.8, len(members))
    coeff = mask / mask.sum()
    names = {f"{2 * (i // 2)}.{'weight' if i % 2 == 0 else 'bias'}": p for i, p in enumerate(params)}

    def full():
        with torch.no_grad():
            for n, p in names.items():
                shape = (-1,) + (1,) * (stacked[n].dim() - 1)
                p.copy_((stacked[n] * coeff.view(shape)).sum(0))
        fwd_bwd()
        with torch.no_grad():
            sum(torch.einsum("k...,...->k", stacked[n], p.grad) for n, p in names.items())

    print(f"  torch mix+fwd+bwd+dots           {measure(a.reps, full)}")


if __name__ == "__main__":
    main()
