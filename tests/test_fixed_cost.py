"""The window step's fixed cost: ``acc.backward`` runs no Python function per parameter.

GradAccumulator's buckets record autograd's accumulations with a builtin hook per parameter
(``list.append``, no Python frame) and settle them once per ``acc.backward``
(``GradBuckets.defer_reattach``, ``settle``). On the original main every parameter's hook was a
Python function, so the Python calls of one ``acc.backward`` grew with the number of parameter
tensors (148 per backward for GPT-2 small). The cases the per-parameter hook handled at once
are still handled, after the backward: a ``.grad`` replaced inside it is copied into its view.
"""

import sys

import torch

from fusedaccum import GradAccumulator
from fusedaccum.bench.workloads import NullOptimizer


def _python_calls(fn) -> int:
    """How many Python functions (not builtins) run inside ``fn()``."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _calls_per_backward(n_params: int) -> list:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(n_params)]
    acc = GradAccumulator(ps, 3, max_norm=1.0)
    opt = NullOptimizer(ps)

    def loss():
        return torch.stack([p.sum() for p in ps]).square().sum()

    calls = []
    for _ in range(2):  # two windows: the first backward of a window, then a later one
        for _ in range(3):
            x = loss()
            calls.append(_python_calls(lambda: acc.backward(x)))
        assert acc.step(opt) is not None
    assert all(acc.buckets.used) and acc.buckets.accumulations == 6 * n_params
    return calls


def test_python_calls_per_backward_do_not_grow_with_the_parameters():
    few, many = _calls_per_backward(4), _calls_per_backward(64)
    assert few == many, (few, many)


def test_a_grad_replaced_inside_acc_backward_is_copied_into_its_view():
    """A .grad set to None inside the backward (here by a tensor hook) is replaced by autograd
    with a new tensor: as the per-parameter hooks did at once, the new tensor (the whole
    gradient of that parameter now) overwrites its view, and .grad points at the view again."""
    w, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([3.0]))
    acc = GradAccumulator([w, b], 4)
    view_w = acc.buckets.buckets[0].views[0]
    x = torch.tensor([5.0, 7.0])
    acc.backward((w * x).sum() + b.sum())
    assert torch.equal(w.grad, x) and w.grad is view_w

    def drop(grad):
        w.grad = None
        return grad

    handle = w.register_hook(drop)
    acc.backward((w * 2 * x).sum() + b.sum())
    handle.remove()
    assert w.grad is view_w and torch.equal(view_w, 2 * x)
    assert torch.equal(b.grad, torch.tensor([2.0]))  # b accumulated in place as usual
    assert acc.buckets.used == [True, True] and acc.micro_batches == 2
    acc.discard_window()
