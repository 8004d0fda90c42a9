#!/usr/bin/env python3
"""The selection bench's trajectory zoo: small MLPs really trained (numpy, hand-written backward
and optimisers), saved as safetensors checkpoints the builtin `mlp` objective reads, with a
selection split and a held-out test split per window.

    pip install numpy scikit-learn safetensors
    python3 scripts/make_zoo.py --split design     # -> target/zoo/design/zoo.json
    python3 scripts/make_zoo.py --split report     # -> target/zoo/report/zoo.json

Each window is one trajectory: `window` checkpoints (the cold window the bench selects on and
whose exhaustive best k-subset it caches), then `slides` more, which the bench's `--warm` mode
feeds one at a time. The two splits are the same families trained with disjoint seed ranges
(design: 1000.., report: 2000..); the report split is for figures no one tuned on.
Deterministic: one thread per BLAS, every random draw from a seeded generator.
See docs/selection-bench.md for the families and the bench.
"""

import os

# One BLAS thread per worker: deterministic sums, and the machine's cores go to the workers.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from scipy.special import erf  # noqa: E402
from sklearn import datasets  # noqa: E402

SPLIT_SEEDS = {"design": 1000, "report": 2000}
WINDOWS_PER_FAMILY = 5

# Families: data, model, optimiser, schedule, noise, stride, window size and k. `burn` steps are
# trained before the first saved checkpoint; checkpoints are saved every `stride` steps after it.
# A list-valued `label_noise` is drawn per window from the list.
FAMILIES = {
    "moons-sgd": dict(
        data="moons", noise_x=0.25, label_noise=0.05, hidden=[32, 32], act="relu",
        opt="sgd", lr=0.1, sched="constant", batch=32, burn=1500, stride=25,
        window=20, k=5, slides=5,
        about="2-D moons, 2x32 relu, plain SGD, constant lr"),
    "circles-momentum-tanh": dict(
        data="circles", noise_x=0.12, label_noise=0.10, hidden=[16, 16, 16], act="tanh",
        opt="momentum", lr=0.05, sched="cosine", batch=32, burn=1200, stride=20,
        window=20, k=5, slides=5,
        about="2-D circles, 3x16 tanh, SGD+momentum 0.9, cosine (window at 55-80 %)"),
    "classif-momentum-noisy": dict(
        data="classification", features=20, classes=4, label_noise=[0.2, 0.25, 0.3],
        hidden=[64, 64], act="relu", opt="momentum", lr=0.01, sched="constant", batch=32,
        burn=1000, stride=30, window=20, k=5, slides=5,
        about="20-feature 4-class make_classification, 20-30 % label noise, 2x64 relu, "
              "SGD+momentum 0.9 (the issue's failing family)"),
    "classif-momentum-dense": dict(
        data="classification", features=20, classes=4, label_noise=[0.2, 0.25, 0.3],
        hidden=[64, 64], act="relu", opt="momentum", lr=0.05, sched="constant", batch=32,
        burn=100, stride=12, window=20, k=5, slides=5,
        about="the same task at a 5x higher lr, saved every 12 steps from step 100: a window "
              "around the noisy minimum of the held-out loss, before the noise is memorised"),
    "digits-adam-gelu": dict(
        data="digits", label_noise=0.0, hidden=[48], act="gelu", opt="adam", lr=3e-3,
        sched="wsd", batch=32, burn=600, stride=15, window=20, k=5, slides=5,
        about="sklearn digits (64 features, 10 classes), 1x48 gelu, Adam, warmup-stable-decay"),
    "blobs-adamw-cyclic": dict(
        data="blobs", features=10, classes=6, label_noise=0.15, hidden=[64], act="relu",
        opt="adamw", lr=1e-2, wd=1e-2, sched="cyclic", cycle=130, batch=32, burn=800,
        stride=20, window=20, k=5, slides=5,
        about="10-feature 6-class blobs, 15 % label noise, 1x64 relu, AdamW, cyclic lr "
              "(period 6.5 checkpoints)"),
    "friedman-rmsprop-mse": dict(
        data="friedman", label_noise=0.0, hidden=[32, 32], act="tanh", opt="rmsprop",
        lr=2e-3, sched="cosine", batch=32, burn=1000, stride=20, window=20, k=5, slides=5,
        about="Friedman #1 regression (10 features), 2x32 tanh, RMSprop, cosine, mse"),
    "wide-sgd-w12": dict(
        data="classification", features=16, classes=3, label_noise=0.0, hidden=[128],
        act="relu", opt="sgd", lr=0.2, sched="constant", batch=64, burn=800, stride=50,
        window=12, k=5, slides=5,
        about="16-feature 3-class make_classification, 1x128 relu, SGD, stride 50, window 12"),
    "moons-adam-w30-k3": dict(
        data="moons", noise_x=0.3, label_noise=0.1, hidden=[64, 64], act="gelu", opt="adam",
        lr=5e-3, sched="constant", batch=32, burn=1000, stride=10, window=30, k=3, slides=5,
        about="2-D moons, 10 % label noise, 2x64 gelu, Adam, stride 10, window 30, k 3"),
    "multireg-momentum-k3": dict(
        data="multireg", features=8, outputs=3, label_noise=0.0, hidden=[48, 48, 48],
        act="gelu", opt="momentum", lr=0.02, sched="wsd", batch=32, burn=1000, stride=25,
        window=20, k=3, slides=5,
        about="synthetic 8->3 regression, 3x48 gelu, SGD+momentum, warmup-stable-decay, mse, k 3"),
    "charlm-adamw": dict(
        data="chars", context=3, label_noise=0.0, hidden=[64], act="relu", opt="adamw",
        lr=3e-3, wd=1e-2, sched="cosine", batch=64, burn=1500, stride=20, window=20, k=5,
        slides=5,
        about="character-level language model (3 one-hot characters -> next, 32 symbols) on "
              "scikit-learn's dataset descriptions, 1x64 relu, AdamW, cosine"),
    # Planted warm-start windows: the best subset moves to the newest members while the bench
    # slides the window one checkpoint at a time (a learning-rate drop, a late decay).
    "planted-lrdrop": dict(
        data="classification", features=10, classes=3, label_noise=0.2, hidden=[48, 48],
        act="relu", opt="momentum", lr=0.1, sched="drop", drop_factor=0.05, batch=32,
        burn=1200, stride=25, window=20, k=5, slides=8, drop_members=[17, 19, 21, 23, 25],
        about="planted: 20 % label noise, 2x48 relu, SGD+momentum at a high lr dropped 20x "
              "at a checkpoint near the window's end (warm-start bench)"),
    "planted-late-converge": dict(
        data="classification", features=10, classes=3, label_noise=0.1, hidden=[48, 48],
        act="relu", opt="momentum", lr=0.03, sched="speedup", slow_factor=0.03, batch=32,
        burn=300, stride=25, window=20, k=5, slides=8, drop_members=[16, 18, 20, 22, 24],
        about="planted: 10 % label noise, 2x48 relu, SGD+momentum crawling at lr 0.0009, then "
              "at lr 0.03 from a checkpoint near the window's end: the newest members are far "
              "better than any average of older ones"),
    "planted-late-decay": dict(
        data="blobs", features=8, classes=5, label_noise=0.25, hidden=[64], act="tanh",
        opt="adam", lr=2e-2, sched="late_decay", batch=32, burn=800, stride=20, window=20, k=5,
        slides=8, drop_members=[16, 18, 20, 22, 24],
        about="planted: 25 % label noise, 1x64 tanh, Adam at a high lr, then an exponential "
              "decay (x0.5 per checkpoint) from a checkpoint near the window's end"),
}

SELECT_ROWS = 1000
TEST_ROWS = 1000
TRAIN_ROWS = 3000
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;()"  # 32 symbols; anything else maps to ' '


# ---------------------------------------------------------------------------------------------
# Data


def flip_labels(y, classes, p, rng):
    """Replace a fraction p of labels by a uniformly drawn class (possibly the same one)."""
    y = y.copy()
    noisy = rng.random(len(y)) < p
    y[noisy] = rng.integers(0, classes, noisy.sum())
    return y


def standardise(parts):
    mu = parts[0].mean(0)
    sd = parts[0].std(0) + 1e-8
    return [((p - mu) / sd).astype(np.float32) for p in parts]


def corpus():
    import sklearn

    d = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr")
    text = " ".join(open(os.path.join(d, f), encoding="utf-8").read()
                    for f in sorted(os.listdir(d)) if f.endswith(".rst"))
    text = " ".join(text.lower().split())
    index = {c: i for i, c in enumerate(ALPHABET)}
    return np.array([index.get(c, index[" "]) for c in text], dtype=np.int64)


def char_data(spec, rng):
    """Next-character prediction from `context` one-hot characters. The text is cut in blocks
    of 200 characters assigned to train / select / test, so the splits are different text."""
    ids = corpus()
    ctx = spec["context"]
    v = len(ALPHABET)
    blocks = np.arange(len(ids) // 200)
    rng.shuffle(blocks)
    n = len(blocks)
    parts = [blocks[: int(0.6 * n)], blocks[int(0.6 * n): int(0.8 * n)], blocks[int(0.8 * n):]]
    out = []
    for part, rows in zip(parts, (TRAIN_ROWS * 2, SELECT_ROWS, TEST_ROWS)):
        pos = (rng.choice(part, rows) * 200 + rng.integers(ctx, 200, rows)).astype(np.int64)
        x = np.zeros((rows, ctx * v), dtype=np.float32)
        for j in range(ctx):
            x[np.arange(rows), j * v + ids[pos - ctx + j]] = 1.0
        out.append((x, ids[pos]))
    return out, v


def make_data(spec, rng):
    """(train, select, test) as (x f32, y) and the output width; y is i64 class ids, or f32
    [N, C] targets for mse families."""
    n = TRAIN_ROWS + SELECT_ROWS + TEST_ROWS
    seed = int(rng.integers(0, 2**31 - 1))
    kind = spec["data"]
    classes = None
    if kind == "chars":
        parts, classes = char_data(spec, rng)
        return parts, classes
    if kind == "moons":
        x, y = datasets.make_moons(n, noise=spec["noise_x"], random_state=seed)
        classes = 2
    elif kind == "circles":
        x, y = datasets.make_circles(n, noise=spec["noise_x"], factor=0.5, random_state=seed)
        classes = 2
    elif kind == "classification":
        classes = spec["classes"]
        x, y = datasets.make_classification(
            n, n_features=spec["features"], n_informative=spec["features"] // 2,
            n_redundant=2, n_classes=classes, n_clusters_per_class=2, class_sep=1.0,
            random_state=seed)
    elif kind == "blobs":
        classes = spec["classes"]
        x, y = datasets.make_blobs(n, n_features=spec["features"], centers=classes * 2,
                                   cluster_std=2.5, random_state=seed)
        y = y % classes
    elif kind == "digits":
        d = datasets.load_digits()
        order = rng.permutation(len(d.target))
        x, y = d.data[order] / 16.0, d.target[order]
        classes = 10
        a, b = len(y) // 2, len(y) * 3 // 4
        xs = [x[:a], x[a:b], x[b:]]
        ys = [y[:a], y[a:b], y[b:]]
        return [(xi.astype(np.float32), yi.astype(np.int64)) for xi, yi in zip(xs, ys)], classes
    elif kind == "friedman":
        x, y = datasets.make_friedman1(n, n_features=10, noise=1.0, random_state=seed)
        y = ((y - y.mean()) / y.std())[:, None]
    elif kind == "multireg":
        # The task (a fixed random function) is the family's; samples are the window's.
        task = np.random.default_rng(7)
        d, c = spec["features"], spec["outputs"]
        a, b = task.normal(size=(d, c)) / np.sqrt(d), task.normal(size=(d, c)) / np.sqrt(d)
        x = rng.normal(size=(n, d))
        y = np.sin(2 * x @ a) + 0.5 * (x @ b) ** 2 + 0.3 * rng.normal(size=(n, c))
        y = (y - y.mean(0)) / y.std(0)
    else:
        raise ValueError(kind)
    cut = [TRAIN_ROWS, TRAIN_ROWS + SELECT_ROWS]
    xs = np.split(x, cut)
    if kind in ("moons", "circles"):
        xs = [xi.astype(np.float32) for xi in xs]
    else:
        xs = standardise(xs)
    if classes is None:
        ys = [yi.astype(np.float32) for yi in np.split(y, cut)]
        return list(zip(xs, ys)), y.shape[1]
    ys = [flip_labels(yi, classes, spec["noise"], rng).astype(np.int64) for yi in np.split(y, cut)]
    return list(zip(xs, ys)), classes


# ---------------------------------------------------------------------------------------------
# Model, loss and backward (the builtin objective's MLP: linear, activation, ..., linear)


def activate(z, act):
    if act == "relu":
        return np.maximum(z, 0)
    if act == "tanh":
        return np.tanh(z)
    return z * 0.5 * (1 + erf(z / np.sqrt(2)))  # exact (erf) gelu, as candle's gelu_erf


def activation_grad(z, h, act):
    if act == "relu":
        return (z > 0).astype(z.dtype)
    if act == "tanh":
        return 1 - h * h
    cdf = 0.5 * (1 + erf(z / np.sqrt(2)))
    return cdf + z * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def loss_and_grads(params, x, y, act, mse):
    """Mean loss over rows (and columns for mse) and its gradient for every parameter."""
    zs, hs = [], [x]
    n_layers = len(params) // 2
    for i in range(n_layers):
        w, b = params[2 * i], params[2 * i + 1]
        z = hs[-1] @ w.T + b
        if i + 1 < n_layers:
            zs.append(z)
            hs.append(activate(z, act))
        else:
            out = z
    rows = x.shape[0]
    if mse:
        diff = out - y
        loss = float(np.mean(diff * diff))
        d = 2 * diff / diff.size
    else:
        shifted = out - out.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        loss = float(-logp[np.arange(rows), y].mean())
        d = np.exp(logp)
        d[np.arange(rows), y] -= 1
        d /= rows
    grads = [None] * len(params)
    for i in reversed(range(n_layers)):
        grads[2 * i] = d.T @ hs[i]
        grads[2 * i + 1] = d.sum(0)
        if i > 0:
            d = (d @ params[2 * i]) * activation_grad(zs[i - 1], hs[i], act)
    return loss, grads


def init_params(dims, rng):
    """torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    params = []
    for a, b in zip(dims[:-1], dims[1:]):
        bound = 1 / np.sqrt(a)
        params.append(rng.uniform(-bound, bound, (b, a)).astype(np.float32))
        params.append(rng.uniform(-bound, bound, b).astype(np.float32))
    return params


# ---------------------------------------------------------------------------------------------
# Optimisers and schedules


class Optimiser:
    def __init__(self, kind, params, wd=0.0):
        self.kind, self.wd, self.t = kind, wd, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, params, grads, lr):
        self.t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        for p, g, m, v in zip(params, grads, self.m, self.v):
            g = g.astype(np.float32)
            if self.kind == "sgd":
                p -= lr * (g + self.wd * p)
            elif self.kind == "momentum":  # torch.optim.SGD(momentum=0.9)
                m *= 0.9
                m += g + self.wd * p
                p -= lr * m
            elif self.kind in ("adam", "adamw"):
                if self.kind == "adamw":
                    p -= lr * self.wd * p
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                mh = m / (1 - b1 ** self.t)
                vh = v / (1 - b2 ** self.t)
                p -= lr * mh / (np.sqrt(vh) + eps)
            elif self.kind == "rmsprop":  # torch.optim.RMSprop(alpha=0.99)
                v *= 0.99
                v += 0.01 * g * g
                p -= lr * g / (np.sqrt(v) + eps)
            else:
                raise ValueError(self.kind)


def learning_rate(spec, t, total, drop_step):
    lr, kind = spec["lr"], spec["sched"]
    if kind == "constant":
        return lr
    if kind == "cosine":  # the run stops at 80 % of the cosine's horizon
        horizon = total / 0.8
        return lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * t / horizon)))
    if kind == "cyclic":  # triangular between lr/10 and lr
        phase = (t % spec["cycle"]) / spec["cycle"]
        return lr * (0.1 + 0.9 * (1 - abs(2 * phase - 1)))
    if kind == "wsd":  # warmup 10 %, stable, linear decay to 2 % over the last 20 %
        if t < 0.1 * total:
            return lr * (t + 1) / (0.1 * total)
        start = 0.8 * total
        return lr if t < start else lr * (1 - 0.98 * (t - start) / (total - start))
    if kind == "drop":
        return lr if t < drop_step else lr * spec["drop_factor"]
    if kind == "speedup":
        return lr * spec["slow_factor"] if t < drop_step else lr
    if kind == "late_decay":
        return lr if t < drop_step else lr * 0.5 ** ((t - drop_step) / spec["stride"])
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# One window


def family_seed(name):
    return zlib.crc32(name.encode())


def make_window(job):
    family, seed, out_dir = job
    spec = dict(FAMILIES[family])
    rng = np.random.default_rng([seed, family_seed(family)])
    noise = spec["label_noise"]
    spec["noise"] = float(noise[rng.integers(len(noise))]) if isinstance(noise, list) else noise
    (train, select, test), outputs = make_data(spec, rng)
    mse = train[1].dtype == np.float32
    dims = [train[0].shape[1], *spec["hidden"], outputs]
    params = init_params(dims, rng)
    opt = Optimiser(spec["opt"], params, spec.get("wd", 0.0))
    n_members = spec["window"] + spec["slides"]
    stride, burn = spec["stride"], spec["burn"]
    total = burn + n_members * stride
    drop_member = None
    drop_step = None
    if "drop_members" in spec:
        drop_member = spec["drop_members"][(seed % WINDOWS_PER_FAMILY)]
        # Just after member `drop_member - 1` is saved: members >= drop_member see the change.
        drop_step = burn + drop_member * stride
    wid = f"{family}-s{seed}"
    wdir = os.path.join(out_dir, wid)
    os.makedirs(os.path.join(wdir, "members"))
    names = [f"net.{2 * i}.{part}" for i in range(len(dims) - 1) for part in ("weight", "bias")]
    members, lrs, train_losses = [], [], []
    x, y = train
    recent = []
    for t in range(total):
        idx = rng.integers(0, len(x), spec["batch"])
        lr = learning_rate(spec, t, total, drop_step)
        loss, grads = loss_and_grads(params, x[idx], y[idx], spec["act"], mse)
        recent.append(loss)
        opt.step(params, grads, lr)
        if t + 1 > burn and (t + 1 - burn) % stride == 0:
            rel = os.path.join("members", f"step_{t + 1:06d}.safetensors")
            save_file({n: np.ascontiguousarray(p, dtype=np.float32) for n, p in zip(names, params)},
                      os.path.join(wdir, rel))
            members.append(rel)
            lrs.append(float(lr))
            train_losses.append(float(np.mean(recent[-stride:])))
    for name, (xs, ys) in (("select", select), ("test", test)):
        save_file({"inputs": np.ascontiguousarray(xs, dtype=np.float32),
                   "targets": np.ascontiguousarray(ys)},
                  os.path.join(wdir, f"{name}.safetensors"))
    n_params = int(sum(p.size for p in params))
    entry = {
        "id": wid,
        "family": family,
        "seed": seed,
        "dir": wid,
        "window": spec["window"],
        "k": spec["k"],
        "slides": spec["slides"],
        "activation": spec["act"],
        "loss": "mse" if mse else "cross_entropy",
        "dims": dims,
        "params": n_params,
        "optimiser": spec["opt"],
        "schedule": spec["sched"],
        "label_noise": spec["noise"],
        "stride": stride,
        "members": members,
        "select": "select.safetensors",
        "test": "test.safetensors",
        "member_lr": lrs,
        "member_train_loss": train_losses,
    }
    if drop_member is not None:
        entry["planted_change_at_member"] = drop_member
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=sorted(SPLIT_SEEDS), required=True)
    ap.add_argument("--out", default="target/zoo", help="parent of <split>/ (default target/zoo)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--only", help="generate one family only (for a look; index lists it alone)")
    args = ap.parse_args()
    families = [args.only] if args.only else list(FAMILIES)
    for f in families:
        if f not in FAMILIES:
            sys.exit(f"unknown family {f!r}; families: {', '.join(FAMILIES)}")
    base = SPLIT_SEEDS[args.split]
    final = os.path.join(args.out, args.split)
    tmp = final + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    jobs = [(f, base + i, tmp) for f in families for i in range(WINDOWS_PER_FAMILY)]
    started = time.time()
    with multiprocessing.Pool(args.jobs) as pool:
        entries = []
        for e in pool.imap(make_window, jobs):
            entries.append(e)
            print(f"{e['id']:<34} {e['params']:>6} params  {len(e['members'])} members", flush=True)
    index = {
        "version": 1,
        "split": args.split,
        "generator": "scripts/make_zoo.py",
        "families": {f: FAMILIES[f]["about"] for f in families},
        "windows": entries,
    }
    with open(os.path.join(tmp, "zoo.json"), "w") as fh:
        json.dump(index, fh, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    print(f"{len(entries)} windows in {final}/zoo.json ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
