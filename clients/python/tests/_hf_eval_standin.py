"""A stand-in for `python -m sewa.evaluators.hf` (same command line) used by the callback's
tests while that module is not on this branch: the mean of the model's own `loss` over the
saved held-out batches, the model built from --config-dir, served with protocol 2."""

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sewa.evaluator import serve
from sewa.evaluators import _batches

p = argparse.ArgumentParser()
p.add_argument("--batches", required=True)
p.add_argument("--config-dir", required=True)
p.add_argument("--device", default="cpu")
p.add_argument("--members-on", default="device")
p.add_argument("--threads", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(a.threads)
batches, _ = _batches.load(a.batches)
batches = [{k: v.to(a.device) for k, v in b.items()} for b in batches]
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.config_dir)).to(a.device)
model.eval()


def loss_fn(weights):
    total = 0.0
    for b in batches:
        total = total + torch.func.functional_call(model, weights, args=(), kwargs=b).loss
    return total / len(batches)


serve(loss_fn, device=a.device, members_on=a.members_on, name="hf-standin")
