"""Smoke tests of the bench code itself (python -m fusedaccum bench): no timing assertions.

The CUDA-only branches (do_bench, the GPU targets) are exercised with stand-ins, so a typo
there shows up here and not first on a GPU machine."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedaccum import __main__ as cli
from fusedaccum import _backend
from fusedaccum.bench import cases, cli as bench_cli, layouts, machine, profiling, report, targets, timing
from fusedaccum.bench import workloads

ROW_FIELDS = {"op", "impl", "layout", "tensors", "size", "dtype", "bytes", "bytes_per_elem", "bytes_note",
              "median_s", "quantiles", "gbps", "frac_copy", "syncs"}


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def test_quick_run_writes_json_markdown_plot(tmp_path, reference_backend, capsys):
    assert cli.main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "reference path" in printed and "/" in printed  # the progress counter [i/total]
    slug = machine.slugify(machine.device_name(torch.device("cpu")), torch.device("cpu"))
    data = json.loads((tmp_path / f"{slug}.json").read_text())
    assert (tmp_path / f"{slug}.md").read_text().startswith("# fusedaccum bench")
    try:
        import matplotlib  # noqa: F401 - the plot is skipped without it
    except ImportError:
        pass
    else:
        assert (tmp_path / f"{slug}.png").stat().st_size > 1000

    meta = data["meta"]
    assert meta["device"]["type"] == "cpu" and meta["device"]["backend"] == "torch"
    assert meta["device"]["threads"] == torch.get_num_threads()
    assert meta["versions"]["torch"] == torch.__version__ and meta["date"] and meta["quick"]

    rows = data["rows"]
    assert not [r for r in rows if r.get("error")]
    for r in rows:
        assert ROW_FIELDS <= set(r), r
        assert r["median_s"] > 0 and r["gbps"] > 0 and r["syncs"] == "n/a (cpu)"
        assert r["bytes"] == round(r["size"] * r["bytes_per_elem"])
        assert set(r["quantiles"]) == {"p20", "p50", "p80"}
    ops = {r["op"] for r in rows}
    assert {"copy", "accumulate_ bf16->fp32", "accumulate_ fp32->fp32", "accumulate_ bf16->fp32 zero_grad",
            "norm pass fp32", "unscale_clip_ fp32", "clip_grad_norm_ fp32"} <= ops
    if hasattr(cases.fusedaccum, "GradAccumulator"):
        assert any(r["op"].startswith("window step") for r in rows)
    # Every fused row has a copy of the same bytes and a speed-up over each baseline of its group.
    for r in rows:
        if r["op"] == "copy":
            assert r["for_op"] in ops and r["bytes_per_elem"] in {b["bytes_per_elem"] for b in rows
                                                                   if b["op"] == r["for_op"]}
        if r.get("ours"):
            assert r["frac_copy"] > 0 and r["copy_median_s"] > 0
            baselines = [b for b in rows if b["op"] == r["op"] and b["size"] == r["size"] and not b.get("ours")]
            assert len(r["speedups"]) == len(baselines) >= 1
    chains = {r["layout"] for r in rows if r["impl"] == "torch unscale+clip chain"}
    assert {"flat", "gpt2-148", "list-496", "gpt2-tiny list"} <= chains
    # The timed CPU targets are on GPT-2 small and N >= 1e6, not --quick's sizes; the memory one is not timed.
    assert [t["target"].split(" <= ")[0] for t in data["targets"]] == [
        "bf16 parameters hold"] * bool(data.get("grad_memory"))
    # The issue-18 groups run at tiny sizes too: bf16 fold rows, the micro-batch group.
    assert {"window step + AdamW(fused) bf16", "window step + SGD(fused) bf16", "window step + AdamW(fused) fp32",
            "micro-batch accumulation bf16 (K=4)"} <= ops
    micro = {r["impl"]: r for r in rows if r["op"] == "micro-batch accumulation bf16 (K=4)" and r["size"] == 10**4}
    assert micro["fusedaccum direct"]["bytes_per_elem"] == 40
    assert micro["fusedaccum landing bucket"]["bytes_per_elem"] == 72
    # The bf16 signals rows are charged the path each runs: noise_scale keeps the landing bucket.
    sig = {r["impl"]: r["bytes_per_elem"] for r in rows
           if r["op"] == "window step bf16 params (K=4), noise scale" and r["size"] == 10**4}
    # The landing path's step applies only: its norm comes from the window's last accumulate pass.
    assert sig["GradAccumulator(noise_scale=True)"] == 76
    assert sig["GradAccumulator (no statistics)"] == (54 if cases.fusedaccum.buckets.grad_dtype_supported() else 76)
    mem = {(m["engine"], m["param_dtype"]): m for m in data["grad_memory"]["rows"]}
    assert {e for e, _ in mem} == {"one process", "process group", "DDP", "FSDP2"}
    assert mem[("one process", "fp32")]["bytes_per_param"] == 4.0
    if cases.fusedaccum.buckets.grad_dtype_supported():
        assert mem[("one process", "bf16")]["bytes_per_param"] == 4.0  # direct: the fp32 bucket only
        assert mem[("one process", "bf16 landing")]["bytes_per_param"] == 6.0  # + the bf16 landing bucket
        assert mem[("FSDP2", "bf16")]["path"] == "landing"


def test_gpt2_small_layout():
    shapes = layouts.GPT2_SMALL
    assert len(shapes) == 148
    assert sum(math.prod(s) for s in shapes) == 124_439_808  # GPT2LMHeadModel, lm_head tied
    assert len(layouts.LIST_LAYOUTS["list-496"]) == 496
    for n in (10**4, 10**6 + 3):
        sizes = layouts.split_sizes(shapes, n)
        assert sum(sizes) == n and min(sizes) >= 1 and len(sizes) == 148


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_norm_pass_matches_float64(backend_name, monkeypatch):
    """The norm-pass row launches the read pass by hand: check it computes the norm."""
    if backend_name == "triton":
        kernels = None
        try:
            kernels = _backend._load_kernels()
        except RuntimeError as exc:
            pytest.skip(str(exc))
        if not _backend._interpreted(kernels):
            pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    monkeypatch.setenv(_backend.ENV_VAR, backend_name)
    x = torch.randn(3 * 4096 + 17, generator=torch.Generator().manual_seed(0))
    run, total_norm = workloads.norm_pass(x, torch.ones(()))  # inv = 1, as in the bench
    run()
    assert float(total_norm()) == pytest.approx(float(x.double().norm()), rel=1e-5)


def test_gpu_timer_branches(monkeypatch):
    """Timer on CUDA calls triton.testing.do_bench with quantiles, or return_mode on a
    triton without them; checked with a stand-in do_bench (no GPU needed)."""
    triton_testing = pytest.importorskip("triton.testing")
    calls = []

    def with_quantiles(fn, warmup, rep, quantiles=None, return_mode="mean"):
        calls.append((quantiles, return_mode))
        fn()
        return [1.0, 2.0, 3.0] if quantiles else 2.0

    monkeypatch.setattr(triton_testing, "do_bench", with_quantiles)
    got = timing.Timer(torch.device("cuda"), quick=True)(lambda: None)
    assert got["median_s"] == 2e-3 and got["quantiles"]["p20"] == 1e-3 and got["quantiles"]["p80"] == 3e-3 and calls[-1][0] == [0.2, 0.5, 0.8]

    def without_quantiles(fn, warmup, rep, return_mode="mean"):
        calls.append((None, return_mode))
        return 4.0

    monkeypatch.setattr(triton_testing, "do_bench", without_quantiles)
    got = timing.Timer(torch.device("cuda"), quick=True)(lambda: None)
    assert got["median_s"] == 4e-3 and calls[-1] == (None, "median")


def _row(op, impl, layout, size, t, bpe, ours=False, frac=None, syncs=0):
    return {"op": op, "impl": impl, "layout": layout, "tensors": 1, "size": size, "dtype": "fp32",
            "bytes": int(size * bpe), "bytes_per_elem": bpe, "bytes_note": "x", "median_s": t,
            "quantiles": {"p20": t, "p50": t, "p80": t}, "gbps": size * bpe / t / 1e9, "frac_copy": frac,
            "syncs": syncs, "ours": ours}


def test_gpu_targets_and_report(tmp_path):
    """The GPU targets, markdown and plot from a hand-made CUDA result (no GPU needed)."""
    n = 10**8
    rows = [
        dict(_row("copy", "dst.copy_(src) uint8", "flat", n, 1.0, 12, frac=1.0, syncs=0), for_op="unscale_clip_ fp32"),
        _row("accumulate_ bf16->fp32", "fusedaccum", "flat", n, 1.0, 10, ours=True, frac=0.95),
        _row("norm pass fp32", "fusedaccum", "flat", n, 1.0, 4, ours=True, frac=0.85),
        _row("unscale_clip_ fp32", "fusedaccum", "flat", n, 1.0, 12, ours=True, frac=0.9, syncs=1),
        _row("unscale_clip_ fp32", "torch unscale+clip chain", "flat", n, 2.0, 20, frac=0.8),
    ]
    rows[-1]["fusedaccum_speedup"] = 2.0
    meta = {"device": {"type": "cuda", "name": "Test GPU", "slug": "test-gpu", "threads": 1, "backend": "triton",
                       "memory_gb": 80.0},
            "versions": {"torch": "t", "triton": "3.6", "fusedaccum": "0", "python": "3"},
            "date": "today", "command": "python -m fusedaccum bench", "timing": "do_bench", "sizes": [n]}
    results = {"meta": meta, "rows": rows}
    got = {t["target"].split(" at ")[0].split(" >= ")[0]: t["met"] for t in targets.targets(results)}
    assert got == {"GPU: accumulate_ bf16->fp32": True, "GPU: norm pass fp32": False,
                   "GPU: unscale_clip_ moves <= 12 B/el": True, "GPU: unscale_clip_": True,
                   "GPU: zero host syncs per step (every fusedaccum row)": False}
    results["targets"] = targets.targets(results)
    paths = report.write_outputs(results, tmp_path)
    md = paths["md"].read_text()
    assert "Test GPU" in md and "| 2.00x |" in md and "**no**" in md and "copy: dst.copy_(src)" in md
    assert json.loads(paths["json"].read_text())["meta"]["device"]["slug"] == "test-gpu"


def test_sync_count_is_na_on_cpu():
    assert timing.count_syncs(lambda: None, torch.device("cpu")) == "n/a (cpu)"


def test_profile_window_cpu(reference_backend):
    text = profiling.profile_window(torch.device("cpu"), 10**4, k=2, row_limit=5)
    assert "one window step" in text and "# of Calls" in text and "torch: backward loop" in text


def test_cli_forwards_bench_arguments(monkeypatch):
    seen = []

    def fake_main(argv):
        seen.append(argv)
        return 0

    monkeypatch.setattr(bench_cli, "main", fake_main)
    assert cli.main(["bench", "--quick", "--sizes", "1e4", "--out", "x"]) == 0
    assert seen == [["--quick", "--sizes", "1e4", "--out", "x"]]
    args = bench_cli.parse_args(["--sizes", "1e4,2e5", "--no-compile"])
    assert args.sizes == [10**4, 2 * 10**5] and args.compile is False


def test_window_rows_take_the_sync_free_path(monkeypatch):
    """The window rows' NullOptimizer must look like a fused optimizer after its first step,
    or GradAccumulator.step would read found_inf on the host and the rows would time a sync."""
    import fusedaccum

    p = torch.nn.Parameter(torch.ones(8))
    acc = fusedaccum.GradAccumulator([p], 2)
    opt = workloads.NullOptimizer([p])

    def forbidden(self, *args, **kwargs):
        raise AssertionError("host read of a tensor on the step path")
    acc.backward((p * 2).sum())
    acc.backward((p * 2).sum())
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    assert acc.step(opt) is not None


ROOT = Path(__file__).resolve().parent.parent


def _bench_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_table_has_a_line_per_fusedaccum_row():
    docs_table = _bench_script("docs_table")
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        results = json.loads(path.read_text())
        lines = docs_table.table(results).splitlines()
        ours = [r for r in results["rows"] if r.get("ours") and r.get("median_s") is not None]
        assert len(lines) == 2 + len(ours) and ours
        assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_benchmarks_doc_shows_the_tables_of_the_results_it_names():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    named = re.findall(r"`python bench/docs_table.py\s+(bench/results/\S+\.json)` prints it", doc)
    assert named, "docs/benchmarks.md names the JSON each CPU table comes from"
    docs_table = _bench_script("docs_table")
    for path in named:
        for table in docs_table.sections(json.loads((ROOT / path).read_text())):
            assert table in doc, (f"docs/benchmarks.md: a table of {path} is not what python bench/docs_table.py "
                                  f"{path} prints:\n{table}")


def test_step_byte_accounting_matches_docs_kernels():
    """The step rows' bytes are docs/kernels.md's table: the fold, the apply pass, bf16, and the
    place kept for the norm in the last accumulate pass (bf16 landing, one process)."""
    from fusedaccum.bench import fold_cases

    f32, b16 = torch.float32, torch.bfloat16
    assert fold_cases.step_prep_bytes(f32, fold=True)[0] + fold_cases.OPTIMIZER_BYTES["AdamW"] == 36
    assert fold_cases.step_prep_bytes(f32)[0] + fold_cases.OPTIMIZER_BYTES["AdamW"] == 40
    assert fold_cases.step_prep_bytes(f32, fold=True)[0] + fold_cases.OPTIMIZER_BYTES["SGD"] == 28
    assert fold_cases.step_prep_bytes(b16)[0] == 10
    assert fold_cases.step_prep_bytes(b16, norm_in_last_pass=True)[0] == 6
    kernels_md = (ROOT / "docs" / "kernels.md").read_text()
    assert "| 36 |" in kernels_md and "| 28 / 32 |" in kernels_md and "| 24 / 20 |" in kernels_md
    rows = {s.impl: s.bytes_per_elem for s in fold_cases.fold_group(10**4, torch.device("cpu"), "AdamW", b16).specs}
    assert rows == {"fusedaccum (apply pass)": 24, "torch AdamW(fused=True).step() alone": 14}


def test_issue18_targets_from_a_hand_made_cpu_result():
    """Each issue-18 target comes out with its measured value, met or not, from the rows it names."""
    big, small = 10**8, 10**6
    fold, mb, win = "window step + AdamW(fused) fp32", "micro-batch accumulation bf16 (K=4)", \
        "window step fp32 params (K=4)"
    rows = [
        _row(fold, "fusedaccum (fold)", "gpt2-148", big, 1.5, 36, ours=True),
        _row(fold, "torch AdamW(fused=True).step() alone", "gpt2-148", big, 1.0, 28),
        _row(mb, "fusedaccum direct", "gpt2-148", big, 0.7, 40, ours=True),
        _row(mb, "fusedaccum landing bucket", "gpt2-148", big, 1.0, 72),
        _row(win, "fusedaccum.GradAccumulator", "gpt2-148", small, 1.0, 64, ours=True),
        _row(win, "torch backward loop + clip_grad_norm_(foreach)", "gpt2-148", small, 0.9, 56),
    ]
    for r in rows:
        r["frac_copy"] = 0.5
    memory = {"how": "x", "rows": [{"engine": "one process", "param_dtype": "bf16", "path": "landing",
                                    "bytes_per_param": 6.0}]}
    results = {"meta": {"device": {"type": "cpu"}}, "rows": rows, "grad_memory": memory}
    got = {t["target"].split(" <= ")[0].split(" >= ")[0].split(" at ")[0]: (t["met"], t["value"].split()[0])
           for t in targets.targets(results)}
    assert got == {"CPU: fp32 AdamW(fused=True) window step": (False, "1.50x"),
                   "bf16 parameters hold": (False, "6"),
                   "CPU: bf16 micro-batch accumulation": (True, "0.70x"),
                   "CPU: window step": (False, "0.90x")}
    results["targets"] = targets.targets(results)
    tables = _bench_script("docs_table").sections(results)
    assert len(tables) == 3 and "| 6 |" in tables[2] and tables[1].count("**no**") == 3


def test_norm_accuracy_script(capsys):
    assert _bench_script("norm_accuracy").main([1000, 4099]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1,000", "4,099"]
    assert all(float(r[4]) < 1e-6 for r in rows)  # the row fold against float64


def test_overlap_gloo_script():
    # A subprocess: its workers are spawned, and must import the script by its file name.
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "overlap_gloo.py"), "32"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "window, DDP" in run.stdout and "window, GradAccumulator" in run.stdout


def test_hook_cost_script(capsys):
    """bench/hook_cost.py: the four hook states time a backward each; its unhooked window (the
    upper bound docs/benchmarks.md quotes) registers no hook and gives the hooked window's step."""
    script = _bench_script("hook_cost")
    script.main(1000, 2)
    out = capsys.readouterr().out
    assert all(name in out for name in ("no hook", "hook removed", "list.append hook", "+ pre-hook removed"))
    sizes = script.split_sizes(script.LIST_LAYOUTS["gpt2-148"], 3000)
    grads = list(torch.randn(3000).split(sizes))
    unhooked, ps = script.unhooked_window(grads, sizes)
    hooked_ps = [torch.nn.Parameter(torch.empty(s)) for s in sizes]
    acc = script.fusedaccum.GradAccumulator(hooked_ps, script.WINDOW_K, max_norm=script.MAX_NORM)
    for _ in range(script.WINDOW_K):
        acc.backward(script._InjectGrads.apply(grads, *hooked_ps))
    want = acc.step(script.NullOptimizer(hooked_ps))
    got = unhooked()
    assert all(p._post_accumulate_grad_hooks is None for p in ps)
    assert torch.equal(got.total_norm, want.total_norm)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, hooked_ps))
