"""A run: the sizes, the run's metadata, each group timed (its own copies beside it), and the
derived columns (GB/s, fraction of copy, speed-ups)."""

from __future__ import annotations

import datetime
import os
import time

import torch

import fusedaccum
from fusedaccum import _backend

from . import grad_memory
from .cases import WINDOW_K, build_plan
from .machine import (DISTURBED_PCT, OtherLoad, _free_memory, _loadavg, _versions, device_name, slugify,
                      wait_quiet)
from .report import _fmt_n, _fmt_t
from .targets import targets
from .timing import Timer, count_syncs
from .workloads import MAX_NORM

FULL_SIZES = (10**6, 10**7, 10**8)
GPU_BIG_SIZE = 10**9
# The largest group at N=1e9 holds about 24 GB at once (the window rows: two parameter sets,
# the injected gradients, a bucket and torch's gradients, 4 GB each; or the 20-B/el copy:
# two 10 GB buffers); ask for twice that free before adding it.
GPU_BIG_MIN_FREE = 48 * 10**9
QUICK_SIZES = (10**4, 10**5)


def _line(r: dict) -> str:
    if r.get("error"):
        return f"{r['op']:<30} N={_fmt_n(r['size']):<11} {r['layout']:<18} {r['impl']:<40} ERROR {r['error']}"
    if r["op"] == "copy":
        extra = ""
    elif r.get("speedups"):
        extra = "  " + ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedups"].items())
    elif r.get("fusedaccum_speedup") is not None:
        extra = f"  fusedaccum speed-up {r['fusedaccum_speedup']:.2f}x"
    else:
        extra = ""
    frac = "" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:4.0f}% copy"
    return (f"{r['op']:<30} N={_fmt_n(r['size']):<11} {r['layout']:<18} {r['impl']:<40} "
            f"{_fmt_t(r['median_s']):>11} {r['bytes_per_elem']:>5g} B/el {r['gbps']:7.2f} GB/s {frac:>9} "
            f"syncs {r['syncs']}{extra}")


def choose_sizes(args, device: torch.device) -> list:
    if args.sizes is not None:
        return args.sizes
    sizes = list(QUICK_SIZES if args.quick else FULL_SIZES)
    if device.type == "cuda" and not args.quick:
        free, _ = torch.cuda.mem_get_info(device)
        if free >= GPU_BIG_MIN_FREE:
            sizes.append(GPU_BIG_SIZE)
        else:
            print(f"skipping N=1e9: {free / 1e9:.0f} GB free, {GPU_BIG_MIN_FREE / 1e9:.0f} GB wanted")
    return sizes


def make_meta(args, device: torch.device, backend: str, timer: Timer, sizes: list, compile_: bool) -> dict:
    name = device_name(device)
    meta = {
        "device": {"type": device.type, "name": name, "slug": slugify(name, device),
                   "threads": torch.get_num_threads(), "backend": backend,
                   "cpu_count": os.cpu_count()},
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m fusedaccum bench"] + args.argv),
        "quick": bool(args.quick),
        "timing": timer.describe(),
        "sizes": list(sizes),
        "max_norm": MAX_NORM,
        "window_k": WINDOW_K,
        "grad_accumulator": hasattr(fusedaccum, "GradAccumulator"),
        "compile_baselines": compile_,
        "loadavg_start": _loadavg(),
    }
    if device.type == "cuda":
        meta["device"]["memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return meta


def _copy_entry(n, bpe, op, device):
    nbytes = int(round(n * bpe))
    r = {"op": "copy", "for_op": op, "impl": "dst.copy_(src) uint8", "layout": "flat", "tensors": 1, "size": n,
         "dtype": "uint8", "bytes": nbytes, "bytes_per_elem": bpe, "ours": False,
         "bytes_note": f"read B/2 + write B/2 bytes, B = {bpe:g} x N: the bytes of the rows it is compared with"}

    def build():
        src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    return r, build


def _spec_entry(s):
    r = {"op": s.op, "impl": s.impl, "layout": s.layout, "tensors": s.tensors, "size": s.n,
         "dtype": s.dtype, "bytes": int(round(s.n * s.bytes_per_elem)),
         "bytes_per_elem": s.bytes_per_elem, "bytes_note": s.bytes_note, "ours": s.ours}
    return r, s.build


def _failed(r, exc):
    r.update(median_s=None, quantiles=None, syncs=None, error=f"{type(exc).__name__}: {exc}"[:300])


def time_on_cuda(entries: list, timer: Timer, device: torch.device) -> None:
    # One row at a time, its memory freed before the next (N=1e9 fills a GPU quickly).
    for r, build in entries:
        try:
            fn = build()
            r.update(timer(fn))
            r["syncs"] = count_syncs(fn, device)
            del fn
        except Exception as exc:  # noqa: BLE001 - e.g. torch.compile unavailable: recorded, run goes on
            _failed(r, exc)
        _free_memory(device)


def time_on_cpu(entries: list, group, timer: Timer, device: torch.device, args) -> None:
    """The group's rows interleaved; timed again (up to ``args.retries`` times) while other
    processes used more than DISTURBED_PCT of the CPU meanwhile."""
    print(f"  ... timing {len(entries)} rows of '{group.op}' at N={_fmt_n(group.n)} interleaved", flush=True)
    fns = []
    for r, build in entries:
        try:
            fns.append(build())
        except Exception as exc:  # noqa: BLE001
            _failed(r, exc)
            fns.append(None)
    idx = [i for i, f in enumerate(fns) if f is not None]
    live = [fns[i] for i in idx]
    warm_errors = timer.warm(live)
    for attempt in range(1 + max(0, args.retries)):
        if args.wait > 0:
            before = wait_quiet(args.wait)
            if before is not None and before > DISTURBED_PCT:
                print(f"  !! other processes still use {before}% of the CPU after {args.wait:g} s", flush=True)
        load = OtherLoad()  # after the warm-up: torch.compile's worker processes are not "others"
        got, errors = timer.interleaved(live, warm_errors)
        others = load.percent()
        if others is None or others <= DISTURBED_PCT:
            break
        print(f"  !! other processes used {others}% of the CPU while this group ran"
              + (": timing it again" if attempt < args.retries else ": its times are disturbed"), flush=True)
    for r, _ in entries:
        r["other_procs_cpu_pct"] = others
        r["timing_attempts"] = attempt + 1
    for j, i in enumerate(idx):
        if j in got:
            entries[i][0].update(got[j], syncs=count_syncs(None, device))
        else:
            _failed(entries[i][0], errors[j])


def derive(entries: list, n_copies: int) -> None:
    """GB/s, the fraction of the copy of the same bytes, and the speed-ups within the group."""
    copies = {r["bytes_per_elem"]: r for r, _ in entries[:n_copies]}
    group_rows = [r for r, _ in entries[n_copies:]]
    ours = next((r for r in group_rows if r["ours"] and r.get("median_s")), None)
    for r, _ in entries:
        t = r.get("median_s")
        r["gbps"] = r["bytes"] / t / 1e9 if t else 0.0
        c = copies.get(r["bytes_per_elem"], {}).get("median_s")
        r["copy_median_s"] = c
        r["frac_copy"] = c / t if (c and t) else None
        if r["ours"] and t:
            r["speedups"] = {f"{b['impl']} [{b['layout']}]": b["median_s"] / t
                             for b in group_rows if not b["ours"] and b.get("median_s")}
        elif ours and t and r["op"] != "copy":
            r["fusedaccum_speedup"] = t / ours["median_s"]


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = _backend.name_for(device)
    if device.type != "cuda" and backend == "triton":
        raise SystemExit("fusedaccum bench: FUSEDACCUM_BACKEND=triton on the CPU runs the Triton interpreter, "
                         "far too slow to benchmark; unset it (the CPU bench measures the torch reference)")
    sizes = choose_sizes(args, device)
    compile_ = not args.quick if args.compile is None else args.compile
    torch.manual_seed(0)
    timer = Timer(device, args.quick, args.min_repeats, args.budget)
    meta = make_meta(args, device, backend, timer, sizes, compile_)
    what = ("the Triton kernels" if backend == "triton" else
            "the pure-PyTorch reference path (backend 'torch'), not the Triton kernels")
    print(f"fusedaccum bench on {meta['device']['name']} ({device.type}, {meta['device']['threads']} threads): "
          f"measuring {what}")
    print(f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}; timing: {meta['timing']}")
    if not meta["grad_accumulator"]:
        print("fusedaccum.GradAccumulator not found: no window-step rows")

    groups = build_plan(sizes, device, compile_=compile_, quick=args.quick)
    # Every group times its own copies (same bytes as its rows, same conditions: interleaved
    # with them on a CPU), so a disturbed group never lends its copy time to another.
    total = sum(len(g.specs) + len({s.bytes_per_elem for s in g.specs}) for g in groups)
    rows = []
    t_start, run_load = time.perf_counter(), OtherLoad()
    for group in groups:
        new_copies = sorted({s.bytes_per_elem for s in group.specs})
        entries = ([_copy_entry(group.n, bpe, group.op, device) for bpe in new_copies]
                   + [_spec_entry(s) for s in group.specs])
        if device.type == "cuda":
            time_on_cuda(entries, timer, device)
        else:
            time_on_cpu(entries, group, timer, device, args)
        derive(entries, len(new_copies))
        for r, _ in entries:
            rows.append(r)
            print(f"[{len(rows):>3}/{total} {time.perf_counter() - t_start:6.0f}s] {_line(r)}", flush=True)
        del entries
        for close in group.cache.pop("close", []):
            close()
        group.cache.clear()
        group.specs.clear()
        _free_memory(device)
    results = {"meta": meta, "rows": rows}
    if meta["grad_accumulator"]:
        results["grad_memory"] = {"how": grad_memory.HOW, "rows": grad_memory.table()}
    results["targets"] = targets(results)
    results["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["meta"]["loadavg_end"] = _loadavg()
    results["meta"]["other_procs_cpu_pct"] = run_load.percent()
    return results
