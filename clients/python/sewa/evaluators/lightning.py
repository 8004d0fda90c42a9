"""A LightningModule's own loss on saved validation batches, served to sewa (protocol 2).

    python -m sewa.evaluators.lightning --spec module.json --batches batches.pt \\
        [--device cpu] [--members-on device] [--threads N]

`sewa.integrations.lightning.SewaCallback` writes both files at train begin and puts this
command in sewa's config; nobody has to write an evaluator script.

The spec (`write_spec`) names how to rebuild the module: its class (module and qualified
name; for a class defined in the training script itself, the script's path, imported here
under another name so that its `if __name__ == "__main__":` block does not run) with its
hyper-parameters, or a zero-argument factory; and the loss: the module's own
`validation_step(batch, batch_idx)` (its returned tensor, or a dict's "loss"), or a function
`loss_fn(module, batch) -> scalar tensor`. Only what the spec names is imported: the user's
own code, named by the user's own process in its own output directory. Nothing sewa sends is
ever executed (members are read with `torch.load(weights_only=True)` or safetensors).

Each request's weights are the window's `.ckpt` `state_dict` tensors mixed by the client
(the names of `pl_module.state_dict()`); they reach the step through
`torch.func.functional_call` on a thin wrapper whose forward calls the step, so autograd
carries the gradient back to them. The loss is the mean over the saved batches weighted by
each batch's rows (the first tensor's first dimension). Buffers (batch norm's running
statistics) are mixed too but enter detached: torch cannot differentiate through them, so
their share of the gradient is zero. Each batch's term is back-propagated as it comes
(the client's per-batch backward), so one batch's activations are alive at a time.

This module also holds the spec's format (`describe`, `write_spec`, `read_spec`, `resolve`),
which the callback uses; it imports neither torch nor Lightning until they are needed.
"""

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
import warnings

SPEC_FORMAT = "sewa-lightning-module"
SPEC_VERSION = 1

# The name a training script's file is imported under here: never "__main__", so the
# script's `if __name__ == "__main__":` block (its training) does not run.
SCRIPT_MODULE = "_sewa_user_script"


# ----------------------------------------------------------------------------------------
# Naming the user's code: references that another process can import.

def _package_root(file, modname):
    """The sys.path entry from which `modname` imports as `file` (None when unknowable)."""
    if not file:
        return None
    path = os.path.abspath(file)
    parts = modname.split(".")
    up = len(parts) + (1 if os.path.basename(path).startswith("__init__.") else 0)
    for _ in range(up):
        path = os.path.dirname(path)
    return path


def describe(obj, what):
    """A reference to a module-level class or function `obj` that the evaluator can import:
    {"module", "qualname", "file" (a script run as __main__, else null), "sys_path"}.
    `obj` may also be a string "package.module:name". Raises ValueError naming `what` when
    `obj` cannot be imported from another process (a lambda, a local, a notebook cell)."""
    if isinstance(obj, str):
        return _describe_string(obj, what)
    modname = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not modname or not qualname or "<" in qualname:
        raise ValueError(
            f"{what} {obj!r} cannot be imported by sewa's evaluator process: define it at the "
            f"top level of a .py file (not as a lambda, inside a function, or in a notebook)")
    mod = sys.modules.get(modname)
    file = getattr(mod, "__file__", None)
    ref = {"module": modname, "qualname": qualname, "file": None, "sys_path": []}
    if modname == "__main__":
        spec = getattr(mod, "__spec__", None)
        if spec is not None and spec.name and spec.name != "__main__":
            # `python -m package.module`: importable under its real name
            ref["module"] = spec.name
        elif file:
            ref["file"] = os.path.abspath(file)
            ref["sys_path"].append(os.path.dirname(ref["file"]))
        else:
            raise ValueError(
                f"{what} {qualname} is defined in an interactive session (no file): move it "
                f"into a .py file and import it from there")
    root = _package_root(file, ref["module"]) if ref["file"] is None else None
    if root:
        ref["sys_path"].append(root)
    return ref


def _describe_string(text, what):
    modname, sep, qualname = text.partition(":")
    if not sep or not modname or not qualname:
        raise ValueError(f"{what} {text!r}: give it as \"package.module:name\"")
    try:
        obj = resolve({"module": modname, "qualname": qualname, "file": None, "sys_path": []})
    except Exception as e:
        raise ValueError(f"{what} {text!r} does not import here: {type(e).__name__}: {e}") from e
    ref = describe(obj, what)
    # Keep the name the user gave (a re-export imports the same way in the evaluator).
    ref["module"], ref["qualname"] = modname, qualname
    root = _package_root(getattr(sys.modules.get(modname), "__file__", None), modname)
    if root and root not in ref["sys_path"]:
        ref["sys_path"].append(root)
    return ref


def _import_script(file):
    """A training script's module, imported under SCRIPT_MODULE (once per process)."""
    mod = sys.modules.get(SCRIPT_MODULE)
    if mod is not None and getattr(mod, "__file__", None) == file:
        return mod
    spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"{file}: cannot be imported as a Python file")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[SCRIPT_MODULE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[SCRIPT_MODULE]
        raise
    return mod


def resolve(ref):
    """The object a reference names (imports the user's module; nothing else runs)."""
    for p in reversed(ref.get("sys_path") or []):
        if p not in sys.path:
            sys.path.insert(0, p)
    if ref.get("file"):
        mod = _import_script(ref["file"])
    else:
        mod = importlib.import_module(ref["module"])
    obj = mod
    for part in ref["qualname"].split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------
# The spec file.

def module_spec(module, build_module=None, loss_fn=None):
    """The spec of a LightningModule instance (a dict, checked now so a mistake fails at
    train begin rather than in sewa's log): how to rebuild it and which loss to compute."""
    spec = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "loss_fn": None,
            "class": None, "hparams": None, "factory": None}
    if loss_fn is not None:
        spec["loss_fn"] = describe(loss_fn, "loss_fn")
    if build_module is not None:
        spec["factory"] = describe(build_module, "build_module")
        return spec
    cls = type(module)
    spec["class"] = describe(cls, "the LightningModule class")
    hparams = dict(getattr(module, "hparams", {}) or {})
    advice = ("call self.save_hyperparameters() in __init__ with plain values (numbers, "
              "strings, lists, dicts), or pass SewaCallback(build_module=...) an importable "
              "zero-argument function that returns the module")
    try:
        text = json.dumps(hparams, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cls.__qualname__}.hparams cannot be written as JSON ({e}), so "
                         f"sewa's evaluator cannot rebuild the module: {advice}") from e
    try:
        inspect.signature(cls).bind(**hparams)
    except TypeError as e:
        raise ValueError(f"{cls.__qualname__}(**hparams) would fail ({e}; hparams: "
                         f"{sorted(hparams)}), so sewa's evaluator cannot rebuild the module: "
                         f"{advice}") from e
    spec["hparams"] = json.loads(text)
    return spec


def write_spec(path, spec):
    """Write a spec atomically (temp file, fsync, rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_spec(path):
    with open(path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"{path}: not a sewa Lightning module spec (format {SPEC_FORMAT!r})")
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"{path}: spec version {spec.get('version')!r}, this sewa reads "
                         f"{SPEC_VERSION}")
    if not spec.get("factory") and not spec.get("class"):
        raise ValueError(f"{path}: names neither a module class nor a factory")
    return spec


def build(spec):
    """The LightningModule a spec describes (its own initial weights: every request replaces
    them)."""
    if spec.get("factory"):
        return resolve(spec["factory"])()
    return resolve(spec["class"])(**(spec.get("hparams") or {}))


# ----------------------------------------------------------------------------------------
# The loss.

def batch_rows(batch):
    """Rows of a batch: the first dimension of its first tensor (1 for a scalar)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    items = batch.values() if isinstance(batch, dict) else (
        batch if isinstance(batch, (list, tuple)) else ())
    for b in items:
        n = batch_rows(b)
        if n is not None:
            return n
    return None


def to_device(batch, device):
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    if isinstance(batch, tuple):
        return tuple(to_device(v, device) for v in batch)
    return batch


def step_loss(out, where):
    """The scalar loss in what a step returned: a tensor, or a dict's "loss"."""
    import torch

    if isinstance(out, dict) and "loss" in out:
        out = out["loss"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{where} returned {type(out).__name__}, not a loss tensor: return the loss (or "
            f"{{\"loss\": loss}}) from it, or pass SewaCallback(loss_fn=...) a function "
            f"loss_fn(module, batch) -> scalar tensor")
    if out.numel() != 1:
        raise ValueError(f"{where} returned a tensor of shape {tuple(out.shape)}, not a scalar")
    return out.reshape(())


def _step_module(module, loss_fn):
    """A thin nn.Module whose forward computes the loss of one batch, so that
    functional_call can swap the wrapped module's weights for sewa's mixture."""
    import torch

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module

        def forward(self, batch, batch_idx):
            if loss_fn is None:
                return step_loss(self.module.validation_step(batch, batch_idx),
                                 "validation_step")
            return step_loss(loss_fn(self.module, batch), "loss_fn")

    return Step()


def make_loss_fn(module, batches, loss_fn=None):
    """loss_fn(weights) for `serve`: the rows-weighted mean of the step's loss over
    `batches`, with `weights` (the .ckpt state_dict names) applied by functional_call."""
    import torch

    step = _step_module(module, loss_fn)
    rows = [batch_rows(b) or 1 for b in batches]
    total = float(sum(rows))
    expected = set(module.state_dict().keys())
    # Buffers (batch norm's running statistics) are mixed like every float tensor, but torch
    # cannot differentiate through them (native_batch_norm refuses running_mean with
    # requires_grad): they enter detached, and their share of the gradient is zero.
    buffers = {n for n, _ in module.named_buffers()}
    checked = []

    def check(names):
        unknown = sorted(set(names) - expected)
        missing = sorted(expected - set(names))
        if unknown or missing:
            raise KeyError(
                f"the checkpoints' state_dict does not match the rebuilt "
                f"{type(module).__qualname__}: unknown {unknown[:5]}"
                f"{' …' if len(unknown) > 5 else ''}, missing {missing[:5]}"
                f"{' …' if len(missing) > 5 else ''} (were the hyper-parameters changed "
                f"after save_hyperparameters()?)")
        checked.append(True)

    def loss(weights):
        # One term per batch, each its share of the mean: the client back-propagates each as it
        # comes, so one batch's graph is alive at a time (per-batch backward).
        if not checked:
            check(weights.keys())
        named = {f"module.{k}": (v.detach() if k in buffers else v) for k, v in weights.items()}
        for i, (b, n) in enumerate(zip(batches, rows)):
            yield torch.func.functional_call(step, named, (b, i)) * (n / total)

    return loss


# ----------------------------------------------------------------------------------------
# The process.

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m sewa.evaluators.lightning",
        description="Serve a LightningModule's own loss on saved validation batches to sewa.")
    p.add_argument("--spec", required=True, help="the module spec the callback wrote")
    p.add_argument("--batches", required=True, help="the held-out batches file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--members-on", default="device", choices=["device", "cpu"],
                   help="keep the window's members on the device or in (pinned) host memory")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: max(1, cpus // 4))")
    return p.parse_args(argv)


def setup(args):
    """(module, batches, loss_fn for serve) from the parsed arguments."""
    from . import _batches, _common

    _common.set_threads(args.threads)
    args.device = _common.resolve_device(args.device)
    spec = read_spec(args.spec)
    module = build(spec)
    module.to(args.device)
    module.eval()  # as Lightning validates: dropout off, batch norm on running statistics
    batches, _meta = _batches.load(args.batches)
    batches = [to_device(b, args.device) for b in batches]
    user_loss = resolve(spec["loss_fn"]) if spec.get("loss_fn") else None
    return module, batches, make_loss_fn(module, batches, user_loss)


def main(argv=None):
    args = parse_args(argv)
    # validation_step's self.log() has no trainer here; Lightning warns about it once.
    warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
    from sewa_evaluator import serve

    _module, batches, loss_fn = setup(args)
    print(f"sewa.evaluators.lightning: {len(batches)} batches on {args.device}",
          file=sys.stderr, flush=True)
    serve(loss_fn, device=args.device, members_on=args.members_on,
          name="sewa.evaluators.lightning")


if __name__ == "__main__":
    main()
