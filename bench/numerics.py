"""The accuracy and edge cases of issue 10, measured in both backends, and the CPU time of the
reference ``unscale_clip_`` (the CPU benchmark relies on it).

    TRITON_INTERPRET=1 python bench/numerics.py          # both backends (Triton under the interpreter)
    python bench/numerics.py --time                       # also: median of 5 unscale_clip_ on 1e7 fp32, CPU

Each line: the case, then per backend the relative error against float64 (or the result)."""

import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fusedaccum  # noqa: E402
from fusedaccum.ops import _unscale_clip_stats  # noqa: E402


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _norm_case(n, value, p, inv):
    x = torch.full((n,), value, dtype=torch.float32)
    exact = float(torch.linalg.vector_norm(x.double(), p)) * inv
    stats = _unscale_clip_stats([x], inv, None, p)
    return float(stats[0]), float(stats[1]), exact


def cases():
    yield "p=1, 3000 x 1e13: norm rel err", lambda: "%.1e" % _rel(*_norm_case(3000, 1e13, 1.0, 1.0)[::2])
    yield "p=0.5, 8.4M x 3.3: norm rel err", lambda: "%.1e" % _rel(*_norm_case(8_400_000, 3.3, 0.5, 1.0)[::2])

    def underflow():
        x = torch.full((100_000,), 1e-25)
        norm, found, _ = _norm_case(100_000, 1e-25, 2.0, 1e20)
        _unscale_clip_stats([x], 1e20, 1e-3)
        return f"total_norm {norm:.3g} (exact 3.16e-3), clipped norm {float(torch.linalg.vector_norm(x.double())):.3g}"
    yield "1e5 x 1e-25, inv 1e20, max_norm 1e-3", underflow

    def overflow():
        norm, found, exact = _norm_case(1024, 1e36, 0.5, 1e-20)
        return f"total_norm {norm:.3g} (exact {exact:.3g}), found_inf {found:g}"
    yield "p=0.5, 1024 x 1e36, inv 1e-20", overflow

    def bf16_out():
        b = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
        out = torch.empty(4096)
        fusedaccum.unscale_clip_(b, 0.3, out=out)
        ref = b.double() * 0.3
        return "%.1e" % float(((out.double() - ref).abs() / ref.abs()).max())
    yield "bf16 bucket -> fp32 out, max rel err", bf16_out

    def fp16_store():
        b = torch.tensor([40000.0, 1.0], dtype=torch.float16)
        _, found = fusedaccum.unscale_clip_(b, 2.0)
        return f"stored {b.tolist()}, found_inf {float(found):g}"
    yield "fp16 [40000, 1] x 2 in place", fp16_store

    def accumulator():
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
        opt = torch.optim.SGD([p], lr=1e-6)
        acc = fusedaccum.GradAccumulator([p], 1, scaler=fusedaccum.LossScaler(init_scale=0.25))
        acc.backward((torch.full((4,), 1e5) * p.float()).sum())
        res = acc.step(opt)
        return f"found_inf {float(res.found_inf):g}, param {p.tolist()}"
    yield "issue repro: fp16 param, grad 1e5, scale 0.25", accumulator


def time_reference(n: int = 10**7) -> float:
    os.environ["FUSEDACCUM_BACKEND"] = "torch"
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        fusedaccum.unscale_clip_(x, 1.0, max_norm=1e9)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, fn in cases():
        row = []
        for backend in ("torch", "triton"):
            os.environ["FUSEDACCUM_BACKEND"] = backend
            try:
                row.append(f"{backend}: {fn()}")
            except Exception as exc:  # report the case, go on with the others
                row.append(f"{backend}: {type(exc).__name__}: {str(exc)[:60]}")
        print(f"{name:<46} " + " | ".join(row))
    if "--time" in argv:
        print(f"unscale_clip_ 1e7 fp32 on the CPU, torch backend: median {time_reference() * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
