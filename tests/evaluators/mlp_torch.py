"""Torch evaluator for sewa's tests: the MLP of mlp_numpy.py (nn.Sequential layout, ReLU,
mean cross-entropy) through torch.func.functional_call, gradients by autograd. Under torchrun
each rank evaluates its shard of the rows (sewa_evaluator.shard).

usage: mlp_torch.py DATA.safetensors [--protocol N] [--device DEV] [--float32]
--float32 computes in float32 (the benchmark) instead of float64 (the tests' tolerance).
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))

import torch
from safetensors.torch import load_file

import sewa_evaluator


def layers(weights):
    names = [n for n in weights if n.endswith(".weight") and weights[n].ndim == 2]
    index = lambda n: [int(x) for x in re.findall(r"\d+", n)]
    return [(n, n[: -len("weight")] + "bias") for n in sorted(names, key=index)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--protocol", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--float32", action="store_true")
    args = ap.parse_args()
    dt = torch.float32 if args.float32 else torch.float64
    data = load_file(args.data)
    x = sewa_evaluator.shard(data["inputs"]).to(dt).to(args.device)
    y = sewa_evaluator.shard(data["targets"]).long().to(args.device)

    def loss_fn(w):
        h = x
        order = layers(w)
        for i, (wn, bn) in enumerate(order):
            h = h @ w[wn].to(dt).T + w[bn].to(dt)
            if i + 1 < len(order):
                h = torch.relu(h)
        return torch.nn.functional.cross_entropy(h, y)

    sewa_evaluator.serve(loss_fn, name="mlp_torch", device=args.device, protocol=args.protocol)


if __name__ == "__main__":
    main()
