"""The norm in the window's last accumulate pass (bf16/fp16 landing buckets, one process).

The pass that writes a landing bucket's finished fp32 sum also writes its norm partials, the same
bits as the norm pass over the sum afterwards, so the step runs no norm pass over it. Checked at
the op (both backends: the Triton kernels under the interpreter at small sizes, the reference up
to several CPU pieces), and in GradAccumulator: the same results as with the norm pass, the norm
pass skipped where the partials apply, and run again wherever they may be stale."""

import copy
import math

import pytest
import torch
from torch import nn

import fusedaccum
import fusedaccum.buckets
from fusedaccum import GradAccumulator, LossScaler, _backend, _last_pass, reference
from fusedaccum.ops import _unscale_clip_stats, accumulate_, sq_slots

BLOCK = 4096
K = 3


def same(a, b) -> bool:
    """Bitwise, NaN included (the partials' rows hold no signed NaN payloads that matter)."""
    return torch.equal(a.nan_to_num(1234.5, 6e37, -6e37), b.nan_to_num(1234.5, 6e37, -6e37)) and torch.equal(
        a.isnan(), b.isnan())


def check_partials(n, dtype, p, *, inv=0.25, inject=None, scale=0.5, overwrite=False, seed=0):
    """accumulate_(norm_out=...) against the same accumulate without it, then norm_partials."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g).to(dtype)
    if inject == "tiny":
        acc.mul_(1e-25)
    elif inject == "zeros_and_inf_inv":
        acc[: n // 2].zero_()
        grad[: n // 2].zero_()
    elif inject is not None and n:
        grad[n // 3] = float(inject)
    acc2, grad2 = acc.clone(), grad.clone()
    slots = sq_slots(acc)
    out = torch.full((5, slots + 2), 7.0)
    accumulate_(acc, grad, scale, zero_grad=True, overwrite=overwrite, norm_out=out, norm_slot=1, inv_scale=inv,
                norm_type=p, norm_dtype=dtype)
    accumulate_(acc2, grad2, scale, zero_grad=True, overwrite=overwrite)
    assert same(acc, acc2) and torch.equal(grad, grad2) and not grad.any()
    impl = _backend.implementation(acc.device)
    want = impl.norm_partials([acc2], inv, p, out=[torch.empty(0, dtype=dtype)])
    assert same(out[:, 1:1 + slots], want), (n, dtype, p, inv, inject, out[:, 1:1 + slots], want)
    assert (out[:, 0] == 7).all() and (out[:, -1] == 7).all()  # nothing outside its columns
    return want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_partials_equal_the_norm_pass(backend, dtype, p):
    if p == 2.0:
        for n in (0, 1, BLOCK - 1, 8209):  # 8209: a prime, three programs, the last one partial
            check_partials(n, dtype, p, overwrite=n == 1)
    n = BLOCK + 1  # two programs, one full tile and one partial
    check_partials(n, dtype, p, inject="inf")
    check_partials(n, dtype, p, inject="nan", inv=torch.tensor(0.5))
    big = check_partials(n, dtype, p, inv=torch.tensor(3e38))  # a finite sum * inv overflows
    assert big[2].max() == 1.0
    nan = check_partials(n, dtype, p, inv=math.inf, inject="zeros_and_inf_inv")  # 0 * inf
    assert nan[2].max() == 2.0


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_reference_over_several_cpu_pieces(monkeypatch, p):
    """Several cache-sized pieces (the 2-norm's fast path taken piece by piece, no norm pass),
    the fast path's range left (tiny sums: the norm pass after the add), fp32 grads too."""
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    n = 2 * reference.NORM_GROUP + 3 * reference.NORM_ROW + 17  # three groups of pieces, the last partial
    calls = []
    real = reference.norm_partials
    monkeypatch.setattr(reference, "norm_partials", lambda *a, **k: calls.append(1) or real(*a, **k))
    check_partials(n, torch.bfloat16, p)
    check_partials(n, torch.float16, p, overwrite=True, inject="inf")
    check_partials(n, torch.float32, p, inv=torch.tensor(0.125))
    # 3 for the comparisons; in the pass: p = 3 always, p = 2 where the fast path's sum is not finite.
    assert len(calls) == (4 if p == 2.0 else 6)
    calls.clear()
    check_partials(n, torch.bfloat16, 2.0, scale=1e-36, inject="tiny")  # Σx² below the fast path's range
    assert len(calls) == 2


def test_norm_out_is_validated_and_nothing_changes():
    acc, grad = torch.randn(10), torch.randn(10).to(torch.bfloat16)
    a0, g0 = acc.clone(), grad.clone()
    good = torch.zeros(5, 2)
    bad = [
        (dict(norm_out=torch.zeros(4, 2)), ValueError, "norm_out must be"),
        (dict(norm_out=torch.zeros(5, 2, dtype=torch.float64)), ValueError, "norm_out must be"),
        (dict(norm_out=[0.0]), TypeError, "norm_out must be a torch.Tensor"),
        (dict(norm_out=good, norm_slot=2), ValueError, "norm_slot=2"),
        (dict(norm_out=good, norm_slot=-1), ValueError, "norm_slot=-1"),
        (dict(norm_out=good, norm_slot=True), TypeError, "norm_slot must be an int"),
        (dict(norm_out=good, norm_type=0.0), ValueError, "norm_type"),
        (dict(norm_out=good, norm_dtype=torch.float64), TypeError, "norm_dtype"),
        (dict(norm_out=good, inv_scale="x"), TypeError, "inv_scale"),
        (dict(norm_out=good, sq_out=good.view(-1)[:3]), ValueError, "overlaps"),
        (dict(norm_out=torch.zeros(5, 2).t().contiguous().t()), ValueError, "norm_out must be"),
    ]
    for kwargs, exc, match in bad:
        with pytest.raises(exc, match=match):
            accumulate_(acc, grad, 0.5, zero_grad=True, **kwargs)
        assert torch.equal(acc, a0) and torch.equal(grad, g0) and not good.any()
    with pytest.raises(ValueError, match=r"partials\[0\] must be None or an fp32 tensor of shape \(5, 1\)"):
        _unscale_clip_stats([acc], partials=[torch.zeros(5, 3)])
    with pytest.raises(ValueError, match="partials has 2 entries for 1 buckets"):
        _unscale_clip_stats([acc], partials=[None, None])
    assert torch.equal(acc, a0)


# ---------------------------------------------------------------- GradAccumulator


@pytest.fixture
def landing(monkeypatch):
    """bf16/fp16 gradients through a landing bucket (the only path of a torch without Tensor.grad_dtype)."""
    monkeypatch.setattr(fusedaccum.buckets, "grad_dtype_supported", lambda: False)


@pytest.fixture
def passes(monkeypatch):
    """The buckets each norm pass ran over (data pointers), for the current backend."""
    seen = []
    for module in (reference, _backend._load_kernels()):
        real = module.norm_partials

        def spy(buckets, *args, _real=real, **kwargs):
            seen.append([b.data_ptr() for b in buckets])
            return _real(buckets, *args, **kwargs)

        monkeypatch.setattr(module, "norm_partials", spy)
    return seen


def off(monkeypatch):
    monkeypatch.setattr(_last_pass, "ask", lambda *args: None)


def make_model(dtype, mixed=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    if mixed:
        model[2].float()  # an fp32 bucket beside the landing one
    return model


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 2, generator=g)


def loss_of(model, x, y):
    h = model[1](model[0](x.to(model[0].weight.dtype)))
    return ((model[2](h.to(model[2].weight.dtype)).float() - y) ** 2).sum()


def train(model, *, windows=(K, K), max_norm=None, scaler=None, items=False, big=None, between=None, forced=()):
    """Windows of micro-batches (a short one closed with force=True); ``between(acc, w)`` runs
    after each window's last backward. Returns the accumulator and the (norm, found_inf) results."""
    acc = GradAccumulator(model, K, max_norm=max_norm, scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data(4 * sum(windows))
    results, i = [], 0
    for w, count in enumerate(windows):
        for _ in range(count):
            loss = loss_of(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]) * (big if big and w == 1 else 1.0)
            acc.backward(loss, num_items=(torch.tensor(4 + i) if i % 2 else 4 + i) if items else None)
            i += 1
        if between is not None:
            between(acc, w)
        r = acc.step(opt, force=count < K or w in forced)
        results.append((r.total_norm.clone(), r.found_inf.clone()))
    return acc, results


def compare(monkeypatch, make, **kw):
    """The same training with the last-pass norm on and off: the same bits."""
    model = make()
    acc, results = train(model, **kw)
    acc.release()
    off(monkeypatch)
    ref = make()
    ref_acc, ref_results = train(ref, **kw)
    ref_acc.release()
    for (n, f), (rn, rf) in zip(results, ref_results):
        assert same(n, rn) and torch.equal(f, rf)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    return results


@pytest.mark.parametrize("case", ["clip", "items", "mixed", "overflow"])
def test_accumulator_equals_the_norm_pass(backend, landing, passes, monkeypatch, case):
    dtype = torch.float16 if case == "overflow" else torch.bfloat16
    kw = {"clip": dict(max_norm=0.5), "items": dict(items=True, max_norm=0.5), "mixed": dict(max_norm=0.5),
          "overflow": dict(scaler=LossScaler(init_scale=2.0**8), big=1e30)}[case]
    make = lambda: make_model(dtype, mixed=case == "mixed")  # noqa: E731
    acc = GradAccumulator(make(), K)
    assert acc._lowp and not acc.buckets.direct
    acc.release()
    results = compare(monkeypatch, make, **kw)
    if case == "overflow":
        assert [float(f) for _, f in results] == [0.0, 1.0]
    if "max_norm" in kw:
        assert float(results[0][0]) > kw["max_norm"]  # clipping is active
    assert all(math.isfinite(float(n)) for n, _ in results[:1])


def test_norm_pass_skipped_only_where_the_partials_apply(backend, landing, passes):
    model = make_model(torch.bfloat16, mixed=True)
    acc, _ = train(model, windows=(K, 2))  # a full window, then a short one (force=True)
    lowp = [b.accum.data_ptr() for b in acc.buckets if b.landing is not None]
    wide = [b.accum.data_ptr() for b in acc.buckets if b.landing is None]
    assert len(lowp) == len(wide) == 1
    # The full window: the norm pass over the fp32 bucket alone; the short one: over both.
    assert passes == [wide, [b.accum.data_ptr() for b in acc.buckets]]
    acc.release()


def test_matches_float64_large_batch(backend, landing, passes):
    model = make_model(torch.bfloat16)
    ref = copy.deepcopy(model).double()
    x, y = data(4 * K)
    acc = GradAccumulator(model, K, max_norm=0.5)
    for i in range(K):
        acc.backward(loss_of(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]))
    r = acc.step(torch.optim.SGD(model.parameters(), lr=0.0))
    assert passes == []  # every bucket's partials came from the last pass
    loss = sum(((ref(x[4 * i:4 * i + 4].double()) - y[4 * i:4 * i + 4].double()) ** 2).sum() for i in range(K)) / K
    want = torch.autograd.grad(loss, list(ref.parameters()))
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in want)))
    assert float(r.total_norm) == pytest.approx(norm, rel=2e-2)  # bf16 forward/backward
    clip = min(1.0, 0.5 / (norm + 1e-6))
    assert clip < 1
    gmax = max(float(g.abs().max()) for g in want)
    for p, g in zip(model.parameters(), want):
        assert (p.grad.double() - g * clip).abs().max() <= 2.0**-6 * gmax * clip
    acc.release()


def _scale_sum(acc, w):
    if w == 0:
        for b in acc.buckets:
            b.accum.mul_(4.0)  # between the last backward and the step: the partials are stale


def _reload_other(states):
    def between(acc, w):
        if w == 0:
            states.append(acc.state_dict())
        else:
            acc.load_state_dict(states[0])  # a full window, other sums: the partials are stale
    return between


def test_stale_partials_are_not_used(backend, landing, passes, monkeypatch):
    """In-place change of the sums, load_state_dict of another window, discard_window, a
    short window, a micro-batch that raised after its fold: each equals the norm-pass path."""
    make = lambda: make_model(torch.bfloat16)  # noqa: E731
    cases = [dict(windows=(K,), between=_scale_sum), dict(windows=(K, 2)), dict(windows=(K,), forced=(0,))]
    for kw in cases:
        with monkeypatch.context() as m:
            compare(m, make, max_norm=0.5, **kw)
    passes.clear()
    model = make()
    acc, _ = train(model, windows=(K,), between=_scale_sum)
    assert len(passes) == 1  # the norm pass ran: the sums changed after the last pass
    acc.release()
    passes.clear()
    with monkeypatch.context() as m:
        compare(m, make, max_norm=0.5, between=_reload_other([]))
    assert len(passes) == 1 + 2  # on: once (the reloaded window); off: both windows


def test_discard_and_a_raising_last_micro_batch(backend, landing, monkeypatch):
    model = make_model(torch.bfloat16)
    x, y = data(4 * K)
    acc = GradAccumulator(model, K)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for i in range(K):
        acc.backward(loss_of(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]))
    acc.discard_window()
    assert _last_pass.take(acc) is None
    # The last micro-batch's fold ran, then the backward raised before counting it: a forced
    # step of the K - 1 counted micro-batches must not use partials taken with 1/K.
    for i in range(K - 1):
        acc.backward(loss_of(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]))
    with monkeypatch.context() as m:
        m.setattr(acc._signals, "after_backward", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            acc.backward(loss_of(model, x[-4:], y[-4:]))
    assert acc.buckets.last_pass is not None and acc.micro_batches == K - 1
    # The window's count is not the one the partials' inverse scale was taken for: not used.
    assert _last_pass.take(acc) is None and acc.buckets.last_pass is None
    with pytest.raises(RuntimeError, match="outside acc.backward"):  # the guards refuse the window anyway
        acc.step(opt, force=True)
    acc.discard_window()
    acc.release()


def test_opcheck_accumulate_with_norm_out(backend):
    """The custom op's schema declares norm_out mutated, and traced calls take the same arguments."""
    from fusedaccum import _library

    acc, grad = torch.randn(37), torch.randn(37).bfloat16()
    out = torch.zeros(5, sq_slots(acc) + 1)
    torch.library.opcheck(_library.accumulate, (acc, grad, None, 0.5, True, False, None, None, 1.0, out, 1,
                                                torch.tensor(0.25), 0.0, 2.0, torch.bfloat16))
    traced = _library.Operators(_library._EAGER, _backend.implementation(acc.device))
    a2, g2, o2 = acc.clone(), grad.clone(), torch.zeros_like(out)
    traced.accumulate_(a2, g2, 0.5, zero_grad=True, overwrite=False, norm_out=o2, norm_slot=1, inv_scale=0.25,
                       norm_type=2.0, norm_dtype=torch.bfloat16)
    want = _backend.implementation(acc.device).norm_partials([a2], 0.25, 2.0, out=[grad])
    assert same(o2[:, 1:], want) and not o2[:, 0].any()
