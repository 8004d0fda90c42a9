#!/usr/bin/env python3
"""Write the Megatron-LM `torch_dist` fixtures in tests/fixtures/megatron/ (run once; the
outputs are committed, well under 1 MB in all).

Written by the real megatron-core package (`megatron.core.dist_checkpointing.save`, the
`torch_dist` backend Megatron-LM's `--ckpt-format torch_dist` uses), on CPU with gloo:
  /work/venv-torch/bin/python -m venv --system-site-packages /work/venv-mg
  /work/venv-mg/bin/pip install megatron-core          # 0.16.1 made the committed files
  /work/venv-mg/bin/python scripts/make_megatron_fixtures.py
On a machine without a GPU, two CUDA calls of megatron-core's writer are shimmed (nothing
else is patched): `torch.cuda.synchronize` after its host copies is a no-op, and
`torch.cuda.current_device()` (where it makes the failure flag it broadcasts) is the CPU. It starts itself again under `torchrun --nproc_per_node 2`: a tiny GPTModel (local layer spec,
no Transformer Engine, bf16 parameters) with tensor parallelism 2, torch Adam's state made
ShardedTensors by megatron-core's `optim_state_to_sharding_state` (what its FP32Optimizer's
`sharded_state_dict` does; that class needs CUDA to construct) and the state dict Megatron-LM's `generate_state_dict` builds (args,
iteration, model, optimizer, rng_state), saved as Megatron-LM saves it: into
`iter_{iteration:07d}/` (common.pt, the rank files `__{rank}_{k}.distcp`, `.metadata`, then
metadata.json), then rank 0 writes `latest_checkpointed_iteration.txt`. The tests never need
torch or megatron: they compare what sewa makes of these directories with what torch itself
read from them (`expected/`).

Directories:
  run/iter_0000010/, run/iter_0000020/, run/latest_checkpointed_iteration.txt
                        two saves of the same run (weights and Adam moments differ)
  errors/escape.metadata   iter_0000010's .metadata with one chunk of a model tensor at
                        relative_path ../escape.distcp
  errors/huge.metadata     iter_0000010's .metadata claiming decoder.final_layernorm.weight
                        (and its one chunk) holds 2^40 elements
Expected values (safetensors, computed by torch from the files, not from memory):
  expected/iter_0000010.safetensors  the model's tensors of iter_0000010, as
                        torch.distributed.checkpoint reads them back (`dcp.load` of every
                        ShardedTensor key not under `optimizer.`), names kept
  expected/avg.safetensors           their mean over the two iterations (floats averaged in
                        f32 and cast back, as sewa does)
"""
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "megatron")
RUN = os.path.join(ROOT, "run")
ITERS = (10, 20)


def iter_dir(it):
    return os.path.join(RUN, f"iter_{it:07d}")  # Megatron-LM's get_checkpoint_name


def distributed():
    import argparse

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )
    from megatron.core.transformer import TransformerConfig

    if not torch.cuda.is_available():
        # megatron-core's FileSystemWriterAsync.preload_tensors copies tensors to the host
        # with non_blocking=True and then calls torch.cuda.synchronize(), the one CUDA call of
        # a CPU save: without a GPU there is nothing to wait for. Its finalize step broadcasts
        # a failure flag in a tensor made on `torch.cuda.current_device()`: on the CPU, gloo
        # broadcasts a CPU tensor.
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: "cpu"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(1234)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=4,
        use_cpu_initialization=True, params_dtype=torch.bfloat16, bf16=True,
    )
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=32, max_sequence_length=8)
    adam = torch.optim.Adam([p for p in model.parameters()], lr=1e-2)

    def init_state_fn(opt, config=None):
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)

    def optimizer_sharded_state_dict(model_sd):
        # The body of megatron-core's FP32Optimizer.sharded_state_dict (whose constructor
        # needs CUDA): Adam's state as ShardedTensors keyed `optimizer.state.<k>.<param key>`.
        sd = adam.state_dict()
        params = [p for g in adam.param_groups for p in g["params"]]
        id_map = get_param_id_to_sharded_param_map(model_sd, params)
        optim_state_to_sharding_state(sd, id_map, exclude_keys="step")
        return sd

    args = argparse.Namespace(ckpt_format="torch_dist", tensor_model_parallel_size=2)
    for it in ITERS:
        # A few deterministic "training" updates between saves: the weights move.
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(torch.full_like(p, 0.015625 * (i + 1) * it / 10))
        init_state_fn(adam)
        for p in model.parameters():
            adam.state[p]["exp_avg"].fill_(it / 100)
            adam.state[p]["exp_avg_sq"].fill_(it / 1000)
        model_sd = model.sharded_state_dict()
        state = {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": it,
            "model": model_sd,
            "optimizer": optimizer_sharded_state_dict(model_sd),
            "rng_state": ShardedObject(
                "rng_state", [{"random_rng_state": torch.get_rng_state()}], (2,), (rank,),
                replica_id=0),
            "num_floating_point_operations_so_far": 0,
        }
        out = iter_dir(it)
        if rank == 0:
            os.makedirs(out, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(state, out)
        dist.barrier()
        if rank == 0:  # Megatron-LM's iter_finalize_fn: the tracker, after the save
            with open(os.path.join(RUN, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(it))
    dist.barrier()
    dist.destroy_process_group()


def model_tensors(path):
    """The model's tensors as torch itself reads them back from the directory: `dcp.load` into
    empty tensors of the sizes and dtypes `.metadata` gives, for every key not under
    `optimizer.` (megatron-core leaves `planner_data` empty, which torch's
    `_load_state_dict_from_keys` cannot filter by)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(path).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype)
          for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer.")}
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    return sd


def expected():
    from safetensors.torch import save_file

    sds = [model_tensors(iter_dir(it)) for it in ITERS]
    out = os.path.join(ROOT, "expected")
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sds[0].items()},
              os.path.join(out, "iter_0000010.safetensors"))
    avg = {}
    for k, v in sds[-1].items():
        if v.is_floating_point():
            avg[k] = (sum(sd[k].to(torch.float32) for sd in sds) / len(sds)).to(v.dtype)
        else:
            avg[k] = v.clone()
    save_file({k: v.contiguous() for k, v in avg.items()}, os.path.join(out, "avg.safetensors"))
    for k, v in sorted(sds[0].items()):
        print(f"{k}: {v.dtype} {list(v.shape)}")


def errors():
    """Hostile `.metadata` files: iter_0000010's, unpickled by torch, one thing changed. The
    tests copy iter_0000010 and put one of these in place of its `.metadata`."""
    import pickle

    out = os.path.join(ROOT, "errors")
    os.makedirs(out, exist_ok=True)

    def edited(name, edit):
        with open(os.path.join(iter_dir(10), ".metadata"), "rb") as f:
            md = pickle.load(f)
        edit(md)
        with open(os.path.join(out, name), "wb") as f:
            pickle.dump(md, f)

    def escape(md):  # one chunk of a model tensor read from outside the directory
        key = next(k for k in sorted(md.storage_data, key=lambda k: (k.fqn, k.index or 0))
                   if k.fqn == "decoder.final_layernorm.weight")
        md.storage_data[key].relative_path = "../escape.distcp"

    def huge(md):  # a model tensor claimed to be 2^40 elements, its one chunk too
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        item = md.state_dict_metadata["decoder.final_layernorm.weight"]
        item.size = torch.Size([1 << 40])
        c = item.chunks[0]
        item.chunks[0] = ChunkStorageMetadata(offsets=c.offsets, sizes=torch.Size([1 << 40]))

    edited("escape.metadata", escape)
    edited("huge.metadata", huge)


def main():
    if os.environ.get("WORLD_SIZE"):
        distributed()
        return
    if sys.argv[1:] == ["--derived"]:  # expected/ and errors/ again, from the saved run
        expected()
        errors()
        return
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(RUN)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29517", os.path.abspath(__file__)]
    subprocess.run(torchrun, check=True)
    expected()
    errors()


if __name__ == "__main__":
    main()
