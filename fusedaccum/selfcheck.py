"""A quick self-check: run every fused op through the backend the device gets, compare with
a float64 computation, and print a table. Exit status 1 if any row fails."""

import math
import time

import torch

from . import _backend
from .ops import accumulate_, clip_grad_norm_, unscale_clip_

# Relative error allowed against float64, by the dtype of the stored result.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def run(device: "torch.device | str | None" = None, n: int = 1_000_003) -> bool:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = _backend.name_for(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []

    def row(op, dtype, err, tol, seconds):
        rows.append((op, str(dtype).replace("torch.", ""), err, tol, seconds, err <= tol))

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        acc = torch.randn(n, generator=gen).to(device)
        grad = torch.randn(n, generator=gen).to(dtype).to(device)
        want = acc.double() + grad.double() * 0.25
        t0 = time.perf_counter()
        accumulate_(acc, grad, 0.25)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row("accumulate_", dtype, _rel(acc, want), RTOL[torch.float32], time.perf_counter() - t0)

        bucket = (torch.randn(n, generator=gen) * 100).to(dtype).to(device)
        ref = bucket.double() / 1024
        ref_norm = ref.norm()
        t0 = time.perf_counter()
        norm, found_inf = unscale_clip_(bucket, 1 / 1024, max_norm=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        err = max(_rel(norm, ref_norm), _rel(bucket, ref * min(1.0, 1.0 / (float(ref_norm) + 1e-6))),
                  float(found_inf))
        row("unscale_clip_", dtype, err, RTOL[dtype], seconds)

    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in (3, 1000, 77)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    want = [p.grad.double() for p in params]
    total = math.sqrt(sum(float(w.pow(2).sum()) for w in want))
    t0 = time.perf_counter()
    got = clip_grad_norm_(params, 0.5)
    err = max([_rel(got, torch.tensor(total))] +
              [_rel(p.grad, w * min(1.0, 0.5 / (total + 1e-6))) for p, w in zip(params, want)])
    row("clip_grad_norm_", torch.float32, err, RTOL[torch.float32], time.perf_counter() - t0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"fusedaccum self-check on {device} ({name}), backend {backend}, n={n}")
    print(f"{'op':<16} {'grad dtype':<10} {'rel err':>10} {'tolerance':>10} {'seconds':>8}  result")
    for op, dt, err, tol, sec, ok in rows:
        print(f"{op:<16} {dt:<10} {err:>10.2e} {tol:>10.1e} {sec:>8.4f}  {'ok' if ok else 'FAIL'}")
    return all(r[-1] for r in rows)
