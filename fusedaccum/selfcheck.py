"""A quick self-check: run every fused op through the backend the device gets, compare with
a float64 computation, and print a table. Exit status 1 if any row fails.

The tolerances are the tests' (``fusedaccum._tolerances``, printed in docs/numerics.md): an
element passes when ``|x - ref| <= atol + rtol * |ref|``, by the dtype it is stored in; a norm
when its relative error is at most ``NORM_RTOL``. The table shows the worst element's error as a
fraction of its allowance (<= 1 passes)."""

import math
import time

import torch

from . import _backend
from ._tolerances import NORM_RTOL, TOL
from .ops import accumulate_, clip_grad_norm_, unscale_clip_


def _err(x: torch.Tensor, ref: torch.Tensor, stored: "torch.dtype | None") -> float:
    """max |x - ref| / (atol + rtol |ref|): TOL[stored] elementwise, or NORM_RTOL for a norm (None)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    rtol, atol = (NORM_RTOL, 0.0) if stored is None else (TOL[stored]["rtol"], TOL[stored]["atol"])
    if x.numel() == 0:
        return 0.0
    return float(((x - ref).abs() / (atol + rtol * ref.abs()).clamp_min(1e-300)).max())


def run(device: "torch.device | str | None" = None, n: int = 1_000_003) -> bool:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = _backend.name_for(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []

    def row(op, dtype, stored, err, seconds):
        rows.append((op, str(dtype).replace("torch.", ""), str(stored).replace("torch.", ""), err,
                     TOL[stored]["rtol"], seconds, err <= 1.0))

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        acc = torch.randn(n, generator=gen).to(device)
        grad = torch.randn(n, generator=gen).to(dtype).to(device)
        want = acc.double() + grad.double() * 0.25
        t0 = time.perf_counter()
        accumulate_(acc, grad, 0.25)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row("accumulate_", dtype, torch.float32, _err(acc, want, torch.float32), time.perf_counter() - t0)

        bucket = (torch.randn(n, generator=gen) * 100).to(dtype).to(device)
        ref = bucket.double() / 1024
        ref_norm = ref.norm()
        t0 = time.perf_counter()
        norm, found_inf = unscale_clip_(bucket, 1 / 1024, max_norm=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        err = max(_err(norm, ref_norm, None), _err(bucket, ref * min(1.0, 1.0 / (float(ref_norm) + 1e-6)), dtype),
                  math.inf if float(found_inf) else 0.0)
        row("unscale_clip_", dtype, dtype, err, seconds)

    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in (3, 1000, 77)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    want = [p.grad.double() for p in params]
    total = math.sqrt(sum(float(w.pow(2).sum()) for w in want))
    t0 = time.perf_counter()
    got = clip_grad_norm_(params, 0.5)
    err = max([_err(got, torch.tensor(total), None)] +
              [_err(p.grad, w * min(1.0, 0.5 / (total + 1e-6)), torch.float32) for p, w in zip(params, want)])
    row("clip_grad_norm_", torch.float32, torch.float32, err, time.perf_counter() - t0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"fusedaccum self-check on {device} ({name}), backend {backend}, n={n}")
    print("err/tol: the worst element's |x - ref| / (atol + rtol |ref|) against float64 (<= 1 passes); "
          f"norms: relative error / {NORM_RTOL:g}")
    print(f"{'op':<16} {'grad dtype':<10} {'stored as':<10} {'err/tol':>8} {'rtol':>9} {'seconds':>8}  result")
    for op, dt, stored, err, tol, sec, ok in rows:
        print(f"{op:<16} {dt:<10} {stored:<10} {err:>8.3f} {tol:>9.2e} {sec:>8.4f}  {'ok' if ok else 'FAIL'}")
    return all(r[-1] for r in rows)
