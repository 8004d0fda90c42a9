"""A fake trainer: writes checkpoints the way real ones do (numpy + safetensors only).

Tensor values are a function of the step, so a test can check any published average from its
manifest alone:  w[i] = step + i / 8,  b[i] = -step / 2 + i,  n = step (int64).

Styles (--style):
  st-rename   safetensors >= 0.8: sparse preallocated hidden temp, slow fill, rename into place
  inplace     torch.save-like: the final name written in place in slow chunks
  rename-in   Lightning: serialised in $TMPDIR (another dir), then moved in (one rename event)
  hf-dir      HF Trainer: checkpoint-N/ filled file by file, trainer_state.json last
  torch-run   a plain PyTorch loop, torch.save in place each save: ckpt_N.pt, optim_N.pt (the
              optimizer's state_dict) and last.pt rewritten at the same path; with --embed-step
              the checkpoints are {"model": sd, "step": N} (written by torch_zip.py, no torch)
Options: --keep N rotates (deletes the oldest) like save_total_limit; --corrupt S,S writes a
truncated file at those steps, --nan S,S writes a NaN; --fixture F writes the bytes of a
real torch.save (.pt) or Lightning (.ckpt) file instead (inplace and rename-in styles); --rewrite S rewrites step S's file in
place (same path, same contents, new inode state: truncate then slow write) and exits. Prints "saved <path>" per checkpoint.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import save

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_zip  # noqa: E402  (stdlib-only torch.save format writer beside this file)

N_W, N_B = 64, 16


def tensors(step, nan=False):
    w = (step + np.arange(N_W, dtype=np.float64) / 8).astype(np.float32).reshape(8, 8)
    if nan:
        w[3, 3] = np.nan
    b = (-step / 2 + np.arange(N_B, dtype=np.float64)).astype(np.float32)
    return {"w": w, "b": b, "n": np.array(step, dtype=np.int64)}


def payload(step, args):
    if args.fixture:  # bytes of a real torch.save / Lightning file (same tensors every step)
        with open(args.fixture, "rb") as f:
            return f.read()
    data = save(tensors(step, nan=step in args.nan), metadata={"eval_loss": str(1000.0 / step)})
    if step in args.corrupt:
        data = data[: len(data) - 40]  # truncated: the header promises more bytes
    return data


def slow_write(f, data, chunks, chunk_ms):
    step = max(1, len(data) // chunks)
    for off in range(0, len(data), step):
        f.write(data[off : off + step])
        f.flush()
        time.sleep(chunk_ms / 1000)


def ext(args):
    return os.path.splitext(args.fixture)[1] if args.fixture else ".safetensors"


def save_st_rename(d, step, args):
    data = payload(step, args)
    final = os.path.join(d, f"model_step_{step}.safetensors")
    fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=d)
    with os.fdopen(fd, "r+b") as f:
        f.truncate(len(data))  # sparse, full size, zeros: must never be validated
        time.sleep(args.chunk_ms / 1000)
        slow_write(f, data, args.chunks, args.chunk_ms)
    os.rename(tmp, final)
    return final


def save_inplace(d, step, args):
    final = os.path.join(d, f"ckpt_step_{step}{ext(args)}")
    with open(final, "wb") as f:
        slow_write(f, payload(step, args), args.chunks, args.chunk_ms)
    return final


def save_rename_in(d, step, args, tmpdir):
    staged = os.path.join(tmpdir, f"epoch=0-step={step}{ext(args)}")
    with open(staged, "wb") as f:
        slow_write(f, payload(step, args), args.chunks, args.chunk_ms)
    final = os.path.join(d, os.path.basename(staged))
    shutil.move(staged, final)
    return final


def save_hf_dir(d, step, args):
    cdir = os.path.join(d, f"checkpoint-{step}")
    os.mkdir(cdir)
    files = [
        ("model.safetensors", payload(step, args)),
        ("config.json", json.dumps({"model_type": "toy"}).encode()),
        ("optimizer.pt", os.urandom(4096)),
        ("scheduler.pt", os.urandom(512)),
    ]
    for name, data in files:
        with open(os.path.join(cdir, name), "wb") as f:
            slow_write(f, data, max(1, args.chunks // 2), args.chunk_ms)
    state = {"global_step": step, "log_history": [{"step": step, "eval_loss": 1000.0 / step}]}
    with open(os.path.join(cdir, "trainer_state.json"), "w") as f:
        json.dump(state, f)
    return cdir


def save_torch_run(d, step, args):
    sd = torch_zip.model(step)
    obj = {"model": sd, "step": step} if args.embed_step else sd
    ckpt = os.path.join(d, f"ckpt_{step}.pt")
    files = [
        (ckpt, torch_zip.dumps(obj)),
        (os.path.join(d, f"optim_{step}.pt"), torch_zip.dumps(torch_zip.optimizer(step))),
        (os.path.join(d, "last.pt"), torch_zip.dumps(obj)),  # "wb": truncated, same inode
    ]
    for path, data in files:
        with open(path, "wb") as f:
            slow_write(f, data, args.chunks, args.chunk_ms)
    return ckpt


def rotate(saved, keep):
    while keep and len(saved) > keep:
        old = saved.pop(0)
        if os.path.isdir(old):
            shutil.rmtree(old)
        elif os.path.exists(old):
            os.remove(old)
        print(f"deleted {old}", flush=True)


def rewrite(path, step, args):
    """Rewrite in place at the same path (truncate, then write): the SIGBUS hazard."""
    with open(path, "r+b") as f:
        f.truncate(0)
        slow_write(f, payload(step, args), args.chunks, args.chunk_ms)


def steps_arg(s):
    return {int(x) for x in s.split(",") if x}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--style", required=True, choices=["st-rename", "inplace", "rename-in", "hf-dir", "torch-run"])
    p.add_argument("--steps", default="100,200,300,400,500,600")
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--chunk-ms", type=int, default=60)
    p.add_argument("--keep", type=int, default=0)
    p.add_argument("--corrupt", type=steps_arg, default=set())
    p.add_argument("--nan", type=steps_arg, default=set())
    p.add_argument("--rewrite", type=int, default=0)
    p.add_argument("--fixture", default="", help="write this file's bytes (inplace, rename-in)")
    p.add_argument("--embed-step", action="store_true", help="torch-run: {model, step} dicts")
    args = p.parse_args()
    if args.rewrite:
        names = [n for n in os.listdir(args.dir) if f"_{args.rewrite}." in n or n.endswith(f"-{args.rewrite}")]
        path = os.path.join(args.dir, names[0])
        rewrite(path, args.rewrite, args)
        print(f"rewrote {path}", flush=True)
        return 0
    tmpdir = tempfile.mkdtemp(prefix="sewa-writer-")
    saved = []
    for step in [int(s) for s in args.steps.split(",")]:
        if args.style == "st-rename":
            path = save_st_rename(args.dir, step, args)
        elif args.style == "inplace":
            path = save_inplace(args.dir, step, args)
        elif args.style == "rename-in":
            path = save_rename_in(args.dir, step, args, tmpdir)
        elif args.style == "torch-run":
            path = save_torch_run(args.dir, step, args)
        else:
            path = save_hf_dir(args.dir, step, args)
        print(f"saved {path}", flush=True)
        saved.append(path)
        rotate(saved, args.keep)
        time.sleep(args.interval_ms / 1000)
    shutil.rmtree(tmpdir, ignore_errors=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
