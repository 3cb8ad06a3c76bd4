"""LossScaler against torch.amp.GradScaler: same scale sequence, same checkpoint format."""

import random

import pytest
import torch

from fusedaccum import LossScaler
from fusedaccum import scaler as scaler_mod


def grad_scaler_run(flags, **config):
    """The scales torch.amp.GradScaler goes through when its steps find inf per ``flags``."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.0)
    gs = torch.amp.GradScaler("cpu", **config)
    scales = []
    for bad in flags:
        gs.scale(torch.ones(()))  # lazy init
        p.grad = torch.full((2,), float("inf") if bad else 1.0)
        gs.step(opt)
        gs.update()
        scales.append((gs.get_scale(), gs.state_dict()["_growth_tracker"]))
    return scales, gs


def loss_scaler_run(flags, scaler=None, **config):
    ls = scaler or LossScaler(**config)
    scales = []
    for bad in flags:
        ls.scale(torch.ones(()))
        ls.update(torch.tensor(float(bad)))
        scales.append((ls.get_scale(), ls.state_dict()["_growth_tracker"]))
    return scales, ls


CONFIGS = [
    dict(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=3),
    dict(init_scale=1000.0, growth_factor=1.7, backoff_factor=0.37, growth_interval=2),  # rounding
    dict(init_scale=2.0**126, growth_factor=4.0, backoff_factor=0.5, growth_interval=1),  # growth to inf
]


@pytest.fixture(params=["native", "where"])
def update_impl(request, monkeypatch):
    """The ATen op, or the torch.where fallback used where the op has no kernel."""
    if request.param == "where":
        monkeypatch.setattr(scaler_mod, "_NATIVE_UPDATE_MISSING", {"cpu", "cuda"})
    return request.param


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "odd-factors", "near-max"])
def test_scale_sequence_matches_grad_scaler(config, update_impl):
    rng = random.Random(0)
    flags = [rng.random() < 0.25 for _ in range(40)]
    flags[5:12] = [False] * 7  # long enough runs to grow
    want, _ = grad_scaler_run(flags, **config)
    got, _ = loss_scaler_run(flags, **config)
    assert got == want
    assert len({s for s, _ in want}) >= 3  # both growth and backoff happened


def test_state_dict_loads_from_and_into_grad_scaler():
    flags = [False, True, False, False, False, False, True, False]
    _, gs = grad_scaler_run(flags[:5], growth_interval=2, growth_factor=3.0, backoff_factor=0.25)
    state = gs.state_dict()
    ls = LossScaler()
    ls.load_state_dict(state)
    assert ls.state_dict() == state
    assert list(ls.state_dict()) == list(state)  # same keys, same order
    assert all(type(ls.state_dict()[k]) is type(state[k]) for k in state)

    # Both continue identically from the checkpoint.
    want, _ = grad_scaler_run(flags[5:], growth_interval=2, growth_factor=3.0, backoff_factor=0.25)
    ls_fresh = LossScaler(growth_interval=2, growth_factor=3.0, backoff_factor=0.25)
    gs2 = torch.amp.GradScaler("cpu")
    gs2.load_state_dict(ls.state_dict())
    assert gs2.state_dict() == state
    assert ls_fresh.state_dict() == torch.amp.GradScaler("cpu", growth_interval=2, growth_factor=3.0,
                                                            backoff_factor=0.25).state_dict()
    got, _ = loss_scaler_run(flags[5:], scaler=ls)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.0)
    cont = []
    for bad in flags[5:]:
        gs2.scale(torch.ones(()))
        p.grad = torch.full((2,), float("inf") if bad else 1.0)
        gs2.step(opt)
        gs2.update()
        cont.append((gs2.get_scale(), gs2.state_dict()["_growth_tracker"]))
    assert got == cont


def test_state_is_on_the_device_and_update_takes_a_device_flag():
    ls = LossScaler(init_scale=8.0, growth_interval=1)
    scaled = ls.scale(torch.tensor(3.0))
    assert scaled.item() == 24.0
    t = ls.scale_tensor()
    assert t.dtype == torch.float32 and t.dim() == 0
    ls.update(torch.tensor(0.0))
    assert t.item() == 16.0  # updated in place: holders of scale_tensor() see the new value
    ls.update(True)
    assert ls.get_scale() == 8.0
    assert ls.scale([torch.tensor(1.0), (torch.tensor(2.0),)])[1][0].item() == 16.0


def test_disabled_is_a_no_op():
    ls = LossScaler(enabled=False, growth_factor=0.5)  # config is not checked when disabled
    loss = torch.tensor(2.0, requires_grad=True)
    assert ls.scale(loss) is loss
    assert ls.get_scale() == 1.0 and ls.scale_tensor().item() == 1.0
    ls.update(torch.tensor(1.0))
    assert ls.state_dict() == {} and torch.amp.GradScaler("cpu", enabled=False).state_dict() == {}
    ls.load_state_dict({"anything": 1})
    assert not ls.is_enabled()


@pytest.mark.parametrize("kwargs, match", [
    (dict(growth_factor=1.0), "growth_factor"),
    (dict(backoff_factor=1.0), "backoff_factor"),
    (dict(backoff_factor=0.0), "backoff_factor"),
    (dict(growth_interval=0), "growth_interval"),
    (dict(growth_interval=2.5), "growth_interval"),
    (dict(init_scale=0.0), "scale"),
    (dict(init_scale=float("inf")), "scale"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossScaler(**kwargs)


def test_bad_state_dict_changes_nothing():
    ls = LossScaler(init_scale=4.0)
    ls.scale(torch.ones(()))
    before = ls.state_dict()
    with pytest.raises(RuntimeError, match="empty"):
        ls.load_state_dict({})
    with pytest.raises(KeyError, match="_growth_tracker"):
        ls.load_state_dict({k: v for k, v in before.items() if k != "_growth_tracker"})
    with pytest.raises(ValueError, match="backoff_factor"):
        ls.load_state_dict({**before, "backoff_factor": 2.0})
    assert ls.state_dict() == before


# ---------------------------------------------------------------- one scaler, two accumulators (a GAN)

GAN_K = 4


def _gan_batch(i):
    g = torch.Generator().manual_seed(7 + i)
    return torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)


def _b_loss(model, i):
    x, y = _gan_batch(i)
    return ((model(x) - y) ** 2).mean()


def _gan_nets():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)


def _reference_b():
    """B alone, with a scaler nobody else moves: the scale its window was scaled with throughout."""
    from fusedaccum import GradAccumulator
    _, b = _gan_nets()
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    acc = GradAccumulator(b, GAN_K, max_norm=0.5, scaler=LossScaler(init_scale=2.0**10, growth_interval=1000))
    for i in range(GAN_K):
        acc.backward(_b_loss(b, i))
    assert not acc.step(opt).found_inf
    return b


def _a_overflows(acc_a, a, opt_a, shared):
    before = shared.get_scale()
    acc_a.backward(a(torch.ones(2, 4)).sum() * float("inf"))
    assert acc_a.step(opt_a).found_inf
    assert shared.get_scale() == before / 2  # A backed the shared scale off


@pytest.mark.parametrize("resume", [False, True], ids=["straight", "resumed-mid-window"])
def test_shared_scaler_backed_off_by_one_accumulator_mid_way_through_the_others_window(resume):
    from fusedaccum import GradAccumulator
    ref = _reference_b()
    a, b = _gan_nets()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    shared = LossScaler(init_scale=2.0**10, growth_interval=1000)
    acc_a = GradAccumulator(a, 1, scaler=shared)
    acc_b = GradAccumulator(b, GAN_K, max_norm=0.5, scaler=shared)
    acc_b.backward(_b_loss(b, 0))
    acc_b.backward(_b_loss(b, 1))
    _a_overflows(acc_a, a, opt_a, shared)  # B's window: 2 micro-batches at 2^10, the scaler now at 2^9
    if resume:
        state = acc_b.state_dict()
        acc_b.release()
        shared2 = LossScaler()  # a fresh process: the scale comes from the checkpoint (2^9)
        acc_b = GradAccumulator(b, GAN_K, max_norm=0.5, scaler=shared2)
        acc_b.load_state_dict(state)
        assert shared2.get_scale() == 2.0**9
    acc_b.backward(_b_loss(b, 2))
    acc_b.backward(_b_loss(b, 3))
    result = acc_b.step(opt_b)
    assert not result.found_inf
    # Before, the window (summed at 2^10) was unscaled by 2^9: B's gradient twice too big.
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), ref.parameters()))


def test_each_window_takes_the_scale_of_its_first_micro_batch():
    from fusedaccum import GradAccumulator
    a, b = _gan_nets()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    shared = LossScaler(init_scale=2.0**10, growth_interval=1000)
    acc_a, acc_b = GradAccumulator(a, 1, scaler=shared), GradAccumulator(b, 2, scaler=shared)
    acc_b.backward(_b_loss(b, 0))
    _a_overflows(acc_a, a, opt_a, shared)
    acc_b.backward(_b_loss(b, 1))
    assert acc_b._win.scale.item() == 2.0**10  # kept for the whole window
    acc_b.step(opt_b)
    acc_b.backward(_b_loss(b, 2))
    assert acc_b._win.scale.item() == 2.0**9  # the next window starts at the scaler's scale
    # The scaler's own tensor changes in place: the window's is a copy, not an alias.
    assert acc_b._win.scale.data_ptr() != shared.scale_tensor().data_ptr()
