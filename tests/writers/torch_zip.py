"""Write torch.save-format zip files with the standard library only (no torch, no numpy).

How it works: torch.save pickles the object (protocol 2) with a persistent_id hook that turns
each tensor storage into ("storage", torch.<Kind>Storage, "<key>", "cpu", numel) and stores
the storage's bytes as the zip entry `<archive>/data/<key>`; a tensor is pickled as
torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()). We build
the same opcodes by registering stand-in `torch` and `torch._utils` modules in sys.modules, so
Python's own pickler writes the GLOBAL references torch would. The entries (data.pkl,
byteorder, data/N, version) are stored uncompressed like torch's, compared against
tests/fixtures/state_dict.pt with `python3 -m zipfile -l` and `pickletools.dis`. Nothing here
is imported by sewa; tests call it to make layouts the committed fixtures do not cover.

    from torch_zip import Tensor, save
    save({"net": {"w": Tensor.f32([2, 2], [1, 2, 3, 4])}, "step": 500}, "x.pt")

Run as a script it writes one of the named layouts of `LAYOUTS` (see --help).
"""

import argparse
import collections
import io
import pickle
import struct
import sys
import types
import zipfile

_STORAGES = {"f32": ("FloatStorage", "<f"), "i64": ("LongStorage", "<q"), "u8": ("ByteStorage", "<B")}


def _stand_in_torch():
    """Modules named like torch's, holding only the names the pickle refers to."""
    if "torch" in sys.modules and not getattr(sys.modules["torch"], "_sewa_stand_in", False):
        raise RuntimeError("real torch is imported: use torch.save instead")
    torch = types.ModuleType("torch")
    torch._sewa_stand_in = True
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise RuntimeError("stand-in")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for cls, _ in _STORAGES.values():
        setattr(torch, cls, type(cls, (), {"__module__": "torch"}))
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    return torch


_TORCH = _stand_in_torch()


class Tensor:
    """A dense, contiguous CPU tensor: dtype name, shape and its values."""

    def __init__(self, dtype, shape, values):
        n = 1
        for d in shape:
            n *= d
        if len(values) != n:
            raise ValueError(f"{len(values)} values for shape {shape}")
        self.dtype, self.shape, self.values = dtype, list(shape), list(values)

    @staticmethod
    def f32(shape, values):
        return Tensor("f32", shape, values)

    @staticmethod
    def i64(shape, values):
        return Tensor("i64", shape, values)

    def data(self):
        fmt = _STORAGES[self.dtype][1]
        return b"".join(struct.pack(fmt, v) for v in self.values)

    def strides(self):
        out, acc = [], 1
        for d in reversed(self.shape):
            out.append(acc)
            acc *= d
        return tuple(reversed(out))

    def __reduce__(self):
        storage = _Storage(self)
        args = (storage, 0, tuple(self.shape), self.strides(), False, collections.OrderedDict())
        return (_TORCH._utils._rebuild_tensor_v2, args)


class _Storage:
    def __init__(self, tensor):
        self.tensor = tensor


class _Pickler(pickle.Pickler):
    def __init__(self, f):
        super().__init__(f, protocol=2)
        self.storages = []

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        key = str(len(self.storages))
        self.storages.append((key, obj.tensor.data()))
        cls = getattr(_TORCH, _STORAGES[obj.tensor.dtype][0])
        return ("storage", cls, key, "cpu", len(obj.tensor.values))


def dumps(obj, archive="archive"):
    """The bytes of a torch.save zip holding `obj` (dicts, lists, ints, floats, Tensors)."""
    buf = io.BytesIO()
    p = _Pickler(buf)
    p.dump(obj)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", buf.getvalue())
        z.writestr(f"{archive}/byteorder", b"little")
        for key, data in p.storages:
            z.writestr(f"{archive}/data/{key}", data)
        z.writestr(f"{archive}/version", b"3\n")
    return out.getvalue()


def save(obj, path):
    with open(path, "wb") as f:
        f.write(dumps(obj))


def model(step):
    """The fake trainer's tensors for `step` (tests/writers/trainer.py): w, b float, n int."""
    w = [step + i / 8 for i in range(64)]
    b = [-step / 2 + i for i in range(16)]
    return {"w": Tensor.f32([8, 8], w), "b": Tensor.f32([16], b), "n": Tensor.i64([], [step])}


def optimizer(step):
    """An Adam-like optimizer.state_dict(): tensors under state[i], no dict of tensors."""
    state = {
        i: {"step": Tensor.f32([], [float(step)]), "exp_avg": Tensor.f32([n], [0.1] * n)}
        for i, n in enumerate([64, 16])
    }
    return {"state": state, "param_groups": [{"lr": 0.001, "params": [0, 1]}]}


LAYOUTS = {
    # {"net": sd, "step": s}: a custom key (needs --state-key net) and a step inside.
    "net-step": lambda s: {"net": model(s), "step": s},
    # {"model": sd, "global_step": s, "epoch": 3}
    "model-global-step": lambda s: {"model": model(s), "global_step": s, "epoch": 3},
    # {"model_state_dict": sd, "iteration": s}
    "iteration": lambda s: {"model_state_dict": model(s), "iteration": s},
    # {"state_dict": sd, "epoch": s}: only an epoch
    "epoch": lambda s: {"state_dict": model(s), "epoch": s},
    # a bare state dict (no step anywhere)
    "plain": lambda s: model(s),
    # optimizer.state_dict() alone
    "optimizer": optimizer,
    # {"state": sd}: named like an optimizer's entry, but a state dict
    "state": lambda s: {"state": model(s)},
    # {"optimizer": opt, "scheduler": {...}, "step": s}
    "optimizer-nested": lambda s: {"optimizer": optimizer(s), "scheduler": {"last_epoch": s}, "step": s},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    ap.add_argument("--step", type=int, default=500)
    a = ap.parse_args()
    save(LAYOUTS[a.layout](a.step), a.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
