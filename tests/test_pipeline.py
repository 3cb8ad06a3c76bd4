"""Pipeline stages (``pipeline_group``): a 2-stage pipeline written by hand on gloo (2 ranks, and
2 stages x 2 data-parallel ranks) against one float64 process training on all the data, and
``clip_grad_norm_(..., pipeline_group=...)`` against torch's on the stages' gradients together.

Why by hand and not ``torch.distributed.pipelining``: its schedules call backward themselves,
so they cannot run each micro-batch's backward through ``GradAccumulator.backward``
(docs/nd-parallel.md). Tolerance 1e-5 on O(1) weights after 3 fp32 steps."""

import math
import os
import sys

import pytest
import torch

import fusedaccum
from fusedaccum.parallel.pipeline import compact_partials
from fusedaccum import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _multiproc as mp  # noqa: E402
import _pipeline_worker as W  # noqa: E402

TOL = 1e-5


def launch(tmp_path, world, timeout=90):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pipeline_worker.py")
    results = []
    for r, rec in enumerate(mp.launch(script, tmp_path, world, timeout=timeout, label="pipeline workers",
                                      require_exit_0=False)):
        res = rec.get("train", {"error": "not run"})
        assert "error" not in res, f"rank {r}:\n{res.get('error')}"
        results.append(res)
    return results


def reference_run(dp_size):
    """One float64 process on every dp rank's micro-batches: per window Σ loss / Σ items, the
    global norm, the clip, SGD; the overflow window skipped."""
    layers = W.full_model(torch.float64)
    opt = torch.optim.SGD(layers.parameters(), lr=W.LR, momentum=W.MOMENTUM)
    steps = []
    for w, rows in enumerate(W.ROWS):
        for p in layers.parameters():
            p.grad = None
        total_loss, items = 0.0, 0
        for dp, sizes in enumerate(rows[:dp_size]):
            for k in range(len(sizes)):
                x, y = W.batch(w, dp, k, torch.float64)
                loss = ((W.run_layers(layers, x, last=True) - y) ** 2).sum()
                loss.backward()
                total_loss, items = total_loss + loss.item(), items + x.shape[0]
        grads = [p.grad / items for p in layers.parameters()]
        norm = torch.cat([g.reshape(-1) for g in grads]).norm().item()
        if w == W.OVERFLOW:
            steps.append([math.inf, 1.0, total_loss / items, items])
            continue
        coef = min(1.0, W.MAX_NORM / (norm + 1e-6))
        assert coef < 1, "clipping must be active in every stepped window"
        for p, g in zip(layers.parameters(), grads):
            p.grad = g * coef
        opt.step()
        steps.append([norm, 0.0, total_loss / items, items])
    return [p.detach() for p in layers.parameters()], steps


@pytest.mark.parametrize("world", [4])  # 2 stages x 2 dp; world=2 (process_group=None) passes too, 17 s
def test_pipeline_matches_one_process(tmp_path, world):
    results = launch(tmp_path, world)
    params, steps = reference_run(world // 2)
    for r, res in enumerate(results):
        stage = res["stage"]
        for got, exp in zip(res["steps"], steps):
            norm, found_inf, loss, items = got
            assert found_inf == exp[1], (r, got, exp)
            if exp[1]:
                assert not math.isfinite(norm)
            else:
                assert norm == pytest.approx(exp[0], rel=TOL), (r, got, exp)
            assert loss == pytest.approx(exp[2], rel=TOL), (r, got, exp)  # the last stage's, everywhere
            assert items == exp[3], (r, got, exp)  # stage 0 passed num_items=0
        for got, exp in zip(res["params"], params[4 * stage: 4 * stage + 4]):
            torch.testing.assert_close(got.double(), exp, rtol=0, atol=TOL)
    # Every rank took the same decisions on the same numbers.
    assert all(res["steps"] == results[0]["steps"] for res in results)
    # clip_grad_norm_ with pipeline_group: torch's over both stages' gradients together.
    expected = [[g.clone().double() for g in W.clip_grads(s)] for s in range(2)]
    flat = [g for gs in expected for g in gs]
    tparams = [torch.zeros_like(g, requires_grad=True) for g in flat]
    for p, g in zip(tparams, flat):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(tparams, 1.5)
    assert total > 1.5  # the clip is active
    for res in results:
        stage = res["stage"]
        assert res["clip"]["total"] == pytest.approx(float(total), rel=TOL)
        mine = tparams[:3] if stage == 0 else tparams[3:]
        for got, p in zip(res["clip"]["grads"], mine):
            tol = 2.0**-8 * p.grad.abs().max().item() if len(got) == 6 else TOL  # the bf16 gradient rounds
            torch.testing.assert_close(got.double(), p.grad, rtol=0, atol=tol)


def _partials(tensors, dtypes, p):
    flat = [t.to(d).view(-1) for t, d in zip(tensors, dtypes)]
    return flat, reference.norm_partials(flat, 1.0, p)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf])
def test_compact_partials_finalize_alike(p):
    """The [5, 3] compact partials finalize to the same stats as the raw ones (norm within one
    fp32 rounding, found_inf and the store-overflow test exactly), whatever the width."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(50, generator=g) * 1e-20, torch.randn(30, generator=g) * 1e3,
               torch.randn(20, generator=g) * 5, torch.randn(9, generator=g)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16]
    _, raw = _partials(tensors, dtypes, p)
    small = compact_partials(raw, p)
    assert small.shape == (5, 3)
    for max_norm in (None, 1.0):
        a = reference.finalize(raw, 1.0, max_norm, p, 1e-6)
        b = reference.finalize(small, 1.0, max_norm, p, 1e-6)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    # An fp16 value that overflows on store only with a large inv_scale: flagged alike.
    for inv in (1.0, 1e4):
        a = reference.finalize(raw, inv, None, p, 1e-6)
        b = reference.finalize(small, inv, None, p, 1e-6)
        assert a[1].item() == b[1].item()
    # Non-finite codes survive the fold.
    bad = raw.clone()
    bad[reference.ROW_BAD, 1] = 2.0
    assert reference.finalize(compact_partials(bad, p), 1.0, None, p, 1e-6)[1].item() == 1.0


def test_pipeline_group_refusals():
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match="pipeline_group must be"):
        fusedaccum.GradAccumulator(params, 2, pipeline_group=3)
    with pytest.raises(TypeError, match="pipeline_group must be"):
        fusedaccum.clip_grad_norm_(params, 1.0, pipeline_group="pp")
    with pytest.raises(ValueError, match="scaler with pipeline_group"):
        fusedaccum.GradAccumulator(params, 2, scaler=fusedaccum.LossScaler(), pipeline_group=object())
    with pytest.raises(ValueError, match="noise_scale with pipeline_group"):
        fusedaccum.GradAccumulator(params, 2, noise_scale=True, pipeline_group=object())
    assert params[0].grad is None  # refused before the buckets re-point anything
