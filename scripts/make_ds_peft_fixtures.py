#!/usr/bin/env python3
"""Write the DeepSpeed and PEFT fixtures in tests/fixtures/{deepspeed,peft}/ (run once; the
outputs are committed, the tests never need torch).

    python3 -m venv --system-site-packages /tmp/dsenv      # on top of a torch + peft venv
    DS_BUILD_OPS=0 /tmp/dsenv/bin/pip install deepspeed
    PATH=/tmp/dsenv/bin:$PATH /tmp/dsenv/bin/python scripts/make_ds_peft_fixtures.py

DeepSpeed: checkpoints are written by DeepSpeed itself (CPU accelerator, gloo, two ranks started
with torch.distributed.run), ZeRO-2 and ZeRO-3, bf16 (so the `module` weights are low precision
and differ from the fp32 masters), two saves each (global_step2, global_step4) plus `latest`.
The expected fp32 weights are DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`
(zero_to_fp32.py) on each step; expected module weights are torch.load(...)["module"].

PEFT: a tiny nn.Module wrapped with real peft LoRA (r=4, alpha=8, target q and v), two adapters
(`checkpoint-100`, `checkpoint-200`) saved with save_pretrained, one with r=8
(`mismatch-r8`), one saved as adapter_model.bin (`bin-300`), and the base model's weights as an HF-style directory (`base/`).

expected.safetensors (one per family) holds the averages computed here with torch:
  deepspeed: z2_fp32.<name>, z2_module.<name>, z3_fp32.<name> (uniform average of the two steps,
             computed in float64), z2_fp32_step4.<name> (one step, converted)
  peft:      adapter.<key> (average of the two adapters' tensors), with_bin.<key> (of
             checkpoint-100 and bin-300), merged.<name> (base +
             mean over adapters of (alpha/r) * B @ A for target modules, else base)
"""
import json
import os
import shutil
import subprocess
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


# ---------------------------------------------------------------- DeepSpeed (worker side)
class DsNet(nn.Module):
    # Odd parameter sizes (35, 7, 7, 7, 21, 3) so partitions need padding; two buffers (float
    # and int64) that live only in the model-states file; a frozen layer (its weights are in
    # frozen_param_fragments, partitioned by rank under ZeRO-3).
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.fc1 = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 3))
        self.register_buffer("calls", torch.tensor(0, dtype=torch.int64))

    def forward(self, x):
        self.calls += 1
        x = self.frozen(x)
        return self.fc2(torch.relu(self.norm(self.fc1(x)))) + self.shift.to(x.dtype)


def ds_model():
    torch.manual_seed(0)
    return DsNet()


def ds_worker(stage, out):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = ds_model()
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05}},
        "bf16": {"enabled": True},
    }
    eng, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                    config=cfg)
    gen = torch.Generator().manual_seed(100 + eng.global_rank)
    for step in range(1, 5):
        x = torch.randn(4, 5, generator=gen).to(torch.bfloat16)
        loss = eng(x).float().pow(2).mean()
        eng.backward(loss)
        eng.step()
        if step % 2 == 0:
            eng.save_checkpoint(out)
    # An orderly shutdown: leaving it to interpreter exit sometimes aborts in the comm library.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_deepspeed(stage, out):
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--ds-worker", str(stage), out]
    subprocess.run(cmd, check=True, env=env)
    for helper in ("zero_to_fp32.py", "zero_to_torch.py"):  # copies DeepSpeed drops; not needed
        if os.path.exists(os.path.join(out, helper)):
            os.remove(os.path.join(out, helper))


def avg(tensors):
    """Uniform average in float64; integer tensors (step counters) come from the last input,
    as with sewa's default --int-policy latest."""
    if not tensors[0].is_floating_point():
        return tensors[-1].clone()
    out = sum(t.double() for t in tensors) / len(tensors)
    return out.to(tensors[0].dtype)


def make_deepspeed():
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = os.path.join(ROOT, "deepspeed")
    os.makedirs(d, exist_ok=True)
    expected = {}
    for stage in (2, 3):
        out = os.path.join(d, f"z{stage}")
        run_deepspeed(stage, out)
        fp32 = [get_fp32_state_dict_from_zero_checkpoint(out, tag=f"global_step{s}") for s in (2, 4)]
        for name in fp32[0]:
            expected[f"z{stage}_fp32.{name}"] = avg([sd[name] for sd in fp32]).contiguous()
            if stage == 2:
                expected[f"z2_fp32_step4.{name}"] = fp32[1][name].contiguous()
        if stage == 2:
            mods = [torch.load(os.path.join(out, f"global_step{s}", "mp_rank_00_model_states.pt"),
                               weights_only=False)["module"] for s in (2, 4)]
            for name in mods[0]:
                expected[f"z2_module.{name}"] = avg([m[name] for m in mods]).contiguous()
    save_file(expected, os.path.join(d, "expected.safetensors"))


# ---------------------------------------------------------------- PEFT
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.k = nn.Linear(6, 5)
        self.v = nn.Linear(6, 4, bias=False)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        return self.norm(self.q(x) + self.k(x))


def tiny_base():
    torch.manual_seed(1)
    return Tiny()


def make_adapter(out, r, seed, safe=True):
    from peft import LoraConfig, get_peft_model

    base = tiny_base()  # seeds itself: seed the adapter's own initialisation after it
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False)
    model = get_peft_model(base, cfg)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=safe)
    os.remove(os.path.join(out, "README.md"))  # a generated model card: not needed
    from safetensors.torch import load_file

    if not safe:
        return torch.load(os.path.join(out, "adapter_model.bin")), cfg
    return load_file(os.path.join(out, "adapter_model.safetensors")), cfg


def make_peft():
    d = os.path.join(ROOT, "peft")
    os.makedirs(d, exist_ok=True)
    base = {k: v.contiguous() for k, v in tiny_base().state_dict().items()}
    os.makedirs(os.path.join(d, "base"), exist_ok=True)
    save_file(base, os.path.join(d, "base", "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "base", "config.json"), "w") as f:
        json.dump({"model_type": "tiny"}, f)
    a1, cfg = make_adapter(os.path.join(d, "checkpoint-100"), 4, 10)
    a2, _ = make_adapter(os.path.join(d, "checkpoint-200"), 4, 20)
    make_adapter(os.path.join(d, "mismatch-r8"), 8, 30)
    a3, _ = make_adapter(os.path.join(d, "bin-300"), 4, 40, safe=False)
    expected = {f"adapter.{k}": avg([a1[k], a2[k]]) for k in a1}
    expected.update({f"with_bin.{k}": avg([a1[k], a3[k]]) for k in a1})
    scale = cfg.lora_alpha / cfg.r
    for name, w in base.items():
        module = name.rsplit(".", 1)[0]
        key = f"base_model.model.{module}.lora_A.weight"
        if name.endswith(".weight") and key in a1:
            deltas = [scale * (a[key.replace("lora_A", "lora_B")].double() @ a[key].double())
                      for a in (a1, a2)]
            w = (w.double() + sum(deltas) / len(deltas)).to(w.dtype)
        expected[f"merged.{name}"] = w.contiguous()
    save_file(expected, os.path.join(d, "expected.safetensors"))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ds-worker":
        ds_worker(int(sys.argv[2]), sys.argv[3])
    else:
        which = sys.argv[1:] or ["deepspeed", "peft"]
        if "peft" in which:
            make_peft()
        if "deepspeed" in which:
            make_deepspeed()
