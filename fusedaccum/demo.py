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
"""

import argparse
import copy
import os
import random
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from .accumulator import GradAccumulator

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
    name = "large batch"

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
    name = "GradAccumulator"

    def __init__(self, model, k):
        self.model = model
        self.opt = _adamw(model)
        self.acc = GradAccumulator(model.parameters(), k, max_norm=MAX_NORM)

    def epoch(self, x, y, windows, log):
        for micro in windows:
            total = 0.0
            for idx in micro:
                with self.acc.accumulate(self.model):
                    loss = F.cross_entropy(self.model(x[idx]), y[idx], reduction="sum")
                    self.acc.backward(loss, num_items=len(idx))
                total = total + loss.detach()
                self.acc.step(self.opt)  # steps when the window holds K micro-batches
            log.append(total / sum(len(i) for i in micro))
        if self.acc.micro_batches:  # the epoch's partial last window
            self.acc.step(self.opt, force=True)


class Naive:
    name = "naive loop"

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


# ------------------------------------------------------------------ measurements
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flat(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).cpu()


def _persistent_bytes(trainer):
    """Bytes of parameters, gradients, optimizer state and accumulation buckets (each storage once)."""
    tensors = []
    for p in trainer.model.parameters():
        tensors += [p, p.grad]
    for state in trainer.opt.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    acc = getattr(trainer, "acc", None)
    if acc is not None:
        for b in acc.buckets:
            tensors += [b.accum, b.landing]
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _transient_peak_bytes(fn, device):
    """Peak bytes allocated above the starting point while fn() runs (None if unmeasurable)."""
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    # CPU: the profiler records every allocation and free; fold them in time order.
    from torch.profiler import ProfilerActivity, profile

    saved_fd = os.dup(2)  # kineto prints its start/stop lines on the C-level stderr
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # noqa: BLE001 - a profiler that cannot run leaves the column empty
        return None
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _peak_memory(method, init, x, y, schedule, k, device):
    """Persistent state plus the transient peak of one window (the third, after warm-up)."""
    trainer = method(copy.deepcopy(init), k)
    windows = schedule[0]
    warm = min(2, len(windows) - 1)
    trainer.epoch(x, y, windows[:warm], [])  # optimizer state now exists
    transient = _transient_peak_bytes(lambda: trainer.epoch(x, y, windows[warm:warm + 1], []), device)
    if transient is None:
        return None
    return _persistent_bytes(trainer) + transient


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

    rows, curves, snapshots = [], {}, {}
    for method in METHODS:
        trainer = method(copy.deepcopy(init), k)
        log, snaps, seconds = [], [], 0.0
        for windows in schedule:
            _sync(device)
            t0 = time.perf_counter()
            trainer.epoch(x, y, windows, log)
            _sync(device)
            seconds += time.perf_counter() - t0
            snaps.append(_flat(trainer.model))  # a copy to the host, outside the timing
        curves[method.name] = torch.stack(log).cpu().tolist()
        snapshots[method.name] = snaps
        loss, _ = _evaluate(trainer.model, x, y)
        _, test_acc = _evaluate(trainer.model, x_test, y_test)
        rows.append(dict(method=method.name, loss=loss, test_acc=test_acc, seconds=seconds,
                         peak=_peak_memory(method, init, x, y, schedule, k, device)))
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

    _plot(curves, drift, labels, out, epochs)
    print(f"plot saved to {os.path.abspath(out)}", file=stream)
    return rows


def _plot(curves, drift, labels, out, epochs):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise SystemExit(f"the demo needs matplotlib ({exc}): {EXTRAS_HINT}") from None
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)  # no pyplot, no global backend state
    ax_loss, ax_drift = fig.subplots(1, 2)
    styles = {LargeBatch.name: dict(color="black", lw=2.5, alpha=0.5),
              Accumulated.name: dict(color="tab:blue", lw=1.0, ls="--"),
              Naive.name: dict(color="tab:red", lw=1.0)}
    for name, values in curves.items():
        ax_loss.plot(range(1, len(values) + 1), values, label=labels[name], **styles[name])
    ax_loss.set(xlabel="optimizer step", ylabel="training loss of the window", yscale="log",
                title="loss curves")
    ax_loss.legend()
    for name, values in drift.items():
        if name != LargeBatch.name:
            ax_drift.plot(range(1, epochs + 1), [max(v, 1e-12) for v in values], marker="o", ms=3,
                          label=labels[name], **styles[name])
    ax_drift.set(xlabel="epoch", ylabel="max |w - w_large batch|", yscale="log",
                 title="distance to large-batch training")
    ax_drift.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


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
