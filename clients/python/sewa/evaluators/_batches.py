"""The held-out batches file: what a callback saves once (the trainer's eval set, batched by the
trainer's own collator) and an evaluator reads back.

The file is a `torch.save` of {"format": "sewa-batches", "version": 1, "batches": [...],
"meta": {...}}, where each batch is a tensor or a dict / list / tuple of them (nested), and
`meta` holds plain strings and numbers. It is read with `torch.load(weights_only=True)`, so
loading it executes nothing. Batches are stored on the CPU, detached and contiguous.
"""

FORMAT = "sewa-batches"
VERSION = 1


def to_cpu(batch):
    """`batch` with every tensor detached, on the CPU and contiguous; other leaves (None,
    numbers, strings) kept, so the structure the collator made is what the evaluator sees."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu().contiguous()
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        # dicts and dict-likes (transformers' BatchEncoding) become plain dicts
        return {str(k): to_cpu(batch[k]) for k in batch.keys()}
    if isinstance(batch, (list, tuple)):
        return [to_cpu(b) for b in batch] if isinstance(batch, list) else tuple(
            to_cpu(b) for b in batch)
    if batch is None or isinstance(batch, (bool, int, float, str)):
        return batch
    raise TypeError(f"a batch holds a {type(batch).__name__}; only tensors, dicts, lists, "
                    f"tuples, numbers and strings can be saved")


def save(path, batches, meta=None, max_batches=None):
    """Write `batches` (an iterable; at most `max_batches` of it) to `path` atomically
    (a temporary file renamed over it). Returns how many batches were written."""
    import os
    import torch

    out = []
    for b in batches:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(to_cpu(b))
    if not out:
        raise ValueError("no held-out batches to save (is the eval dataset empty?)")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, "batches": out,
                    "meta": dict(meta or {})}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(out)


def load(path):
    """(batches, meta) from a file `save` wrote; a clear error for anything else."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sewa batches file (format {FORMAT!r})")
    if obj.get("version") != VERSION:
        raise ValueError(f"{path}: batches file version {obj.get('version')!r}, this sewa "
                         f"reads {VERSION}")
    batches = obj.get("batches")
    if not isinstance(batches, list) or not batches:
        raise ValueError(f"{path}: no batches in it")
    return batches, dict(obj.get("meta") or {})
