"""What the shipped evaluators share: their thread limit, the device under torchrun, logging to
stderr, and finding and reading the `config.json` that describes a window member's model.

Nothing here imports a module or runs code named by a file: a config is read as JSON and only
ever handed to `transformers`' own config classes by the evaluator that uses it.
"""

import json
import os
import sys

# Bytes of config.json read at most: real configs are a few KB; a larger file is not a config.
CONFIG_MAX_BYTES = 4 << 20

# Keys of config.json that say nothing about the model's shape or computation: a member whose
# config differs from the model's only in these does not rebuild the model.
CONFIG_IGNORED = frozenset({"transformers_version", "_name_or_path", "_commit_hash",
                            "torch_dtype", "dtype", "use_cache", "_attn_implementation_autoset"})


def log(prefix, msg):
    print(f"{prefix}: {msg}", file=sys.stderr, flush=True)


def cpu_count():
    """The cores this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(cpus=None):
    """A small share of the cores (a quarter, at least one): the evaluator runs beside a
    trainer, which needs the rest. Under torchrun, that share is split between local ranks."""
    cpus = cpu_count() if cpus is None else cpus
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus // 4 // local)


def set_threads(threads):
    """Set torch's intra-op threads (`threads` or the default); returns the number set."""
    import torch

    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"--threads must be at least 1, not {n}")
    torch.set_num_threads(n)
    return n


def resolve_device(device):
    """`device` as the evaluator uses it: under torchrun, plain "cuda" is this rank's GPU."""
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def member_config_dir(path, fmt):
    """The directory whose config.json describes a member sewa names: the member itself for
    an HF checkpoint dir (`hf-dir`), else the directory holding the member's file."""
    if fmt == "hf-dir":
        return path
    return os.path.dirname(os.path.abspath(path))


def find_config(path, fmt, fallback_dir=None):
    """The config.json for a member: beside it, else in `fallback_dir` (a staged copy in
    sewa's private directory has none beside it). Raises naming both places when neither has
    one."""
    tried = []
    for d in (member_config_dir(path, fmt), fallback_dir):
        if d is None:
            continue
        p = os.path.join(d, "config.json")
        if os.path.isfile(p):
            return p
        tried.append(p)
    hint = "" if fallback_dir else " (pass --config-dir DIR holding the model's config.json)"
    raise FileNotFoundError(f"no config.json for member {path}: tried {', '.join(tried)}{hint}")


def read_config(path):
    """config.json as a dict; a clear error naming the file when it is not one."""
    size = os.path.getsize(path)
    if size > CONFIG_MAX_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than a config.json holds "
                         f"({CONFIG_MAX_BYTES} at most)")
    with open(path, "rb") as f:
        raw = f.read(CONFIG_MAX_BYTES + 1)
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    return cfg


def config_key(cfg):
    """What decides whether two configs build the same model (CONFIG_IGNORED left out)."""
    return json.dumps({k: v for k, v in cfg.items() if k not in CONFIG_IGNORED}, sort_keys=True)
