"""Members held sharded across ranks (`serve(..., shard_members=True)`): each rank keeps a
deterministic 1/W slice of every floating tensor of every member, so a window of K members
costs ~K/W members of memory per rank instead of K.

The slice: a tensor of n elements is flattened and cut into W chunks of c = ceil(n / W)
elements; rank r keeps elements [r c, (r + 1) c), zero-padded to c (the padding adds nothing
to a sum or a dot product). Non-floating tensors (step counters, int buffers) are kept whole.

A request: each rank mixes its slices (Σ α_i w_i in float32, as the whole-member path does,
element by element, so the mixture is the same); the mixture is all-gathered bucket by bucket
into whole tensors (the mixed model once, not K members) for `loss_fn`, which still sees
{name: whole tensor}. Each rank's gradient, weighted by its share of the rows, is summed
across ranks (all_reduce) and this rank keeps its slice; ⟨∇F, w_i⟩ on the slice, summed across
ranks by the caller (`sum_dots`), is the dot product over the whole tensor."""

from ._common import buckets
from ._torch import BUCKET_BYTES, Torch


class ShardedTorch(Torch):
    # The dots this backend returns are per-slice parts of the whole ∇F: summed across ranks,
    # not weighted by rows (the gradient already was).
    sum_dots = True

    def __init__(self, device, members_on, dist):
        super().__init__(device, members_on)
        self.dist = dist
        self.rank = dist.rank if dist is not None else 0
        self.world = dist.world if dist is not None else 1
        # name -> whole shape of a sharded (floating) tensor; the same for every member.
        self.shapes = {}

    def _chunk(self, numel):
        return -(-numel // self.world)

    def load_member(self, files):
        whole = super().load_member(files)
        torch = self.torch
        out, shapes = {}, {}
        for n, t in whole.items():
            if not t.is_floating_point():
                out[n] = t
                continue
            shapes[n] = tuple(t.shape)
            c = self._chunk(t.numel())
            flat = t.reshape(-1)[self.rank * c:(self.rank + 1) * c]
            part = torch.zeros(c, dtype=t.dtype, device=flat.device)
            part[:flat.numel()] = flat
            out[n] = part
        del whole
        for n, s in shapes.items():
            if n in self.shapes and self.shapes[n] != s:
                raise ValueError(f"tensor {n!r} has shape {list(s)}, other members "
                                 f"{list(self.shapes[n])}")
        self.shapes.update(shapes)
        if self.pin:
            out = {n: t.pin_memory() for n, t in out.items()}
        return out

    def _buckets(self, members, names):
        # Bounded by the whole tensors' float32 bytes: that is what a gather materialises.
        return buckets(names, lambda n: self._chunk(_numel(self.shapes[n])) * self.world * 4,
                       BUCKET_BYTES)

    def _gather(self, flat):
        """[W, len] float32: every rank's `flat`, rank r in row r."""
        torch = self.torch
        if self.dist is None:
            return flat.unsqueeze(0)
        out = torch.empty((self.world, flat.numel()), dtype=flat.dtype, device=flat.device)
        self.dist.dist.all_gather(list(out.unbind(0)), flat)
        return out

    def mix(self, members, weights, ints, want_grad):
        """{name: whole Σ α_i w_i} in the members' dtype, gathered from every rank's slice,
        plus the `ints` member's other tensors."""
        torch = self.torch
        names = members.floats(self)
        ref = members.held[ints]
        mixed = {}
        with torch.no_grad():
            for bucket in self._buckets(members, names):
                acc = torch.zeros(sum(ref[n].numel() for n in bucket), dtype=torch.float32,
                                  device=self.device)
                parts = list(acc.split([ref[n].numel() for n in bucket]))
                for mid, a in weights.items():
                    src = self._on_device([members.held[mid][n] for n in bucket])
                    src = [s if s.dtype == torch.float32 else s.float() for s in src]
                    torch._foreach_add_(parts, src, alpha=float(a))
                full = self._gather(acc)
                off = 0
                for n in bucket:
                    c, shape = ref[n].numel(), self.shapes[n]
                    whole = full[:, off:off + c].reshape(-1)[:_numel(shape)].reshape(shape)
                    mixed[n] = whole.to(ref[n].dtype).requires_grad_(want_grad)
                    off += c
                del full, acc, parts
        for n, t in ref.items():
            if n not in mixed:
                mixed[n] = t.to(self.device)
        return mixed, names

    def evaluate_mix(self, loss_fn, members, weights, ints, want_grad):
        """(loss of this rank's rows, {member id: this slice's part of ⟨∇F, w_i⟩} or None)."""
        from . import _shard_weight

        mixed, names = self.mix(members, weights, ints, want_grad)
        try:
            loss, grads = self.evaluate(loss_fn, mixed, want_grad)
        except Exception:
            if self.dist is not None:
                self.dist.agree(False)
            raise
        del mixed
        # Agree before the gradient's collective: a rank whose loss_fn raised never reaches it.
        if self.dist is not None:
            self.dist.agree(True)
        if grads is None:
            return loss, None
        share = _shard_weight["w"]
        share = 1.0 / self.world if share is None else share
        return loss, self._slice_dots(members, names, grads, share)

    def _slice_dots(self, members, names, grads, share):
        torch = self.torch
        ids = list(members.held)
        ref = members.held[ids[0]]
        total = torch.zeros(len(ids), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for bucket in self._buckets(members, names):
                sizes = [ref[n].numel() for n in bucket]
                # [W, Σ c]: rank r's slice of every tensor of the bucket in row r.
                flat = torch.zeros((self.world, sum(sizes)), dtype=torch.float32,
                                   device=self.device)
                off = 0
                for n, c in zip(bucket, sizes):
                    g = grads[n].reshape(-1).float()
                    padded = torch.zeros(self.world * c, dtype=torch.float32, device=self.device)
                    padded[:g.numel()] = g * share
                    flat[:, off:off + c] = padded.view(self.world, c)
                    off += c
                if self.dist is not None:
                    self.dist.dist.all_reduce(flat)
                g = list(flat[self.rank].split(sizes))
                del flat
                for k, mid in enumerate(ids):
                    w = self._on_device([members.held[mid][n] for n in bucket])
                    prods = torch._foreach_mul(g, [x.float() for x in w])
                    total[k] += sum(p.sum(dtype=torch.float64) for p in prods)
        return dict(zip(ids, total.tolist()))


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
