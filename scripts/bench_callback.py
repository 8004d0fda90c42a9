"""Step time of a tiny Hugging Face Trainer run with and without SewaCallback.

    PYTHONPATH=clients/python SEWA_BIN=target/debug/sewa python scripts/bench_callback.py \
        [--steps 60] [--repeats 3] [--save-steps 5]

Runs alternate (without, with, without, with, ...) from the same seed and data. A step is timed
from on_step_begin to the last callback's on_step_end, so it holds the forward, backward and
optimizer step and SewaCallback's on_step_end (its non-blocking poll, and trainer.log when a
publication arrived); checkpoint saves come after on_step_end and are not in it. The daemon and
its evaluator run beside training on the same CPUs, so what they take from the trainer shows up
in the step times too. Also timed alone: SewaCallback.on_step_end itself.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers

from sewa.integrations.transformers import SewaCallback


class StepTimer(transformers.TrainerCallback):
    def __init__(self):
        self.times = []
        self._t = None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


class TimedSewa(SewaCallback):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.hook_times = []

    def on_step_end(self, *a, **kw):
        t = time.perf_counter()
        super().on_step_end(*a, **kw)
        self.hook_times.append(time.perf_counter() - t)


def tokens(n, seed, seq=16, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, vocab, (n, 1), generator=g)
           + torch.randint(1, 4, (n, 1), generator=g) * torch.arange(seq)) % vocab
    return [{"input_ids": x, "labels": x} for x in ids]


def run(out, steps, save_steps, sewa):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_positions=16, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0))
    args = transformers.TrainingArguments(
        out, max_steps=steps, save_steps=save_steps, save_total_limit=10, learning_rate=1e-2,
        lr_scheduler_type="constant", per_device_train_batch_size=16, use_cpu=True, seed=0,
        report_to=[], logging_steps=10**6, disable_tqdm=True)
    timer = StepTimer()
    cbs = ([sewa] if sewa else []) + [timer]  # the timer's on_step_end runs last
    trainer = transformers.Trainer(model=model, args=args, train_dataset=tokens(4096, 0),
                                   eval_dataset=tokens(128, 1), callbacks=cbs)
    t = time.perf_counter()
    trainer.train()
    return timer.times, time.perf_counter() - t


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save-steps", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--window", type=int, default=10)
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    rows = {False: [], True: []}
    walls = {False: [], True: []}
    hooks = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for with_cb in (False, True):
                sewa = TimedSewa(k=a.k, window=a.window, timeout_s=600) if with_cb else None
                times, wall = run(os.path.join(tmp, f"r{r}-{int(with_cb)}"), a.steps,
                                  a.save_steps, sewa)
                times = times[1:]  # the first step pays one-off set-up
                rows[with_cb] += times
                walls[with_cb].append(wall)
                if sewa:
                    hooks += sewa.hook_times
                    res = sewa.result or {}
                    print(f"# repeat {r}: sewa {res.get('selected_steps')} loss "
                          f"{res.get('published_loss')}, last checkpoint loss "
                          f"{res.get('newest_member_loss')}", file=sys.stderr)
    print(f"tiny GPT-2 (110k parameters), {a.steps} steps x {a.repeats} repeats, save every "
          f"{a.save_steps}, k={a.k} window={a.window}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| run | steps timed | median step | p90 step | train() wall, median |")
    print("|---|---|---|---|---|")
    for with_cb in (False, True):
        xs = rows[with_cb]
        print(f"| {'with' if with_cb else 'without'} SewaCallback | {len(xs)} | "
              f"{statistics.median(xs) * 1e3:.1f} ms | {pct(xs, 0.9) * 1e3:.1f} ms | "
              f"{statistics.median(walls[with_cb]):.1f} s |")
    m0, m1 = statistics.median(rows[False]), statistics.median(rows[True])
    p0, p1 = pct(rows[False], 0.9), pct(rows[True], 0.9)
    print(f"overhead: median {100 * (m1 / m0 - 1):+.1f} %, p90 {100 * (p1 / p0 - 1):+.1f} %; "
          f"SewaCallback.on_step_end: median {statistics.median(hooks) * 1e6:.0f} us, max "
          f"{max(hooks) * 1e3:.2f} ms over {len(hooks)} calls")


if __name__ == "__main__":
    main()
