"""The report of a run: the JSON, the markdown tables and the files (the plot is in plot.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .plot import write_plot


def _fmt_n(n: int) -> str:
    if n > 0 and 10 ** round(math.log10(n)) == n:
        return f"1e{round(math.log10(n))}"
    return f"{n:,}"


def _fmt_t(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _frac(r: dict) -> str:
    return "" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:.0f}%"


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n")


def _header(results: dict) -> list:
    m = results["meta"]
    d = m["device"]
    lines = [f"# fusedaccum bench: {d['name']}", "",
             f"- device: {d['type']} `{d['name']}`, {d['threads']} torch threads"
             + (f", {d['memory_gb']} GB" if d.get("memory_gb") else ""),
             f"- fused ops ran on backend `{d['backend']}`"
             + (" (the pure-PyTorch reference path; the Triton kernels run only on CUDA)"
                if d["backend"] == "torch" else " (Triton kernels)"),
             f"- torch {m['versions']['torch']}, triton {m['versions']['triton']}, "
             f"fusedaccum {m['versions']['fusedaccum']}, python {m['versions']['python']}",
             f"- date {m['date']}; command `{m['command']}`; {m.get('wall_s', '?')} s; "
             f"load average at start {m.get('loadavg_start')}, end {m.get('loadavg_end')}; other processes "
             f"used {m.get('other_procs_cpu_pct')}% of the CPU during the run (per group: JSON "
             "`other_procs_cpu_pct`)",
             f"- timing: {m['timing']}",
             "- B/el: bytes per element by the accounting in bench/README.md; GB/s = B/el x N / median; "
             "% copy = time of `dst.copy_(src)` moving the same bytes / row time; "
             "speed-up = baseline time / fusedaccum time (same op, same N, same data)"
             + ("; others' CPU = CPU time other processes used while the group was timed (% of all cores)"
                if d["type"] != "cuda" else ""),
             ""]
    if d["type"] != "cuda":
        lines += ["GPU rows: none. This file holds CPU measurements only; no GPU number is estimated.", ""]
    if results.get("targets"):
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in results["targets"]]
        lines.append("")
    return lines


def _summary(rows: list) -> list:
    ours_rows = [r for r in rows if r.get("ours") and r.get("median_s")]
    if not ours_rows:
        return []
    lines = ["## Summary: fusedaccum rows", "",
             "| op | N | layout | fusedaccum median | B/el | GB/s | % copy | speed-up over each baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ours_rows:
        sp = "; ".join(f"{k}: {v:.2f}x" for k, v in (r.get("speedups") or {}).items())
        lines.append(f"| {r['op']} | {_fmt_n(r['size'])} | {r['layout']} | {_fmt_t(r['median_s'])} | "
                     f"{r['bytes_per_elem']:g} | {r['gbps']:.2f} | {_frac(r)} | {sp} |")
    return lines + [""]


def _op_row(r: dict, cpu: bool) -> str:
    if r.get("error"):
        return (f"| {_fmt_n(r['size'])} | {r['layout']} ({r['tensors']}) | {r['impl']} | "
                f"error: {r['error'][:120]} | | | | | |" + (" |" if cpu else ""))
    q = r.get("quantiles") or {}
    spread = (f" ({_fmt_t(q.get('p20'))}-{_fmt_t(q.get('p80'))})" if q.get("p20") is not None else "")
    if r.get("ours"):
        sp = "(this)"
    elif r.get("fusedaccum_speedup") is not None:
        sp = f"{r['fusedaccum_speedup']:.2f}x"
    else:
        sp = ""
    impl = f"**{r['impl']}**" if r.get("ours") else r["impl"]
    if r["op"] == "copy":
        impl = f"copy: {r['impl']}"
    return (f"| {_fmt_n(r['size'])} | {r['layout']} ({r['tensors']}) | {impl} | "
            f"{_fmt_t(r['median_s'])}{spread} | {r['bytes_per_elem']:g} | {r['gbps']:.2f} | {_frac(r)} | "
            f"{sp} | {r['syncs']} |" + (f" {r.get('other_procs_cpu_pct')}% |" if cpu else ""))


def _op_table(results: dict, op: str) -> list:
    """One op's rows, its group's copies first, then the byte accounting of each implementation."""
    cpu = results["meta"]["device"]["type"] != "cuda"
    lines = [f"## {op}", "",
             "| N | layout (tensors) | implementation | median (p20-p80) | B/el | GB/s | % copy "
             "| fusedaccum speed-up | syncs |" + (" others' CPU |" if cpu else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if cpu else "")]
    lines += [_op_row(r, cpu) for r in results["rows"] if r["op"] == op or r.get("for_op") == op]
    notes = {"copy: dst.copy_(src) uint8": "read B/2 + write B/2 bytes, B = (B/el) x N: the bytes of the rows "
                                           "it is compared with"}
    notes.update({r["impl"]: r["bytes_note"] for r in results["rows"] if r["op"] == op})
    return lines + [""] + [f"- {impl}: {note}" for impl, note in notes.items()] + [""]


def memory_lines(results: dict) -> list:
    """The gradient memory table (``grad_memory.py``), engines as rows."""
    mem = results.get("grad_memory")
    if not mem:
        return []
    lines = ["| engine | parameters | path | gradient B/param between micro-batches | note |", "|---|---|---|---|---|"]
    for r in mem["rows"]:
        if r.get("bytes_per_param") is None:
            lines.append(f"| {r['engine']} | {r['param_dtype']} | refused | - | {r.get('error', '')[:90]} |")
            continue
        note = (f"DDP's reducer holds {r['ddp_reducer_bytes_per_param']:g} B/param more of its own"
                if r.get("ddp_reducer_bytes_per_param") else "")
        lines.append(f"| {r['engine']} | {r['param_dtype']} | {r['path']} | {r['bytes_per_param']:g} | {note} |")
    return lines + ["", f"Measured: {mem['how']}.", ""]


def markdown(results: dict) -> str:
    lines = _header(results) + _summary(results["rows"])
    mem = memory_lines(results)
    if mem:
        lines += ["## Gradient memory per parameter", ""] + mem
    ops = [op for op in dict.fromkeys(r["op"] for r in results["rows"]) if op != "copy"]
    for op in ops:
        lines += _op_table(results, op)
    return "\n".join(lines)


def write_outputs(results: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    slug = results["meta"]["device"]["slug"]
    paths = {"json": out / f"{slug}.json", "md": out / f"{slug}.md", "png": out / f"{slug}.png"}
    write_json(results, paths["json"])
    paths["md"].write_text(markdown(results))
    if not write_plot(results, paths["png"]):
        del paths["png"]
    return paths
