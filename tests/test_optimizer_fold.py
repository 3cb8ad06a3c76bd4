"""The fold: with torch's fused Adam/AdamW/SGD/Adagrad, GradAccumulator.step runs the norm pass
and the finalize only and hands grad_scale = 1/coef and found_inf to the optimizer, which
divides in its kernel and writes the quotient back to .grad. Results must equal the apply
pass's (fold turned off) to the fp32 tolerances, and the float64 large-batch gradient."""

import contextlib
import math

import pytest
import torch

import fusedaccum
from fusedaccum import _backend, _optim

K = 2
RTOL, ATOL = 2e-6, 1e-6  # docs/kernels.md, float32; the fold divides by 1/coef: two roundings, not one

OPTIMIZERS = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, fused=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-1, fused=True),
}


def _data(windows):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(3, 7, generator=g), torch.randn(3, 5, generator=g)) for _ in range(K)]
            for _ in range(windows)]


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))


class _Applies:
    """Counts the backend's apply passes."""

    def __init__(self, monkeypatch):
        self.calls = 0
        impl = _backend.implementation(torch.device("cpu"))
        real = impl.apply

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(impl, "apply", counted)


def _run(opt_name, max_norm, data, bad=(), fold=True, monkeypatch=None):
    """Windows of K micro-batches; a window in ``bad`` gets an inf loss factor (found_inf).
    Returns the model, the optimizer, per-window (grads after the step, stats, state steps)."""
    with _fold_off(monkeypatch, not fold):
        return _windows(opt_name, max_norm, data, bad)


@contextlib.contextmanager
def _fold_off(monkeypatch, off: bool):
    """A context in which no optimizer folds (the apply pass always runs); the test's other
    patches (the backend) stay."""
    if not off:
        yield
        return
    with monkeypatch.context() as m:
        m.setattr(_optim, "FOLD_TYPES", ())
        yield


def _windows(opt_name, max_norm, data, bad):
    model = _model()
    acc = fusedaccum.GradAccumulator(model.parameters(), K, max_norm=max_norm)
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    log = []
    for w, window in enumerate(data):
        for i, (x, y) in enumerate(window):
            loss = torch.nn.functional.mse_loss(model(x), y)
            acc.backward(loss * math.inf if (w in bad and i == 0) else loss)
        result = acc.step(opt)
        log.append(([p.grad.clone() for p in model.parameters()], (float(result.total_norm),
                    float(result.found_inf)), [s.get("step", torch.zeros(())).clone() for s in opt.state.values()]))
    return model, opt, log


def _expected_grads(model_before, window, max_norm):
    """The window's mean gradient in float64, clipped as clip_grad_norm_ would."""
    m = model_before.double()
    for x, y in window:
        (torch.nn.functional.mse_loss(m(x.double()), y.double()) / K).backward()
    grads = [p.grad for p in m.parameters()]
    if max_norm is not None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        grads = [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in grads]
    return grads


@pytest.mark.parametrize("max_norm", [None, 0.05])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_fold_equals_apply_pass(backend, opt_name, max_norm, monkeypatch):
    data = _data(3)
    bad = {0, 2}  # window 0: overflow with the optimizer state missing (host path); 2: skipped on the device
    applies = _Applies(monkeypatch)
    model, opt, log = _run(opt_name, max_norm, data, bad)
    assert applies.calls == 0  # every window folded: the apply pass never ran
    model_ref, opt_ref, log_ref = _run(opt_name, max_norm, data, bad, fold=False, monkeypatch=monkeypatch)
    assert applies.calls == len(data)
    for (grads, stats, steps), (grads_ref, stats_ref, steps_ref) in zip(log, log_ref):
        assert stats == stats_ref or (math.isnan(stats[0]) and math.isnan(stats_ref[0]))
        for g, r in zip(grads, grads_ref):
            if stats[1]:  # skipped: .grad keeps the raw sums, every bit
                assert torch.equal(g.nan_to_num(), r.nan_to_num())
            else:
                torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)
        assert [float(s) for s in steps] == [float(s) for s in steps_ref]
    assert [stats[1] for _, stats, _ in log] == [1.0, 0.0, 1.0]
    assert all(float(s) == 0 for s in log[0][2])  # the skipped first window took no step (Adagrad: state from init)
    if opt_name != "SGD":  # one step taken: the device skip undid its step count
        assert [float(s) for s in log[-1][2]] == [1.0] * len(list(model.parameters()))
    for p, r in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, r, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_fold_first_step_matches_float64(backend, max_norm):
    """State missing on the first step (the host decides the skip): param.grad after the step is
    the window's processed gradient, as with the apply pass, against float64."""
    data = _data(1)
    before = _model()
    model, opt, log = _run("AdamW", max_norm, data)
    assert log[0][1][1] == 0.0 and float(opt.state[next(model.parameters())]["step"]) == 1
    for g, e in zip(log[0][0], _expected_grads(before, data[0], max_norm)):
        torch.testing.assert_close(g.double(), e, rtol=RTOL, atol=ATOL)


def test_fold_max_norm_zero(monkeypatch):
    """coef = 0 (max_norm = 0): grad_scale = inf, and g / inf = 0, as g * 0."""
    data = _data(2)
    applies = _Applies(monkeypatch)
    _, _, log = _run("SGD", 0.0, data)
    assert applies.calls == 0
    _, _, log_ref = _run("SGD", 0.0, data, fold=False, monkeypatch=monkeypatch)
    for (grads, _, _), (grads_ref, _, _) in zip(log, log_ref):
        for g, r in zip(grads, grads_ref):
            assert torch.equal(g, r) and not g.any()


@pytest.mark.parametrize("case", ["not fused", "foreach", "subset", "subclass", "bf16"])
def test_no_fold_keeps_apply_pass(case, monkeypatch):
    """Only an exact torch fused optimizer that steps every parameter folds; else the apply pass
    runs and the other parameters' .grad still get the processed gradient."""
    model = _model().to(torch.bfloat16) if case == "bf16" else _model()
    params = list(model.parameters())
    acc = fusedaccum.GradAccumulator(params, K, max_norm=0.05)
    if case == "not fused":
        opt = torch.optim.AdamW(params, lr=1e-2, fused=False, foreach=False)
    elif case == "foreach":
        opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    elif case == "subset":
        opt = torch.optim.AdamW(params[:2], lr=1e-2, fused=True)
    elif case == "subclass":
        opt = type("MyAdamW", (torch.optim.AdamW,), {})(params, lr=1e-2, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    assert not acc._fold(opt)
    applies = _Applies(monkeypatch)
    before = _model()
    for x, y in _data(1)[0]:
        acc.backward(torch.nn.functional.mse_loss(model(x.to(params[0].dtype)), y.to(params[0].dtype)))
    acc.step(opt)
    assert applies.calls == 1
    if case != "bf16":
        for p, e in zip(params, _expected_grads(before, _data(1)[0], 0.05)):
            torch.testing.assert_close(p.grad.double(), e, rtol=RTOL, atol=ATOL)


def test_fold_retry_with_other_optimizer(monkeypatch):
    """A fused optimizer that raises leaves the window closed with the apply pass owed; a retry
    with an optimizer that cannot fold runs it then, once."""
    model = _model()
    params = list(model.parameters())
    acc = fusedaccum.GradAccumulator(params, K, max_norm=0.05)
    fused = torch.optim.AdamW(params, lr=1e-2, fused=True)
    monkeypatch.setattr(fused, "step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    before = _model()
    data = _data(1)[0]
    for x, y in data:
        acc.backward(torch.nn.functional.mse_loss(model(x), y))
    applies = _Applies(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        acc.step(fused)
    assert applies.calls == 0 and not hasattr(fused, "grad_scale")
    plain = torch.optim.SGD(params, lr=0.0)
    acc.step(plain)
    acc.step(plain)  # nothing accumulated: None, no second apply
    assert applies.calls == 1
    for p, e in zip(params, _expected_grads(before, data, 0.05)):
        torch.testing.assert_close(p.grad.double(), e, rtol=RTOL, atol=ATOL)


def test_grad_scale_cleared_after_step():
    """The optimizer's grad_scale/found_inf are removed after the step: a later plain
    opt.step() divides by nothing."""
    model = _model()
    acc = fusedaccum.GradAccumulator(model.parameters(), K)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)
    for x, y in _data(2)[1]:
        acc.backward(torch.nn.functional.mse_loss(model(x), y))
    acc.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    p = next(model.parameters())
    before, g = p.detach().clone(), p.grad.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - g)


def test_fold_with_loss_scaler(backend, monkeypatch):
    """A LossScaler's unscale rides in coef: the fold gives the apply pass's weights, and the
    scaler backs off on the overflowing window alike."""
    def run(fold):
        with _fold_off(monkeypatch, not fold):
            return windows()

    def windows():
        model = _model()
        scaler = fusedaccum.LossScaler(init_scale=2.0 ** 10, growth_interval=1)
        acc = fusedaccum.GradAccumulator(model.parameters(), K, max_norm=0.05, scaler=scaler)
        opt = OPTIMIZERS["AdamW"](list(model.parameters()))
        for w, window in enumerate(_data(3)):
            for i, (x, y) in enumerate(window):
                loss = torch.nn.functional.mse_loss(model(x), y)
                acc.backward(loss * math.inf if (w == 1 and i == 0) else loss)
            acc.step(opt)
        return list(model.parameters()), scaler.get_scale()

    params, scale = run(True)
    params_ref, scale_ref = run(False)
    assert scale == scale_ref
    for p, r in zip(params, params_ref):
        torch.testing.assert_close(p, r, rtol=RTOL, atol=ATOL)
