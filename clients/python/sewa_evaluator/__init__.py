"""sewa evaluator client: serve a loss (and its gradient) to sewa over the evaluator protocol.

sewa starts this process once and keeps it. It sends JSON lines on stdin and reads JSON lines
from stdout (the protocol is in sewa's docs/evaluator.md, "The protocol"). Your code only
writes the loss function:

    import torch
    from sewa_evaluator import serve

    model = MyModel()
    x, y = load_heldout()

    def loss_fn(weights):                      # dict[str, torch.Tensor]
        out = torch.func.functional_call(model, weights, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    serve(loss_fn, device="cuda")              # gradients by autograd

Per-batch backward: `loss_fn` may instead return an iterable of scalar tensor terms whose sum is
the loss (e.g. be a generator yielding one term per batch, each the batch's share of the mean).
The client back-propagates each term as it comes and frees its graph, so only one batch's
activations are alive at a time instead of the whole held-out set's:

    def loss_fn(weights):
        for x, y in batches:
            out = torch.func.functional_call(model, weights, (x,))
            yield torch.nn.functional.cross_entropy(out, y, reduction="sum") / n_rows

`serve(..., on_members=hook)` calls `hook(added)` with [(id, path, format)] for each `members`
message that adds members, before they are loaded (e.g. to rebuild a model from the config.json
beside a member); if it raises, the message is refused with its error and nothing changes.

Protocol 2 (the default when sewa offers it): the client loads each window member once from
the path sewa names and receives only mixing weights; it mixes the members on `device`, calls
`loss_fn` on the mixture and answers the loss and one number per member. Protocol 1: sewa
writes each candidate to a file and reads the gradient back (kept for old sewa versions).

With torch, the weights must flow into the loss through autograd: `model.load_state_dict(weights)`
copies them and cuts the graph, so no weight gets a gradient; the client then fails with a
message saying so instead of sending zeros.

With numpy (`framework="numpy"`), `loss_fn` receives numpy arrays and returns either a float
(forward-only) or `(loss, {name: gradient})`; a gradient of `None` for every weight is an error
too. Anything your code prints goes to stderr, which sewa logs; stdout is reserved for the
protocol.

Under `torchrun --nproc_per_node N`, the same `serve()` runs on every rank: rank 0 speaks the
protocol and broadcasts each request, every rank evaluates its share of the held-out data
(`shard(dataset)`), and losses and dot products are summed across ranks weighted by rows.

`serve(..., shard_members=True)` holds each member sharded across the torchrun ranks (a 1/W
slice of every floating tensor per rank, so ~K/W members of memory per rank); `loss_fn` still
gets the whole mixture (gathered once per request) and the answers are the same.

Needs only `safetensors` and either `torch` or `numpy`.
"""

import json
import math
import os
import sys
import traceback

from ._common import NO_GRADIENT  # noqa: F401 (part of the public surface before 0.2)
from ._members import Members, decode_path

# The highest protocol version this client speaks (tests lower it to check negotiation).
PROTOCOL = 2

__all__ = ["serve", "shard", "PROTOCOL"]
__version__ = "0.2.0"

_shard_weight = {"w": None}


def _rank_world():
    """(rank, world size) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(dataset, weight=None):
    """This rank's contiguous share of `dataset` (anything with len() and slicing) under
    torchrun; the whole dataset otherwise. The share's fraction of the rows weights this
    rank's loss and gradient in the sums across ranks, so loss_fn returns its shard's mean.
    `weight(item)`, if given, is an item's weight instead of 1 (e.g. the tokens of a batch, for
    a loss that is a mean over tokens): the share is then its fraction of the total weight."""
    rank, world = _rank_world()
    n = len(dataset)
    start, end = rank * n // world, (rank + 1) * n // world
    if weight is None:
        _shard_weight["w"] = (end - start) / n if n else 0.0
    else:
        ws = [float(weight(dataset[i])) for i in range(n)]
        total = sum(ws)
        _shard_weight["w"] = sum(ws[start:end]) / total if total > 0 else 0.0
    if world == 1:
        return dataset
    return dataset[start:end]


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


def _backend(framework, device, members_on, shard_members=False, dist=None, module=None):
    if module is not None:
        if framework != "torch":
            raise ValueError("module= (an FSDP2 module) needs framework=\"torch\"")
        from ._fsdp import FsdpTorch

        return FsdpTorch(device, members_on, dist, module)
    if shard_members:
        if framework != "torch":
            raise ValueError("shard_members=True needs framework=\"torch\"")
        from ._sharded import ShardedTorch

        return ShardedTorch(device, members_on, dist)
    if framework == "torch":
        from ._torch import Torch

        return Torch(device, members_on)
    if framework == "numpy":
        from ._numpy import Numpy

        return Numpy(device, members_on)
    raise ValueError(f"framework must be \"torch\" or \"numpy\", not {framework!r}")


class _Server:
    """One rank's state: the backend, the members held, the negotiated version."""

    def __init__(self, loss_fn, backend, grad, name, protocol, dist, on_members=None):
        self.loss_fn, self.backend, self.grad = loss_fn, backend, bool(grad)
        self.on_members = on_members
        self.name, self.protocol, self.dist = name, protocol, dist
        self.members = Members()
        self.version = 1

    def hello(self, req):
        offered = int(req.get("protocol", 1))
        self.version = max(1, min(offered, self.protocol))
        reply = {
            "type": "hello",
            "protocol": self.version,
            "grad": self.grad,
            "framework": self.backend.name,
            "name": self.name or os.path.basename(sys.argv[0] or "evaluator"),
            # Protocol 1: candidate dtypes it reads besides float32 (sewa then sends bf16/f16
            # members' candidates in their own dtype: half the bytes).
            "dtypes": list(getattr(self.backend, "dtypes", [])),
        }
        if self.version >= 2:
            reply["mix"] = True
            reply["formats"] = self.backend.formats
        return reply

    def members_msg(self, req):
        if self.on_members is not None and req.get("add"):
            self.on_members([(str(a["id"]), decode_path(a["path"]), a["format"])
                             for a in req["add"]])
        held = self.members.change(self.backend, req)
        added = [str(a["id"]) for a in req.get("add", [])]
        removed = [str(r) for r in req.get("remove", [])]
        where = f" on rank {self.dist.rank}" if self.dist is not None else ""
        print(f"sewa_evaluator: members added {added} removed {removed}, holding {held} "
              f"({self.members.nbytes()} bytes{where})", file=sys.stderr, flush=True)
        return {"type": "ready", "members": held}

    def evaluate(self, req):
        want_grad = bool(req.get("grad")) and self.grad
        weights = req["weights"]
        if isinstance(weights, dict):
            return self._evaluate_mix(req, weights, want_grad)
        return self._evaluate_file(req, weights, want_grad)

    def _evaluate_file(self, req, path, want_grad):
        weights = self.backend.load(path, want_grad)
        loss, grads = self.backend.evaluate(self.loss_fn, weights, want_grad)
        if self.dist is not None:
            raise RuntimeError("under torchrun, use protocol 2 (sewa sends mixing weights)")
        reply = _result(req["id"], loss)
        if grads is not None and math.isfinite(loss):
            self.backend.save(grads, req["grad_path"])
            reply["grad"] = req["grad_path"]
        return reply

    def _evaluate_mix(self, req, weights, want_grad):
        weights = {str(k): float(v) for k, v in weights.items()}
        unknown = [k for k in weights if k not in self.members.held]
        if unknown:
            raise KeyError(f"weights for members never added: {unknown}")
        ints = str(req.get("ints") or next(reversed(weights)))
        loss, dots = self.backend.evaluate_mix(self.loss_fn, self.members, weights, ints, want_grad)
        if self.dist is not None:
            if not self.dist.agreed:
                self.dist.agree(True)
            loss, dots = self.dist.reduce(loss, dots, list(self.members.held),
                                          getattr(self.backend, "sum_dots", False))
        reply = _result(req["id"], loss)
        if dots is not None:
            reply["dots"] = {k: (v if math.isfinite(v) else None) for k, v in dots.items()}
        return reply


def _result(rid, loss):
    reply = {"type": "result", "id": rid, "loss": loss if math.isfinite(loss) else None}
    if not math.isfinite(loss):
        reply["loss_repr"] = repr(loss)
    return reply


def _handle(server, req):
    """The reply to one request; a failure becomes an error reply. Under torchrun every rank
    runs this for every request and they agree on success exactly once."""
    dist = server.dist
    if dist is not None:
        dist.agreed = False
    try:
        reply = _dispatch(server, req)
        if dist is not None and not dist.agreed:
            dist.agree(True)
        return reply
    except Exception as e:  # report, keep serving: sewa decides what to do
        traceback.print_exc(file=sys.stderr)
        if dist is not None and not dist.agreed:
            dist.agree(False)
        return {"type": "error", "id": req.get("id"), "message": f"{type(e).__name__}: {e}"}


def _dispatch(server, req):
    kind = req.get("type")
    if kind == "hello":
        return server.hello(req)
    if kind == "members":
        return server.members_msg(req)
    if kind == "evaluate":
        return server.evaluate(req)
    raise ValueError(f"unknown request {kind!r}")


def serve(loss_fn, *, grad=True, framework="torch", name=None, device="cpu",
          members_on="device", protocol=None, on_members=None, shard_members=False,
          module=None):
    """Answer sewa's requests until stdin closes (or sewa says shutdown).

    loss_fn(weights) -> a scalar, or (torch) an iterable of scalar tensor terms whose sum is the
    loss, back-propagated one by one (per-batch backward: one term's graph alive at a time).
    `grad=False` declares the evaluator forward-only.
    `framework` is "torch" or "numpy"; `device` is "cpu", "cuda" or "cuda:N" (torch; under
    torchrun "cuda" means this rank's local GPU); `members_on` keeps the window's members on
    the device ("device") or in pinned host memory ("cpu"). `name` is shown in sewa's logs.
    `protocol` caps the version spoken (default: the highest both sides speak).
    `on_members(added)`: called with [(id, path, format)] before a `members` message's added
    members are loaded (protocol 2; paths decoded, as sewa sent them); raising refuses the
    message with that error and changes nothing.
    `shard_members=True` (torch, protocol 2): under torchrun each rank holds a 1/W slice of
    every member (memory per rank ~K/W members); the mixture is gathered whole for `loss_fn`
    and the dot products are summed over the slices. See docs/evaluator.md, "Sharded members".
    `module=m`, an FSDP2 module (`fully_shard`): each rank holds, of every member, the local
    shards of m's parameters; a request writes the mixture into them and `loss_fn` runs m
    (FSDP gathers in forward, gradients come back sharded).
    """
    from . import _dist

    dist = _dist.start(framework, device)
    if dist is not None and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    backend = _backend(framework, device, members_on, shard_members, dist, module)
    cap = PROTOCOL if protocol is None else min(int(protocol), PROTOCOL)
    server = _Server(loss_fn, backend, grad, name, cap, dist, on_members)
    # Every rank's prints go to stderr (under torchrun all ranks share sewa's stdout pipe);
    # only rank 0 writes protocol lines.
    proto = _protocol_stream()
    if dist is not None and dist.rank != 0:
        proto.close()
        proto = None
    requests = _dist.requests(sys.stdin, dist)
    for req in requests:
        if req.get("type") == "shutdown":
            break
        reply = _handle(server, req)
        if proto is not None:
            _send(proto, reply)
