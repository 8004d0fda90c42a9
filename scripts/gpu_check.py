#!/usr/bin/env python3
"""GPU check for the generic HF evaluator (issue 21 item 6): one short run, on a machine with
a CUDA device, of `python -m sewa.evaluators.hf` over the evaluator protocol, timing each
oracle call (loss + K dot products) on the CPU, on `cuda` with the members on the device, and
on `cuda` with the members in pinned host memory. Nothing in the project depends on it.

    python scripts/gpu_check.py [--layers 4] [--hidden 512] [--members 4] [--calls 5]

It needs torch, transformers and the `sewa` Python package (PYTHONPATH=clients/python from a
checkout, or `pip install .`); no sewa binary, no hub access: the model is built from a config.
Prints one table (median and worst seconds per call, peak CUDA memory) and exits 0; exits 2 when
no CUDA device is visible.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def members(tmp, args):
    """K checkpoint dirs of one GPT-2-shaped model with different weights, and a batches file."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sewa.evaluators import _batches

    cfg = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=8, vocab_size=8192,
                     n_positions=args.seq, bos_token_id=0, eos_token_id=0)
    paths = []
    for i in range(args.members):
        torch.manual_seed(i)
        model = GPT2LMHeadModel(cfg)
        path = os.path.join(tmp, f"checkpoint-{100 * (i + 1)}")
        model.save_pretrained(path)
        paths.append(path)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    data = os.path.join(tmp, "batches.pt")
    _batches.save(data, batches)
    params = sum(p.numel() for p in model.parameters())
    return paths, data, params


def run(paths, data, device, members_on, calls):
    """Per-call seconds of one evaluator process (after its start and the members' load)."""
    cmd = [sys.executable, "-m", "sewa.evaluators.hf", "--batches", data, "--device", device,
           "--members-on", members_on, "--config-dir", paths[0]]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         bufsize=1)

    def ask(msg):
        p.stdin.write(json.dumps(msg) + "\n")
        p.stdin.flush()
        reply = json.loads(p.stdout.readline())
        if reply.get("type") == "error":
            raise RuntimeError(f"{device}/{members_on}: {reply['message']}")
        return reply

    try:
        ask({"type": "hello", "protocol": 2, "protocols": [1, 2]})
        t = time.perf_counter()
        ask({"type": "members", "add": [{"id": str(i), "path": path, "format": "hf-dir"}
                                        for i, path in enumerate(paths)], "remove": []})
        load_s = time.perf_counter() - t
        k = len(paths)
        times = []
        for c in range(calls):
            w = {str(i): 1.0 / k for i in range(k)}
            t = time.perf_counter()
            reply = ask({"type": "evaluate", "id": c, "weights": w, "grad": True,
                         "ints": str(k - 1)})
            times.append(time.perf_counter() - t)
            assert reply["loss"] is not None and len(reply["dots"]) == k, reply
        return load_s, times, reply["loss"]
    finally:
        p.stdin.close()
        p.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--cpu", action="store_true", help="run the CPU row only (no GPU needed)")
    args = ap.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        paths, data, params = members(tmp, args)
        print(f"model: GPT-2 shape, {params / 1e6:.1f}M parameters, {args.members} members, "
              f"{args.batches} batches of {args.batch}x{args.seq} tokens; torch "
              f"{torch.__version__}"
              + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
        rows = [("cpu", "device")] if args.cpu else [("cpu", "device"), ("cuda", "device"),
                                                     ("cuda", "cpu")]
        print("| device | members on | load s | median s/call | worst s/call | loss |")
        print("|---|---|---|---|---|---|")
        for device, on in rows:
            load_s, times, loss = run(paths, data, device, on, args.calls)
            print(f"| {device} | {'pinned host' if on == 'cpu' and device != 'cpu' else on} | "
                  f"{load_s:.2f} | {statistics.median(times):.3f} | {max(times):.3f} | "
                  f"{loss:.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
