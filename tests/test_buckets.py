import pytest
import torch

import fusedaccum

from helpers import same_bits


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)
    return model


def _grads_by_autograd(model, x):
    twin = _model(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    twin(x).square().sum().backward()
    return [p.grad.clone() for p in twin.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grads_are_views_into_one_bucket(dtype):
    model = _model(dtype)
    buckets = fusedaccum.GradBuckets(model.parameters())
    (bucket,) = buckets.buckets
    params = list(model.parameters())
    assert bucket.numel == sum(p.numel() for p in params) and bucket.accum.dtype == torch.float32
    assert (bucket.landing is None) == (dtype == torch.float32)
    assert bucket.grads.dtype == dtype
    for p, off in zip(params, bucket.offsets):
        assert p.grad._base is bucket.grads and p.grad.storage_offset() == off
        assert p.grad.shape == p.shape and p.grad.dtype == dtype

    x = torch.randn(4, 5).to(dtype)
    model(x).square().sum().backward()
    model(x).square().sum().backward()  # autograd accumulates in place, into the bucket
    want = _grads_by_autograd(model, x)
    flat = torch.cat([w.reshape(-1) * 2 for w in want])
    torch.testing.assert_close(bucket.grads, flat.to(dtype), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-3)
    assert all(p.grad._base is bucket.grads for p in params)


def test_grads_keep_the_parameter_layout(backend, device):
    """channels_last and transposed parameters get gradient views with their own strides
    (autograd and DDP expect grads laid out like their parameters); the bucket still holds
    every element once, so the fused clip_grad_norm_ covers it."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 3))
    conv = conv.to(device=device, memory_format=torch.channels_last)
    extra = torch.nn.Parameter(torch.randn(5, 3, device=device).t())  # a transpose: strides (1, 3)
    twin = [p.detach().clone().requires_grad_() for p in [*conv.parameters(), extra]]
    params = [*conv.parameters(), extra]
    buckets = fusedaccum.GradBuckets(params)
    assert not params[0].is_contiguous() and not extra.is_contiguous()
    for p in params:
        assert p.grad.stride() == p.stride() and p.grad._base is buckets.buckets[0].accum
    x = torch.randn(2, 3, 7, 7, device=device).to(memory_format=torch.channels_last)

    def loss(ps):
        h = torch.nn.functional.conv2d(x, ps[0], ps[1]).tanh()
        return torch.nn.functional.conv2d(h, ps[2], ps[3]).square().sum() + (ps[4] ** 3).sum()

    loss(params).backward()
    loss(twin).backward()
    for p, t in zip(params, twin):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(buckets.buckets[0].accum, torch.cat([p.grad.permute(
        *sorted(range(p.dim()), key=lambda d: -p.stride()[d])).reshape(-1) for p in params]))
    assert fusedaccum.ops._covering_buckets([p.grad for p in params]) is not None  # the fused path
    norm = fusedaccum.clip_grad_norm_(params, 0.1)
    want = torch.nn.utils.clip_grad_norm_(twin, 0.1)
    torch.testing.assert_close(norm, want, rtol=1e-5, atol=0)
    for p, t in zip(params, twin):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-5, atol=1e-7)
        assert p.grad._base is buckets.buckets[0].accum  # scaled in place by the fused path


def test_dense_layout():
    from fusedaccum._layout import _dense_layout

    t = torch.ones(4, 6)
    assert _dense_layout(t) and _dense_layout(t.t()) and _dense_layout(torch.ones(1, 5, 1))
    assert _dense_layout(torch.ones(0, 3)) and _dense_layout(torch.ones(2, 3, 4).permute(2, 0, 1))
    assert not _dense_layout(t[:, :3]) and not _dense_layout(torch.ones(3).expand(4, 3))
    assert not _dense_layout(t[::2])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_optimizer_zero_grad_keeps_views_and_zeroes(set_to_none):
    model = _model()
    buckets = fusedaccum.GradBuckets(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 5)
    model(x).square().sum().backward()
    opt.zero_grad(set_to_none=set_to_none)
    model(x).square().sum().backward()
    (bucket,) = buckets.buckets
    assert all(p.grad is v for p, v in zip(bucket.params, bucket.views))
    want = torch.cat([g.reshape(-1) for g in _grads_by_autograd(model, x)])
    torch.testing.assert_close(bucket.accum, want)  # one backward's worth: zero_grad took effect


def test_zero_grad_then_unused_param_reads_zero():
    model = _model()
    buckets = fusedaccum.GradBuckets(model.parameters())
    model(torch.randn(2, 5)).sum().backward()
    model.zero_grad()  # set_to_none
    model[0](torch.randn(2, 5)).sum().backward()  # the second layer gets no gradient
    (bucket,) = buckets.buckets
    second = bucket.offsets[2]
    assert torch.equal(bucket.accum[second:], torch.zeros_like(bucket.accum[second:]))
    assert model[2].weight.grad is None  # what torch says too: no gradient this step
    buckets.attach()
    assert model[2].weight.grad is bucket.views[2]



class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward failed on purpose")


def test_a_backward_that_raises_does_not_stop_later_zeroing():
    """A backward that raises after one re-attach never runs its end-of-backward callback;
    the next backwards must still zero the views of parameters that get no gradient."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    buckets = fusedaccum.GradBuckets([a, b])
    (a.sum() + b.sum()).backward()
    a.grad = b.grad = None
    failing = _FailingBackward.apply(b).sum()
    fine = (a * 3).sum()  # recorded later, so run first: a's hook re-attaches before b's branch raises
    with pytest.raises(RuntimeError, match="on purpose"):
        (failing + fine).backward()
    assert a.grad is bucket_view(buckets, 0)
    a.grad = b.grad = None
    (a.sum() * 5).backward()
    assert b.grad is None
    assert torch.equal(bucket_view(buckets, 1), torch.zeros(3))  # b got no gradient: zero, not stale
    assert torch.equal(bucket_view(buckets, 0), torch.full((3,), 5.0))


def bucket_view(buckets, i):
    (bucket,) = buckets.buckets
    return bucket.views[i]


SCENARIOS = {
    # Each: a list of steps on parameters (a, b, c); "zero" / "zero a" set grads to None,
    # ("bw", names) runs a backward through those parameters.
    "unused first, used later": ["zero", ("bw", "a"), ("bw", "ab"), ("bw", "abc")],
    "set_to_none on some": [("bw", "abc"), "zero a", ("bw", "ab"), ("bw", "abc")],
    "replaced grad": [("bw", "abc"), "replace b", ("bw", "abc")],
    "create_graph": [("bw", "abc"), ("bw2", "abc"), ("bw", "bc")],
    "zero, then one of them": [("bw", "abc"), "zero", ("bw", "c"), ("bw", "a")],
}


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # torch's, for plain torch too
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_grads_follow_torch_through_zero_grad_and_partial_backwards(name):
    """Standalone GradBuckets (no GradAccumulator re-attaching before each backward): after
    every step each param.grad equals what plain torch holds, and the bucket equals the
    attached grads (zero where torch says None)."""
    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(n)) for n in (3, 5, 2)]

    ours, plain = make(), make()
    buckets = fusedaccum.GradBuckets(ours)
    xs = [torch.randn(n) for n in (3, 5, 2)]

    def backward(params, names, create_graph=False):
        loss = sum((params["abc".index(c)] * xs["abc".index(c)]).square().sum() for c in names)
        loss.backward(create_graph=create_graph)

    for step in SCENARIOS[name]:
        for params in (ours, plain):
            if step == "zero":
                for p in params:
                    p.grad = None
            elif step == "zero a":
                params[0].grad = None
            elif step == "replace b":
                params[1].grad = torch.full_like(params[1], 7.0)
            else:
                kind, names = step
                backward(params, names, create_graph=kind == "bw2")
        for p, q in zip(ours, plain):
            assert (p.grad is None) == (q.grad is None)
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad.detach(), rtol=1e-6, atol=0)
        if step in ("zero", "zero a", "replace b"):
            continue  # until the next backward the bucket keeps the old values (documented)
        want = torch.cat([torch.zeros(q.numel()) if q.grad is None else q.grad.detach() for q in plain])
        torch.testing.assert_close(buckets.buckets[0].accum, want, rtol=1e-6, atol=0)


def test_skips_frozen_dedupes_and_groups_by_dtype():
    a = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    h = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    buckets = fusedaccum.GradBuckets([a, frozen, h, a])
    assert [b.params for b in buckets] == [[a], [h]]
    assert frozen.grad is None
    assert [b.dtype for b in buckets] == [torch.float32, torch.bfloat16]


def test_existing_grad_is_copied_in():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.arange(4.0)
    buckets = fusedaccum.GradBuckets([p])
    assert torch.equal(buckets.buckets[0].accum, torch.arange(4.0))


@pytest.mark.parametrize("params, error, message", [
    ([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], TypeError, "dtype torch.float64"),
    ([torch.nn.Parameter(torch.ones(2), requires_grad=False)], ValueError, "no parameter requires grad"),
    ([{"params": []}], TypeError, "param groups"),
    (["w"], TypeError, r"params\[0\] is a str"),
])
def test_bad_params_are_refused(params, error, message):
    with pytest.raises(error, match=message):
        fusedaccum.GradBuckets(params)


def test_refused_params_keep_their_grads():
    good = torch.nn.Parameter(torch.ones(2))
    good.grad = torch.full((2,), 5.0)
    bad = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    with pytest.raises(TypeError):
        fusedaccum.GradBuckets([good, bad])
    assert good.grad._base is None and torch.equal(good.grad, torch.full((2,), 5.0))


def test_unscale_clip_over_buckets_updates_param_grads(backend, device):
    params = [torch.nn.Parameter(torch.ones(s, device=device)) for s in (3, 4097, 1)]
    buckets = fusedaccum.GradBuckets(params)
    for p in params:
        p.grad.fill_(2.0)
    norm, found = fusedaccum.unscale_clip_([b.accum for b in buckets], 0.5, max_norm=1.0)
    assert abs(float(norm) - (4101 ** 0.5)) < 1e-3 and float(found) == 0
    for p in params:
        torch.testing.assert_close(p.grad, torch.full_like(p, 1.0 / 4101 ** 0.5), rtol=1e-5, atol=0)
    assert same_bits(params[1].grad, buckets.buckets[0].accum[3:4100].view(4097))


def test_a_parameter_has_one_owner_until_released():
    model = _model()
    first = fusedaccum.GradBuckets(model.parameters())
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(7, 5\)\) already belongs to another GradBuckets"):
        fusedaccum.GradBuckets(model.parameters())
    assert all(p.grad is v for p, v in zip(first.buckets[0].params, first.buckets[0].views))  # untouched
    model(torch.randn(2, 5)).sum().backward()
    kept = [p.grad.clone() for p in model.parameters()]
    first.release()
    assert all(p.grad._base is None and torch.equal(p.grad, k) for p, k in zip(model.parameters(), kept))
    second = fusedaccum.GradBuckets(model.parameters())
    torch.testing.assert_close(second.buckets[0].accum, torch.cat([k.reshape(-1) for k in kept]))
    model.zero_grad()
    model(torch.randn(2, 5)).sum().backward()  # only the new owner's hooks run
    assert all(p.grad is v for p, v in zip(second.buckets[0].params, second.buckets[0].views))


@pytest.mark.parametrize("owner", ["GradBuckets", "GradAccumulator"])
def test_a_dropped_owner_frees_its_parameters(owner):
    """No release(): once the owner is garbage-collected its hooks are gone and the
    parameters may be taken again (the hooks must not keep the owner alive)."""
    import gc
    import weakref

    model = _model()
    if owner == "GradBuckets":
        first = fusedaccum.GradBuckets(model.parameters())
        gone = weakref.ref(first)
    else:
        first = fusedaccum.GradAccumulator(model.parameters(), 2)
        gone = weakref.ref(first.buckets)
    model(torch.randn(2, 5)).sum().backward()
    del first
    gc.collect()
    assert gone() is None
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    model.zero_grad()
    model(torch.randn(2, 5)).sum().backward()
    assert all(p.grad._base is None for p in model.parameters())  # plain autograd gradients now
    second = fusedaccum.GradBuckets(model.parameters())  # no error
    assert all(p.grad is v for p, v in zip(second.buckets[0].params, second.buckets[0].views))
