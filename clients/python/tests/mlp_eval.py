"""Test evaluator for the client: a 2-layer MLP's mean cross-entropy over held-out batches made
from a seed, served either as one scalar (every batch's graph alive until the one backward) or
as an iterable of per-batch terms (per-batch backward).

usage: mlp_eval.py --form scalar|iter|list [--batches N] [--rows R] [--dim D] [--hidden H]
                   [--classes C] [--uneven] [--grad|--no-grad] [--shard-members]
--uneven gives batch i (i % 3 + 1) * R rows, so a mean over batches is not a mean over rows.
--shard-members serves with shard_members=True (each rank holds a slice of every member).
Under torchrun each rank takes its share of the batches (sewa_evaluator.shard, weighted by rows).
"""

import argparse

import torch

import sewa_evaluator


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--form", choices=["scalar", "iter", "list"], required=True)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--uneven", action="store_true")
    ap.add_argument("--no-grad", dest="grad", action="store_false")
    ap.add_argument("--shard-members", action="store_true")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(1234)
    data = []
    for i in range(args.batches):
        n = args.rows * ((i % 3) + 1 if args.uneven else 1)
        data.append((torch.randn(n, args.dim, generator=g),
                     torch.randint(0, args.classes, (n,), generator=g)))
    data = sewa_evaluator.shard(data, weight=lambda b: len(b[1]))
    rows = sum(len(y) for _, y in data)

    def term(w, x, y):
        h = torch.relu(x @ w["0.weight"].T + w["0.bias"])
        out = h @ w["2.weight"].T + w["2.bias"]
        return torch.nn.functional.cross_entropy(out, y, reduction="sum") / rows

    def loss_fn(w):
        if args.form == "scalar":
            return sum(term(w, x, y) for x, y in data)
        if args.form == "list":
            return [term(w, x, y) for x, y in data]
        return (term(w, x, y) for x, y in data)

    sewa_evaluator.serve(loss_fn, grad=args.grad, name=f"mlp_eval {args.form}",
                         shard_members=args.shard_members)


if __name__ == "__main__":
    main()
