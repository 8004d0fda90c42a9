"""Numpy-only evaluator for sewa's tests: an MLP (nn.Sequential layout: net.0.weight [out, in],
net.0.bias, activation between layers) with mean cross-entropy on held-out data, gradients by
hand-written backprop. It must agree with sewa's builtin candle objective on the same files.

usage: mlp_numpy.py DATA.safetensors [--mode MODE] [--protocol N]
--protocol caps the protocol version the client speaks (1: candidate files; 2: mixing weights).
MODE (for failure tests): ok | forward-only | crash-after-1 | hang | garbage | nan | version
      zero-grad: the true loss with an all-zero gradient (a broken autograd that sends zeros)
      no-grad: the true loss with no gradient for any weight (the client must refuse it)
      constant: loss 1.0 and zero gradients, to time the protocol alone (examples/bench_evaluator.rs)
      count-ints: the true loss plus the sum of every integer tensor sent (which member's
            integer buffers a protocol 2 mixture carries)
      echo: protocol 2 by hand, loading nothing and answering loss 1.0 and zero ∂F/∂α at once:
            the protocol's own cost per request (examples/bench_evaluator.rs)
"""

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))

import numpy as np
from safetensors.numpy import load_file

import sewa_evaluator


def layers(weights):
    """(weight, bias) names ordered by the layer index in the name, as nn.Sequential saves them."""
    names = [n for n in weights if n.endswith(".weight") and weights[n].ndim == 2]
    index = lambda n: [int(x) for x in re.findall(r"\d+", n)]
    return [(n, n[: -len("weight")] + "bias") for n in sorted(names, key=index)]


def loss_and_grad(weights, x, y):
    acts, h = [], x.astype(np.float64)
    order = layers(weights)
    for i, (wn, bn) in enumerate(order):
        z = h @ weights[wn].astype(np.float64).T + weights[bn].astype(np.float64)
        acts.append((h, z))
        h = np.maximum(z, 0.0) if i + 1 < len(order) else z
    logits = h - h.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    n = x.shape[0]
    loss = -logp[np.arange(n), y].mean()
    d = np.exp(logp)
    d[np.arange(n), y] -= 1.0
    d /= n
    grads = {}
    for i in reversed(range(len(order))):
        wn, bn = order[i]
        h_in, z = acts[i]
        if i + 1 < len(order):
            d = d * (z > 0)
        grads[wn] = d.T @ h_in
        grads[bn] = d.sum(axis=0)
        d = d @ weights[wn].astype(np.float64)
    return loss, grads


def echo():
    import json

    held = set()
    for line in sys.stdin:
        req = json.loads(line)
        kind = req.get("type")
        if kind == "hello":
            reply = {"type": "hello", "protocol": 2, "grad": True, "mix": True,
                     "formats": ["safetensors"], "name": "echo"}
        elif kind == "members":
            held |= {a["id"] for a in req["add"]}
            held -= set(req["remove"])
            reply = {"type": "ready", "members": len(held)}
        elif kind == "evaluate":
            reply = {"type": "result", "id": req["id"], "loss": 1.0, "dots": {i: 0.0 for i in held}}
        else:
            break
        print(json.dumps(reply), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--mode", default="ok")
    ap.add_argument("--protocol", type=int, default=None)
    args = ap.parse_args()
    data = load_file(args.data)
    x, y = data["inputs"], data["targets"].astype(np.int64)
    calls = {"n": 0}

    if args.mode == "version":
        # Bypass the client's negotiation: insist on a version sewa does not speak.
        sys.stdin.readline()
        print('{"type": "hello", "protocol": 99, "grad": true}', flush=True)
        time.sleep(60)
        return
    if args.mode == "echo":
        echo()
        return
    if args.mode == "garbage":
        # Bypass the client: answer the hello, then print junk.
        sys.stdin.readline()
        print('{"type": "hello", "protocol": 1, "grad": true}', flush=True)
        sys.stdin.readline()
        print("this is not json", flush=True)
        time.sleep(60)
        return

    def loss_fn(w):
        calls["n"] += 1
        print(f"evaluating candidate {calls['n']}", file=sys.stderr, flush=True)
        if args.mode == "crash-after-1" and calls["n"] > 1:
            print("simulated crash", file=sys.stderr, flush=True)
            os._exit(3)
        if args.mode == "hang":
            time.sleep(3600)
        if args.mode == "nan":
            return float("nan")
        if args.mode == "constant":
            return 1.0, {n: np.zeros_like(t) for n, t in w.items()}
        loss, grads = loss_and_grad(w, x, y)
        if args.mode == "count-ints":
            loss += sum(float(t.sum()) for t in w.values() if t.dtype.kind in "iu")
        if args.mode == "forward-only":
            return float(loss)
        if args.mode == "zero-grad":
            return loss, {n: np.zeros_like(t) for n, t in w.items()}
        if args.mode == "no-grad":
            return loss, {n: None for n in w}
        return loss, grads

    sewa_evaluator.serve(loss_fn, framework="numpy", grad=args.mode != "forward-only",
                         name="mlp_numpy", protocol=args.protocol)


if __name__ == "__main__":
    main()
