"""The guards' own life cycle (fusedaccum/guards.py): memos that die with their optimizer, a
collection inside torch's hook loop, use after release(), and micro-batches left in a window
that no step used."""

import builtins
import gc
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fusedaccum import GradAccumulator, _optim, guards
from fusedaccum.guards import OpenWindowWarning

from test_guards import K, loss_of, make, same, snapshot


def _fake_id(monkeypatch, modules, reuse: dict):
    """Make ``id()`` in ``modules`` report the addresses in ``reuse`` (new object's id -> dead
    object's id): what CPython does when a new object lands where a dead one lived."""
    def fake(obj):
        return reuse.get(builtins.id(obj), builtins.id(obj))
    for m in modules:
        monkeypatch.setattr(m, "id", fake, raising=False)


def test_a_new_optimizer_at_a_dead_ones_address_is_still_guarded(monkeypatch):
    model, foreign = make(), make(seed=1)
    acc = GradAccumulator(model, K)
    old = torch.optim.SGD(foreign.parameters(), lr=0.1)  # steps no managed parameter
    loss_of(foreign, 0).backward()
    old.step()  # the guard memoises "not mine" for it
    dead = (id(old), id(old.param_groups[0]["params"]))
    del old
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # same number of parameters, managed ones
    _fake_id(monkeypatch, [guards, _optim], {id(opt): dead[0], id(opt.param_groups[0]["params"]): dead[1]})
    acc.backward(loss_of(model, 1))
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"acc\.step\(optimizer\)"):
        opt.step()  # keyed by id(), it inherited "not mine" and stepped with the raw sum
    assert same(before, snapshot(model, opt))
    acc.discard_window()


def test_check_optimizer_is_not_inherited_by_a_new_optimizer_at_a_dead_ones_address(monkeypatch):
    model, foreign = make(), make(seed=1)
    acc = GradAccumulator(model, 1)
    old = torch.optim.SGD(model.parameters(), lr=0.1)
    acc.backward(loss_of(model, 0))
    acc.step(old)  # checked: every parameter is managed
    dead = (id(old), id(old.param_groups[0]["params"]))
    del old
    params = list(model.parameters())[:-1] + [next(foreign.parameters())]  # one is not managed
    opt = torch.optim.SGD(params, lr=0.1)
    _fake_id(monkeypatch, [guards, _optim], {id(opt): dead[0], id(opt.param_groups[0]["params"]): dead[1]})
    acc.backward(loss_of(model, 1))
    with pytest.raises(ValueError, match="not managed by this GradAccumulator"):
        acc.step(opt)
    acc.discard_window()


def test_optimizer_memos_forget_an_optimizer_with_it():
    model = make()
    acc = GradAccumulator(model, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc.backward(loss_of(model, 0))
    acc.step(opt)
    opt.step()  # between windows: through the guard's hook
    assert len(acc._optimizers_checked) == 1 and len(acc._guard._managed) == 1
    del opt
    gc.collect()
    assert len(acc._optimizers_checked) == 0 and len(acc._guard._managed) == 0
    # A param list replaced by another of the same length is a new layout, not the memoised one.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc.backward(loss_of(model, 1))
    acc.step(opt)
    foreign = make(seed=1)
    opt.param_groups[0]["params"] = list(foreign.parameters())
    acc.backward(loss_of(model, 2))
    with pytest.raises(ValueError, match="not managed"):
        acc.step(opt)
    acc.discard_window()


def test_an_accumulator_collected_while_torch_runs_the_step_pre_hooks_breaks_no_step():
    model, other = make(), make(seed=1)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    acc = GradAccumulator(model, K)
    acc.cycle = acc  # only the cyclic collector frees it: when the hook below runs it
    def collect(*args):
        gc.collect()

    # A hook after it: torch's loop has one more next() to take on the hook dict after the collection.
    hooks = [register_optimizer_step_pre_hook(collect), register_optimizer_step_pre_hook(lambda *args: None)]
    gc.disable()
    try:
        del acc
        loss_of(other, 0).backward()
        opt.step()  # was: RuntimeError: OrderedDict mutated during iteration
    finally:
        gc.enable()
        for h in hooks:
            h.remove()
    assert opt.state[next(other.parameters())] is not None
    gc.collect()
    assert all(g._acc() is not None for g in guards._live)  # the collected one left the set


def test_an_accumulator_used_after_release_refuses():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradAccumulator(model, K)
    acc.release()
    with pytest.raises(RuntimeError, match=r"acc\.backward\(\): this GradAccumulator was released"):
        acc.backward(loss_of(model, 0))
    with pytest.raises(RuntimeError, match=r"acc\.step\(\): this GradAccumulator was released"):
        acc.step(opt, force=True)
    with pytest.raises(RuntimeError, match=r"acc\.accumulate\(\): this GradAccumulator was released"):
        with acc.accumulate(model):
            pass
    assert acc.micro_batches == 0


def _open_window_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, OpenWindowWarning)]


def test_micro_batches_left_in_an_open_window_warn_when_released_or_collected():
    model = make()
    acc = GradAccumulator(model, K)
    acc.backward(loss_of(model, 0))
    with pytest.warns(OpenWindowWarning, match=r"released with 1 micro-batch.*force=True"):
        acc.release()
    acc = GradAccumulator(model, K)
    acc.backward(loss_of(model, 0))
    acc.backward(loss_of(model, 1))
    with pytest.warns(OpenWindowWarning, match=r"garbage-collected with 2 micro-batch"):
        del acc
        gc.collect()


def test_closed_discarded_or_saved_windows_do_not_warn():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        acc = GradAccumulator(model, K)
        acc.backward(loss_of(model, 0))
        acc.step(opt, force=True)  # the partial last window, closed
        acc.release()
        acc = GradAccumulator(model, K)
        acc.backward(loss_of(model, 0))
        acc.discard_window()  # dropped on purpose
        del acc
        gc.collect()
        acc = GradAccumulator(model, K)
        acc.backward(loss_of(model, 0))
        state = acc.state_dict()  # in a checkpoint: not lost
        acc.release()
        acc = GradAccumulator(model, K)
        acc.load_state_dict(state)
        del acc
        gc.collect()
    assert _open_window_warnings(record) == []


def test_an_open_window_at_interpreter_exit_warns_once(monkeypatch):
    monkeypatch.setattr(guards, "_exiting", False)
    assert guards._at_exit_registered  # atexit.register(guards._at_exit) with the first guard
    model = make()
    acc = GradAccumulator(model, K)
    acc.backward(loss_of(model, 0))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        guards._at_exit()  # what atexit runs, before the interpreter tears the objects down
        del acc  # a collection during shutdown then stays silent: one warning per window
        gc.collect()
    assert [m for m in _open_window_warnings(record) if "1 micro-batch" in m] == [
        "a GradAccumulator is still alive at interpreter exit with 1 micro-batch(es) in a window that no optimizer "
        "step used: they are lost. Close a partial last window with acc.step(optimizer, force=True), or drop it "
        "on purpose with acc.discard_window()"]
