"""Gradient memory per parameter, per data-parallel engine and parameter dtype: the bytes of
gradient storage a ``GradAccumulator`` holds between micro-batches, read from the buffers it
actually allocated (its ``GradBuckets``: each bucket's fp32 ``accum``, its ``landing`` bucket in
the parameter dtype when it has one, and a direct bucket's step buffer when one is alive)
over the parameter elements this rank holds, on a small model, after one micro-batch.

The engines that need a process group get one of world size 1 in this process (gloo, a file
rendezvous in a temp folder); a bigger world changes what FSDP2's shards hold, not the bytes per
element. Not counted: the engine's own buffers (DDP's reducer buckets, listed apart where torch
reports them; FSDP2's transient unsharded gradient inside a backward) and the optimizer's."""

from __future__ import annotations

import contextlib
import datetime
import tempfile
from pathlib import Path

import torch

import fusedaccum

ENGINES = ("one process", "process group", "DDP", "FSDP2")
PATHS = (("fp32", torch.float32, None), ("bf16", torch.bfloat16, "auto"),
         ("bf16 landing", torch.bfloat16, "landing"))
HOW = ("bytes of every buffer the accumulator's GradBuckets allocated (fp32 accum + landing bucket "
       "+ a live direct step buffer) / parameter elements held by this rank, after one micro-batch "
       "of a 3-layer MLP (world size 1), on the CPU whatever the run's device (the layout is the same on every device)")


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(dtype)


@contextlib.contextmanager
def _world_of_one():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'pg'}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=30))
        try:
            yield dist.group.WORLD
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def _landing_only(force: bool):
    """The landing path where torch has ``Tensor.grad_dtype`` (what older torch runs)."""
    real = fusedaccum.buckets.grad_dtype_supported
    if force:
        fusedaccum.buckets.grad_dtype_supported = lambda: False
    try:
        yield
    finally:
        fusedaccum.buckets.grad_dtype_supported = real


def held_bytes(buckets) -> int:
    """Gradient bytes a ``GradBuckets`` holds now."""
    return sum(b.accum.nbytes + (0 if b.landing is None else b.landing.nbytes)
               + (0 if b.step_out is None else b.step_out.nbytes) for b in buckets.buckets)


def _local_numel(params) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)


def _measure(engine: str, dtype, group) -> dict:
    model = _model(dtype)
    extra = {}
    if engine == "DDP":
        model = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    elif engine == "FSDP2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    kwargs = {"process_group": group} if engine == "process group" else {}
    acc = fusedaccum.GradAccumulator(model if engine in ("DDP", "FSDP2") else list(model.parameters()), 4,
                                     **kwargs)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        x = torch.randn(16, 32, dtype=dtype)
        if engine == "FSDP2":
            with acc.accumulate(model):
                acc.backward(model(x).float().square().mean())
        else:
            acc.backward(model(x).float().square().mean())
        n = _local_numel(params)
        if engine == "DDP":
            data = model._get_ddp_logging_data()  # the reducer's own fp32 buckets, beside ours
            sizes = data.get("bucket_sizes")
            if isinstance(sizes, str):
                sizes = [int(s) for s in sizes.split(",") if s.strip()]
            if sizes:
                extra["ddp_reducer_bytes_per_param"] = round(sum(sizes) / n, 3)
        direct = any(b.direct for b in acc.buckets.buckets)
        return {"bytes_per_param": round(held_bytes(acc.buckets) / n, 3), "params": n,
                "path": "fp32" if dtype == torch.float32 else ("direct" if direct else "landing"),
                **extra}
    finally:
        acc.discard_window()
        acc.release()


def table() -> list:
    """One row per engine and parameter path: the measured bytes, or why the engine refuses it."""
    import torch.distributed as dist

    rows = []
    distributed = dist.is_available() and dist.is_gloo_available() and not dist.is_initialized()
    for engine in ENGINES:
        # One world for every path of an engine: a gloo group takes a while to set up.
        world = _world_of_one() if engine != "one process" and distributed else contextlib.nullcontext(None)
        with world as group:
            for name, dtype, path in PATHS:
                row = {"engine": engine, "param_dtype": name}
                if path == "landing" and not fusedaccum.buckets.grad_dtype_supported():
                    continue  # the "bf16" row is the landing path already
                try:
                    if engine != "one process" and group is None:
                        raise RuntimeError("needs torch.distributed with gloo and no process group yet")
                    with _landing_only(path == "landing"):
                        row.update(_measure(engine, dtype, group))
                except Exception as exc:  # noqa: BLE001 - an engine refusing a dtype is a result
                    row.update(bytes_per_param=None, error=f"{type(exc).__name__}: {exc}"[:200])
                rows.append(row)
    return rows
