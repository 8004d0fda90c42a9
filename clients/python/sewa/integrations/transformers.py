"""sewa beside a Hugging Face `Trainer`: one callback, no script to write.

    from sewa.integrations.transformers import SewaCallback
    trainer = Trainer(..., eval_dataset=heldout, callbacks=[SewaCallback(k=5, window=20)])
    trainer.train()          # at the end, trainer.model holds sewa's average

At train begin (world rank 0 only) the callback saves the Trainer's `eval_dataset`, batched by
its own data collator, to `work_dir/heldout.pt`, the model's config to `work_dir/model-config`,
and starts `sewa watch` on `args.output_dir` (pattern `checkpoint-*`) with the generic evaluator
`python -m sewa.evaluators.hf` as the objective. During training it only reads what a background
thread parsed (`Sidecar.poll`) and passes sewa's figures to `trainer.log`, so they reach
TensorBoard, W&B or whatever `report_to` names. At train end it waits (bounded) for the
selection over the last checkpoint, stops the daemon, logs the final figures and, with
`load_average_at_end`, loads the published average into `trainer.model` on every rank.
docs/integrations.md says it all with the disk and rank rules.
"""

import inspect
import logging
import os
import re
import sys

from transformers import TrainerCallback

from ._sidecar import Sidecar

log = logging.getLogger("sewa.integrations")

CHECKPOINT_RE = re.compile(r"^checkpoint-([0-9]+)$")


def newest_checkpoint_step(output_dir):
    """The largest N of the `checkpoint-N` directories in `output_dir` (None if there are none)."""
    try:
        names = os.listdir(output_dir)
    except OSError:
        return None
    steps = [int(m.group(1)) for n in names if (m := CHECKPOINT_RE.match(n))
             and os.path.isdir(os.path.join(output_dir, n))]
    return max(steps) if steps else None


def _find_trainer(callback):
    """The Trainer whose hook is running: walk the caller frames for a `self` that is a
    `transformers.Trainer` holding `callback` in its callback handler."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer):
                handler = getattr(obj, "callback_handler", None)
                if handler is not None and any(c is callback for c in handler.callbacks):
                    return obj
            frame = frame.f_back
    finally:
        del frame
    return None


def heldout_batches(trainer, max_batches):
    """The Trainer's eval set batched by its own collator at `per_device_eval_batch_size`, with
    the columns the model's forward does not take removed as the Trainer removes them; a
    generator of at most `max_batches` batches, in order."""
    import torch

    dataset = trainer.eval_dataset
    if isinstance(dataset, dict):
        if not dataset:
            raise ValueError("sewa: the Trainer's eval_dataset is an empty dict")
        name = next(iter(dataset))
        log.info("sewa: eval_dataset is a dict; the held-out loss uses its first entry, %r", name)
        dataset = dataset[name]
    collator = trainer.data_collator
    try:
        import datasets

        is_hf_dataset = isinstance(dataset, datasets.Dataset)
    except ImportError:
        is_hf_dataset = False
    if is_hf_dataset and hasattr(trainer, "_remove_unused_columns"):
        dataset = trainer._remove_unused_columns(dataset, description="sewa held-out")
    elif hasattr(trainer, "_get_collator_with_removed_columns"):
        collator = trainer._get_collator_with_removed_columns(collator, description="sewa held-out")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=collator,
        shuffle=False, num_workers=0, drop_last=False)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def save_config(model, config_dir):
    """`model.config` saved to `config_dir`, naming the model's class in `architectures` (a
    model built from a config has none until `save_pretrained`; the evaluator builds the class
    it names)."""
    import copy

    config = copy.deepcopy(model.config)
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    config.save_pretrained(config_dir)


def load_average(model, path):
    """Load the published average at `path` (an HF-layout directory or a safetensors file) into
    `model`, strictly: every key the model has must come from the file except weights tied to a
    loaded one, and no key may be left over. Returns the number of tensors loaded."""
    import json

    from safetensors.torch import load_file

    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        files = [os.path.join(path, n) for n in files]
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"{path}: no safetensors file in the published average")
    sd = {}
    for f in files:
        sd.update(load_file(f))
    own = model.state_dict()
    unexpected = sorted(k for k in sd if k not in own)
    loaded_ptrs = {own[k].data_ptr() for k in sd if k in own}
    # a missing key is allowed only when it shares storage with a loaded one (tied weights such
    # as lm_head.weight = wte.weight, which safetensors checkpoints store once)
    missing = sorted(k for k in own if k not in sd and own[k].data_ptr() not in loaded_ptrs)
    if unexpected or missing:
        raise RuntimeError(f"{path}: the published average does not match the model: "
                           f"missing {missing[:10]}, unexpected {unexpected[:10]}")
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return len(sd)


class SewaCallback(TrainerCallback):
    """Run sewa beside `Trainer.train()`: selection while training, the average at the end.

    Arguments (docs/integrations.md has the details):
      k, window: members averaged, checkpoints considered ([select] k, [window] size);
      device, members_on, threads: where the evaluator computes the held-out loss ("cpu" by
        default, so it never takes GPU memory from training), where it keeps the window's
        members ("device" or pinned "cpu"), and its CPU threads (default: a quarter of the
        cores, at least 1);
      load_average_at_end: load the published average into `trainer.model` at train end;
      timeout_s: how long train end waits for the selection over the last checkpoint;
      max_eval_batches: held-out batches saved (and evaluated per oracle call);
      keep_deleted: None follows `save_total_limit` (see docs), True/False as [window];
      work_dir: where sewa's files go (default `<output_dir>/sewa`);
      extra: `{table: {key: value}}` laid over the generated sewa.toml;
      trainer: the Trainer, when frame walking cannot find it (a custom loop calling the hooks);
      evaluator: the evaluator's command prefix (default `[python, "-m", "sewa.evaluators.hf"]`),
        given the same arguments.
    """

    def __init__(self, k=5, window=20, device="cpu", members_on="device",
                 load_average_at_end=True, timeout_s=600, max_eval_batches=32, threads=None,
                 work_dir=None, extra=None, trainer=None, keep_deleted=None, evaluator=None):
        if members_on not in ("device", "cpu"):
            raise ValueError(f"members_on must be 'device' or 'cpu', not {members_on!r}")
        if int(k) < 1 or int(window) < 1:
            raise ValueError(f"k ({k}) and window ({window}) must be at least 1")
        if max_eval_batches is not None and int(max_eval_batches) < 1:
            raise ValueError(f"max_eval_batches ({max_eval_batches}) must be at least 1")
        self.k = int(k)
        self.window = int(window)
        self.device = str(device)
        self.members_on = members_on
        self.load_average_at_end = bool(load_average_at_end)
        self.timeout_s = float(timeout_s)
        self.max_eval_batches = None if max_eval_batches is None else int(max_eval_batches)
        self.threads = threads
        self.work_dir = work_dir
        self.extra = extra
        self.trainer = trainer
        self.keep_deleted = keep_deleted
        self.evaluator = list(evaluator) if evaluator else [sys.executable, "-m",
                                                            "sewa.evaluators.hf"]
        self.sidecar = None
        self.result = None       # finish()'s summary, after train end
        self._in_log = False     # trainer.log calls on_log: do not recurse

    # -- the pieces, apart from the hooks -----------------------------------------------------

    def _trainer(self):
        trainer = self.trainer or _find_trainer(self)
        if trainer is None:
            raise RuntimeError("sewa: SewaCallback could not find its Trainer; pass it: "
                               "SewaCallback(..., trainer=trainer) (or cb.trainer = trainer "
                               "before train())")
        self.trainer = trainer
        return trainer

    def _window(self, args):
        """(window, k, keep_deleted), following the Trainer's save_total_limit."""
        window, k, keep = self.window, self.k, self.keep_deleted
        limit = getattr(args, "save_total_limit", None)
        if keep is None:
            if limit and limit > 0 and window > limit:
                log.info("sewa: save_total_limit=%d: the window follows the Trainer's rotation "
                         "(window %d instead of %d, keep_deleted=false); pass keep_deleted=True "
                         "to keep rotated checkpoints open while the disk has room", limit, limit,
                         window)
                window = limit
            keep = False if limit and limit > 0 else None
        elif keep and limit and limit > 0 and window > limit:
            log.info("sewa: keep_deleted=True with save_total_limit=%d: up to %d rotated "
                     "checkpoints stay allocated on disk while sewa holds them ([window] "
                     "min_free_bytes releases them when the disk runs short)", limit,
                     window - limit)
        if k > window:
            log.info("sewa: k=%d is more than the window (%d): averaging up to %d", k, window,
                     window)
            k = window
        return window, k, keep

    def _threads(self):
        if self.threads is not None:
            return max(1, int(self.threads))
        return max(1, (os.cpu_count() or 1) // 4)

    def _start(self, args, model):
        from ..evaluators import _batches

        trainer = self._trainer()
        if trainer.eval_dataset is None:
            raise ValueError("sewa: SewaCallback needs an eval_dataset on the Trainer (the "
                             "held-out data whose loss picks the checkpoints to average); pass "
                             "Trainer(..., eval_dataset=...)")
        work_dir = os.path.abspath(self.work_dir or os.path.join(args.output_dir, "sewa"))
        os.makedirs(work_dir, exist_ok=True)
        model = model if model is not None else trainer.model
        batches_path = os.path.join(work_dir, "heldout.pt")
        n = _batches.save(batches_path, heldout_batches(trainer, self.max_eval_batches),
                          meta={"source": "transformers.Trainer",
                                "model_class": type(model).__name__,
                                "batch_size": int(args.per_device_eval_batch_size)},
                          max_batches=self.max_eval_batches)
        config_dir = os.path.join(work_dir, "model-config")
        save_config(model, config_dir)
        threads = self._threads()
        command = self.evaluator + [
            "--batches", batches_path, "--config-dir", config_dir, "--device", self.device,
            "--members-on", self.members_on, "--threads", str(threads)]
        window, k, keep = self._window(args)
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        self.sidecar = Sidecar(args.output_dir, work_dir, evaluator_command=command, k=k,
                               window=window, pattern="checkpoint-*", keep_deleted=keep, env=env,
                               extra=self.extra)
        self.sidecar.start()
        log.info("sewa: %d held-out batches in %s; selecting k=%d of a window of %d", n,
                 batches_path, k, window)

    def _log(self, figures):
        if not figures or self._in_log or self.trainer is None:
            return
        self._in_log = True
        try:
            self.trainer.log(dict(figures))
        finally:
            self._in_log = False

    # -- the hooks ----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.result = None
        if not state.is_world_process_zero:
            return
        if self.sidecar is not None:  # a second train() on the same callback
            self.sidecar.stop()
            self.sidecar = None
        self._start(args, model)

    def on_step_end(self, args, state, control, **kwargs):
        if self.sidecar is not None and not self._in_log:
            self._log(self.sidecar.poll())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.sidecar is not None and not self._in_log:
            self._log(self.sidecar.poll())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        path = None
        if self.sidecar is not None:
            sidecar, self.sidecar = self.sidecar, None
            newest = newest_checkpoint_step(args.output_dir)
            r = sidecar.finish(newest_step=newest,
                               timeout_s=self.timeout_s if newest is not None else 0)
            self.result = r
            self._log(sidecar.poll())  # the last publication's figures, if not logged yet
            self._log(sidecar_final_figures(r))
            self._close_tensorboard()
            if r["published"] and not r["error"]:
                path = r["published"]
                print(summary_line(r), flush=True)
                log.info("%s", summary_line(r))
            elif r["published"]:
                path = r["published"]
                log.warning("sewa: %s; the newest publication (steps %s) is what is loaded",
                            r["error"], r["selected_steps"])
            else:
                log.warning("sewa: no average was published (%s); the model is left as "
                            "trained", r["error"] or "no checkpoint was saved")
        if not self.load_average_at_end:
            return
        path = _agree_on(path)
        if path is None:
            return
        model = model if model is not None else (self.trainer.model if self.trainer else None)
        if model is None:
            log.warning("sewa: no model to load the average into")
            return
        n = load_average(model, path)
        log.info("sewa: loaded the average (%d tensors) from %s into the model", n, path)

    def _close_tensorboard(self):
        """The Trainer's TensorBoard callback closed its writer before this on_train_end and
        opened a new one for the final figures: close that one too (it is flushed already)."""
        handler = getattr(self.trainer, "callback_handler", None)
        for cb in getattr(handler, "callbacks", []):
            if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "tb_writer", None):
                cb.tb_writer.close()
                cb.tb_writer = None


def sidecar_final_figures(r):
    out = {"sewa/final_published_loss": r.get("published_loss"),
           "sewa/final_last_checkpoint_loss": r.get("newest_member_loss"),
           "sewa/final_oracle_calls_total": r.get("oracle_calls_total")}
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def _fmt(x):
    return "n/a" if x is None else f"{x:.6g}"


def summary_line(r):
    return (f"sewa: average of steps {r.get('selected_steps')} loss "
            f"{_fmt(r.get('published_loss'))}; last checkpoint (step "
            f"{r.get('newest_member_step')}) loss {_fmt(r.get('newest_member_loss'))}")


def _agree_on(path):
    """Every rank gets rank 0's published path (a barrier too) when torch.distributed is
    initialised; `path` itself otherwise."""
    try:
        import torch.distributed as dist
    except ImportError:
        return path
    if not (dist.is_available() and dist.is_initialized()):
        return path
    box = [path if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
