"""GradAccumulator against float64 large-batch references, through both backends.

Every run here trains a 123-parameter MLP for a few windows and compares the weights with
the same training done in float64 on one large batch per window (same initial weights).

Tolerances (max |w - w_ref| over all weights after S optimizer steps):
- fp32 parameters: the gradients are fp32 sums of a few dozen products (relative error
  ~1e-7) and each step rounds the weights to fp32; with weights O(1) and S <= 4 steps,
  1e-5 is two orders of magnitude above what is measured (~5e-8) and far below the effect of
  any normalization or clipping mistake (the tests check the weights moved >= 10x TOL).
- bf16/fp16 parameters: every step rounds each weight to the parameter dtype (half an ulp,
  2^-9 relative for bf16), the micro-batch forward/backward runs in that dtype (gradient
  error ~2^-8 relative), and the error of one step carries into the next: bound it by
  S ulps of the largest weight, S * 2^-8 * max|w| for bf16 (S * 2^-11 * max|w| for fp16).
"""

import contextlib
import copy
import warnings
import io

import pytest
from helpers import read_by_cpu_reference
import torch
import torch.nn.functional as F
from torch import nn

import fusedaccum
from fusedaccum import GradAccumulator, LossScaler

IN, HID, OUT = 6, 12, 3
MANTISSA_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def weight_tol(dtype, steps, ref_model):
    if dtype == torch.float32:
        return 1e-5
    wmax = max(p.detach().abs().max().item() for p in ref_model.parameters())
    return steps * MANTISSA_ULP[dtype] * wmax


class Mixed(nn.Module):
    """A bf16 first layer and an fp32 second layer: two buckets on one device."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(IN, HID), nn.Linear(HID, OUT)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.to(self.l1.weight.dtype))).to(self.l2.weight.dtype))


def make_model(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Mixed() if dtype == "mixed" else nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if dtype == "mixed":
        model.l1.to(torch.bfloat16)
        return model.to(device)
    return model.to(device=device, dtype=dtype)


def make_data(n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g, dtype=torch.float64), torch.randn(n, OUT, generator=g, dtype=torch.float64)


def make_opt(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=5e-2, weight_decay=1e-2)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=5e-2, weight_decay=1e-2, fused=True)
    raise ValueError(name)


def in_dtype(model):
    return next(model.parameters()).dtype


def out64(model, x):
    """Forward of x (float64, CPU) through model, in the model's dtype/device; output float64."""
    p = next(model.parameters())
    return model(x.to(device=p.device, dtype=p.dtype)).double()


def mean_loss(model, x, y):
    return F.mse_loss(out64(model, x), y.to(next(model.parameters()).device))


def sum_loss(model, x, y):
    """Sum over rows ("tokens") of the per-row mean squared error."""
    return (out64(model, x) - y.to(next(model.parameters()).device)).pow(2).mean(-1).sum()


def reference(model, windows, opt_name, max_norm=None, per_item=False):
    """float64 large batch: one optimizer step per window over all of its rows.
    Returns (model64, norms before clipping, per-window float64 gradients before clipping)."""
    ref = copy.deepcopy(model).double()
    opt = make_opt("adamw" if opt_name == "adamw_fused" else opt_name, ref.parameters())
    norms, grads = [], []
    for x, y in windows:
        opt.zero_grad()
        loss = sum_loss(ref, x, y) / x.shape[0] if per_item else mean_loss(ref, x, y)
        loss.backward()
        grads.append([p.grad.detach().clone() for p in ref.parameters()])
        norms.append(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads[-1]]))))
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        opt.step()
    return ref, norms, grads


def lockstep_grads(model, x, y, max_norm):
    """The float64 large-batch gradient (clipped) at model's current weights."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.grad = None
    twin = twin.double()
    mean_loss(twin, x, y).backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
    return [p.grad for p in twin.parameters()]


def max_diff(model, ref):
    return max((p.detach().double().cpu() - q.detach().cpu()).abs().max().item()
               for p, q in zip(model.parameters(), ref.parameters()))


def split(x, y, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


def cat(micro):
    return torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro])


def bits(t):
    return t.detach().contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).clone()


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state.get(p, {}).items()}
             for p in model.parameters()]
    return params, state


def same_snapshot(a, b):
    (pa, sa), (pb, sb) = a, b
    if not all(same_bits(x, y) for x, y in zip(pa, pb)):
        return False
    for da, db in zip(sa, sb):
        if da.keys() != db.keys():
            return False
        for k in da:
            va, vb = da[k], db[k]
            if torch.is_tensor(va) and not same_bits(va, vb):
                return False
            if not torch.is_tensor(va) and va != vb:
                return False
    return True


# ---------------------------------------------------------------- equivalence to one large batch

K, MICRO, WINDOWS = 4, 3, 3


# Processed gradient (param.grad after step) against the float64 large-batch gradient at the
# same weights, relative to its largest element: fp32 sums are exact to ~1e-7; a bf16
# forward/backward is good to ~2^-8 of the largest terms, and the result is rounded to bf16.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-6}


@pytest.mark.parametrize("max_norm", [None, 0.2], ids=["noclip", "clip"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw", "adamw_fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_large_batch(backend, device, dtype, opt_name, max_norm):
    model = make_model(dtype, device)
    x, y = make_data(K * MICRO * WINDOWS, device)
    micro = split(x, y, [MICRO] * (K * WINDOWS))
    windows = [cat(micro[w * K:(w + 1) * K]) for w in range(WINDOWS)]
    ref, ref_norms, ref_grads = reference(model, windows, opt_name, max_norm)
    init = copy.deepcopy(model)

    acc = GradAccumulator(model.parameters(), K, max_norm=max_norm)
    opt = make_opt(opt_name, model.parameters())
    results = []
    for i, (xb, yb) in enumerate(micro):
        if i % K == 0:
            want_grads = lockstep_grads(model, *windows[i // K], max_norm)
        acc.backward(mean_loss(model, xb, yb))
        r = acc.step(opt)
        assert (r is None) == ((i + 1) % K != 0)
        if r is not None:
            results.append(r)
            gmax = max(g.abs().max().item() for g in want_grads)
            for p, g in zip(model.parameters(), want_grads):
                assert p.grad.dtype == dtype
                assert (p.grad.double().cpu() - g.cpu()).abs().max().item() <= GRAD_RTOL[dtype] * gmax
    assert len(results) == WINDOWS
    norm_rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for r, want in zip(results, ref_norms):
        assert r.found_inf.item() == 0.0 and r.micro_batches == K and r.num_items is None
        assert r.total_norm.item() == pytest.approx(want, rel=norm_rtol)
        if max_norm is not None:
            assert want > 3 * max_norm  # clipping is active in every window

    tol = weight_tol(dtype, WINDOWS, ref)
    allowed = [torch.full_like(q, tol) for q in ref.parameters()]
    if dtype != torch.float32 and opt_name.startswith("adamw"):
        # Adam turns any gradient into an update of about +-lr. Where the float64 gradient is
        # within bf16 noise of zero (under 2^-7 of the window's largest: the measured error of
        # a bf16 gradient is 2^-7.6 of it), rounding can flip its sign: allow 2 lr per window
        # there, and check that this exempts only a minority of the elements.
        lr = opt.param_groups[0]["lr"]
        for gw in ref_grads:
            gmax = max(g.abs().max() for g in gw)
            for a, g in zip(allowed, gw):
                a += torch.where(g.abs() < 2.0**-7 * gmax, 2 * lr, 0.0)
        assert sum(int((a > tol).sum()) for a in allowed) <= 0.25 * sum(a.numel() for a in allowed)
    for p, q, a in zip(model.parameters(), ref.parameters(), allowed):
        assert ((p.detach().double() - q).abs() <= a).all()
    assert max_diff(model, ref) <= max(a.max().item() for a in allowed)
    assert max_diff(init, ref) >= 5 * tol  # the weights moved: the comparison can fail


@pytest.mark.parametrize("dtype", ["mixed", torch.float16], ids=["bf16+fp32", "fp16-scaled"])
def test_matches_large_batch_mixed_and_fp16(backend, device, dtype):
    """Two buckets (bf16 and fp32) in one fused step; fp16 parameters with a loss scale."""
    model = make_model(dtype, device)
    x, y = make_data(K * MICRO * WINDOWS, device)
    micro = split(x, y, [MICRO] * (K * WINDOWS))
    windows = [cat(micro[w * K:(w + 1) * K]) for w in range(WINDOWS)]
    ref, _, _ = reference(model, windows, "sgd", 0.5)
    scaler = LossScaler(init_scale=2.0**10) if dtype == torch.float16 else None
    acc = GradAccumulator(model, K, max_norm=0.5, scaler=scaler)
    assert len(acc.buckets) == (2 if dtype == "mixed" else 1)
    opt = make_opt("sgd", model.parameters())
    for xb, yb in micro:
        acc.backward(mean_loss(model, xb, yb).float())
        acc.step(opt)
    assert max_diff(model, ref) <= weight_tol(torch.bfloat16 if dtype == "mixed" else torch.float16, WINDOWS, ref)
    for p in model.parameters():  # the processed gradient, in the parameter's dtype
        assert p.grad.dtype == p.dtype


def test_processed_gradient_stays_in_param_grad(backend, device):
    """After step(), param.grad holds the normalized, clipped gradient (the large-batch one)
    until the next window's first backward."""
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(dtype, device)
        x, y = make_data(2 * MICRO, device)
        acc = GradAccumulator(model.parameters(), 2, max_norm=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        ref = copy.deepcopy(model).double()
        mean_loss(ref, x, y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        for xb, yb in split(x, y, [MICRO, MICRO]):
            acc.backward(mean_loss(model, xb, yb))
        acc.step(opt)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad.double().cpu(), q.grad.cpu(),
                                       **({"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else
                                          {"rtol": 2e-2, "atol": 2e-3}))
        kept = [p.grad.clone() for p in model.parameters()]
        assert acc.step(opt) is None  # nothing accumulated: nothing happens
        assert all(same_bits(p.grad, k) for p, k in zip(model.parameters(), kept))


# ---------------------------------------------------------------- partial last window

@pytest.mark.parametrize("mode", ["mean", "items"])
def test_forced_partial_window_is_normalized_by_its_true_size(backend, device, mode):
    sizes = [MICRO] * (2 * K) + ([MICRO, MICRO] if mode == "mean" else [MICRO, 1])
    x, y = make_data(sum(sizes), device)
    micro = split(x, y, sizes)
    windows = [cat(micro[:K]), cat(micro[K:2 * K]), cat(micro[2 * K:])]
    model = make_model(torch.float32, device)
    ref, _, _ = reference(model, windows, "sgd", per_item=(mode == "items"))

    def run(naive):
        m = copy.deepcopy(model)
        opt = make_opt("sgd", m.parameters())
        if naive:  # the hand-written loop: per-micro-batch mean / K, step every K and at the end
            for i, (xb, yb) in enumerate(micro):
                (mean_loss(m, xb, yb) / K).backward()
                if (i + 1) % K == 0 or i + 1 == len(micro):
                    opt.step()
                    opt.zero_grad()
            return m
        acc = GradAccumulator(m.parameters(), K)
        for xb, yb in micro:
            if mode == "mean":
                acc.backward(mean_loss(m, xb, yb))
            else:
                acc.backward(sum_loss(m, xb, yb), num_items=xb.shape[0])
            r = acc.step(opt)
        assert r is None and acc.micro_batches == 2  # a partial window is not stepped by itself
        before = [p.detach().clone() for p in m.parameters()]
        assert acc.step(opt) is None and all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
        r = acc.step(opt, force=True)
        assert r.micro_batches == 2 and r.num_items == (None if mode == "mean" else MICRO + 1)
        assert acc.micro_batches == 0
        return m

    tol = weight_tol(torch.float32, 3, ref)
    assert max_diff(run(naive=False), ref) <= tol
    assert max_diff(run(naive=True), ref) > 100 * tol  # dividing the last window by K is wrong


# ---------------------------------------------------------------- token-weighted

@pytest.mark.parametrize("given_as", ["int", "tensor"])
def test_token_weighted_matches_per_token_mean(backend, device, given_as):
    tokens = [[1, 29, 4, 14], [20, 2, 3, 23]]  # very different counts per micro-batch
    x, y = make_data(sum(map(sum, tokens)), device)
    micro = split(x, y, [t for w in tokens for t in w])
    windows = [cat(micro[:K]), cat(micro[K:])]
    model = make_model(torch.float32, device)
    ref, ref_norms, _ = reference(model, windows, "sgd", per_item=True)

    m = copy.deepcopy(model)
    acc = GradAccumulator(m.parameters(), K)
    opt = make_opt("sgd", m.parameters())
    results = []
    for xb, yb in micro:
        n = xb.shape[0] if given_as == "int" else torch.tensor(xb.shape[0], device=device)
        acc.backward(sum_loss(m, xb, yb), num_items=n)
        r = acc.step(opt)
        if r is not None:
            results.append(r)
    for r, want, counts in zip(results, ref_norms, tokens):
        assert int(r.num_items) == sum(counts)
        assert r.total_norm.item() == pytest.approx(want, rel=1e-5)
    tol = weight_tol(torch.float32, 2, ref)
    assert max_diff(m, ref) <= tol

    naive = copy.deepcopy(model)  # per-micro-batch means, averaged: tokens weighted unequally
    opt = make_opt("sgd", naive.parameters())
    for i, (xb, yb) in enumerate(micro):
        (sum_loss(naive, xb, yb) / xb.shape[0] / K).backward()
        if (i + 1) % K == 0:
            opt.step()
            opt.zero_grad()
    assert max_diff(naive, ref) > 100 * tol


# ---------------------------------------------------------------- overflow

@pytest.mark.parametrize("opt_name", ["sgd", "adamw_fused"])  # host-side and device-side skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_overflow_skips_step_and_recovers(backend, device, dtype, opt_name):
    x, y = make_data(3 * K * MICRO, device)
    y = y * 100  # losses ~1e4: times 2**127 they overflow fp32
    micro = split(x, y, [MICRO] * (3 * K))
    model = make_model(dtype, device)
    ref, _, _ = reference(model, [cat(micro[:K]), cat(micro[2 * K:])], opt_name, 1.0)

    scaler = LossScaler(init_scale=2.0**16, backoff_factor=2.0**-110)
    acc = GradAccumulator(model.parameters(), K, max_norm=1.0, scaler=scaler)
    opt = make_opt(opt_name, model.parameters())
    for xb, yb in micro[:K]:
        acc.backward(mean_loss(model, xb, yb))
        r = acc.step(opt)
    assert r.found_inf.item() == 0.0

    state = scaler.state_dict()
    scaler.load_state_dict({**state, "scale": 2.0**127})
    before = snapshot(model, opt)
    for xb, yb in micro[K:2 * K]:
        acc.backward(mean_loss(model, xb, yb))
        r = acc.step(opt)
    assert r.found_inf.item() == 1.0 and not torch.isfinite(r.total_norm)
    assert same_snapshot(snapshot(model, opt), before)  # parameters and optimizer state untouched
    assert scaler.get_scale() == 2.0**17 and scaler.state_dict()["_growth_tracker"] == 0

    # The next window starts from empty buckets: after its first backward they hold exactly
    # that micro-batch's scaled gradient.
    xb, yb = micro[2 * K]
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.grad = None
    (mean_loss(twin, xb, yb) * 2.0**17).backward()
    acc.backward(mean_loss(model, xb, yb))
    fresh = torch.cat([p.grad.float().reshape(-1) for p in twin.parameters()])
    assert same_bits(acc.buckets.buckets[0].accum, fresh)
    for xb, yb in micro[2 * K + 1:]:
        acc.backward(mean_loss(model, xb, yb))
        r = acc.step(opt)
    assert r.found_inf.item() == 0.0
    assert max_diff(model, ref) <= weight_tol(dtype, 2, ref)  # as if window 2 never happened


# ---------------------------------------------------------------- checkpoint / resume

@pytest.mark.parametrize("where", ["mid-window", "boundary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_mid_window_is_bit_identical(backend, device, dtype, where):
    k, n_windows = 3, 3
    counts = [3, 1, 5, 2, 4, 3, 1, 1, 6]
    x, y = make_data(sum(counts), device)
    micro = split(x, y, counts)

    def build(seed):
        model = make_model(dtype, device, seed=seed)
        scaler = LossScaler(init_scale=2.0**8, growth_interval=2)  # the scale grows during the run
        acc = GradAccumulator(model.parameters(), k, max_norm=0.5, scaler=scaler)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2), acc, scaler

    def train(model, opt, acc, batches):
        losses = []
        for xb, yb in batches:
            acc.backward(sum_loss(model, xb, yb), num_items=torch.tensor(xb.shape[0], device=device))
            result = acc.step(opt)
            if result is not None:
                losses.append(result.loss)
        return losses

    model, opt, acc, scaler = build(0)
    want_losses = train(model, opt, acc, micro)
    assert scaler.get_scale() == 2.0**9
    want = snapshot(model, opt)

    model, opt, acc, scaler = build(0)
    cut = k + 2 if where == "mid-window" else k  # two micro-batches into the second window, or none
    train(model, opt, acc, micro[:cut])
    assert acc.micro_batches == cut - k
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict()}, buf)
    del model, opt, acc, scaler
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model, opt, acc, scaler = build(1)  # other initial weights: everything comes from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    acc.load_state_dict(ckpt["acc"])
    assert acc.micro_batches == cut - k
    losses = train(model, opt, acc, micro[cut:])
    assert same_snapshot(snapshot(model, opt), want)
    assert scaler.get_scale() == 2.0**9
    # The resumed window's loss counts its micro-batches from before the checkpoint too.
    assert all(same_bits(a, b) for a, b in zip(losses, want_losses[-len(losses):]))


def test_load_state_dict_rejects_other_layout_and_changes_nothing():
    model = make_model(torch.float32, "cpu")
    acc = GradAccumulator(model.parameters(), 2)
    x, y = make_data(3, "cpu")
    acc.backward(mean_loss(model, x, y))
    state = acc.state_dict()
    other = GradAccumulator(make_model(torch.bfloat16, "cpu").parameters(), 2)
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(state)
    assert other.micro_batches == 0
    with pytest.raises(ValueError, match="scaler"):
        GradAccumulator(make_model(torch.float32, "cpu").parameters(), 2, scaler=LossScaler()).load_state_dict(state)


@pytest.mark.parametrize("corrupt", ["2-D bucket", "fp64 bucket", "bucket missing", "items_device vector"])
def test_load_state_dict_rejects_a_corrupt_window_and_changes_nothing(corrupt):
    model = make_model(torch.float32, "cpu")
    scaler = LossScaler(init_scale=8.0)
    acc = GradAccumulator(model.parameters(), 4, scaler=scaler)
    x, y = make_data(6, "cpu")
    acc.backward(sum_loss(model, x[:3], y[:3]), num_items=torch.tensor(3))
    state = acc.state_dict()
    state["scaler"]["scale"] = 2.0  # would change the scaler if it were loaded
    (n,) = state["buckets"][0].shape
    if corrupt == "2-D bucket":
        state["buckets"][0] = state["buckets"][0].reshape(n, 1)
    elif corrupt == "fp64 bucket":
        state["buckets"][0] = state["buckets"][0].double()
    elif corrupt == "bucket missing":
        state["buckets"] = []
    else:
        state["items_device"] = torch.ones(2)
    acc.backward(sum_loss(model, x[3:], y[3:]), num_items=torch.tensor(3))
    sums = [b.accum.clone() for b in acc.buckets]
    with pytest.raises(ValueError, match="state dict"):
        acc.load_state_dict(state)
    assert acc.micro_batches == 2 and scaler.get_scale() == 8.0
    assert all(same_bits(b.accum, s) for b, s in zip(acc.buckets, sums))


# ---------------------------------------------------------------- step edge cases

def test_num_items_tensor_is_copied_not_kept(backend, device):
    """A float64 counter reused and refilled by the caller for every micro-batch."""
    def run(reuse):
        model = make_model(torch.float32, device)
        acc = GradAccumulator(model.parameters(), 2)
        x, y = make_data(8, device)
        counter = torch.zeros((), dtype=torch.float64, device=device)
        for lo, hi in ((0, 3), (3, 8)):
            items = counter.fill_(hi - lo) if reuse else torch.tensor(float(hi - lo), dtype=torch.float64,
                                                                      device=device)
            acc.backward(sum_loss(model, x[lo:hi], y[lo:hi]), num_items=items)
            if reuse:
                counter.fill_(1e6)  # refilled (here: spoiled) before the step
        res = acc.step(make_opt("sgd", model.parameters()))
        return float(res.num_items), model

    (n_fresh, a), (n_reused, b) = run(False), run(True)
    assert n_fresh == n_reused == 8
    assert all(same_bits(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_step_whose_optimizer_raises_can_be_retried(backend, device):
    """optimizer.step() raising after the fused pass: the retry steps with the same processed
    gradient (not normalized twice), and the window is closed only then."""
    x, y = make_data(2 * MICRO, device)
    micro = split(x, y, [MICRO, MICRO])

    def run(fail_first):
        model = make_model(torch.float32, device)
        acc = GradAccumulator(model.parameters(), 2, max_norm=0.5, scaler=LossScaler(init_scale=4.0))
        for xb, yb in micro:
            acc.backward(mean_loss(model, xb, yb))
        if fail_first:
            broken = torch.optim.LBFGS(model.parameters())  # its step() needs a closure
            with pytest.raises(TypeError):
                acc.step(broken)
            grads = [p.grad.clone() for p in model.parameters()]
            with pytest.raises(RuntimeError, match="call step\\(optimizer\\) again"):
                acc.backward(mean_loss(model, x, y))
            with pytest.raises(RuntimeError, match="call step\\(optimizer\\) again"):
                acc.state_dict()
            assert all(same_bits(p.grad, g) for p, g in zip(model.parameters(), grads))
            assert acc.scaler.get_scale() == 4.0  # not updated by the failed step
        res = acc.step(make_opt("sgd", model.parameters()))
        assert res is not None and acc.micro_batches == 0
        acc.backward(mean_loss(model, *micro[0]))  # the next window starts normally
        return model, float(res.total_norm), acc.scaler.get_scale()

    (a, norm_a, scale_a), (b, norm_b, scale_b) = run(False), run(True)
    assert norm_a == norm_b and scale_a == scale_b
    assert all(same_bits(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("items_as", ["int", "tensor"])
def test_a_window_of_zero_items_is_skipped(backend, device, items_as):
    model = make_model(torch.float32, device)
    acc = GradAccumulator(model.parameters(), 2, scaler=LossScaler(init_scale=8.0))
    opt = make_opt("adamw", model.parameters())
    x, y = make_data(4, device)
    zero = 0 if items_as == "int" else torch.tensor(0, device=device)
    for _ in range(2):
        acc.backward(sum_loss(model, x[:0], y[:0]), num_items=zero)  # e.g. all-padding micro-batches
    before = snapshot(model, opt)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = acc.step(opt)
    said = [str(w.message) for w in record if "0 items" in str(w.message)]
    assert len(said) == (items_as == "int")  # a host count is known without a sync
    assert float(res.found_inf) == 1.0 and acc.micro_batches == 0
    assert same_snapshot(snapshot(model, opt), before)
    acc.backward(sum_loss(model, x, y), num_items=4)  # the next window trains
    acc.backward(sum_loss(model, x, y), num_items=4)
    assert float(acc.step(opt).found_inf) == 0.0
    assert not same_snapshot(snapshot(model, opt), before)


def _two_windows(model, acc, opt, x, y):
    for _ in range(2):
        acc.backward(mean_loss(model, x, y))
        assert float(acc.step(opt).found_inf) == 0.0
    return model


def _assert_fused_equals_plain(run):
    """run(fused) trains with SGD(fused=fused) and returns the model."""
    fused, plain = run(True), run(False)
    for p, q in zip(fused.parameters(), plain.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_sgd_after_a_skipped_first_step(backend, device, momentum):
    """SGD(fused=True) creates its momentum buffers uninitialised (empty_like) in its first
    step: a first step skipped on the device must not leave them for the next one."""
    def run(fused):
        model = make_model(torch.float32, device)
        acc = GradAccumulator(model.parameters(), 1, scaler=LossScaler(init_scale=2.0**127))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, fused=fused)
        x, y = make_data(4, device)
        acc.backward(mean_loss(model, x, y) * float("inf"))  # overflows: skipped
        assert float(acc.step(opt).found_inf) == 1.0
        acc.scaler.load_state_dict({**acc.scaler.state_dict(), "scale": 1.0})
        return _two_windows(model, acc, opt, x, y)

    _assert_fused_equals_plain(run)


def test_fused_sgd_param_group_added_after_the_first_step(backend, device):
    """Optimizer state that exists for some parameters only: a param group added later has
    no momentum buffer yet, and a step skipped on the device must not create it uninitialised."""
    def run(fused):
        model = make_model(torch.float32, device)
        first, *later = list(model.parameters())
        acc = GradAccumulator(model.parameters(), 1, scaler=LossScaler(init_scale=1.0))
        opt = torch.optim.SGD([first], lr=0.1, momentum=0.9, fused=fused)
        x, y = make_data(4, device)
        acc.backward(mean_loss(model, x, y))
        assert float(acc.step(opt).found_inf) == 0.0 and first in opt.state
        opt.add_param_group({"params": later})
        acc.backward(mean_loss(model, x, y) * float("inf"))  # overflows: skipped
        assert float(acc.step(opt).found_inf) == 1.0
        assert all("momentum_buffer" not in opt.state.get(p, {}) for p in later)
        return _two_windows(model, acc, opt, x, y)

    _assert_fused_equals_plain(run)


# ---------------------------------------------------------------- zero_grad

@pytest.mark.parametrize("how", ["between_windows", "between_windows_keep", "every_micro_batch", "before_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_optimizer_zero_grad_does_not_break_accumulation(backend, device, dtype, how):
    x, y = make_data(2 * K * MICRO, device)
    micro = split(x, y, [MICRO] * (2 * K))

    def run(zero):
        model = make_model(dtype, device)
        acc = GradAccumulator(model.parameters(), K, max_norm=1.0)
        opt = make_opt("sgd", model.parameters())
        for xb, yb in micro:
            if zero and how == "every_micro_batch":
                opt.zero_grad()  # set_to_none=True: harmless even inside a window
            acc.backward(mean_loss(model, xb, yb))
            if zero and how == "before_step":
                opt.zero_grad()  # the usual place in a hand-written loop: must not empty the step
            if acc.step(opt) is not None and zero and how in ("between_windows", "between_windows_keep"):
                opt.zero_grad(set_to_none=(how == "between_windows"))
                assert all((p.grad is None) == (how == "between_windows") for p in model.parameters())
        return model

    a, b = run(False), run(True)
    assert all(same_bits(p, q) for p, q in zip(a.parameters(), b.parameters()))
    moved = make_model(dtype, device)
    assert not all(same_bits(p, q) for p, q in zip(a.parameters(), moved.parameters()))


# ---------------------------------------------------------------- bad use

@pytest.mark.parametrize("k", [0, -1, 2.5, True, "4", None])
def test_accumulation_steps_must_be_a_positive_int(k):
    model = make_model(torch.float32, "cpu")
    with pytest.raises(ValueError, match="accumulation_steps"):
        GradAccumulator(model.parameters(), k)
    assert all(p.grad is None for p in model.parameters())  # nothing attached


@pytest.mark.parametrize("first", ["with", "without"])
def test_num_items_on_some_micro_batches_only(first):
    model = make_model(torch.float32, "cpu")
    x, y = make_data(6, "cpu")
    acc = GradAccumulator(model.parameters(), 4)
    given = first == "with"
    acc.backward(sum_loss(model, x[:3], y[:3]), num_items=3 if given else None)
    sums = [b.accum.clone() for b in acc.buckets]
    loss = sum_loss(model, x[3:], y[3:])
    with pytest.raises(ValueError, match="num_items must be given on every micro-batch"):
        acc.backward(loss, num_items=None if given else 3)
    assert acc.micro_batches == 1 and all(torch.equal(b.accum, s) for b, s in zip(acc.buckets, sums))
    acc.backward(loss, num_items=3 if given else None)  # the graph was not consumed: retry works
    assert acc.micro_batches == 2


def test_force_step_with_nothing_accumulated():
    model = make_model(torch.float32, "cpu")
    acc = GradAccumulator(model.parameters(), 2)
    opt = make_opt("adamw", model.parameters())
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="nothing accumulated"):
        acc.step(opt, force=True)
    assert same_snapshot(snapshot(model, opt), before) and not opt.state


def test_other_bad_use_raises_before_changing_anything():
    model = make_model(torch.float32, "cpu")
    x, y = make_data(6, "cpu")
    acc = GradAccumulator(model.parameters(), 1)
    acc.backward(mean_loss(model, x, y))
    with pytest.raises(RuntimeError, match="call step"):  # window full
        acc.backward(mean_loss(model, x, y))
    stranger = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD(list(model.parameters()) + [stranger], lr=0.1)
    sums = acc.buckets.buckets[0].accum.clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[4\]"):
        acc.step(opt)
    assert acc.micro_batches == 1 and torch.equal(acc.buckets.buckets[0].accum, sums)
    with pytest.raises(ValueError, match="scalar"):
        acc.backward(out64(model, x).sum(0))
    acc.release()
    second = GradAccumulator(model.parameters(), 2)
    with pytest.raises(ValueError, match="num_items"):
        second.backward(mean_loss(model, x, y), num_items=-1)
    with pytest.raises(ValueError, match="already belongs to another GradBuckets"):
        GradAccumulator(model.parameters(), 2)
    with pytest.raises(TypeError, match="LossScaler"):
        GradAccumulator(model.parameters(), 2, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="max_norm"):
        GradAccumulator(model.parameters(), 2, max_norm=-1.0)


# ---------------------------------------------------------------- syncs, DDP, BatchNorm

def test_fused_optimizer_path_never_reads_the_device(monkeypatch):
    """With AdamW(fused=True) nothing on the backward/step path converts a tensor to a host
    value (on CUDA that would be a sync); the plain-optimizer path reads found_inf once."""
    model = make_model(torch.float32, "cpu")
    x, y = make_data(8, "cpu")
    acc = GradAccumulator(model.parameters(), 2, max_norm=0.1, scaler=LossScaler())
    reads = []

    def forbid(name):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, **kwargs):
            if not read_by_cpu_reference():
                reads.append(name)
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        forbid(name)
    losses = [mean_loss(model, x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    losses += [mean_loss(model, x[i:i + 2], y[i:i + 2]) for i in range(0, 4, 2)]  # forwards before spying
    reads.clear()
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    acc.backward(losses[0], num_items=torch.tensor(2))
    acc.backward(losses[1], num_items=torch.tensor(2))
    assert acc.step(fused) is not None
    assert reads == ["item"]  # the first step: the optimizer has no state yet (see step())
    reads.clear()
    acc.backward(losses[4], num_items=torch.tensor(2))
    acc.backward(losses[5], num_items=torch.tensor(2))
    assert acc.step(fused) is not None
    assert reads == []
    plain = torch.optim.AdamW(model.parameters())
    step = plain.step

    def step_unwatched():  # AdamW reads its own (host) step counters: not ours to count
        n = len(reads)
        step()
        del reads[n:]
    plain.step = step_unwatched
    acc.backward(losses[2])
    acc.backward(losses[3])
    assert acc.step(plain) is not None
    assert reads == ["item"]  # found_inf, once per optimizer step
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)  # no momentum: no state, ever
    for _ in range(2):
        window = [mean_loss(model, x[i:i + 2], y[i:i + 2]) for i in (0, 2)]
        reads.clear()
        for loss in window:
            acc.backward(loss)
        assert acc.step(sgd) is not None
        assert reads == [] and not sgd.state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host syncs")
def test_no_sync_on_cuda_with_fused_optimizer():
    model = make_model(torch.bfloat16, "cuda")
    x, y = make_data(8, "cuda")
    acc = GradAccumulator(model.parameters(), 2, max_norm=0.1, scaler=LossScaler())
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    xs = x.to("cuda", torch.bfloat16)
    ys = y.to("cuda", torch.bfloat16)
    items = torch.tensor(4, device="cuda")
    for _ in range(2):  # warm-up: lazy init of scaler and optimizer state
        acc.backward(F.mse_loss(model(xs), ys, reduction="sum"), num_items=items)
    acc.step(opt)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            acc.backward(F.mse_loss(model(xs), ys, reduction="sum"), num_items=items)
        acc.step(opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class FakeDDP(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self.in_no_sync = False
        self.log = []

    def forward(self, x):
        self.log.append(self.in_no_sync)
        return self.module(x)

    def no_sync(self):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            self.in_no_sync = True
            try:
                yield
            finally:
                self.in_no_sync = False
        return ctx()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_accumulate_enters_no_sync_on_all_but_the_last_micro_batch(dtype):
    ddp = FakeDDP(make_model(dtype, "cpu"))
    x, y = make_data(3, "cpu")
    acc = GradAccumulator(ddp.parameters(), 3)
    opt = make_opt("sgd", ddp.parameters())
    for _ in range(6):
        with acc.accumulate(ddp):
            acc.backward(F.mse_loss(ddp(x.to(dtype)).double(), y))
        acc.step(opt)
    if dtype == torch.float32 or acc.buckets.direct:  # direct: bf16 gradients stay in param.grad (fp32 views)
        assert ddp.log == [True, True, False] * 2
    else:  # landing: bf16 gradients leave param.grad after each backward: every micro-batch must sync
        assert ddp.log == [False] * 6
    plain = make_model(torch.float32, "cpu")
    acc2 = GradAccumulator(plain.parameters(), 3)
    with acc2.accumulate(plain):  # no no_sync(): nothing happens
        acc2.backward(mean_loss(plain, x, y))

    # A partial window closed by force needs sync=True on its last micro-batch.
    ddp = FakeDDP(make_model(torch.float32, "cpu"))
    acc = GradAccumulator(ddp.parameters(), 3)
    opt = make_opt("sgd", ddp.parameters())
    with acc.accumulate(ddp):
        acc.backward(F.mse_loss(ddp(x.float()).double(), y))
    with pytest.raises(RuntimeError, match="sync=True"):
        acc.step(opt, force=True)
    with acc.accumulate(ddp, sync=True):
        acc.backward(F.mse_loss(ddp(x.float()).double(), y))
    assert ddp.log == [True, False] and acc.step(opt, force=True).micro_batches == 2


def test_real_ddp_single_process(tmp_path):
    """DDP's reducer reads and writes param.grad in place: the bucket views survive it, and the
    no_sync windows train like one large batch."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = make_model(torch.float32, "cpu")
        x, y = make_data(2 * K * MICRO, "cpu")
        micro = split(x, y, [MICRO] * (2 * K))
        ref, _, _ = reference(model, [cat(micro[:K]), cat(micro[K:])], "sgd", 0.5)
        ddp = nn.parallel.DistributedDataParallel(model)
        acc = GradAccumulator(ddp.parameters(), K, max_norm=0.5)
        opt = make_opt("sgd", ddp.parameters())
        for xb, yb in micro:
            with acc.accumulate(ddp):
                acc.backward(F.mse_loss(ddp(xb.float()).double(), yb))
            acc.step(opt)
        assert max_diff(model, ref) <= weight_tol(torch.float32, 2, ref)
        assert all(p.grad._base is acc.buckets.buckets[0].accum for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_disabled_scaler_is_no_scaler():
    x, y = make_data(2 * MICRO, "cpu")
    runs = []
    for scaler in (None, LossScaler(enabled=False)):
        model = make_model(torch.bfloat16, "cpu")
        acc = GradAccumulator(model.parameters(), 2, max_norm=0.5, scaler=scaler)
        opt = make_opt("sgd", model.parameters())
        for xb, yb in split(x, y, [MICRO, MICRO]):
            acc.backward(mean_loss(model, xb, yb))
        acc.step(opt)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(same_bits(a, b) for a, b in zip(*runs))


def test_warns_once_about_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(IN, 4), nn.BatchNorm1d(4), nn.Linear(4, OUT))
    x, y = make_data(8, "cpu")
    acc = GradAccumulator(model.parameters(), 2)
    with pytest.warns(UserWarning, match=r"BatchNorm1d layer '1' is in training mode") as record:
        for _ in range(4):
            with acc.accumulate(model):
                acc.backward(mean_loss(model, x, y))
            acc.step(torch.optim.SGD(model.parameters(), lr=0.1))
    assert sum("BatchNorm" in str(w.message) for w in record) == 1

    acc.release()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc = GradAccumulator(model, 2)  # the model itself: checked at each window start too
        acc.backward(mean_loss(model, x, y))
        model.train()
    with pytest.warns(UserWarning, match="BatchNorm"):
        acc.backward(mean_loss(model, x, y))
        acc.step(torch.optim.SGD(model.parameters(), lr=0.1))
        acc.backward(mean_loss(model, x, y))


@pytest.mark.parametrize("how", ["accumulate", "model given"])
def test_batchnorm_switched_to_training_later_is_seen_and_points_at_the_caller(how):
    """The model stays in train mode; one BatchNorm layer is unfrozen after some windows."""

    model = nn.Sequential(nn.Linear(IN, 4), nn.BatchNorm1d(4), nn.Linear(4, OUT))
    model[1].eval()
    x, y = make_data(8, "cpu")
    acc = GradAccumulator(model if how == "model given" else model.parameters(), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def window():
        for _ in range(2):
            with acc.accumulate(model) if how == "accumulate" else contextlib.nullcontext():
                acc.backward(mean_loss(model, x, y))
        acc.step(opt)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        window()
    model[1].train()
    with pytest.warns(UserWarning, match=r"BatchNorm1d layer '1' is in training mode") as record:
        window()
    assert [w.filename for w in record if "BatchNorm" in str(w.message)] == [__file__]


def test_exports():
    assert fusedaccum.GradAccumulator is GradAccumulator and fusedaccum.LossScaler is LossScaler
