"""Members held as an FSDP2 module's own shards (`serve(..., module=m)`, m built with
`torch.distributed.fsdp.fully_shard`): each rank keeps, of every member, exactly the local
shard of each DTensor parameter (the slice FSDP2 keeps: dim 0 chunked across the mesh), so a
window of K members costs ~K/W members per rank.

A request: the mixture Σ α_i w_i is computed on the shards (float32, cast to the parameter's
dtype) and written into the parameters' local shards; `loss_fn` runs the module, whose forward
all-gathers as usual; each backward's gradient comes back sharded by FSDP's reduce-scatter,
averaged across ranks, with each rank's loss scaled by W times its share of the rows first, so
each rank's ⟨∇F, w_i⟩ on its shards, summed across ranks (`sum_dots`), is the dot product over
the whole model. FSDP's rule holds: every rank runs the same number of forward and
backward passes (the same number of terms)."""

from ._common import NO_GRADIENT
from ._torch import Torch


class FsdpTorch(Torch):
    sum_dots = True

    def __init__(self, device, members_on, dist, module):
        super().__init__(device, members_on)
        from torch.distributed.tensor import DTensor

        self.dist, self.module = dist, module
        self.params = dict(module.named_parameters())
        not_sharded = [n for n, p in self.params.items() if not isinstance(p, DTensor)]
        if not_sharded:
            raise ValueError(f"module= needs an FSDP2 module (fully_shard): parameters "
                             f"{not_sharded[:5]} are not DTensors")
        # FSDP's reduce-scatter averages the ranks' gradients (divides their sum by W); a
        # divide factor of 1 would need ReduceOp.PREMUL_SUM, which gloo lacks, so each rank's
        # loss is scaled by W as well as by its share of the rows.
        self.world = dist.world if dist is not None else 1

    def load_member(self, files):
        from torch.distributed.tensor import distribute_tensor

        whole = super().load_member(files)
        floats = {n for n, t in whole.items() if t.is_floating_point()}
        extra = sorted(floats - set(self.params))
        missing = sorted(set(self.params) - floats)
        if extra or missing:
            raise ValueError(f"its floating tensors are not the module's parameters: not "
                             f"parameters {extra[:5]}, parameters missing {missing[:5]}")
        out = {}
        for n, t in whole.items():
            if n not in self.params:
                out[n] = t  # integer tensors: kept whole, not mixed
                continue
            p = self.params[n]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"tensor {n!r} has shape {list(t.shape)}, the module's "
                                 f"{list(p.shape)}")
            # src_data_rank=None: every rank slices its own shard, no communication.
            local = distribute_tensor(t.to(p.device), p.device_mesh, p.placements,
                                      src_data_rank=None).to_local()
            out[n] = local.to(self.store).clone()
        del whole
        return out

    def mix(self, members, weights, ints, want_grad):
        """Writes Σ α_i w_i into the parameters' local shards; {name: parameter} for loss_fn."""
        torch = self.torch
        names = sorted(self.params)
        with torch.no_grad():
            for n in names:
                local = self.params[n].to_local()
                acc = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
                for mid, a in weights.items():
                    acc.add_(members.held[mid][n].to(local.device).float(), alpha=float(a))
                local.copy_(acc)
                self.params[n].requires_grad_(want_grad)
        return dict(self.params), names

    def evaluate_mix(self, loss_fn, members, weights, ints, want_grad):
        from . import _shard_weight

        torch = self.torch
        mixed, names = self.mix(members, weights, ints, want_grad)
        share = _shard_weight["w"]
        share = 1.0 / self.world if share is None else share
        scale = share * self.world
        for p in self.params.values():
            p.grad = None
        loss, count, backwards = 0.0, 0, 0
        with torch.enable_grad() if want_grad else torch.no_grad():
            out = loss_fn(mixed)
            terms = [out] if isinstance(out, torch.Tensor) or not _iterable(out) else out
            for term in terms:
                count += 1
                if not isinstance(term, torch.Tensor):
                    if want_grad:
                        raise RuntimeError(NO_GRADIENT + f" (term {count} is a "
                                           f"{type(term).__name__}, not a tensor)")
                    loss += float(term)
                    continue
                loss += float(term.detach())
                if want_grad and term.requires_grad:
                    (term.reshape(()) * scale).backward()
                    backwards += 1
                del term
        if count == 0:
            raise ValueError("loss_fn yielded no terms (is the held-out data empty?)")
        if not want_grad:
            return loss, None
        if backwards == 0:
            raise RuntimeError(NO_GRADIENT)
        ids = list(members.held)
        total = torch.zeros(len(ids), dtype=torch.float64)
        with torch.no_grad():
            for n in names:
                p = self.params[n]
                if p.grad is None:
                    continue
                g = p.grad.to_local().float()
                for k, mid in enumerate(ids):
                    w = members.held[mid][n].to(g.device).float()
                    total[k] += (g * w).sum(dtype=torch.float64).item()
            for p in self.params.values():
                p.grad = None
        return loss, dict(zip(ids, total.tolist()))


def _iterable(x):
    try:
        iter(x)
    except TypeError:
        return False
    return True
