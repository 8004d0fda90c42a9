#!/usr/bin/env python3
"""Write the torch.distributed.checkpoint (DCP) fixtures in tests/fixtures/dcp/ (run once; the
outputs are committed, a few hundred KB in all).

Needs PyTorch and safetensors:  /tmp/torchenv/bin/python scripts/make_dcp_fixtures.py
It starts itself again under `torchrun --nproc_per_node 2` (gloo, CPU) for the sharded ones.
The tests never need torch: they read these directories and compare what sewa makes of them
with the safetensors files torch computed here (expected/).

Directories:
  accelerate/checkpoint-10/pytorch_model_fsdp_0/
                                     single-process dcp.save({"model": sd}) (Accelerate's layout,
                                     inside an HF Trainer checkpoint with trainer_state.json)
  torchtitan/step-10/, step-20/      2 processes, DTensors sharded on dim 0 (uneven), dim 1 and
                                     replicated; model FQNs at the top level beside optimizer
                                     (sharded exp_avg), lr_scheduler, dataloader, train_state
  lightning/epoch=0-step=5.ckpt/, epoch=0-step=10.ckpt/
                                     single process, keys model.<fqn> and optimizer_0.*, plus
                                     meta.pt (Lightning's FSDP sharded checkpoint)
  errors/transformed/                step-10 with a transform descriptor on one item
  errors/escape/                     step-10 with one item's relative_path = ../escape.distcp
  errors/unknown_class/              step-10 whose planner_data holds an argparse.Namespace
Expected values (safetensors, computed by torch):
  expected/accelerate.safetensors    the model's tensors (one input: a conversion)
  expected/torchtitan_avg.safetensors
                                     mean of step-10 and step-20 (floats averaged in f32 and
                                     cast back; the int64 buffer is step-20's: take-latest)
  expected/lightning_avg.safetensors mean of the two Lightning checkpoints
"""
import argparse
import os
import pickle
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "dcp")


def ramp(n, scale, shift, dtype=torch.float32):
    """Deterministic, non-trivial values (no RNG, so the fixtures are reproducible)."""
    return (torch.arange(n, dtype=torch.float64) * scale + shift).to(dtype)


def model_sd(step):
    s = step / 10.0
    return {
        "tok_embeddings.weight": ramp(5 * 6, 0.125 * s, -1.0).reshape(5, 6),  # 5 rows: 3 + 2
        "layers.0.attention.wq.weight": ramp(4 * 6, 0.25, -s).reshape(4, 6),  # dim 1 split
        "layers.0.attention_norm.weight": ramp(6, 0.5, s, torch.bfloat16),  # replicated
        "layers.0.feed_forward.w1.weight": ramp(8 * 4, -0.0625 * s, 2.0).reshape(8, 4),
        "norm.weight": ramp(6, 0.5 * s, 0.25),
        "output.weight": ramp(6 * 3, 0.75, -s, torch.float16).reshape(6, 3),
        "layers.0.num_batches_tracked": torch.tensor(step, dtype=torch.int64),
    }


# How the 2-process fixtures place each tensor on the mesh.
PLACEMENT = {
    "layers.0.attention.wq.weight": "shard1",
    "layers.0.attention_norm.weight": "replicate",
    "layers.0.num_batches_tracked": "replicate",
}


def average(sds):
    """The reference average: floats in f32, cast back; integers take the latest."""
    out = {}
    for k, v in sds[-1].items():
        if v.is_floating_point():
            acc = sum(sd[k].to(torch.float32) for sd in sds) / len(sds)
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def save_expected(name, sd):
    os.makedirs(os.path.join(ROOT, "expected"), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(ROOT, "expected", name))


def single_process():
    sd = model_sd(10)
    out = os.path.join("accelerate", "checkpoint-10", "pytorch_model_fsdp_0")
    dcp.save({"model": sd}, checkpoint_id=out)
    with open(os.path.join("accelerate", "checkpoint-10", "trainer_state.json"), "w") as f:
        f.write('{"global_step": 10, "log_history": []}\n')
    save_expected("accelerate.safetensors", sd)
    steps = [5, 10]
    for step in steps:
        sd = model_sd(step)
        out = os.path.join("lightning", f"epoch=0-step={step}.ckpt")
        exp_avg = {k: torch.full_like(v, 0.5) for k, v in sd.items() if v.is_floating_point()}
        state = {"model": sd, "optimizer_0": {"state": {"exp_avg": exp_avg}, "step": step}}
        dcp.save(state, checkpoint_id=out)
        meta = {"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.4.0"}
        torch.save(meta, os.path.join(out, "meta.pt"))
    save_expected("lightning_avg.safetensors", average([model_sd(s) for s in steps]))


def distributed():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    place = {"shard1": [Shard(1)], "replicate": [Replicate()]}
    for step in (10, 20):
        sd = model_sd(step)
        model = {k: distribute_tensor(v, mesh, place.get(PLACEMENT.get(k), [Shard(0)]))
                 for k, v in sd.items()}
        exp_avg = {k: distribute_tensor(torch.full_like(v, 0.5), mesh, [Shard(0)])
                   for k, v in sd.items() if v.is_floating_point() and v.dim() > 1}
        state = dict(model)  # torchtitan: model FQNs at the top level
        state["optimizer"] = {"state": exp_avg, "param_groups": [{"lr": 3e-4}]}
        state["lr_scheduler"] = {"last_epoch": step, "_step_count": step + 1}
        state["dataloader"] = {"rank": dist.get_rank(), "position": 17 * step}
        state["train_state"] = {"step": step}
        dcp.save(state, checkpoint_id=os.path.join("torchtitan", f"step-{step}"))
    dist.barrier()
    if dist.get_rank() == 0:
        save_expected("torchtitan_avg.safetensors", average([model_sd(10), model_sd(20)]))
    dist.destroy_process_group()


def edited(name, edit):
    """A copy of torchtitan/step-10 whose .metadata went through `edit(metadata)`."""
    out = os.path.join(ROOT, "errors", name)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "torchtitan", "step-10"), out)
    with open(os.path.join(out, ".metadata"), "rb") as f:
        md = pickle.load(f)
    edit(md)
    with open(os.path.join(out, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def first_tensor_item(md):
    return next(v for k, v in sorted(md.storage_data.items(), key=lambda kv: kv[0].fqn)
                if k.fqn == "norm.weight")


def errors():
    def transformed(md):
        first_tensor_item(md).transform_descriptors = ["zstd"]

    def escape(md):
        first_tensor_item(md).relative_path = "../escape.distcp"

    def unknown(md):
        md.planner_data = argparse.Namespace(note="not a DCP class")

    edited("transformed", transformed)
    edited("escape", escape)
    edited("unknown_class", unknown)


def main():
    # Checkpoint ids relative to ROOT: .metadata records them (storage_meta.checkpoint_id).
    if os.environ.get("LOCAL_RANK") is not None:
        os.chdir(ROOT)
        distributed()
        return
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    os.chdir(ROOT)
    single_process()
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           os.path.abspath(__file__)]
    subprocess.run(run, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    errors()


if __name__ == "__main__":
    main()
