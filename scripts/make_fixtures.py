#!/usr/bin/env python3
"""Write the small torch fixtures in tests/fixtures/ (run once; the outputs are committed).

Needs PyTorch and safetensors:  /tmp/torchenv/bin/python scripts/make_fixtures.py
The tests never need torch: they read these files and compare them with the safetensors twin
written here from the same tensors.

Files:
  state_dict.pt          torch.save(state_dict) — zip format, pickle protocol 2 (torch's default)
  state_dict_p4.pt       the same with pickle_protocol=4 (FRAME, MEMOIZE, SHORT_BINUNICODE...)
  state_dict.safetensors the same tensors, made contiguous and untied (safetensors requires it)
  lightning.ckpt         a Lightning-style checkpoint: state_dict plus optimizer_states, loops,
                         callbacks, hyper_parameters (an AttributeDict), epoch, global_step, ...
  legacy.pt              torch.save(..., _use_new_zipfile_serialization=False): legacy format
  complex.pt             a complex64 tensor (a storage type sewa does not read)
"""
import os
import sys

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def ramp(n, scale=0.25, shift=-1.0, dtype=torch.float32):
    """Deterministic, non-trivial values (no RNG, so the fixtures are reproducible)."""
    return (torch.arange(n, dtype=torch.float64) * scale + shift).to(dtype)


def state_dict():
    sd = {}
    sd["fc1.weight"] = ramp(12).reshape(4, 3)
    sd["fc1.bias"] = ramp(4, 0.5, 0.125)
    sd["half.weight"] = ramp(6, 0.5, -1.5, torch.float16).reshape(2, 3)
    sd["bf.weight"] = ramp(6, 0.75, -2.0, torch.bfloat16).reshape(3, 2)
    sd["dbl.weight"] = ramp(4, 1.0 / 3.0, 0.1, torch.float64).reshape(2, 2)
    sd["bn.running_mean"] = ramp(4, 0.1, 0.0)
    sd["bn.num_batches_tracked"] = torch.tensor(500, dtype=torch.int64)  # 0-d int64 buffer
    sd["mask.bool"] = torch.tensor([True, False, True])
    sd["ids.int32"] = torch.tensor([1, -2, 3], dtype=torch.int32)
    # Tied pair: two keys, one storage (as with tied input/output embeddings).
    emb = ramp(20, 0.05, -0.5).reshape(5, 4)
    sd["embed.weight"] = emb
    sd["lm_head.weight"] = emb
    # A transposed (non-contiguous) view and a view at a storage offset.
    base = ramp(6, 1.0, 10.0).reshape(3, 2)
    sd["proj.weight"] = base.t()  # shape [2, 3], strides (1, 2)
    big = ramp(10, 1.0, 100.0)
    sd["tail.weight"] = big[4:]  # storage offset 4
    return sd


def untied_contiguous(sd):
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


class AttributeDict(dict):
    """Stand-in for lightning.fabric.utilities.data.AttributeDict (pickled by class name)."""


AttributeDict.__module__ = "lightning.fabric.utilities.data"
AttributeDict.__qualname__ = "AttributeDict"


def lightning_ckpt(sd):
    import types

    mod = types.ModuleType("lightning.fabric.utilities.data")
    mod.AttributeDict = AttributeDict
    for name in ["lightning", "lightning.fabric", "lightning.fabric.utilities"]:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["lightning.fabric.utilities.data"] = mod
    names = list(sd)
    adam_state = {
        i: {"step": torch.tensor(500.0), "exp_avg": torch.zeros_like(sd[n], dtype=torch.float32),
            "exp_avg_sq": torch.ones_like(sd[n], dtype=torch.float32)}
        for i, n in enumerate(names[:2])
    }
    return {
        "epoch": 3,
        "global_step": 500,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {
            "fit_loop": {
                "state_dict": {},
                "epoch_loop.state_dict": {"_batches_that_stepped": 500},
                "epoch_progress": {"total": {"ready": 4, "started": 4, "processed": 3, "completed": 3}},
            }
        },
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': 0}": {
                "monitor": "val_loss",
                "best_model_score": torch.tensor(0.25),
                "best_model_path": "/runs/exp1/epoch=2-step=375.ckpt",
                "current_score": torch.tensor(0.3),
                "best_k_models": {"/runs/exp1/epoch=2-step=375.ckpt": torch.tensor(0.25)},
            }
        },
        "optimizer_states": [
            {"state": adam_state,
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                               "amsgrad": False, "params": [0, 1]}]}
        ],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(lr=1e-3, hidden=4, name="mlp", betas=(0.9, 0.999)),
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    sd = state_dict()
    torch.save(sd, os.path.join(OUT, "state_dict.pt"))
    torch.save(sd, os.path.join(OUT, "state_dict_p4.pt"), pickle_protocol=4)
    save_file(untied_contiguous(sd), os.path.join(OUT, "state_dict.safetensors"))
    torch.save(lightning_ckpt(sd), os.path.join(OUT, "lightning.ckpt"))
    small = {"fc1.weight": sd["fc1.weight"], "fc1.bias": sd["fc1.bias"]}
    torch.save(small, os.path.join(OUT, "legacy.pt"), _use_new_zipfile_serialization=False)
    torch.save({"z": torch.zeros(3, dtype=torch.complex64)}, os.path.join(OUT, "complex.pt"))
    for f in sorted(os.listdir(OUT)):
        print(f"{os.path.getsize(os.path.join(OUT, f)):8d}  {f}")


if __name__ == "__main__":
    main()
