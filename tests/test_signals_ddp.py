"""The gradient noise scale at K = 1 under DDP (2 processes, gloo, CPU).

DDP all-reduces in the synchronising backward; at K = 1 that is the window's only one, so no
rank ever saw its own micro-batch's gradient: no small batch, no estimate (NaN), and an
``AdaptiveSteps`` policy that reached K = 1 kept deciding on stale averages. With the
statistics on, that micro-batch now runs under ``no_sync()`` and the step all-reduces: the
estimate is the process-group engine's on the same data. Each launch runs this file as a
script on every rank (FileStore rendezvous, 20 s collective timeout).
"""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _multiproc as mp

WINDOWS = 4
ROWS = 4


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def data(w, k, rank):
    g = torch.Generator().manual_seed(100 * w + 10 * k + rank)
    return torch.randn(ROWS, 5, generator=g), torch.randn(ROWS, 3, generator=g)


def _run(rank, model, wrapped, acc, windows=WINDOWS):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = {"noise": [], "k": [], "micro": []}
    for w in range(windows):
        for k in range(acc.accumulation_steps):
            x, y = data(w, k, rank)
            with acc.accumulate(wrapped):
                acc.backward(F.mse_loss(wrapped(x), y))
        result = acc.step(opt)
        rec["noise"].append(result.noise_scale.to_host())
        rec["micro"].append(result.micro_batches)
        rec["k"].append(acc.accumulation_steps)
    rec["params"] = [p.detach().clone() for p in model.parameters()]
    return rec


def scenario_ddp_k1(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    import fusedaccum

    model = make_model()
    ddp = DistributedDataParallel(model)
    acc = fusedaccum.GradAccumulator(ddp, 1, max_norm=0.5, noise_scale=fusedaccum.NoiseScaleSettings(beta=0.5))
    return _run(rank, model, ddp, acc)


def scenario_group_k1(rank, world):
    import fusedaccum

    model = make_model()
    acc = fusedaccum.GradAccumulator(model, 1, max_norm=0.5, noise_scale=fusedaccum.NoiseScaleSettings(beta=0.5))
    return _run(rank, model, model, acc)


def scenario_ddp_adaptive_reaches_k1(rank, world):
    """A policy that picks K = 1 at its first decision (its whole range is [1, 1])."""
    from torch.nn.parallel import DistributedDataParallel

    import fusedaccum

    model = make_model()
    ddp = DistributedDataParallel(model)
    policy = fusedaccum.AdaptiveSteps(min_steps=1, max_steps=1, every=1, patience=1)
    acc = fusedaccum.GradAccumulator(ddp, 2, noise_scale=fusedaccum.NoiseScaleSettings(beta=0.5, adaptive=policy))
    return _run(rank, model, ddp, acc, windows=6)


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def worker(rank, world, rdzv, out_dir, names):
    mp.run_worker(rank, world, rdzv, out_dir, names, lambda name: SCENARIOS[name](rank, world), 20)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    names = list(SCENARIOS)
    ranks = mp.launch(__file__, tmp_path_factory.mktemp("signals_ddp"), 2, [",".join(names)], timeout=90)
    return {name: [rec.get(name, {"error": "not run (an earlier scenario failed)"}) for rec in ranks]
            for name in names}


def ok(records):
    for r, rec in enumerate(records):
        if "error" in rec:
            pytest.fail(f"rank {r} failed:\n{rec['error']}")
    return records


def test_ddp_at_k1_gives_the_process_group_engines_estimate(runs):
    """Finite window estimates every window, equal to the process-group engine's on the same data,
    and the same trained weights (the step's all-reduce replaces DDP's)."""
    for ddp, group in zip(ok(runs["ddp_k1"]), ok(runs["group_k1"])):
        assert [n["windows"] for n in ddp["noise"]] == [1.0, 2.0, 3.0, 4.0]
        for a, b in zip(ddp["noise"], group["noise"]):
            for key in ("window_trace_cov", "window_grad_sq", "trace_cov", "grad_sq", "b_simple"):
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
        assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(ddp["params"], group["params"]))
    r0, r1 = runs["ddp_k1"]
    assert all(torch.equal(p, q) for p, q in zip(r0["params"], r1["params"]))  # replicas in sync


def test_adaptive_policy_at_k1_under_ddp_keeps_estimating(runs):
    """After the policy moved to K = 1 every window still contributes a finite estimate (before:
    NaN, and the averages stayed where K = 2 left them)."""
    for rec in ok(runs["ddp_adaptive_reaches_k1"]):
        at_k1 = [i for i, m in enumerate(rec["micro"]) if m == 1]
        assert rec["micro"][0] == 2 and at_k1 and at_k1 == list(range(at_k1[0], 6)) and len(at_k1) >= 2
        assert [n["windows"] for n in rec["noise"]] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # every window counted
        assert all(math.isfinite(rec["noise"][i]["window_trace_cov"]) for i in at_k1)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].split(","))
