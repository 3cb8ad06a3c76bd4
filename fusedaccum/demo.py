"""``python -m fusedaccum demo``: gradient accumulation on real data, three ways.

Trains a small MLP on scikit-learn's bundled digits set (1797 8x8 images; no download) with
AdamW and gradient clipping, one optimizer step per window of ``--window`` images:

1. large batch: the whole window in one forward/backward;
2. GradAccumulator: the window split into ``--micro-batches`` micro-batches of uneven sizes
   (as token-budget batching produces), summed losses with ``num_items``, the epoch's partial
   last window closed with ``step(force=True)``;
3. the naive loop: per-micro-batch mean loss / K, ``optimizer.step()`` every K micro-batches
   and at the end of the epoch.

All three see the same windows in the same order from the same initial weights. The table
shows that (2) follows (1) to rounding error while (3) drifts away, and what each costs.

(2) also logs what ``step()`` returns per optimizer step, with no host sync in the loop: the
window's loss (``StepResult.loss``) and the gradient noise scale (``noise_scale=True``:
``StepResult.noise_scale.b_simple``, in images). A fourth run lets the noise scale choose K
(``AdaptiveSteps``: micro-batches of 16 images, K re-decided every few windows); the second
table compares it with fixed K: optimizer steps and images seen until the training loss
first reaches the level both runs reach.
"""

import argparse
import copy
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from ._demo_memory import _peak_memory, _sync
from .accumulator import GradAccumulator
from .demo_plot import ACCUMULATED, ADAPTIVE, LARGE, NAIVE, plot
from .signals import AdaptiveSteps, NoiseScaleSettings

# In the directory the demo runs from, where the user finds it; .gitignore names it, so a run
# in the checkout leaves nothing untracked.
DEFAULT_OUT = "fusedaccum-demo.png"
# The package is not on PyPI: its extras come from a clone (or ./dev, which installs them).
EXTRAS_HINT = ("in a git clone, `./dev demo` installs it, or `pip install -e \".[demo]\"` in your own environment; "
               "without a clone, `pip install \"fusedaccum[demo] @ git+<repository URL>\"`")
MAX_NORM = 1.0


def _load_digits(device, seed):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit(f"the demo needs scikit-learn ({exc}): {EXTRAS_HINT}") from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:297], perm[297:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def _model(seed, device):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)).to(device)


def _partition(rng, n, parts):
    """n split into `parts` positive sizes at random cut points: very uneven micro-batches."""
    parts = max(1, min(parts, n))
    cuts = sorted(rng.sample(range(1, n), parts - 1)) if parts > 1 else []
    bounds = [0] + cuts + [n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _schedule(n_train, epochs, window, k, seed):
    """Per epoch, the windows as lists of micro-batch index tensors (shared by all methods)."""
    epochs_out = []
    for epoch in range(epochs):
        rng = random.Random(seed * 1000 + epoch)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        windows = []
        for start in range(0, n_train, window):
            idx = perm[start:start + window]
            parts = k if len(idx) == window else max(1, round(k * len(idx) / window))
            sizes = _partition(rng, len(idx), parts)
            windows.append(list(torch.split(idx, sizes)))
        epochs_out.append(windows)
    return epochs_out


# ------------------------------------------------------------------ the three training loops
def _adamw(model):
    # fused=True: GradAccumulator then skips on inf/NaN on the device, with no host sync.
    try:
        return torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2, fused=True)
    except (RuntimeError, ValueError):  # a torch without the fused kernel for this device
        return torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)


class LargeBatch:
    name = LARGE

    def __init__(self, model, k):
        self.model = model
        self.opt = _adamw(model)

    def epoch(self, x, y, windows, log):
        for micro in windows:
            idx = torch.cat(micro)
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
            self.opt.step()
            self.opt.zero_grad()
            log.append(loss.detach())


class Accumulated:
    name = ACCUMULATED

    def __init__(self, model, k):
        self.model = model
        self.opt = _adamw(model)
        self.acc = GradAccumulator(model.parameters(), k, max_norm=MAX_NORM, noise_scale=NOISE)
        self.noise = []  # b_simple per optimizer step, 0-d device tensors (read after training)

    def epoch(self, x, y, windows, log):
        for micro in windows:
            for idx in micro:
                with self.acc.accumulate(self.model):
                    loss = F.cross_entropy(self.model(x[idx]), y[idx], reduction="sum")
                    self.acc.backward(loss, num_items=len(idx))
                self._log(self.acc.step(self.opt), log)  # steps when the window holds K micro-batches
        if self.acc.micro_batches:  # the epoch's partial last window
            self._log(self.acc.step(self.opt, force=True), log)

    def _log(self, result, log):
        if result is not None:
            log.append(result.loss)  # the window's per-image loss, on the device: no sync
            self.noise.append(result.noise_scale.b_simple)


class Naive:
    name = NAIVE

    def __init__(self, model, k):
        self.model, self.k = model, k
        self.opt = _adamw(model)

    def epoch(self, x, y, windows, log):
        micro = [idx for w in windows for idx in w]
        total, seen = 0.0, 0
        for i, idx in enumerate(micro):
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            (loss / self.k).backward()
            total, seen = total + loss.detach() * len(idx), seen + len(idx)
            if (i + 1) % self.k == 0 or i + 1 == len(micro):
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
                self.opt.step()
                self.opt.zero_grad()
                log.append(total / seen)
                total, seen = 0.0, 0


METHODS = (LargeBatch, Accumulated, Naive)
NOISE = NoiseScaleSettings(beta=0.98)
ADAPTIVE_MICRO = 16  # images per micro-batch of the adaptive run


class Adaptive:
    """K chosen by the noise scale: K ≈ b_simple / 16 images, re-decided every 5 windows.
    Windows run across epoch boundaries (no forced partial windows)."""

    name = ADAPTIVE

    def __init__(self, model, k):
        self.model = model
        self.opt = _adamw(model)
        # K >= 2: with fp32 parameters the small batch is a window's first micro-batch, so a
        # window of one micro-batch gives no estimate (see docs/signals.md).
        policy = AdaptiveSteps(min_steps=2, max_steps=2 * k, every=5)
        self.acc = GradAccumulator(model.parameters(), 2, max_norm=MAX_NORM,
                                   noise_scale=NoiseScaleSettings(beta=NOISE.beta, adaptive=policy))
        self.ks, self.noise, self.steps = [], [], 0

    def epoch(self, x, y, micro, log):
        for idx in micro:
            with self.acc.accumulate(self.model):
                loss = F.cross_entropy(self.model(x[idx]), y[idx], reduction="sum")
                self.acc.backward(loss, num_items=len(idx))
            result = self.acc.step(self.opt)
            if result is not None:
                self.steps += 1
                log.append(result.loss)
                self.noise.append(result.noise_scale.b_simple)
                self.ks.append(result.micro_batches)


# ------------------------------------------------------------------ measurements
def _flat(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).cpu()


def _evaluate(model, x, y):
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def run(epochs=40, k=8, window=128, device=None, out=DEFAULT_OUT, seed=0, stream=None):
    """Train three ways, print the table (to ``stream``, default stdout), save the plot to
    ``out``; returns the rows."""
    stream = sys.stdout if stream is None else stream
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # A model this small gains nothing from intra-op threads, and on a busy machine their
        # spin-waits make the timings swing by 10x.
        torch.set_num_threads(1)
    try:
        return _run(epochs, k, window, device, out, seed, stream)
    finally:
        torch.set_num_threads(threads)


def _run(epochs, k, window, device, out, seed, stream):
    x, y, x_test, y_test = _load_digits(device, seed)
    schedule = _schedule(len(y), epochs, window, k, seed)
    init = _model(seed, device)
    n_params = sum(p.numel() for p in init.parameters())
    last = len(y) % window
    print(f"fusedaccum demo: digits (scikit-learn), {len(y)} train / {len(y_test)} test images, "
          f"MLP with {n_params} parameters, AdamW, clip {MAX_NORM}", file=stream)
    print(f"device {device}, backend {_backend.name_for(device)}, {epochs} epochs, window {window} images "
          f"= {k} micro-batches of uneven size (last window of each epoch: {last or window} images)",
          file=stream)

    rows, curves, snapshots, progress, trainers = [], {}, {}, {}, {}
    for method in METHODS + (Adaptive,):
        trainer = trainers[method.name] = method(copy.deepcopy(init), k)
        log, snaps, seconds, progress[method.name] = [], [], 0.0, []
        for epoch, windows in enumerate(schedule):
            if method is Adaptive:  # the same images in the same order, in micro-batches of 16
                windows = list(torch.cat([torch.cat(w) for w in windows]).split(ADAPTIVE_MICRO))
            _sync(device)
            t0 = time.perf_counter()
            trainer.epoch(x, y, windows, log)
            _sync(device)
            seconds += time.perf_counter() - t0
            snaps.append(_flat(trainer.model))  # a copy to the host, outside the timing
            progress[method.name].append((_evaluate(trainer.model, x, y)[0], len(log), (epoch + 1) * len(y)))
        if method is Adaptive:  # windows run across epochs: the tail, less than a window, dropped on purpose
            trainer.acc.discard_window()
        curves[method.name] = torch.stack(log).cpu().tolist()
        snapshots[method.name] = snaps
        loss, _ = _evaluate(trainer.model, x, y)
        _, test_acc = _evaluate(trainer.model, x_test, y_test)
        rows.append(dict(method=method.name, loss=loss, test_acc=test_acc, seconds=seconds,
                         peak=None if method is Adaptive else _peak_memory(method, init, x, y, schedule, k, device)))
    adaptive_row = rows.pop()
    reference = snapshots[LargeBatch.name]
    drift = {}
    for row in rows:
        drift[row["method"]] = [float((a - b).abs().max()) for a, b in zip(snapshots[row["method"]], reference)]
        row["max_diff"] = drift[row["method"]][-1]

    labels = {LargeBatch.name: f"large batch ({window})", Accumulated.name: f"GradAccumulator (K={k})",
              Naive.name: "naive loop (mean / K)"}
    print(f"\n{'method':<24} {'final loss':>10} {'test acc':>9} {'max |w - w_large|':>18} "
          f"{'peak mem':>10} {'wall time':>10}", file=stream)
    for row in rows:
        peak = "n/a" if row["peak"] is None else f"{row['peak'] / 2**10:.0f} KiB"
        print(f"{labels[row['method']]:<24} {row['loss']:>10.4f} {100 * row['test_acc']:>8.1f}% "
              f"{row['max_diff']:>18.2e} {peak:>10} {row['seconds']:>9.2f}s", file=stream)
    print("final loss: cross-entropy over the training set; peak mem: parameters, gradients, optimizer "
          "state and buckets plus the peak of one window's temporaries", file=stream)

    fixed, adaptive = trainers[Accumulated.name], trainers[Adaptive.name]
    noise = {name: torch.stack(t.noise).cpu().tolist() for name, t in ((Accumulated.name, fixed),
                                                                         (Adaptive.name, adaptive))}
    rows.append(_compare(adaptive_row, rows[1], progress, noise, adaptive.ks, k, window, stream))
    labels[Adaptive.name] = f"adaptive K ({ADAPTIVE_MICRO} images/micro-batch)"
    plot(curves, drift, labels, out, epochs, progress, noise, adaptive.ks, EXTRAS_HINT)
    print(f"plot saved to {os.path.abspath(out)}", file=stream)
    return rows


def _compare(adaptive_row, fixed_row, progress, noise, ks, k, window, stream):
    """The second table: fixed K against K from the noise scale, to the same training loss."""
    target = max(progress[Accumulated.name][-1][0], progress[Adaptive.name][-1][0])
    print(f"\nK from the noise scale: windows of K x {ADAPTIVE_MICRO} images, K = b_simple / {ADAPTIVE_MICRO} "
          f"re-decided every 5 windows (one host read each), against fixed K = {k} ({window} images)", file=stream)
    print(f"{'run':<24} {'final loss':>10} {'test acc':>9} {'steps':>6} {'to loss':>8} {'steps':>6} "
          f"{'images':>7} {'K used':>10} {'b_simple first/last':>20}", file=stream)
    for name, row, label in ((Accumulated.name, fixed_row, f"fixed K={k}"),
                             (Adaptive.name, adaptive_row, "adaptive K")):
        loss, steps, images = next(p for p in progress[name] if p[0] <= target)
        row.update(reach=dict(target=target, steps=steps, images=images), steps=progress[name][-1][1])
        used = f"{k}" if name == Accumulated.name else f"{min(ks)}..{max(ks)}"
        finite = [v for v in noise[name] if v == v and v > 0]
        b = f"{finite[0]:.0f} / {finite[-1]:.0f}" if finite else "n/a"
        print(f"{label:<24} {row['loss']:>10.4f} {100 * row['test_acc']:>8.1f}% {row['steps']:>6} {target:>8.4f} "
              f"{steps:>6} {images:>7} {used:>10} {b:>20}", file=stream)
    print("to loss: the training-set loss both runs reach (checked at epoch ends); steps, images: until then. "
          "b_simple: the noise scale in images (EMA, bias corrected)", file=stream)
    return adaptive_row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedaccum demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser):
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--micro-batches", type=int, default=8, dest="k",
                        help="micro-batches per window, K (default 8)")
    parser.add_argument("--window", type=int, default=128, help="images per optimizer step (default 128)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where to save the plot, relative to the current directory (default ./{DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)


def run_from_args(args) -> int:
    if args.epochs < 1 or args.k < 1 or args.window < args.k:
        raise SystemExit("need --epochs >= 1, --micro-batches >= 1 and --window >= --micro-batches")
    run(epochs=args.epochs, k=args.k, window=args.window, device=args.device, out=args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
