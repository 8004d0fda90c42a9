"""The torch backend: loss_fn gets {name: tensor} on `device` and returns a scalar tensor, or an
iterable of scalar tensor terms whose sum is the loss (one per batch: each is back-propagated as
it comes, so one batch's autograd graph is alive at a time); the gradient comes from autograd.

Protocol 2: each member is loaded once (safetensors with safe_open, torch zips with
torch.load(weights_only=True, mmap=True): no code is executed) and kept on the device or in
(pinned) host memory (`members_on`). A request mixes them with foreach ops in float32, in
buckets so no full float32 copy of the model is made at once; the mixed weights get the
members' own dtype (bf16 stays bf16), autograd gives ∇F, and the K dot products ⟨∇F, w_i⟩
are accumulated in float64 on the device."""

from ._common import NO_GRADIENT, buckets, require_gradient


def _iterable(x):
    try:
        iter(x)
    except TypeError:
        return False
    return True
from ._members import state_dict_of

# float32 bytes mixed per foreach call.
BUCKET_BYTES = 1 << 28


class Torch:
    name = "torch"
    formats = ["safetensors", "safetensors-index", "hf-dir", "torch"]
    # Protocol 1 candidates it reads besides float32: the members' own dtype, kept as is.
    dtypes = ["bf16", "f16"]

    def __init__(self, device="cpu", members_on="device"):
        import torch
        from safetensors.torch import load_file, save_file

        if members_on not in ("device", "cpu"):
            raise ValueError(f"members_on must be \"device\" or \"cpu\", not {members_on!r}")
        self.torch, self.load_file, self.save_file = torch, load_file, save_file
        self.device = torch.device(device)
        self.store = self.device if members_on == "device" else torch.device("cpu")
        self.pin = members_on == "cpu" and self.device.type == "cuda"

    # protocol 1 ---------------------------------------------------------------------------
    def load(self, path, want_grad):
        weights = self.load_file(path, device=str(self.device))
        if want_grad:
            for t in weights.values():
                if t.is_floating_point():
                    t.requires_grad_(True)
        return weights

    def evaluate(self, loss_fn, weights, want_grad):
        """(loss, {name: gradient} or None). `loss_fn` returns a scalar tensor, or an iterable
        (a generator, a list) of scalar tensor terms whose sum is the loss: each term is
        differentiated as soon as it is produced and its graph freed, so only one term's
        activations are alive at a time (per-batch backward)."""
        torch = self.torch
        with torch.enable_grad() if want_grad else torch.no_grad():
            out = loss_fn(weights)
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
                raise TypeError("with torch, return a scalar tensor or an iterable of scalar "
                                "tensor terms (the client computes gradients)")
            if isinstance(out, torch.Tensor) or not _iterable(out):
                return self._evaluate_scalar(out, weights, want_grad)
            return self._evaluate_terms(out, weights, want_grad)

    def _leaves(self, weights):
        torch = self.torch
        names = [n for n, t in weights.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        return names, [weights[n] for n in names]

    def _evaluate_scalar(self, out, weights, want_grad):
        torch = self.torch
        if not isinstance(out, torch.Tensor):
            if want_grad:
                raise RuntimeError(NO_GRADIENT + " (loss_fn returned a number, not a tensor)")
            return float(out), None
        loss = float(out.detach())
        if not want_grad:
            return loss, None
        if not out.requires_grad:
            raise RuntimeError(NO_GRADIENT)
        names, inputs = self._leaves(weights)
        grads = {}
        if names:
            grads = dict(zip(names, torch.autograd.grad(out, inputs, allow_unused=True)))
        return loss, self._finish(grads, weights)

    def _evaluate_terms(self, terms, weights, want_grad):
        torch = self.torch
        names, inputs = self._leaves(weights) if want_grad else ([], [])
        for t in inputs:
            t.grad = None
        loss, count = 0.0, 0
        for term in terms:
            count += 1
            if not isinstance(term, torch.Tensor):
                if want_grad:
                    raise RuntimeError(NO_GRADIENT + f" (term {count} of loss_fn is a "
                                       f"{type(term).__name__}, not a tensor)")
                loss += float(term)
                continue
            if term.numel() != 1:
                raise ValueError(f"term {count} of loss_fn has shape {tuple(term.shape)}, "
                                 f"not a scalar")
            loss += float(term.detach())
            if not want_grad or not term.requires_grad:
                # A term that depends on no weight adds nothing to ∇F; if no term does, the
                # check in _finish says why.
                continue
            if not names:
                raise RuntimeError(NO_GRADIENT)
            # Accumulates into each weight's .grad as the engine produces it (in place, one
            # gradient's worth of memory) and frees this term's graph.
            torch.autograd.backward(term.reshape(()), inputs=inputs)
            del term
        if count == 0:
            raise ValueError("loss_fn yielded no terms (is the held-out data empty?)")
        if not want_grad:
            return loss, None
        grads = {n: t.grad for n, t in zip(names, inputs)}
        for t in inputs:
            t.grad = None
        return loss, self._finish(grads, weights)

    def _finish(self, grads, weights):
        torch = self.torch
        # The load_state_dict case: the loss needs grad (through the model's own parameters),
        # yet every weight sewa sent comes back None.
        require_gradient(grads)
        # Weights the loss does not use (frozen or unused modules) get zeros.
        return {
            n: (g if g is not None else torch.zeros_like(weights[n])).detach()
            for n, g in grads.items()
        }

    def save(self, grads, path):
        self.save_file({n: g.float().contiguous().cpu() for n, g in grads.items()}, path)

    # protocol 2 ---------------------------------------------------------------------------
    def load_member(self, files):
        from safetensors import safe_open

        torch = self.torch
        out = {}
        for kind, path in files:
            if kind == "safetensors":
                with safe_open(path, framework="pt", device="cpu") as f:
                    part = {k: f.get_tensor(k) for k in f.keys()}
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                part = state_dict_of(obj)
                if self.store.type == "cpu" and not self.pin:
                    # Copy out of the mapping: a file rewritten in place later (last.ckpt)
                    # would otherwise kill this process with SIGBUS on the next access.
                    part = {k: v.clone() for k, v in part.items()}
            out.update(part)
        return {n: self._place(t) for n, t in out.items()}

    def _place(self, t):
        t = t.detach()
        if self.pin:
            return t.contiguous().pin_memory()
        return t.to(self.store).contiguous()

    def is_float(self, t):
        return t.is_floating_point()

    def _buckets(self, members, names):
        first = members.held[next(iter(members.held))]
        return buckets(names, lambda n: first[n].numel() * 4, BUCKET_BYTES)

    def _on_device(self, ts):
        return [t.to(self.device, non_blocking=True) for t in ts]

    def mix(self, members, weights, ints, want_grad):
        """Leaves {name: Σ α_i w_i} in the members' dtype (float32 accumulation), plus the
        `ints` member's other tensors."""
        torch = self.torch
        names = members.floats(self)
        ref = members.held[ints]
        mixed = {}
        with torch.no_grad():
            for bucket in self._buckets(members, names):
                acc = [torch.zeros(ref[n].shape, dtype=torch.float32, device=self.device)
                       for n in bucket]
                for mid, a in weights.items():
                    src = self._on_device([members.held[mid][n] for n in bucket])
                    src = [s if s.dtype == torch.float32 else s.float() for s in src]
                    torch._foreach_add_(acc, src, alpha=float(a))
                for n, t in zip(bucket, acc):
                    mixed[n] = t.to(ref[n].dtype).requires_grad_(want_grad)
        for n, t in ref.items():
            if n not in mixed:
                mixed[n] = t.to(self.device)
        return mixed, names

    def evaluate_mix(self, loss_fn, members, weights, ints, want_grad):
        """(loss, {member id: ⟨∇F, w_i⟩} or None), the dots summed in float64 on the device."""
        mixed, names = self.mix(members, weights, ints, want_grad)
        loss, grads = self.evaluate(loss_fn, mixed, want_grad)
        if grads is None:
            return loss, None
        return loss, self.dots(members, names, grads)

    def dots(self, members, names, grads):
        torch = self.torch
        ids = list(members.held)
        total = torch.zeros(len(ids), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for bucket in self._buckets(members, names):
                g = [grads[n].float() for n in bucket]
                for k, mid in enumerate(ids):
                    w = self._on_device([members.held[mid][n] for n in bucket])
                    prods = torch._foreach_mul(g, [x.float() for x in w])
                    total[k] += sum(p.sum(dtype=torch.float64) for p in prods)
        return dict(zip(ids, total.tolist()))
