#!/usr/bin/env python3
"""Write tests/fixtures/wsm/ with Megatron-LM's own weighted checkpoint merge (run once; the
outputs are committed, about 100 KB). `tests/it/wsm.rs` compares sewa's WSM weights and merged
tensors with them.

Needs PyTorch, safetensors and a Megatron-LM source tree at the commit of PR #5114's merge tool
(NVIDIA/Megatron-LM 812d36dbc43ccc404ed50f94896b5374f0bf767d, `tools/checkpoint/weighted_merge.py`;
e.g. `git archive 812d36dbc4 megatron tools/checkpoint/weighted_merge.py | tar -x -C DIR`):

    /work/venv-torch/bin/python scripts/make_wsm_fixtures.py --megatron DIR

It runs on CPU in one process (gloo), as Megatron's tool itself does.

Written:
  coefficients.json     Megatron's `checkpoint_coefficients(range(n), style)` for n = 1..16 and
                        the styles linear and minus-sqrt; cosine and exponential through
                        Megatron's `_schedule_to_merge_coefficients` with the WSD decay lambdas
                        of megatron/core/optimizer_param_scheduler.py (`lr_wsd_decay_style`).
                        Floats as Python's repr, and under "bits" the same values as the
                        integers of their IEEE-754 bits (a JSON reader need not round
                        decimals exactly: serde_json's default parser is off by an ulp at
                        times).
  inputs/step_N.safetensors
                        the model tensors of the 5 checkpoints (N = 100..500), f32 and bf16,
                        for sewa to read.
  expected/SHAPE.safetensors
                        Megatron's merge (`merge_same_layout_dcp_metadata_checkpoints`, fp32
                        accumulation, saved in each tensor's dtype) of the same tensors saved as
                        Megatron torch_dist checkpoints (`dist_checkpointing.save`), with the
                        weights of `coefficients.json` for n = 5, read back with torch DCP.
The torch_dist checkpoints themselves are temporary (sewa's reader for them is another item).
"""
import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

MEGATRON_COMMIT = "812d36dbc43ccc404ed50f94896b5374f0bf767d"
SCHEDULER_COMMIT = "d98e8a64ddf34856e74b24714e3bedb2f5a39553"
STEPS = [100, 200, 300, 400, 500]
SHAPES = ["linear", "cosine", "exponential", "minus-sqrt"]

# megatron/core/optimizer_param_scheduler.py @ SCHEDULER_COMMIT, WSD branch, verbatim
# expressions (the merge tool has no cosine or exponential style of its own).
WSD_DECAY = {
    "cosine": lambda x: 0.5 * (math.cos(math.pi * x) + 1.0),
    "exponential": lambda x: (2.0 * math.pow(0.5, x)) - 1.0,
}


def tensors(step):
    g = torch.Generator().manual_seed(step)
    return {
        "decoder.final_layernorm.weight": torch.randn(7, generator=g),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(6, 5, generator=g),
        "embedding.word_embeddings.weight": torch.randn(11, 5, generator=g).to(torch.bfloat16),
        "output_layer.weight": torch.randn(11, 5, generator=g) * 1e3,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--megatron", required=True, help="Megatron-LM source tree at %s" % MEGATRON_COMMIT)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/wsm"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.megatron))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    import torch.distributed.checkpoint as dcp
    from tools.checkpoint import weighted_merge as wm

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "inputs").mkdir(parents=True)
    (out / "expected").mkdir()

    coefficients = {}
    for shape in SHAPES:
        per_n = {}
        for n in range(1, 17):
            if shape in wm.SCHEDULES:
                c = wm.checkpoint_coefficients(list(range(n)), shape)
                per_n[str(n)] = [c[i] for i in range(n)]
            else:
                per_n[str(n)] = wm._schedule_to_merge_coefficients(WSD_DECAY[shape], n)
        coefficients[shape] = per_n
    doc = {
        "source": f"NVIDIA/Megatron-LM tools/checkpoint/weighted_merge.py @ {MEGATRON_COMMIT}",
        "cosine_exponential": f"megatron/core/optimizer_param_scheduler.py @ {SCHEDULER_COMMIT}",
        "python": sys.version.split()[0],
        "coefficients": coefficients,
        "bits": {
            shape: {n: [struct.unpack("<Q", struct.pack("<d", x))[0] for x in c] for n, c in per_n.items()}
            for shape, per_n in coefficients.items()
        },
    }
    # json.dumps writes floats as repr(): the shortest string that reads back to the same bits.
    (out / "coefficients.json").write_text(json.dumps(doc, indent=1) + "\n")

    wm._ensure_process_group()  # gloo, world size 1, as the tool runs on a CPU node
    if not torch.cuda.is_available():
        # What Megatron's own test does for CPU-only saves (test_weighted_merge.py,
        # `cpu_only_dcp_save`): its DCP writer synchronises CUDA even for CPU tensors.
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: torch.device("cpu")
        if not filesystem_async.HAVE_PSUTIL:
            filesystem_async._process_memory = lambda: 0
    tmp = Path(tempfile.mkdtemp(prefix="wsm_megatron_"))
    try:
        paths = []
        for step in STEPS:
            sd = tensors(step)
            save_file(sd, str(out / "inputs" / f"step_{step}.safetensors"))
            sharded = {k: ShardedTensor.from_rank_offsets(k, v, replica_id=0) for k, v in sd.items()}
            path = tmp / f"iter_{step:07d}"
            path.mkdir()
            dist_checkpointing.save(sharded, str(path))
            paths.append(path)
        for shape in SHAPES:
            weights = coefficients[shape][str(len(STEPS))]
            merged = tmp / f"merged_{shape}"
            wm.merge_same_layout_dcp_metadata_checkpoints(paths, list(weights), merged)
            template = {k: torch.empty_like(v) for k, v in tensors(STEPS[0]).items()}
            dcp.load(template, checkpoint_id=str(merged), no_dist=True)
            save_file(template, str(out / "expected" / f"{shape}.safetensors"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
