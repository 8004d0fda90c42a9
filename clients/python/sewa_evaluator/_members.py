"""Protocol 2's members on the evaluator side: where a member's tensors are (file formats as
sewa names them on the wire) and the set of members held, changed by sewa's `members`
messages. Loading a file is the backend's (numpy or torch); this module only resolves paths
and checks what was loaded."""

import json
import os

# Formats the backends resolve to files; "torch" needs the torch backend.
SAFETENSORS_FORMATS = ["safetensors", "safetensors-index", "hf-dir"]


def decode_path(p):
    """A path as sewa writes it in JSON: a string, or {"bytes_hex": ...} for non-UTF-8 paths."""
    if isinstance(p, dict):
        return os.fsdecode(bytes.fromhex(p["bytes_hex"]))
    return p


def files_of(path, fmt):
    """[(kind, file)] holding a member's tensors; kind is "safetensors" or "torch"."""
    if fmt == "safetensors":
        return [("safetensors", path)]
    if fmt == "torch":
        return [("torch", path)]
    if fmt == "safetensors-index":
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        base = os.path.dirname(path)
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if os.path.basename(s) != s:
                raise ValueError(f"{path}: shard name {s!r} is not a file name")
        return [("safetensors", os.path.join(base, s)) for s in shards]
    if fmt == "hf-dir":
        for name, kind in (("model.safetensors", "safetensors"),
                           ("model.safetensors.index.json", "safetensors-index"),
                           ("pytorch_model.bin", "torch")):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return files_of(p, kind)
        raise ValueError(f"{path}: no model.safetensors, shard index or pytorch_model.bin")
    raise ValueError(f"format {fmt!r} is not one this evaluator loads")


def state_dict_of(obj):
    """The tensors of a torch checkpoint: its top level, or under one of the keys sewa reads."""
    import torch

    def tensors(d):
        return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    if isinstance(obj, dict):
        top = tensors(obj)
        if top:
            return top
        for key in ("state_dict", "model_state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                inner = tensors(obj[key])
                if inner:
                    return inner
    raise ValueError("no state dict of tensors in it")


class Members:
    """The members held: id -> {name: tensor}, in the order sewa added them."""

    def __init__(self):
        self.held = {}

    def change(self, backend, msg):
        """Apply a `members` message: load every added member first (nothing changes if one
        fails, and the error names it), then drop the removed ones."""
        loaded = {}
        for entry in msg.get("add", []):
            mid, path, fmt = str(entry["id"]), decode_path(entry["path"]), entry["format"]
            try:
                tensors = backend.load_member(files_of(path, fmt))
            except Exception as e:
                raise RuntimeError(f"cannot load member {mid} from {path} ({fmt}): "
                                   f"{type(e).__name__}: {e}") from e
            want = entry.get("tensors")
            if want is not None and len(tensors) != want:
                raise RuntimeError(f"member {mid} from {path}: loaded {len(tensors)} tensors, "
                                   f"sewa sees {want}")
            loaded[mid] = tensors
        for mid in msg.get("remove", []):
            self.held.pop(str(mid), None)
        self.held.update(loaded)
        return len(self.held)

    def floats(self, backend):
        """Names of the floating tensors (the mixed ones), from the first member."""
        first = next(iter(self.held.values()))
        return sorted(n for n, t in first.items() if backend.is_float(t))

    def nbytes(self):
        """Bytes of the tensors held (on this rank: its slices when members are sharded)."""
        # `.nbytes`: numpy arrays and torch tensors both have it (the numpy backend holds arrays)
        return sum(int(t.nbytes) for m in self.held.values() for t in m.values())
