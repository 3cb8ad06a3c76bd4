import math
import warnings

import pytest
import torch

import fusedaccum
from fusedaccum._layout import _covering_buckets

from helpers import NORM_RTOL, same_bits

SHAPES = [(7, 13), (1,), (4097,), (3, 5, 11), (31,), (0, 4)]


def _params(dtype, device, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype).to(device) * 3 for s in shapes]
    return params, grads


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times clip_grad_norm_ took the fused path."""
    from fusedaccum import ops

    calls = []
    real = ops._unscale_clip_stats
    monkeypatch.setattr(ops, "_unscale_clip_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _twin(dtype, device, bucketed, shapes=SHAPES):
    """Two identical parameter lists: one for torch's clip, one for ours (maybe bucketed)."""
    theirs, grads = _params(dtype, device, shapes)
    ours, _ = _params(dtype, device, shapes)
    for p, g in zip(theirs, grads):
        p.grad = g.clone()
    buckets = fusedaccum.GradBuckets(ours) if bucketed else None
    for p, g in zip(ours, grads):
        if bucketed:
            p.grad.copy_(g)
        else:
            p.grad = g.clone()
    return theirs, ours, buckets


@pytest.mark.parametrize("bucketed", [True, False])
@pytest.mark.parametrize("p", [2.0, 1.0, float("inf"), 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch(backend, device, bucketed, p, max_norm, dtype, fused_calls):
    # torch's foreach inf-norm refuses empty tensors (no identity for max); ours gives the
    # max over the others (tested below), so leave the empty one out here.
    shapes = [s for s in SHAPES if 0 not in s] if p == float("inf") else SHAPES
    theirs, ours, buckets = _twin(dtype, device, bucketed, shapes)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=p)
    got = fusedaccum.clip_grad_norm_(ours, max_norm, norm_type=p)
    assert got.dtype == expected.dtype and got.device == expected.device and got.shape == ()
    rtol = NORM_RTOL if dtype == torch.float32 else 8e-3  # torch returns the norm rounded to bf16
    assert math.isclose(float(got), float(expected), rel_tol=rtol)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, **tol)
    assert len(fused_calls) == bucketed
    if bucketed:
        assert all(p.grad is v for b in buckets for p, v in zip(b.params, b.views))


def test_fast_path_is_taken_only_when_grads_tile_the_buffers(device):
    _, ours, buckets = _twin(torch.float32, device, bucketed=True)
    grads = [p.grad for p in ours]
    assert _covering_buckets(grads) == [buckets.buckets[0].accum]
    assert _covering_buckets(grads[1:]) is None  # a gap: the buffer holds more than the grads
    assert _covering_buckets(grads + [grads[0]]) is None  # a grad listed twice
    assert _covering_buckets([torch.randn(3)]) is None  # not a view


def test_a_subset_of_bucketed_params_is_clipped_correctly(backend, device):
    theirs, ours, _ = _twin(torch.float32, device, bucketed=True)
    expected = torch.nn.utils.clip_grad_norm_(theirs[:3], 0.1)
    got = fusedaccum.clip_grad_norm_(ours[:3], 0.1)
    assert math.isclose(float(got), float(expected), rel_tol=NORM_RTOL)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_grads_behave_like_torch(backend, device, bad):
    theirs, ours, _ = _twin(torch.float32, device, bucketed=True)
    theirs[2].grad[5] = bad
    ours[2].grad[5] = bad
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    got = fusedaccum.clip_grad_norm_(ours, 1.0)
    assert same_bits(got, expected)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad.isnan(), b.grad.isnan())
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


def test_error_if_nonfinite_raises_and_leaves_grads(backend, device):
    _, ours, _ = _twin(torch.float32, device, bucketed=True)
    ours[0].grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in ours]
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedaccum.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    assert all(same_bits(p.grad, b) for p, b in zip(ours, before))


def test_no_grads_and_single_tensor(backend, device):
    p = torch.nn.Parameter(torch.ones(3, device=device))
    assert float(fusedaccum.clip_grad_norm_([p], 1.0)) == 0.0
    p.grad = torch.full((3,), 4.0, device=device)
    assert math.isclose(float(fusedaccum.clip_grad_norm_(p, 1.0)), math.sqrt(48), rel_tol=1e-6)


def test_inf_norm_with_an_empty_grad(backend, device):
    _, ours, _ = _twin(torch.float32, device, bucketed=True)
    want = max(float(p.grad.abs().max()) for p in ours if p.numel())
    assert float(fusedaccum.clip_grad_norm_(ours, 1e9, norm_type="inf")) == want


@pytest.mark.parametrize("error_if_nonfinite", [False, True])
def test_fp16_grads_follow_torch_fp16_norm(backend, device, error_if_nonfinite, fused_calls):
    """torch takes an fp16 norm: 1e5 overflows to inf, so it raises (grads untouched) or
    scales by max_norm / inf = 0. The fused fp32 norm would clip instead: fp16 goes to torch."""
    shapes = [(100, 100), (7,)]
    theirs, ours, _ = _twin(torch.float16, device, bucketed=True, shapes=shapes)
    for params in (theirs, ours):
        for p in params:
            p.grad.fill_(1000.0)
    before = [p.grad.clone() for p in ours]
    results = []
    for params in (theirs, ours):
        clip = torch.nn.utils.clip_grad_norm_ if params is theirs else fusedaccum.clip_grad_norm_
        if error_if_nonfinite:
            with pytest.raises(RuntimeError, match="non-finite"):
                clip(params, 1.0, error_if_nonfinite=True)
        else:
            results.append(clip(params, 1.0))
    if error_if_nonfinite:
        assert all(same_bits(p.grad, b) for p, b in zip(ours, before))
    else:
        assert same_bits(results[0], results[1]) and float(results[1]) == float("inf")
        assert all(same_bits(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert not fused_calls


def test_fp16_beside_fp32_grads_follow_torch(backend, device, fused_calls):
    """Mixed fp16 and fp32 grads promote to an fp32 result, but torch still takes the fp16
    group's norm in fp16 (inf here): any fp16 grad sends the call to torch."""
    def make():
        return [torch.nn.Parameter(torch.zeros(100, 100, dtype=torch.float16, device=device)),
                torch.nn.Parameter(torch.zeros(7, device=device))]

    theirs, ours = make(), make()
    fusedaccum.GradBuckets(ours)
    for p in theirs:
        p.grad = torch.zeros_like(p)
    for params in (theirs, ours):
        params[0].grad.fill_(1000.0)
        params[1].grad.fill_(1.0)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    got = fusedaccum.clip_grad_norm_(ours, 1.0)
    assert float(want) == float("inf") and same_bits(got, want)
    assert all(same_bits(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert not fused_calls


@pytest.mark.parametrize("kwargs", [dict(max_norm=-1.0), dict(max_norm=float("nan")),
                                    dict(max_norm=1.0, norm_type=0), dict(max_norm=1.0, norm_type=-2.0),
                                    dict(max_norm=torch.tensor(0.5))])
def test_arguments_the_fused_path_does_not_take_go_to_torch(backend, device, kwargs, fused_calls):
    """Whatever torch does with them (scale by a negative or NaN factor, a 0-"norm", ...),
    bucketed gradients get the same: a call works or fails alike, bucketed or not."""
    theirs, ours, _ = _twin(torch.float32, device, bucketed=True)
    outcome = []
    for params, clip in ((theirs, torch.nn.utils.clip_grad_norm_), (ours, fusedaccum.clip_grad_norm_)):
        try:
            outcome.append(clip(params, **kwargs))
        except Exception as e:  # noqa: BLE001 - compare torch's error with ours
            outcome.append(type(e))
    if isinstance(outcome[0], type):
        assert outcome[0] == outcome[1]
    else:
        assert same_bits(outcome[0], outcome[1])
        for a, b in zip(ours, theirs):
            assert torch.equal(a.grad.isnan(), b.grad.isnan())
            torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
    assert not fused_calls


# ---- issue 10 ----------------------------------------------------------------------------

def test_empty_generator_warns_like_torch():
    """Item 11: torch warns that nothing will be clipped; a list first must not hide it."""
    params = [torch.nn.Parameter(torch.ones(3))]
    for clip in (torch.nn.utils.clip_grad_norm_, fusedaccum.clip_grad_norm_):
        with pytest.warns(UserWarning, match="empty generator, no gradient clipping will occur") as record:
            total = clip((p for p in params if p.dim() == 0), 1.0)
        assert float(total) == 0.0 and record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedaccum.clip_grad_norm_([], 1.0)  # an empty list: no warning, as torch
