"""sewa beside a `lightning.Trainer`: one callback, no script to write.

    from sewa.integrations.lightning import SewaCallback

    trainer = L.Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=100, save_top_k=-1),
                                   SewaCallback(k=5, window=20)])

At fit start (global rank 0 only) the callback saves the validation batches (bounded by
`max_eval_batches`), writes how to rebuild the LightningModule (its class and JSON
hyper-parameters, or `build_module`; see `sewa.evaluators.lightning`), and starts one
`sewa watch` daemon on the ModelCheckpoint's `dirpath` with the evaluator
`python -m sewa.evaluators.lightning` as its objective. During training it only polls (never
blocks a step) and sends sewa's figures to the trainer's loggers. At train end it waits
(bounded) for the selection over the newest checkpoint, stops the daemon, logs one summary
line and, with `load_average_at_end`, loads the published average into the module.

What it does not do: choose checkpoints itself, or run anything on ranks other than 0 (they
only receive the published path to load).
"""

import itertools
import os
import re
import sys
from fnmatch import fnmatch

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..evaluators import _common
from ..evaluators import lightning as evaluator

__all__ = ["SewaCallback", "checkpoint_pattern"]

# A number no real metric formats to: the fields of ModelCheckpoint's filename template are
# formatted with it, then replaced by "*" to give sewa's [watch] pattern.
_SENTINEL = 7777777
_SENTINEL_TEXT = re.compile(r"[-+]?0*7777777(?:\.\d*)?(?:[eE][-+]?\d+)?")
_FIELD = re.compile(r"\{([^{}:]+)(?::[^{}]*)?\}")


def checkpoint_pattern(ckpt):
    """(glob, warning or None): the names ModelCheckpoint `ckpt` gives its checkpoints
    ("epoch=*-step=*.ckpt" by default), which exclude its `last.ckpt` when they can. Lightning
    rewrites `last.ckpt` in place at every save, so sewa should never watch it."""
    template = ckpt.filename or "{epoch}-{step}"
    fields = {name: _SENTINEL for name in _FIELD.findall(template)}
    name = os.path.basename(ckpt.format_checkpoint_name(fields))
    stem, ext = os.path.splitext(name)
    glob = re.sub(r"\*+", "*", _SENTINEL_TEXT.sub("*", stem))
    # ModelCheckpoint adds "-v1", "-v2" to a name that exists already.
    glob = glob if glob.endswith("*") else glob + "*"
    glob += ext
    if "/" in template:
        raise ValueError(f"ModelCheckpoint(filename={template!r}) saves into subdirectories; "
                         f"sewa watches one directory: use a filename without '/'")
    warning = None
    if ckpt.save_last:
        last_fields = {n: 3 for n in _FIELD.findall(ckpt.CHECKPOINT_NAME_LAST)}
        last = os.path.basename(ckpt.format_checkpoint_name(last_fields, ckpt.CHECKPOINT_NAME_LAST))
        if fnmatch(last, glob):
            warning = (f"ModelCheckpoint's filename {template!r} gives names like {last!r} "
                       f"(save_last), which Lightning rewrites in place; sewa skips such copies, "
                       f"but a filename with a fixed part (the default '{{epoch}}-{{step}}') or "
                       f"SewaCallback(pattern=...) keeps it out of the watch entirely")
    return glob, warning


def _history_problems(ckpt):
    """(error or None, warnings): whether `ckpt` keeps a history of checkpoints to average."""
    notes = []
    if ckpt.save_top_k == 0:
        return ("ModelCheckpoint(save_top_k=0) saves no checkpoints, so sewa has nothing to "
                "average: use save_top_k=-1"), notes
    if ckpt.save_top_k != -1:
        kept = ("only the newest checkpoint" if ckpt.monitor is None
                else f"only the {ckpt.save_top_k} best by {ckpt.monitor!r}")
        notes.append(f"ModelCheckpoint(save_top_k={ckpt.save_top_k}) keeps {kept} and deletes "
                     f"the others: sewa averages a deleted checkpoint only if it had opened it "
                     f"first (after [watch] quiet_ms). Use save_top_k=-1 for a full history")
    steps = getattr(ckpt, "_every_n_train_steps", None)
    epochs = getattr(ckpt, "_every_n_epochs", None)
    interval = getattr(ckpt, "_train_time_interval", None)
    if steps == 0 and epochs == 0 and interval is None:
        notes.append("ModelCheckpoint(every_n_train_steps=0, every_n_epochs=0) saves no "
                     "periodic checkpoints: sewa's window stays empty. Set "
                     "every_n_train_steps=N")
    return None, notes


def _val_loader(trainer):
    """The first validation dataloader, wherever the user gave it. At fit start Lightning
    has not built `trainer.val_dataloaders` yet (that happens at the sanity check), so the
    source it will use is asked (fit's argument, the datamodule, the module's hook)."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        val_loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
        source = getattr(val_loop, "_data_source", None)
        if source is not None and source.is_defined():
            loaders = source.dataloader()
    if loaders is None and trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ValueError("SewaCallback needs validation data for sewa's evaluator: pass "
                         "val_dataloaders to trainer.fit, or define val_dataloader() on the "
                         "module or the datamodule")
    return loaders


def _hooked_batches(loader, pl_module, limit):
    """At most `limit` batches, through the module's own batch hooks (as validation sees
    them, except the move to a device: the evaluator does that on its own device)."""
    for batch in itertools.islice(loader, limit):
        batch = pl_module.on_before_batch_transfer(batch, 0)
        yield pl_module.on_after_batch_transfer(batch, 0)


def _newest_step(watch_dir, pattern, ckpt):
    """The step of the newest checkpoint sewa will see: from the names (`step=N`), else the
    step ModelCheckpoint last saved at."""
    steps = []
    try:
        names = os.listdir(watch_dir)
    except OSError:
        names = []
    for name in names:
        m = re.search(r"step=(\d+)", name)
        if m and fnmatch(name, pattern):
            steps.append(int(m.group(1)))
    if steps:
        return max(steps)
    return getattr(ckpt, "_last_global_step_saved", None) or None


def load_published(path):
    """{name: tensor} of a published average: a .safetensors file, or a directory with
    model.safetensors or a sharded index."""
    import json

    from safetensors.torch import load_file

    if os.path.isfile(path):
        return load_file(path)
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for s in shards:
        if os.path.basename(s) != s:
            raise ValueError(f"{index}: shard name {s!r} is not a file name")
        out.update(load_file(os.path.join(path, s)))
    return out


def _fmt(x):
    return "?" if x is None else f"{x:.5g}"


def summary_line(summary):
    """The one-line summary of a run: the average's loss vs the newest checkpoint's."""
    if summary.get("error"):
        return f"sewa: no average ({summary['error']})"
    if not summary.get("published"):
        why = "timed out waiting" if summary.get("timed_out") else "nothing published"
        return f"sewa: no average ({why}); see sewa.log in the work dir"
    steps = summary.get("selected_steps") or []
    line = (f"sewa: average of {len(steps)} checkpoints (steps {', '.join(map(str, steps))}): "
            f"loss {_fmt(summary.get('published_loss'))} vs the newest checkpoint's (step "
            f"{summary.get('newest_member_step')}) {_fmt(summary.get('newest_member_loss'))}; "
            f"{summary.get('oracle_calls')} oracle calls")
    if summary.get("timed_out"):
        line += " (timed out waiting for the newest checkpoint: the last publication)"
    return line


class SewaCallback(Callback):
    """Run sewa beside this Trainer; see the module's docstring.

    k, window: checkpoints averaged and window size. device, members_on: where the evaluator
    computes (default "cpu", so it never takes training's GPU memory) and keeps the window's
    members ("device" or pinned "cpu"). load_average_at_end: load the published average into
    the module at train end. timeout_s: how long train end waits for the final selection.
    max_eval_batches: validation batches saved for the evaluator (None: all). threads: the evaluator's
    torch threads (default max(1, cpus // 4)). work_dir: sewa's config, log, status and
    published average (default `<trainer.log_dir>/sewa`). extra: {table: {key: value}} merged
    over the generated sewa.toml. loss_fn: a function `loss_fn(module, batch) -> scalar
    tensor` or "package.module:function" (default: the module's validation_step's returned
    loss). build_module: a zero-argument function (or "package.module:function") returning
    the module, when its hyper-parameters are not plain JSON. pattern: sewa's [watch]
    pattern (default: from ModelCheckpoint's filename). binary: the sewa binary."""

    def __init__(self, k=5, window=20, *, device="cpu", members_on="device",
                 load_average_at_end=True, timeout_s=600.0, max_eval_batches=32, threads=None,
                 work_dir=None, extra=None, loss_fn=None, build_module=None, pattern=None,
                 binary=None):
        super().__init__()
        for name, value in (("k", k), ("window", window), ("max_eval_batches", max_eval_batches)):
            if name == "max_eval_batches" and value is None:
                continue  # every batch of the validation set
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SewaCallback({name}={value!r}): a positive integer")
        if k > window:
            raise ValueError(f"SewaCallback(k={k}, window={window}): k must be at most window")
        if members_on not in ("device", "cpu"):
            raise ValueError(f"SewaCallback(members_on={members_on!r}): \"device\" or \"cpu\"")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"SewaCallback(threads={threads!r}): a positive integer")
        self.k, self.window, self.device, self.members_on = k, window, str(device), members_on
        self.load_average_at_end, self.timeout_s = load_average_at_end, float(timeout_s)
        self.max_eval_batches, self.threads = max_eval_batches, threads
        self.work_dir, self.extra, self.loss_fn = work_dir, extra, loss_fn
        self.build_module, self.pattern, self.binary = build_module, pattern, binary
        self.sidecar = None
        self.summary = None
        self._ckpt = None
        self._watch = None

    # --- set-up ----------------------------------------------------------------------------
    def _checkpoint_callback(self, trainer):
        found = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        if not found:
            raise ValueError("SewaCallback needs a ModelCheckpoint callback that keeps a "
                             "history, e.g. ModelCheckpoint(every_n_train_steps=100, "
                             "save_top_k=-1), and enable_checkpointing=True")
        ckpt = found[0]
        if len(found) > 1:
            rank_zero_warn(f"SewaCallback: several ModelCheckpoint callbacks; sewa watches the "
                           f"first one's dirpath ({ckpt.dirpath})")
        error, notes = _history_problems(ckpt)
        if error:
            raise ValueError(f"SewaCallback: {error}")
        for note in notes:
            rank_zero_warn(f"SewaCallback: {note}")
        if not ckpt.dirpath:
            raise ValueError("SewaCallback: the ModelCheckpoint has no dirpath yet")
        return ckpt

    def _work_dir(self, trainer):
        if self.work_dir is not None:
            return os.path.abspath(self.work_dir)
        return os.path.abspath(os.path.join(trainer.log_dir or trainer.default_root_dir, "sewa"))

    def _command(self, spec_path, batches_path):
        threads = self.threads or _common.default_threads()
        return [sys.executable, "-m", "sewa.evaluators.lightning", "--spec", spec_path,
                "--batches", batches_path, "--device", self.device,
                "--members-on", self.members_on, "--threads", str(threads)]

    def _env(self):
        # The evaluator inherits the trainer's environment; under DDP that says RANK and
        # WORLD_SIZE, and the evaluator client would take itself for a torchrun job. (The
        # Sidecar puts this `sewa` package on its PYTHONPATH.)
        return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}

    def on_fit_start(self, trainer, pl_module):
        # Every rank asks: trainer.log_dir is a broadcast under DDP.
        work = self._work_dir(trainer)
        if not trainer.is_global_zero:
            return
        from ._sidecar import Sidecar
        from ..evaluators import _batches

        ckpt = self._checkpoint_callback(trainer)
        watch = os.path.abspath(ckpt.dirpath)
        pattern = self.pattern
        if pattern is None:
            pattern, warning = checkpoint_pattern(ckpt)
            if warning:
                rank_zero_warn(f"SewaCallback: {warning}")
        os.makedirs(work, exist_ok=True)
        os.makedirs(watch, exist_ok=True)
        spec_path = os.path.join(work, "lightning_module.json")
        evaluator.write_spec(spec_path, evaluator.module_spec(
            pl_module, build_module=self.build_module, loss_fn=self.loss_fn))
        batches_path = os.path.join(work, "eval_batches.pt")
        loader = _val_loader(trainer)
        n = _batches.save(batches_path, _hooked_batches(loader, pl_module, self.max_eval_batches),
                          meta={"source": "lightning val_dataloader"})
        self._ckpt, self._watch, self._pattern = ckpt, watch, pattern
        self.sidecar = Sidecar(watch, work, evaluator_command=self._command(spec_path, batches_path),
                               k=self.k, window=self.window, pattern=pattern, env=self._env(),
                               binary=self.binary, extra=self.extra)
        self.sidecar.start()
        rank_zero_info(f"sewa: watching {watch} ({pattern}), {n} validation batches; "
                       f"sewa's files in {work}")

    # --- during training -------------------------------------------------------------------
    def _log(self, trainer, figures):
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sidecar is None:
            return
        figures = self.sidecar.poll()
        if figures:
            self._log(trainer, figures)

    # --- the end ---------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module):
        # Train end, not fit end: Lightning finalises the loggers between the two, and the
        # final figures must still reach them.
        path = None
        if self.sidecar is not None:
            newest = _newest_step(self._watch, self._pattern, self._ckpt)
            self.summary = self.sidecar.finish(newest, timeout_s=self.timeout_s)
            figures = self.sidecar.poll()
            if figures:
                self._log(trainer, figures)
            for logger in trainer.loggers:
                logger.save()
            line = summary_line(self.summary)
            if self.summary.get("published") and not self.summary.get("error"):
                rank_zero_info(line)
            else:
                rank_zero_warn(line)
            path = self.summary.get("published")
        if self.load_average_at_end:
            if trainer.world_size > 1:
                path = trainer.strategy.broadcast(path, src=0)
            if path:
                self._load(pl_module, path)

    def _load(self, pl_module, path):
        tensors = load_published(path)
        missing, unexpected = pl_module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"sewa's average at {path} does not match the module: missing "
                               f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        rank_zero_info(f"sewa: the module now holds the average from {path}")

    def _stop(self):
        if self.sidecar is not None:
            self.sidecar.stop()

    def on_exception(self, trainer, pl_module, exception):
        self._stop()

    def teardown(self, trainer, pl_module, stage):
        self._stop()
