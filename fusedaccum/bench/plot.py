"""The plot of a run: GB/s against N, one panel per op, the copy ceiling drawn."""

from __future__ import annotations

import math
from pathlib import Path


def write_plot(results: dict, path: Path) -> bool:
    """GB/s against N for the size-sweep rows, one panel per op, the copy ceiling drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    rows = [r for r in results["rows"] if r.get("median_s")]
    sweep = set(results["meta"]["sizes"])
    ops = [op for op in dict.fromkeys(r["op"] for r in rows) if op != "copy"
           and any(r["op"] == op and r["size"] in sweep for r in rows)]
    cols = 3
    nrows = max(1, math.ceil(len(ops) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        ceiling = {}  # the best of this group's copies at each N
        for r in rows:
            if r["op"] == "copy" and r.get("for_op") == op and r["size"] in sweep:
                ceiling[r["size"]] = max(ceiling.get(r["size"], 0.0), r["gbps"])
        xs = sorted(ceiling)
        series = {}
        for r in rows:
            if r["op"] == op and r["size"] in sweep:
                series.setdefault((r["impl"], r["layout"], r.get("ours")), []).append((r["size"], r["gbps"]))
        for (impl, layout, ours), pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=2.5 if ours else 1.2,
                    label=f"{impl} [{layout}]")
        if xs:
            ax.plot(xs, [ceiling[x] for x in xs], "k--", lw=1.5, label="copy (dst.copy_ of the same bytes)")
        ax.set_xscale("log")
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("N (elements)")
        ax.set_ylabel("GB/s (accounted bytes / median)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    d = results["meta"]["device"]
    fig.suptitle(f"fusedaccum bench: {d['name']} ({d['type']}, backend {d['backend']}, {d['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

