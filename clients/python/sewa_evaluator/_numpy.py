"""The numpy backend: loss_fn gets numpy arrays and returns a float (forward-only) or
`(loss, {name: gradient})`. Loads safetensors only (numpy has no bfloat16: bf16 members are
an error naming the file); mixes in float32 like sewa does for protocol 1."""

from ._common import require_gradient


class Numpy:
    name = "numpy"
    formats = ["safetensors", "safetensors-index", "hf-dir"]
    # Protocol 1 candidates it reads besides float32 (widened to float32 on load).
    dtypes = ["f16"]

    def __init__(self, device="cpu", members_on="device"):
        import numpy as np
        from safetensors.numpy import load_file, save_file

        if device != "cpu":
            raise ValueError("framework=\"numpy\" computes on the CPU only (device=\"cpu\")")
        self.np, self.load_file, self.save_file = np, load_file, save_file

    # protocol 1 ---------------------------------------------------------------------------
    def load(self, path, want_grad):
        np = self.np
        return {n: a.astype(np.float32) if a.dtype == np.float16 else a
                for n, a in self.load_file(path).items()}

    def evaluate(self, loss_fn, weights, want_grad):
        out = loss_fn(weights)
        if isinstance(out, tuple):
            loss, grads = out
            if not want_grad:
                return float(loss), None
            require_gradient(grads)
            np = self.np
            # Weights the loss does not use get zeros, as with torch.
            return float(loss), {
                n: np.zeros_like(weights[n]) if g is None else g for n, g in grads.items()
            }
        if not isinstance(out, (int, float)) and not hasattr(out, "__float__"):
            raise TypeError(f"with numpy, loss_fn returns a float or (loss, {{name: gradient}}), "
                            f"not a {type(out).__name__} (per-batch terms are for torch)")
        return float(out), None

    def save(self, grads, path):
        np = self.np
        self.save_file({n: np.ascontiguousarray(g, dtype=np.float32) for n, g in grads.items()}, path)

    # protocol 2 ---------------------------------------------------------------------------
    def load_member(self, files):
        out = {}
        for kind, path in files:
            if kind != "safetensors":
                raise ValueError(f"{path}: the numpy client loads safetensors only")
            out.update(self.load_file(path))
        return out

    def is_float(self, t):
        return t.dtype.kind == "f"

    def mix(self, members, weights, ints):
        """{name: Σ α_i w_i} in float32 for float tensors, the `ints` member's other tensors."""
        np = self.np
        names = members.floats(self)
        out = {n: np.zeros(members.held[ints][n].shape, np.float32) for n in names}
        for mid, a in weights.items():
            w = members.held[mid]
            for n in names:
                out[n] += np.float32(a) * w[n].astype(np.float32, copy=False)
        for n, t in members.held[ints].items():
            if n not in out:
                out[n] = t
        return out, names

    def evaluate_mix(self, loss_fn, members, weights, ints, want_grad):
        """(loss, {member id: ⟨∇F, w_i⟩} or None)."""
        np = self.np
        mixed, names = self.mix(members, weights, ints)
        loss, grads = self.evaluate(loss_fn, mixed, want_grad)
        if grads is None:
            return loss, None
        g = {n: np.asarray(grads[n], np.float64) for n in names if n in grads}
        dots = {mid: float(sum(np.vdot(g[n], w[n].astype(np.float64)) for n in g))
                for mid, w in members.held.items()}
        return loss, dots
