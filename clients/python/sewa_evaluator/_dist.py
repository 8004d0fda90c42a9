"""torchrun support: rank 0 reads sewa's requests and broadcasts each one; every rank handles
it (loads members, evaluates its shard); losses and per-member dot products are summed across
ranks, each rank's weighted by its share of the rows (`shard`). Only rank 0 replies. A rank
that raises makes the reply an error (the others still reach the collective); a rank that
dies takes torchrun down, so sewa sees the evaluator exit and restarts it."""

import json
import os


def start(framework, device):
    """The process group under torchrun (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if framework != "torch":
        raise ValueError("torchrun needs framework=\"torch\"")
    return _Dist(device)


class _Dist:
    def __init__(self, device):
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = str(device).startswith("cuda")
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        self.device = torch.device(f"cuda:{self.local_rank}") if cuda else torch.device("cpu")
        self.agreed = False

    def broadcast(self, line):
        """Rank 0's request line (None at EOF) on every rank."""
        box = [line]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, ok):
        """Every rank says whether its part of the request worked, once per request; raises on
        the ranks that did when another did not, so all reply the same."""
        self.agreed = True
        t = self.torch.tensor([0.0 if ok else 1.0], dtype=self.torch.float64, device=self.device)
        self.dist.all_reduce(t)
        if ok and t.item() > 0:
            raise RuntimeError("another rank failed on this request (see its stderr)")

    def reduce(self, loss, dots, ids, sum_dots=False):
        """Row-weighted sums of the loss and of the dots across ranks; with `sum_dots` the dots
        are plain sums (per-slice parts of one dot product, members held sharded)."""
        from . import _shard_weight

        torch = self.torch
        w = _shard_weight["w"]
        w = 1.0 / self.world if w is None else w
        dw = 1.0 if sum_dots else w
        vals = [w * loss] + ([dw * dots[i] for i in ids] if dots is not None else [])
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        out = t.tolist()
        return out[0], (dict(zip(ids, out[1:])) if dots is not None else None)


def requests(stdin, dist):
    """Parsed requests: from stdin, or under torchrun from rank 0's stdin on every rank."""
    if dist is None:
        for line in stdin:
            if line.strip():
                yield json.loads(line)
        return
    while True:
        line = None
        if dist.rank == 0:
            line = stdin.readline()
            while line and not line.strip():
                line = stdin.readline()
            line = line or None
        line = dist.broadcast(line)
        if line is None:
            return
        yield json.loads(line)
