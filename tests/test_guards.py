"""The guards against silent misuse (fusedaccum/guards.py): each mistake fails loudly before a
step uses the damaged window, and the guards cost no tensor op."""

import gc
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedaccum.buckets
from fusedaccum import GradAccumulator

K = 4


def make(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    return model


def batch(i, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(5, 6, generator=g).to(dtype), torch.randn(5, 2, generator=g).to(dtype)


def loss_of(model, i):
    x, y = batch(i, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in v.items()} for k, v in opt.state.items()}
    return params, state


def same(a, b):
    pa, sa = a
    pb, sb = b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys()
            and all(torch.equal(sa[k][n], sb[k][n]) if torch.is_tensor(sa[k][n]) else sa[k][n] == sb[k][n]
                    for k in sa for n in sa[k]))


def train(model, opt, acc, micro):
    for i in micro:
        acc.backward(loss_of(model, i))
        acc.step(opt)


# ---------------------------------------------------------------- a backward outside acc.backward

def test_loss_backward_instead_of_acc_backward_fails_before_any_step():
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, K)
    with acc.accumulate(model):
        loss_of(model, 0).backward()  # the mistake: 20 of these used to give no step and no word
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"outside acc\.backward"):
        acc.step(opt)
    with pytest.raises(RuntimeError, match=r"outside acc\.backward"):
        acc.backward(loss_of(model, 1))
    with pytest.raises(RuntimeError, match=r"outside acc\.backward"):
        opt.step()  # the user's own step sees it too
    assert same(before, snapshot(model, opt))
    assert acc.micro_batches == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stray_backward_mid_window_then_discard_window_recovers(dtype):
    ref_model, model = make(dtype), make(dtype)
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_model, model))
    ref_acc, acc = GradAccumulator(ref_model, K), GradAccumulator(model, K)
    train(ref_model, ref_opt, ref_acc, range(K, 3 * K))

    acc.backward(loss_of(model, 0))
    loss_of(model, 1).backward()
    with pytest.raises(RuntimeError, match=r"outside acc\.backward"):
        acc.backward(loss_of(model, 2))
    acc.discard_window()
    assert acc.micro_batches == 0
    train(model, opt, acc, range(K, 3 * K))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


def test_a_loss_that_reaches_no_managed_parameter_is_refused_before_it_counts():
    ref_model, model, other = make(), make(), make(seed=1)
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_model, model))
    ref_acc, acc = GradAccumulator(ref_model, K), GradAccumulator(model, K)
    train(ref_model, ref_opt, ref_acc, range(K))
    with pytest.raises(ValueError, match="reaches none of this GradAccumulator's parameters"):
        acc.backward(loss_of(other, 0))  # was: a zero-gradient micro-batch, counted
    assert acc.micro_batches == 0
    acc.backward(loss_of(model, 0))
    with pytest.raises(ValueError, match="Nothing was counted"):
        acc.backward(loss_of(other, 1))
    assert acc.micro_batches == 1
    train(model, opt, acc, range(1, K))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


def test_a_backward_that_raised_half_way_is_named_and_discard_window_recovers():
    ref_model, model = make(), make()
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_model, model))
    ref_acc, acc = GradAccumulator(ref_model, K), GradAccumulator(model, K)
    train(ref_model, ref_opt, ref_acc, range(K, 3 * K))

    def boom(_grad):
        raise RuntimeError("boom")

    acc.backward(loss_of(model, 0))
    x, _ = batch(1)
    out = model(x)
    out.register_hook(boom)  # raises before any parameter got its gradient: the window is intact
    with pytest.raises(RuntimeError, match="boom"):
        acc.backward(out.square().mean())
    acc.backward(loss_of(model, 1))
    assert acc.micro_batches == 2
    handle = model[0].weight.register_hook(boom)  # raises after the last layer's gradients landed
    with pytest.raises(RuntimeError, match="boom"):
        acc.backward(loss_of(model, 2))
    handle.remove()
    with pytest.raises(RuntimeError, match=r"previous acc\.backward\(\) raised inside the backward "
                                           r"\(RuntimeError: boom\).*discard_window\(\)"):
        acc.backward(loss_of(model, 3))
    acc.discard_window()
    train(model, opt, acc, range(K, 3 * K))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


# ---------------------------------------------------------------- optimizer.step() inside a window

@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_step_inside_a_window_raises_and_changes_nothing(fused):
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    acc = GradAccumulator(model, K)
    train(model, opt, acc, range(K))  # one full window: the optimizer has state
    acc.backward(loss_of(model, K))
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"acc\.step\(optimizer\)"):
        opt.step()
    assert same(before, snapshot(model, opt))
    # The window goes on as if nothing happened.
    for i in range(K + 1, 2 * K):
        acc.backward(loss_of(model, i))
    assert acc.step(opt) is not None


def test_optimizer_step_between_windows_and_other_optimizers_are_left_alone():
    model, other = make(), nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    acc = GradAccumulator(model, K)
    acc.backward(loss_of(model, 0))
    other(torch.ones(2, 3)).sum().backward()
    other_opt.step()  # not over managed parameters: no business of the guard
    for i in range(1, K):
        acc.backward(loss_of(model, i))
    acc.step(opt)
    opt.step()  # between windows the processed gradient is in param.grad: allowed


# ---------------------------------------------------------------- zero_grad(set_to_none=False)

def test_zero_grad_keep_inside_a_window_is_caught_for_fp32():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, K)
    acc.backward(loss_of(model, 0))
    opt.zero_grad(set_to_none=False)  # zeroes the fp32 buckets: the window's sum
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="modified in place"):
        acc.backward(loss_of(model, 1))
    with pytest.raises(RuntimeError, match="modified in place"):
        acc.step(opt, force=True)
    assert same(before, snapshot(model, opt))
    acc.discard_window()


def test_zero_grad_keep_inside_a_window_is_harmless_for_bf16(monkeypatch):
    # The landing path (torch without Tensor.grad_dtype); direct bf16 buckets are guarded as
    # fp32 ones are (tests/test_grad_dtype.py).
    monkeypatch.setattr(fusedaccum.buckets, "grad_dtype_supported", lambda: False)
    ref_model, model = make(torch.bfloat16), make(torch.bfloat16)
    ref_opt, opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref_model, model))
    ref_acc, acc = GradAccumulator(ref_model, K), GradAccumulator(model, K)
    train(ref_model, ref_opt, ref_acc, range(2 * K))
    for i in range(2 * K):
        acc.backward(loss_of(model, i))
        opt.zero_grad(set_to_none=False)  # the landing buffer is already zero between backwards
        acc.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


def test_zero_grad_keep_between_windows_is_allowed():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, K)
    for i in range(2 * K):
        acc.backward(loss_of(model, i))
        if acc.step(opt) is not None:
            opt.zero_grad(set_to_none=False)


def test_clip_grad_norm_inside_a_window_names_clipping_and_max_norm():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, K)
    acc.backward(loss_of(model, 0))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the naive loop's clip, kept by habit
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"modified in place.*clip_grad_norm_.*max_norm="):
        acc.step(opt, force=True)
    assert same(before, snapshot(model, opt))
    acc.discard_window()


# ---------------------------------------------------------------- cost and life cycle

class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_guards_cost_no_tensor_op():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, K)
    acc.backward(loss_of(model, 0))
    guard = acc._guard
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with _CountOps() as counter:
        guard.check("here")
        guard.sync()
        guard.before_optimizer_step(other)
        with pytest.raises(RuntimeError):
            guard.before_optimizer_step(opt)
        with guard.stepping():
            pass
    assert counter.ops == []
    acc.discard_window()


def test_accumulators_share_one_optimizer_hook_and_released_or_dropped_ones_leave_it():
    from torch.optim import optimizer as optim_module

    from fusedaccum import guards
    hooks = optim_module._global_optimizer_pre_hooks
    gc.collect()  # accumulators of earlier tests
    live = len(guards._live)
    acc = GradAccumulator(make(), K)
    n = len(hooks)
    assert list(hooks.values()).count(guards._before_any_step) == 1
    acc2 = GradAccumulator(make(seed=1), K)
    assert len(hooks) == n  # no hook per accumulator
    assert len(guards._live) == live + 2
    del acc2
    gc.collect()
    assert len(guards._live) == live + 1
    acc.release()
    assert len(guards._live) == live
    if live == 0:  # the last one released takes the hook with it
        assert guards._hook is None and guards._before_any_step not in hooks.values()


# ---------------------------------------------------------------- checkpoints

def test_load_state_dict_checks_parameter_shapes_and_order():
    a = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    b = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 32))  # the same element count, other shapes
    acc_a, acc_b = GradAccumulator(a, K), GradAccumulator(b, K)
    acc_a.backward(a(torch.ones(2, 16)).sum())
    state = acc_a.state_dict()
    before = [t.clone() for t in (acc_b.buckets.buckets[0].accum,)]
    with pytest.raises(ValueError, match=r"parameter 0 .*\(32, 16\).*\(16, 32\)"):
        acc_b.load_state_dict(state)
    assert acc_b.micro_batches == 0 and torch.equal(before[0], acc_b.buckets.buckets[0].accum)


def test_load_state_dict_with_other_accumulation_steps_says_what_happens():
    model = make()
    acc4 = GradAccumulator(model, 4)
    for i in range(3):
        acc4.backward(loss_of(model, i))
    state = acc4.state_dict()
    acc4.release()
    acc8 = GradAccumulator(model, 8)
    with pytest.warns(UserWarning, match=r"accumulation_steps=4.*closes the window at 8"):
        acc8.load_state_dict(state)
    assert acc8.micro_batches == 3
    acc2 = None
    acc8.release()
    acc2 = GradAccumulator(model, 2)
    with pytest.raises(ValueError, match="micro_batches=3"):
        acc2.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acc2.release()
        acc4b = GradAccumulator(model, 4)
        acc4b.load_state_dict(state)  # same K: no warning


def test_load_state_dict_between_windows_with_other_accumulation_steps_warns():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc4 = GradAccumulator(model, 4)
    train(model, opt, acc4, range(4))
    state = acc4.state_dict()
    acc4.release()
    acc8 = GradAccumulator(model, 8)
    with pytest.warns(UserWarning, match=r"accumulation_steps=4; .*keeps its own accumulation_steps=8"):
        acc8.load_state_dict(state)  # was: silently ignored
    assert acc8.accumulation_steps == 8


def test_accumulation_steps_changes_survive_a_checkpoint():
    from fusedaccum import AdaptiveSteps, NoiseScaleSettings
    from fusedaccum.signals import StepsChange
    settings = NoiseScaleSettings(adaptive=AdaptiveSteps())
    model = make()
    acc = GradAccumulator(model, K, noise_scale=settings)
    history = [StepsChange(window=4, old=K, new=6, b_simple=17.5, items_per_micro_batch=3.0)]
    acc._signals.tracker.changes.extend(history)  # as the policy records them
    acc.backward(loss_of(model, 0))
    state = acc.state_dict()
    acc.release()
    resumed = GradAccumulator(model, K, noise_scale=settings)
    resumed.load_state_dict(state)
    assert resumed.accumulation_steps_changes == history  # was: []
    resumed.discard_window()
