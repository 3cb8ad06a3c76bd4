"""Print the tables docs/benchmarks.md shows for a stored bench result: the fusedaccum rows
(speed-ups by baseline), then, where the result has them, the targets with their measured
values and the gradient memory per parameter per engine.

    python bench/docs_table.py bench/results/<device>.json

The document's numbers come from here, so none of them is typed by hand; tests/test_bench.py
checks that each table there is what this prints for the JSON it names."""

import json
import sys
from pathlib import Path

from fusedaccum.bench.report import _fmt_n, _fmt_t, memory_lines

# Column -> the baseline (speed-up key) it shows, first match wins.
COLUMNS = [
    ("vs torch, flat", ("[flat]",), ("compile",)),
    ("vs torch, 148 tensors", ("[gpt2-148]",), ("no statistics", "alone", "apply pass", "landing")),
    ("vs torch, 496 tensors", ("[list-496]",), ()),
    ("vs torch.compile", ("compile",), ()),
    ("vs no statistics", ("no statistics",), ()),  # the cost of noise_scale=True (below 1x: slower)
    ("vs optimizer alone", ("alone",), ()),  # the optimizer step / the window step with it (below 1x)
    ("vs apply pass", ("apply pass",), ()),  # the fold against the apply pass, same optimizer
    ("vs landing bucket", ("landing",), ()),  # bf16 micro-batches: direct (grad_dtype) against landing
]


def _pick(speedups: dict, want, avoid):
    for key, value in speedups.items():
        if any(w in key for w in want) and not any(a in key for a in avoid):
            return f"{value:.2f}x"
    return ""


def table(results: dict) -> str:
    head = ["fusedaccum op", "N", "median", "B/el", "GB/s", "% copy"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        if not r.get("ours") or r.get("median_s") is None:
            continue
        sp = r.get("speedups", {})
        cells = [r["op"], _fmt_n(r["size"]), _fmt_t(r["median_s"]), str(r["bytes_per_elem"]), f"{r['gbps']:.1f}",
                 f"{r['frac_copy']:.0%}"]
        if r["size"] in (10**6, 10**7, 10**8, 10**9):
            cells += [_pick(sp, want, avoid) for _, want, avoid in COLUMNS]
        else:  # the real GPT-2-small rows: their own baselines, named
            cells += ["; ".join(f"{k}: {v:.2f}x" for k, v in sp.items())] + [""] * (len(COLUMNS) - 1)
        if r["layout"] not in ("flat", "gpt2-148"):
            cells[0] += f" ({r['layout']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    """The targets the run checked (``fusedaccum/bench/targets.py``), met or not; "" if none."""
    if not results.get("targets"):
        return ""
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in results["targets"]]
    return "\n".join(lines)


def memory_table(results: dict) -> str:
    """Gradient bytes per parameter per engine and dtype (``fusedaccum/bench/grad_memory.py``); "" if none."""
    return "\n".join(memory_lines(results)).rstrip()


def sections(results: dict) -> list:
    """Every table this result has, in the order docs/benchmarks.md shows them."""
    return [t for t in (table(results), targets_table(results), memory_table(results)) if t]


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    print("\n\n".join(sections(json.loads(Path(argv[0]).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
