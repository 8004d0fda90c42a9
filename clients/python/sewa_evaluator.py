"""sewa evaluator client: serve a loss (and its gradient) to sewa over the evaluator protocol.

sewa starts this process once and keeps it. It sends JSON lines on stdin and reads JSON lines
from stdout (the protocol is in sewa's README, "External evaluators"). Your code only writes
the loss function:

    import torch
    from sewa_evaluator import serve

    model = MyModel()
    x, y = load_heldout()

    def loss_fn(weights):                      # dict[str, torch.Tensor]
        out = torch.func.functional_call(model, weights, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    serve(loss_fn)                             # gradients by autograd

With torch, the weights must flow into the loss through autograd: `model.load_state_dict(weights)`
copies them and cuts the graph, so no weight gets a gradient; the client then fails with a
message saying so instead of sending zeros.

With numpy (`framework="numpy"`), `loss_fn` receives numpy arrays and returns either a float
(forward-only) or `(loss, {name: gradient})`; a gradient of `None` for every weight is an error
too. Anything your code prints goes to stderr, which
sewa logs; stdout is reserved for the protocol.

Needs only `safetensors` and either `torch` or `numpy`.
"""

import json
import math
import os
import sys

PROTOCOL = 1

__all__ = ["serve", "PROTOCOL"]

# Why an evaluator gets no gradient, and the fix. Without this check sewa would optimise on
# zeros: every probability stays at k/K and the "selection" is arbitrary.
NO_GRADIENT = (
    "no weight received a gradient: the loss does not depend, through autograd, on the "
    "weights sewa sent (model.load_state_dict(weights) copies them and cuts the graph). "
    "In loss_fn, use torch.func.functional_call(model, weights, args); or declare a "
    "forward-only evaluator with serve(loss_fn, grad=False)"
)


def _require_gradient(grads):
    """Fail loudly when no weight received a gradient (None, empty, or None for every tensor)."""
    if not grads or all(g is None for g in grads.values()):
        raise RuntimeError(NO_GRADIENT)


def _protocol_stream():
    """Keep the real stdout for protocol lines; send everything else printed to stderr."""
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return proto


def _send(proto, msg):
    proto.write(json.dumps(msg) + "\n")
    proto.flush()


class _Torch:
    name = "torch"

    def __init__(self):
        import torch
        from safetensors.torch import load_file, save_file

        self.torch, self.load_file, self.save_file = torch, load_file, save_file

    def load(self, path, want_grad):
        weights = self.load_file(path)
        if want_grad:
            for t in weights.values():
                if t.is_floating_point():
                    t.requires_grad_(True)
        return weights

    def evaluate(self, loss_fn, weights, want_grad):
        torch = self.torch
        with torch.enable_grad() if want_grad else torch.no_grad():
            out = loss_fn(weights)
        if isinstance(out, tuple):
            raise TypeError("with torch, return a scalar tensor (the client computes gradients)")
        if not isinstance(out, torch.Tensor):
            if want_grad:
                raise RuntimeError(NO_GRADIENT + " (loss_fn returned a number, not a tensor)")
            return float(out), None
        loss = float(out.detach())
        if not want_grad:
            return loss, None
        if not out.requires_grad:
            raise RuntimeError(NO_GRADIENT)
        names = [n for n, t in weights.items() if t.requires_grad]
        inputs = [weights[n] for n in names]
        grads = dict(zip(names, torch.autograd.grad(out, inputs, allow_unused=True))) if names else {}
        # The load_state_dict case: `out` needs grad (through the model's own parameters), yet
        # every weight sewa sent comes back None.
        _require_gradient(grads)
        # Weights the loss does not use (frozen or unused modules) get zeros.
        return loss, {
            n: (g if g is not None else torch.zeros_like(weights[n])).detach().float().contiguous()
            for n, g in grads.items()
        }

    def save(self, grads, path):
        self.save_file(grads, path)


class _Numpy:
    name = "numpy"

    def __init__(self):
        import numpy as np
        from safetensors.numpy import load_file, save_file

        self.np, self.load_file, self.save_file = np, load_file, save_file

    def load(self, path, want_grad):
        return self.load_file(path)

    def evaluate(self, loss_fn, weights, want_grad):
        out = loss_fn(weights)
        if isinstance(out, tuple):
            loss, grads = out
            if not want_grad:
                return float(loss), None
            _require_gradient(grads)
            np = self.np
            # Weights the loss does not use get zeros, as with torch.
            return float(loss), {
                n: np.zeros_like(weights[n]) if g is None else g for n, g in grads.items()
            }
        return float(out), None

    def save(self, grads, path):
        np = self.np
        self.save_file({n: np.ascontiguousarray(g, dtype=np.float32) for n, g in grads.items()}, path)


def _handle(backend, loss_fn, req, grad):
    want_grad = bool(req.get("grad")) and grad
    weights = backend.load(req["weights"], want_grad)
    loss, grads = backend.evaluate(loss_fn, weights, want_grad)
    reply = {"type": "result", "id": req["id"], "loss": loss if math.isfinite(loss) else None}
    if not math.isfinite(loss):
        reply["loss_repr"] = repr(loss)
    if grads is not None:
        backend.save(grads, req["grad_path"])
        reply["grad"] = req["grad_path"]
    return reply


def serve(loss_fn, *, grad=True, framework="torch", name=None):
    """Answer sewa's requests until stdin closes.

    loss_fn(weights) -> scalar. `grad=False` declares the evaluator forward-only.
    `framework` is "torch" or "numpy". `name` is shown in sewa's logs and manifests.
    """
    backend = {"torch": _Torch, "numpy": _Numpy}[framework]()
    proto = _protocol_stream()
    supports_grad = bool(grad)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        kind = req.get("type")
        if kind == "hello":
            _send(proto, {
                "type": "hello",
                "protocol": PROTOCOL,
                "grad": supports_grad,
                "framework": backend.name,
                "name": name or os.path.basename(sys.argv[0] or "evaluator"),
            })
        elif kind == "evaluate":
            try:
                reply = _handle(backend, loss_fn, req, supports_grad)
            except Exception as e:  # report, keep serving: sewa decides what to do
                import traceback

                traceback.print_exc(file=sys.stderr)
                reply = {"type": "error", "id": req.get("id"), "message": f"{type(e).__name__}: {e}"}
            _send(proto, reply)
        elif kind == "shutdown":
            break
        else:
            _send(proto, {"type": "error", "id": req.get("id"), "message": f"unknown request {kind!r}"})
