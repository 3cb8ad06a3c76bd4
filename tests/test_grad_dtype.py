"""bf16/fp16 gradients straight into the fp32 buckets (``Tensor.grad_dtype``, torch >= 2.13):
no landing bucket; autograd adds each backward into fp32 views (``"view"``, what a GPU runs)
or each parameter's hook adds autograd's fresh gradient into its view and drops it (``"hook"``,
the CPU's large parameters): every test here runs both, and a bucket holding both
(``"mixed"``; ``_fold_hook.direct_arrival`` forced). The step rounds the processed
gradient into a param-dtype buffer that lives until the next window starts. Compared with the
landing path (forced by hiding the feature), which is what older torch runs."""

import copy

import pytest
import torch
from torch import nn

import fusedaccum._fold_hook
import fusedaccum.buckets
from fusedaccum import GradAccumulator, GradBuckets, LossScaler

pytestmark = pytest.mark.skipif(not fusedaccum.buckets.grad_dtype_supported(),
                                reason="this torch has no Tensor.grad_dtype: only the landing path exists")
K = 3
_DEFAULT_ARRIVAL = fusedaccum._fold_hook.direct_arrival  # before the fixture below replaces it


def make_model(dtype, device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(device, dtype)


def data(n, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(device), torch.randn(n, 2, generator=g).to(device)


def loss_of(model, x, y):
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)).float() - y) ** 2).mean()


@pytest.fixture(autouse=True, params=["view", "hook", "mixed"])
def arrival(request, monkeypatch):
    """Every test under both ways into the fp32 sums, and both in one bucket (mixed: the
    parameters of more than 16 elements fold)."""
    how = request.param
    monkeypatch.setattr(fusedaccum._fold_hook, "direct_arrival",
                        lambda device, numel: ("hook" if numel > 16 else "view") if how == "mixed" else how)
    return how


@pytest.fixture
def landing(monkeypatch):
    """Build accumulators on the landing path, as a torch without Tensor.grad_dtype does."""
    def hide():
        monkeypatch.setattr(fusedaccum.buckets, "grad_dtype_supported", lambda: False)
    return hide


@pytest.mark.parametrize("arrival", ["view"], indirect=True)
def test_autograd_adds_into_the_fp32_view_and_a_none_grad_is_reattached(arrival):
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    b = GradBuckets([p], direct=True)
    bucket = b.buckets[0]
    assert bucket.landing is None and bucket.direct and p.grad_dtype is None
    view = bucket.views[0]
    assert p.grad is view and view.dtype == torch.float32
    g = torch.autograd.grad((x @ p).sum(), p)[0].double()  # bf16 values, exactly representable in fp32
    b.zero_()
    for _ in range(2):
        (x @ p).sum().backward()
        assert p.grad is view  # in place: no new tensor, no landing
    assert torch.equal(view.double(), 2 * g)
    assert view._version > 0  # the guards' version counters see autograd's in-place adds
    # .grad None (optimizer.zero_grad()): autograd makes a new gradient, the hook copies it in.
    p.grad = None
    (x @ p).sum().backward()
    assert p.grad is view and torch.equal(view.double(), g)
    b.release()
    assert p.grad_dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
    assert torch.equal(p.grad.double(), g)


@pytest.mark.parametrize("arrival", ["hook"], indirect=True)
def test_the_hook_folds_each_fresh_gradient_and_drops_it(arrival):
    """``"hook"``: no gradient of the parameter dtype outlives its parameter's turn in the
    backward, autograd's own gradient tensor is folded (not a copy of it), sums across backwards
    are exact, and release() hands the sum over as the parameter's own gradient."""
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    ext = torch.randn(4, 3, dtype=torch.bfloat16)  # a gradient the caller keeps a reference to

    class Give(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.sum()

        @staticmethod
        def backward(ctx, _):
            return ext

    arrived = []  # registered before the buckets' hooks: runs first, sees what autograd stored
    p.register_post_accumulate_grad_hook(lambda t: arrived.append(t.grad))
    b = GradBuckets([p], direct=True)
    bucket = b.buckets[0]
    assert bucket.landing is None and bucket.direct and bucket.folded == [True]
    assert p.grad is None and p.grad_dtype == torch.bfloat16  # the parameter's own dtype, untouched
    view = bucket.views[0]
    g = torch.autograd.grad((x @ p).sum(), p)[0].double()
    for i in range(2):
        (x @ p).sum().backward()
        assert p.grad is None  # dropped by the fold hook
        assert torch.equal(view.double(), (i + 1) * g)
    Give.apply(p).backward()
    assert arrived[-1].data_ptr() == ext.data_ptr()  # taken as is: the steal pre-hook, no copy
    assert torch.equal(view.double(), 2 * g + ext.double())
    assert b.accumulations == 3 and b.used == [True]
    b.zero_()
    (x @ p).sum().backward()
    b.release()  # the sum so far becomes the parameter's own bf16 gradient
    assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad.double(), g)
    (x @ p).sum().backward()  # no hook left: autograd's usual add
    assert torch.equal(p.grad.double(), (2 * g).bfloat16().double())


@pytest.mark.parametrize("arrival", ["view"], indirect=True)
def test_by_default_the_cpu_folds_the_parameters_above_one_piece(arrival, monkeypatch):
    """Without the fixture's choice: on the CPU a bf16 parameter of more than CPU_PIECE elements
    folds (its add spans two pieces here), a smaller one keeps its view, in one bucket, and both
    sum exactly."""
    from fusedaccum.reference import CPU_PIECE

    monkeypatch.setattr(fusedaccum._fold_hook, "direct_arrival", _DEFAULT_ARRIVAL)
    big = nn.Parameter(torch.zeros(CPU_PIECE + 1, dtype=torch.bfloat16))
    small = nn.Parameter(torch.zeros(CPU_PIECE, dtype=torch.bfloat16))
    b = GradBuckets([big, small], direct=True)
    assert b.buckets[0].folded == [True, False]
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in (big, small)]
    for _ in range(3):
        ((big * w[0]).sum() + (small * w[1]).sum()).backward()
    assert big.grad is None and small.grad is b.buckets[0].views[1]
    want = torch.cat([3 * x.double() for x in w])  # bf16 values: exact in fp32
    assert torch.equal(b.buckets[0].accum.double(), want)
    b.release()


def test_gradient_memory_per_parameter(landing):
    """The memory target: 4 B of gradient per bf16 parameter between micro-batches (today 6)."""
    def grad_bytes(acc):
        return sum(b.accum.nbytes + (0 if b.landing is None else b.landing.nbytes) +
                   (0 if b.step_out is None else b.step_out.nbytes) for b in acc.buckets)
    model = make_model(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    x, y = data(4)
    acc = GradAccumulator(model, K)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(K):
        with acc.accumulate(model):
            acc.backward(loss_of(model, x, y))
        assert grad_bytes(acc) == 4 * n
    acc.step(opt)
    assert grad_bytes(acc) == 6 * n  # the processed bf16 gradient, in param.grad after the step
    with acc.accumulate(model):
        assert grad_bytes(acc) == 4 * n  # freed before the next window's forward
        acc.backward(loss_of(model, x, y))
    acc.discard_window()
    acc.release()
    landing()
    old = GradAccumulator(make_model(torch.bfloat16), K)
    assert grad_bytes(old) == 6 * n


def run(model, opt_name, *, max_norm=None, scaler=None, windows=(K, K, 2), dtype=torch.bfloat16, big=None,
        save_at=None):
    """Train ``windows`` (micro-batches per window; a short one is closed with force=True).
    Returns the accumulator, the results and the param.grad after each step."""
    opt = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
           "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
           "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True)}[opt_name](model.parameters())
    acc = GradAccumulator(model, K, max_norm=max_norm, scaler=scaler)
    x, y = data(4 * sum(windows))
    results, grads, i = [], [], 0
    for w, count in enumerate(windows):
        for m in range(count):
            with acc.accumulate(model):
                loss = loss_of(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
                acc.backward(loss * (big if big is not None and w == 1 else 1.0))
            i += 1
            if save_at == (w, m):  # a checkpoint mid-window, loaded into a fresh accumulator
                state = acc.state_dict()
                acc.release()
                acc = GradAccumulator(model, K, max_norm=max_norm, scaler=scaler)
                acc.load_state_dict(state)
        r = acc.step(opt, force=count < K)
        results.append(r)
        grads.append([p.grad.clone() for p in model.parameters()])
    return acc, results, grads


@pytest.mark.parametrize("opt_name,max_norm", [("sgd", None), ("adamw_fused", 0.05), ("adamw_foreach", 0.05)])
def test_direct_equals_the_landing_path(backend, landing, opt_name, max_norm):
    """Clipping, a partial last window and a checkpoint mid-window: the same bits as the landing
    path (autograd's fp32 add of the bf16 gradient is the accumulate pass's fma by 1)."""
    init = make_model(torch.bfloat16)
    model = copy.deepcopy(init)
    acc, results, grads = run(model, opt_name, max_norm=max_norm, save_at=(1, 1))
    assert all(b.direct and b.landing is None for b in acc.buckets)
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    acc.release()
    landing()
    ref = copy.deepcopy(init)
    ref_acc, ref_results, ref_grads = run(ref, opt_name, max_norm=max_norm, save_at=(1, 1))
    assert not any(b.direct for b in ref_acc.buckets)
    for r, q in zip(results, ref_results):
        assert torch.equal(r.total_norm, q.total_norm) and float(r.found_inf) == float(q.found_inf) == 0
    if max_norm is not None:
        assert float(ref_results[0].total_norm) > 2 * max_norm  # clipping is active
    for gs, qs in zip(grads, ref_grads):
        assert all(torch.equal(g, q) for g, q in zip(gs, qs))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), init.parameters()))


def test_direct_fp16_overflow_is_skipped_like_the_landing_path(backend, landing):
    init = make_model(torch.float16)
    model = copy.deepcopy(init)
    _, results, _ = run(model, "adamw_fused", scaler=LossScaler(init_scale=2.0**8), big=1e30)
    landing()
    ref = copy.deepcopy(init)
    _, ref_results, _ = run(ref, "adamw_fused", scaler=LossScaler(init_scale=2.0**8), big=1e30)
    assert [float(r.found_inf) for r in results] == [float(r.found_inf) for r in ref_results] == [0.0, 1.0, 0.0]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_direct_matches_float64_large_batch(backend):
    """Against float64 (not only against the landing path): one window, clipped."""
    model = make_model(torch.bfloat16)
    ref = copy.deepcopy(model).double()
    x, y = data(4 * K)
    acc = GradAccumulator(model, K, max_norm=0.05)
    for i in range(K):
        acc.backward(loss_of(model, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4]))
    r = acc.step(torch.optim.SGD(model.parameters(), lr=0.0))
    # The float64 gradient of the same bf16 weights, as the mean of the micro-batch means.
    loss = sum(((ref(x[4 * i:4 * i + 4].double()) - y[4 * i:4 * i + 4].double()) ** 2).mean() for i in range(K)) / K
    want = torch.autograd.grad(loss, list(ref.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in want))
    assert float(r.total_norm) == pytest.approx(float(norm), rel=2e-2)  # bf16 forward/backward
    clip = min(1.0, 0.05 / (float(norm) + 1e-6))
    gmax = max(float(g.abs().max()) for g in want)
    for p, g in zip(model.parameters(), want):
        assert (p.grad.double() - g * clip).abs().max() <= 2.0**-6 * gmax * clip


def test_guards_see_direct_buckets(arrival):
    model = make_model(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(4)
    acc = GradAccumulator(model, K)
    acc.backward(loss_of(model, x, y))
    want = [b.accum.clone() for b in acc.buckets]
    opt.zero_grad(set_to_none=False)
    if arrival != "hook":  # zeroes the fp32 sum of the views
        with pytest.raises(RuntimeError, match="modified in place inside a window"):
            acc.step(opt)
    else:  # param.grad is None between backwards: nothing to zero, the sum is intact
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(b.accum, w) for b, w in zip(acc.buckets, want))
        assert acc.step(opt, force=True).micro_batches == 1
    acc.discard_window()
    acc.backward(loss_of(model, x, y))
    loss_of(model, x, y).backward()  # bypasses acc.backward: caught by the hooks' count
    with pytest.raises(RuntimeError, match="outside acc.backward"):
        acc.backward(loss_of(model, x, y))
    acc.discard_window()
    acc.release()


def test_noise_scale_and_fsdp_keep_the_landing_path(monkeypatch):
    """The noise statistics sample every micro-batch from the landing's accumulate pass."""
    acc = GradAccumulator(make_model(torch.bfloat16), K, noise_scale=True)
    assert not acc.buckets.direct and all(b.landing is not None for b in acc.buckets)
    acc.release()
    monkeypatch.setattr(fusedaccum.buckets, "grad_dtype_supported", lambda: False)
    with pytest.raises(RuntimeError, match="needs Tensor.grad_dtype"):
        GradBuckets(make_model(torch.bfloat16).parameters(), direct=True)
