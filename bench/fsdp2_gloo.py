"""FSDP2's two window modes beside DDP, with GradAccumulator: gloo on CPU processes (says
nothing about NCCL on GPUs).

    python bench/fsdp2_gloo.py [--width 1024] [--layers 4] [--world 2] [--json bench/results/fsdp2/gloo-cpu.json]

(Not in bench/results/*.json: that folder's top level holds the fusedaccum bench's tables.)

A model of LAYERS Linear(WIDTH, WIDTH) layers (1024 x 4: 4.2M parameters), each wrapped with
fully_shard and the root too; K = 4 micro-batches of 32 rows; AdamW; max_norm=1.0. Each setup
runs in its own processes (so that its peak RSS is its own):

- fsdp2 micro_batch: GradAccumulator(model, K) (the default): FSDP2 reduce-scatters every micro-batch;
- fsdp2 window: GradAccumulator(model, K, fsdp_sync="window"): one reduce-scatter per window;
- ddp: the same layers unsharded in DistributedDataParallel, GradAccumulator(ddp, K).

Per setup, rank 0 reports: the median window time over REPEATS windows (after one warm-up
window); the collectives of one window, during the micro-batches and at step(), counted by
wrapping torch.distributed's functions (DDP's all-reduces through a communication hook), with
the bytes each rank receives (all-reduce: the buffer; all-gather: the gathered tensor;
reduce-scatter: its shard); the gradient bytes held between two micro-batches of a window
(the accumulator's buckets plus FSDP2's unsharded gradients, summed over the live tensors
after micro-batch K-1); and the process's peak RSS.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

K, BATCH, REPEATS = 4, 32, 5
COUNTED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_single", "all_gather_single")
CALLS: list = []
DEPTH: list = []
ORIGINALS: dict = {}  # torch.distributed's functions, unwrapped


def _count_collectives() -> None:
    for name in COUNTED:
        original = ORIGINALS[name] = getattr(dist, name)

        def counting(*args, _original=original, _name=name, **kwargs):
            t = args[0] if args else next(iter(kwargs.values()))
            if not DEPTH:  # all_gather_into_tensor calls all_gather_single: the outer call only
                CALLS.append((_name, t.numel() * t.element_size()))  # the output: what this rank receives
            DEPTH.append(_name)
            try:
                return _original(*args, **kwargs)
            finally:
                DEPTH.pop()

        setattr(dist, name, counting)


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])


def _unsharded_grad_bytes(model) -> int:
    """Bytes of the unsharded gradients FSDP2 holds for the window (no-sync micro-batches)."""
    total = 0
    for m in model.modules():
        state = getattr(m, "_get_fsdp_state", None)
        if state is None:
            continue
        for group in state()._fsdp_param_groups:
            for fp in group.fsdp_params:
                for t in (fp.unsharded_accumulated_grad, getattr(getattr(fp, "_unsharded_param", None), "grad", None)):
                    if t is not None:
                        total += t.numel() * t.element_size()
    return total


def _measure(rank: int, setup: str, width: int, layers: int) -> dict:
    import fusedaccum

    model = _model(width, layers)
    numel = sum(p.numel() for p in model.parameters())
    hook_calls = []
    if setup == "ddp":
        net = nn.parallel.DistributedDataParallel(model)

        def hook(state, bucket):
            hook_calls.append(("all_reduce (DDP)", bucket.buffer().numel() * bucket.buffer().element_size()))
            t = bucket.buffer().div_(dist.get_world_size())
            return ORIGINALS["all_reduce"](t, async_op=True).get_future().then(lambda fut: fut.value()[0])

        net.register_comm_hook(None, hook)
        acc = fusedaccum.GradAccumulator(net, K, max_norm=1.0)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        net = fully_shard(model)
        acc = fusedaccum.GradAccumulator(net, K, max_norm=1.0, fsdp_sync=setup.split()[-1])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
    x = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(rank))

    def window(held=None, phases=None):
        for k in range(K):
            with acc.accumulate(net):
                acc.backward(net(x).square().mean())
            if held is not None and k == K - 2:
                held.append(sum(b.accum.numel() * 4 + (b.landing.numel() * b.landing.element_size()
                                                        if b.landing is not None else 0) for b in acc.buckets)
                            + (_unsharded_grad_bytes(net) if setup != "ddp" else 0))
        if phases is not None:
            phases["micro-batches"] = CALLS + hook_calls
            CALLS.clear()
            hook_calls.clear()
        assert acc.step(opt) is not None
        if phases is not None:
            phases["step"] = CALLS + hook_calls

    held: list = []
    phases: dict = {}
    CALLS.clear()
    hook_calls.clear()
    window(held, phases)  # warm-up; its collectives are one window's
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        window()
        times.append(time.perf_counter() - t0)
    collectives: dict = {}
    for phase, calls in phases.items():
        for name, nbytes in calls:
            c = collectives.setdefault(phase, {}).setdefault(name, [0, 0])
            c[0] += 1
            c[1] += nbytes
    return {"setup": setup, "numel": numel, "window_ms": 1e3 * statistics.median(times),
            "window_ms_all": [1e3 * t for t in times], "collectives": collectives,
            "grad_bytes_held": held[0], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _worker(rank: int, world: int, store_path: str, setup: str, width: int, layers: int, out: str) -> None:
    torch.set_num_threads(1)
    _count_collectives()
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        result = _measure(rank, setup, width, layers)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = []
    for setup in ("fsdp2 micro_batch", "fsdp2 window", "ddp"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(_worker, args=(args.world, os.path.join(tmp, "store"), setup, args.width, args.layers, out),
                     nprocs=args.world)
            with open(out) as f:
                results.append(json.load(f))
    numel = results[0]["numel"]
    print(f"gloo, {args.world} CPU processes (1 thread each), {numel / 1e6:.1f}M parameters "
          f"({args.layers} x Linear({args.width}, {args.width})), K={K}, {BATCH} rows per micro-batch, "
          f"torch {torch.__version__}\n")
    print("| setup | window ms (median of 5) | collectives in the micro-batches: count (MiB received) | "
          "at step() | gradient MiB held mid-window | peak RSS MiB |")
    print("|---|---|---|---|---|---|")

    def colls(phase: dict) -> str:
        return ", ".join(f"{name} {n} ({_mib(b)})" for name, (n, b) in sorted(phase.items())) or "none"

    for r in results:
        c = r["collectives"]
        print(f"| {r['setup']} | {r['window_ms']:.0f} | {colls(c.get('micro-batches', {}))} | "
              f"{colls(c.get('step', {}))} | {_mib(r['grad_bytes_held'])} | {r['peak_rss_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"world": args.world, "width": args.width, "layers": args.layers, "K": K, "batch": BATCH,
                       "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
