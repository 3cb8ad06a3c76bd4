"""Would overlapping the window's all-reduce with the last backward pay? Measured with gloo on
2 CPU processes (says nothing about NCCL on GPUs).

    python bench/overlap_gloo.py [WIDTH]     # an MLP of 2 WIDTH x WIDTH layers (2048: 8.4M parameters), K=4

Rank 0 prints medians (over the repeats) of: one all-reduce of the model's fp32 gradient,
one forward+backward of a micro-batch, and one whole window two ways: DDP, whose all-reduce
overlaps the last micro-batch's backward (accumulate(ddp_model)), and GradAccumulator without
DDP, which all-reduces its bucket at step()."""

import gc
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WIDTH, BATCH, K, REPEATS = 2048, 64, 4, 7  # WIDTH: the default


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))


def _median_s(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(rank: int, width: int) -> dict:
    import fusedaccum

    x = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(rank))
    model = _model(width)
    numel = sum(p.numel() for p in model.parameters())
    grad = torch.ones(numel)
    times = {"numel": numel, "reduce": _median_s(lambda: dist.all_reduce(grad)),
             "backward": _median_s(lambda: model(x).square().mean().backward())}

    ddp = nn.parallel.DistributedDataParallel(_model(width))
    acc_ddp = fusedaccum.GradAccumulator(ddp, K)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=1e-6)
    plain = _model(width)
    acc_plain = fusedaccum.GradAccumulator(plain.parameters(), K)  # reduces at step()
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-6)

    def window(acc, net, opt):
        for _ in range(K):
            with acc.accumulate(net):
                acc.backward(net(x).square().mean())
        assert acc.step(opt) is not None

    times["ddp"] = _median_s(lambda: window(acc_ddp, ddp, opt_ddp))
    times["plain"] = _median_s(lambda: window(acc_plain, plain, opt_plain))
    return times


def _worker(rank: int, world: int, store_path: str, width: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        # DDP and its reducer are gone when _measure returns: torn down after the group, gloo
        # can abort the process.
        t = _measure(rank, width)
        gc.collect()  # anything of _measure's left in a reference cycle (DDP's reducer) goes now
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        numel = t["numel"]
        print(f"torch {torch.__version__}, gloo, {world} processes x 1 thread; "
              f"{numel / 1e6:.1f}M fp32 parameters, micro-batch {BATCH}, K={K}, median of {REPEATS}")
        print(f"all-reduce of the gradient ({numel * 4 / 2**20:.0f} MiB)  {t['reduce'] * 1e3:7.1f} ms")
        print(f"forward+backward of a micro-batch      {t['backward'] * 1e3:7.1f} ms")
        print(f"window, DDP (overlapped all-reduce)    {t['ddp'] * 1e3:7.1f} ms")
        print(f"window, GradAccumulator (reduce at step) {t['plain'] * 1e3:5.1f} ms")


def main(width: int = WIDTH) -> int:
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), width), nprocs=world)
    return 0


if __name__ == "__main__":
    sys.exit(main(*[int(a) for a in sys.argv[1:2]]))
