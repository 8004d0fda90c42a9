"""The generic Hugging Face evaluator: a model's own `loss` on held-out data, served to sewa
(protocol 2, gradients by autograd, one batch's graph alive at a time).

    python -m sewa.evaluators.hf --batches FILE [--config-dir DIR] [--device cpu] ...
    python -m sewa.evaluators.hf --text FILE --tokenizer DIR [--max-tokens N] [--batch 8] ...

The model is rebuilt from each window member's own config.json (beside the member: an HF
`checkpoint-N/` dir, or the directory of a member file; for the copies sewa stages in its
private directory, from `--config-dir DIR`): the class named by `architectures[0]`, looked up
in `transformers` by name (only its own model classes: no `trust_remote_code`, nothing a file
names is imported), built once from the config (no weights downloaded, no hub) and rebuilt
only when a member's config differs. Each request's weights are the mixture of the members
(torch.func.functional_call); the loss is `model(**batch).loss`, batch by batch, weighted by
what the loss is a mean over: predicted tokens for causal LMs (`labels[..., 1:] != -100`),
labelled tokens for masked LMs and token classifiers (`labels != -100`), rows otherwise
(`--loss-weight` overrides).

Data: `--batches FILE`, the file `sewa.evaluators._batches.save` writes (a Trainer's eval set
batched by its collator; the HF callback writes it), or `--text FILE --tokenizer DIR` for a
causal LM: a jsonl file (one document per record, `--text-key`) or a plain text file, which is
tokenized whole and cut into blocks of `--max-tokens` (default: the config's
`max_position_embeddings`, `n_positions` or `n_ctx`, capped at 2048; logged).

Threads: `--threads N` torch intra-op threads, default a quarter of the cores this process may
use (at least 1; split between local ranks under torchrun), so the evaluator does not take the
trainer's cores. Under torchrun each rank evaluates its share of the batches.
"""

import argparse
import os
import sys

from . import _common

PREFIX = "sewa.evaluators.hf"

# The default --max-tokens is the model's context length, capped here: activations grow with it
# and a held-out block longer than this rarely changes the loss a selection needs.
MAX_TOKENS_CAP = 2048
# The default when a config names no context length at all.
MAX_TOKENS_FALLBACK = 1024

LOSS_WEIGHTS = ("auto", "shifted-tokens", "tokens", "rows")
IGNORE = -100


def log(msg):
    _common.log(PREFIX, msg)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sewa.evaluators.hf",
                                 description=__doc__.splitlines()[0])
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--batches", metavar="FILE",
                      help="held-out batches saved by sewa.evaluators._batches.save")
    data.add_argument("--text", metavar="FILE",
                      help="held-out text: jsonl (one document per record) or plain text")
    ap.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory for --text")
    ap.add_argument("--text-key", default="text", help="jsonl field holding the text")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens per block for --text (default: the model's context, capped "
                         f"at {MAX_TOKENS_CAP})")
    ap.add_argument("--batch", type=int, default=8, help="blocks per batch for --text")
    ap.add_argument("--config-dir", metavar="DIR",
                    help="config.json for members that have none beside them (staged copies)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--members-on", default="device", choices=["device", "cpu"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: a quarter of the cores, at least 1)")
    ap.add_argument("--loss-weight", default="auto", choices=LOSS_WEIGHTS)
    ap.add_argument("--name", default=None, help="name shown in sewa's logs")
    args = ap.parse_args(argv)
    if args.text is not None and args.tokenizer is None:
        ap.error("--text needs --tokenizer DIR")
    if args.batch < 1:
        ap.error("--batch must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 2:
        ap.error("--max-tokens must be at least 2")
    return args


# --- pure decisions ------------------------------------------------------------------------

def _names(mapping):
    out = set()
    for v in mapping.values():
        out.update([v] if isinstance(v, str) else list(v))
    return out


def auto_loss_weight(arch):
    """What `arch`'s own loss is a mean over: "shifted-tokens", "tokens" or "rows"."""
    from transformers.models.auto import modeling_auto as m

    if arch.endswith("ForCausalLM") or arch in _names(m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "shifted-tokens"
    if (arch.endswith("ForMaskedLM") or arch.endswith("ForTokenClassification")
            or arch in _names(m.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
            or arch in _names(m.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES)):
        return "tokens"
    return "rows"


def batch_weight(batch, mode):
    """The number the loss of `batch` is a mean over, under `mode`."""
    labels = batch.get("labels")
    if mode in ("shifted-tokens", "tokens"):
        if labels is None:
            raise ValueError(f"--loss-weight {mode} needs `labels` in every batch")
        lab = labels[..., 1:] if mode == "shifted-tokens" else labels
        return int((lab != IGNORE).sum())
    ref = labels if labels is not None else next(
        (v for v in batch.values() if hasattr(v, "shape") and len(v.shape) > 0), None)
    if ref is None:
        raise ValueError("a batch holds no tensor to count rows from")
    return int(ref.shape[0])


def context_length(cfg):
    """The model's context from its config, or None."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = cfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    text = cfg.get("text_config")
    return context_length(text) if isinstance(text, dict) else None


def blocks(ids, size):
    """`ids` cut into consecutive blocks of `size` (the last shorter; one token alone
    predicts nothing and is dropped)."""
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) >= 2]


def fit_report(weights, model_state, arch, cfg_path):
    """Which names to pass to functional_call, or a ValueError naming every tensor that does
    not fit. `model_state`: name -> tensor with tied names sharing one tensor object."""
    unexpected = sorted(n for n in weights if n not in model_state)
    shapes = sorted(
        f"{n} (member {tuple(weights[n].shape)}, model {tuple(model_state[n].shape)})"
        for n in weights if n in model_state
        and tuple(weights[n].shape) != tuple(model_state[n].shape))
    groups = {}
    for n, t in model_state.items():
        groups.setdefault(id(t), []).append(n)
    missing = sorted(" = ".join(g) for g in groups.values() if not any(n in weights for n in g))
    if unexpected or shapes or missing:
        parts = []
        for what, items in (("tensors the model does not have", unexpected),
                            ("tensors the model needs that the members lack", missing),
                            ("tensors of another shape", shapes)):
            if items:
                more = f", … {len(items) - 10} more" if len(items) > 10 else ""
                parts.append(f"{len(items)} {what}: {', '.join(items[:10])}{more}")
        raise ValueError(f"the members' weights do not fit {arch} built from {cfg_path}: "
                         + "; ".join(parts))
    # Tied weights (lm_head.weight = embed_tokens.weight): one name per tied group goes to
    # functional_call, which ties the rest; HF checkpoints store only one of them anyway.
    keep, seen = [], set()
    for n in weights:
        g = id(model_state[n])
        if g not in seen:
            seen.add(g)
            keep.append(n)
    return keep


# --- the evaluator -------------------------------------------------------------------------

class HF:
    def __init__(self, args):
        import torch

        self.torch, self.args = torch, args
        self.device = torch.device(_common.resolve_device(args.device))
        self.model = self.cfg_key = self.cfg_path = self.arch = None
        self.state, self.data, self.total, self.mode = None, [], 0, None
        self.max_tokens = None
        if args.batches is not None:
            from . import _batches

            batches, meta = _batches.load(args.batches)
            for i, b in enumerate(batches):
                if not isinstance(b, dict):
                    raise ValueError(f"{args.batches}: batch {i} is a {type(b).__name__}, not "
                                     f"a dict of model inputs (model(**batch))")
            self.source = batches
            log(f"{len(batches)} held-out batches from {args.batches}")
        else:
            self.source = None
        if args.config_dir is not None:
            p = os.path.join(args.config_dir, "config.json")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"--config-dir {args.config_dir}: no config.json in it")
            self.build(_common.read_config(p), p)

    # model --------------------------------------------------------------------------------
    def on_members(self, added):
        for mid, path, fmt in added:
            p = _common.find_config(path, fmt, self.args.config_dir)
            cfg = _common.read_config(p)
            if _common.config_key(cfg) != self.cfg_key:
                self.build(cfg, p, why=f"member {mid}")

    def build(self, cfg, cfg_path, why=None):
        import transformers

        archs = cfg.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs else None
        if not isinstance(arch, str) or not arch.isidentifier() or arch.startswith("_"):
            raise ValueError(f"{cfg_path}: `architectures` names no model class ({archs!r})")
        cls = getattr(transformers, arch, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(f"{cfg_path}: architecture {arch!r} is not a model class of "
                             f"transformers {transformers.__version__} (custom code is never "
                             f"run: no trust_remote_code)")
        try:
            config = cls.config_class.from_dict(cfg)
        except Exception as e:
            raise ValueError(f"{cfg_path}: not a {cls.config_class.__name__}: {e}") from e
        model = cls._from_config(config)
        model.eval().to(self.device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.arch, self.cfg_path = model, arch, cfg_path
        self.cfg_key = _common.config_key(cfg)
        # Tied names share one Parameter object here (keep_vars), which fit_report relies on.
        self.state = dict(model.state_dict(keep_vars=True))
        n = sum(p.numel() for p in model.parameters())
        log(f"built {arch} ({n} parameters) from {cfg_path}"
            + (f" for {why}" if why else ""))
        mode = self.args.loss_weight
        if mode == "auto":
            mode = auto_loss_weight(arch)
        if self.data and mode == self.mode:
            return
        self.mode = mode
        self.prepare(cfg)

    # data ---------------------------------------------------------------------------------
    def prepare(self, cfg):
        import sewa_evaluator

        if self.source is None:
            self.source = self.text_batches(cfg)
        weigh = lambda b: batch_weight(b, self.mode)
        mine = sewa_evaluator.shard(self.source, weight=weigh)
        counted = [(b, weigh(b)) for b in mine]
        self.total = sum(w for _, w in counted)
        if self.total <= 0:
            raise ValueError(f"nothing to average the loss over: 0 {self.mode} in this rank's "
                             f"{len(mine)} of {len(self.source)} batches")
        self.data = [({k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in b.items()},
                      w) for b, w in counted if w > 0]
        log(f"loss: the mean over {self.total} {self.mode.replace('-', ' ')} in "
            f"{len(self.data)} batches on {self.device}")

    def text_batches(self, cfg):
        import json

        import transformers

        args = self.args
        if auto_loss_weight(self.arch) != "shifted-tokens":
            raise ValueError(f"--text feeds labels = input ids, which only a causal LM's loss "
                             f"reads; {self.arch} is not one (use --batches)")
        ctx = context_length(cfg)
        if args.max_tokens is not None:
            if ctx is not None and args.max_tokens > ctx:
                raise ValueError(f"--max-tokens {args.max_tokens} is more than the model's "
                                 f"context ({ctx}, {self.cfg_path})")
            size, why = args.max_tokens, "--max-tokens"
        elif ctx is not None:
            size = min(ctx, MAX_TOKENS_CAP)
            why = f"the model's context {ctx}" + (
                f", capped at {MAX_TOKENS_CAP}" if ctx > MAX_TOKENS_CAP else "")
        else:
            size, why = MAX_TOKENS_FALLBACK, "no context length in the config: the fallback"
        tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        # The whole file is tokenized at once; the tokenizer's own length limit is not ours.
        tok.model_max_length = 1 << 62
        path = args.text
        with open(path, encoding="utf-8") as f:
            if path.endswith((".jsonl", ".json")):
                docs = []
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: line {i} is not JSON ({e})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get(args.text_key), str):
                        raise ValueError(f"{path}: line {i} has no string {args.text_key!r}")
                    docs.append(rec[args.text_key])
            else:
                docs = [f.read()]
        cut = [b for d in docs for b in blocks(tok(d)["input_ids"], size)]
        if not cut:
            raise ValueError(f"{path}: no text to evaluate on (fewer than 2 tokens)")
        pad = tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        out = [self.pad_batch(cut[i:i + args.batch], pad)
               for i in range(0, len(cut), args.batch)]
        log(f"{path}: {len(docs)} documents, {sum(len(b) for b in cut)} tokens in "
            f"{len(cut)} blocks of at most {size} tokens ({why}), {len(out)} batches")
        return out

    def pad_batch(self, rows, pad):
        torch = self.torch
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, IGNORE)}

    # loss ---------------------------------------------------------------------------------
    def loss_fn(self, weights):
        """The loss's terms, one per batch: each batch's mean loss times its share of the
        weight (tokens or rows). A generator: the client back-propagates each as it comes."""
        torch = self.torch
        if self.model is None:
            raise RuntimeError("no model: no member's config.json has been read yet")
        keep = fit_report(weights, self.state, self.arch, self.cfg_path)
        params = {n: weights[n] for n in keep}
        dtype = next((t.dtype for t in params.values() if t.is_floating_point()), None)
        current = next((p.dtype for p in self.model.parameters()), None)
        if dtype is not None and current is not None and dtype != current:
            # The members' dtype (bf16 checkpoints): the model's own buffers follow it.
            self.model.to(dtype)
        total = float(self.total)

        def terms():
            for batch, w in self.data:
                out = torch.func.functional_call(self.model, params, args=(), kwargs=batch)
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise ValueError(f"{self.arch} returned no loss: the batches need `labels`")
                yield loss.float() * (w / total)

        return terms()


def main(argv=None):
    args = parse_args(argv)
    threads = _common.set_threads(args.threads)
    log(f"torch intra-op threads: {threads} of {_common.cpu_count()} cores"
        + (" (--threads)" if args.threads is not None else " (default: a quarter)"))
    ev = HF(args)
    import sewa_evaluator

    sewa_evaluator.serve(ev.loss_fn, device=str(ev.device), members_on=args.members_on,
                         name=args.name or PREFIX, on_members=ev.on_members)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"{PREFIX}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
