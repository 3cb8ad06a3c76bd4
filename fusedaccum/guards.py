"""Guards against the training-loop mistakes that would otherwise corrupt a window silently.

Each check costs host-side bookkeeping only (integer counters and tensor version counters):
no kernel launch, no host-device sync. What is caught, and when (docs/guide.md, "Misuses"):

- a backward that reaches the managed parameters outside ``acc.backward`` (``loss.backward()``
  inside ``accumulate``): the buckets' post-accumulate-grad hooks count every accumulation,
  and the accumulator knows how many its own backwards made; the next ``backward``, ``step``
  or ``optimizer.step()`` raises;
- ``optimizer.step()`` called directly on an optimizer over managed parameters while a window
  is open (or closed but not yet stepped): a global optimizer step pre-hook raises before the
  optimizer changes anything;
- the window's sum changed in place between two accumulator calls (for example
  ``optimizer.zero_grad(set_to_none=False)`` inside a window, which zeroes the fp32 buckets
  that hold the sum): the buckets' version counters moved; the next call raises.

Also: a loss that reaches none of the managed parameters is refused before the window counts
it; a backward that raised half-way is named as such at the next call; an accumulator used
after ``release()`` refuses; micro-batches left in a window that no step used warn when the
accumulator is released, collected or still alive at interpreter exit.

After such an error the window is no longer the sum of its micro-batches: ``acc.discard_window()``
drops it (or fix the loop and start over).

One optimizer step pre-hook serves every live guard (a weak set): a guard that goes away, even
when the garbage collector takes it while torch iterates its pre-hooks, only leaves the set,
so torch's hook dict is never changed from inside a collection ("OrderedDict mutated during
iteration"). The hook is removed when ``release()`` leaves no guard alive.
"""

import atexit
import contextlib
import warnings
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ._optim import OptimizerMemo

__all__ = ["OpenWindowWarning", "WindowGuard"]


class OpenWindowWarning(UserWarning):
    """Micro-batches were accumulated into a window that no optimizer step used."""


_live: "weakref.WeakSet" = weakref.WeakSet()  # every WindowGuard not released
_hook = None  # the one optimizer step pre-hook, while a guard may need it
_exiting = False  # set by the atexit check: the collections that follow warn no more
_at_exit_registered = False


def _before_any_step(optimizer, args, kwargs):
    for guard in list(_live):
        guard.before_optimizer_step(optimizer)


def _at_exit() -> None:
    global _exiting
    _exiting = True
    for guard in list(_live):
        acc = guard._acc()
        if acc is not None:
            guard.warn_if_open(acc, "is still alive at interpreter exit", stacklevel=2)


def _enlist(guard) -> None:
    global _hook, _at_exit_registered
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_before_any_step)
    if not _at_exit_registered:
        atexit.register(_at_exit)
        _at_exit_registered = True
    _live.add(guard)


def _optimizer_params(optimizer):
    for group in optimizer.param_groups:
        yield from group["params"]


class WindowGuard:
    """The accumulator's side of the guards. It holds the accumulator weakly (the global
    optimizer hook must not keep it alive) and asks it only ``window_open()``."""

    def __init__(self, accumulator, buckets, sums: "list[torch.Tensor]"):
        self._acc = weakref.ref(accumulator)
        self._buckets = buckets
        buckets.defer_reattach()  # backward() settles each of acc.backward's backwards
        self._param_ids = {id(p) for p in buckets.params}
        # The tensors whose in-place changes mean the window's sum changed: the fp32 buckets that
        # param.grad are views of (landing buckets are zero between backwards: erasing them is harmless).
        self._sums = list(sums)
        self._versions = None
        self._seen_accumulations = buckets.accumulations
        self._stepping = False
        self._managed = OptimizerMemo()  # optimizer -> whether it steps managed params
        self._failed = None  # what the last acc.backward raised after reaching the buckets
        self._released = False
        self._saved = False  # the open window is in a state dict (saved, or loaded from one)
        _enlist(self)

    # ------------------------------------------------------------------ bookkeeping by the accumulator
    def sync(self, saved: bool = False) -> None:
        """The accumulator has just written the buckets itself: this is the state to expect.
        ``saved``: the window is also in a state dict (loaded from one)."""
        self._seen_accumulations = self._buckets.accumulations
        self._versions = [t._version for t in self._sums]
        self._failed = None
        self._saved = saved

    def saved(self) -> None:
        """``state_dict()`` took the window: left open, it is not lost, so no warning."""
        self._saved = True

    def check_released(self, where: str) -> None:
        if self._released:
            raise RuntimeError(f"{where}: this GradAccumulator was released (release()): it no longer owns "
                               "its parameters' gradients and its guards are off. Build a new GradAccumulator")

    def check(self, where: str) -> None:
        """Raise if something outside the accumulator changed the window since ``sync()``."""
        self.check_released(where)
        if self._buckets.accumulations != self._seen_accumulations:
            if self._failed is not None:
                raise RuntimeError(
                    f"{where}: the previous acc.backward() raised inside the backward ({self._failed}) after "
                    "part of its gradient had reached the buckets: the window is no longer the sum of its "
                    "micro-batches. acc.discard_window() drops it (zeroes the buckets and the counts); then "
                    "go on")
            raise RuntimeError(
                f"{where}: a backward reached this GradAccumulator's parameters outside acc.backward() "
                "(e.g. loss.backward() inside the loop): its gradient went into the window without being "
                "counted, so the window is no longer the sum of its micro-batches. Call acc.backward(loss) "
                "instead, then acc.discard_window() to drop the damaged window (or start over). A backward "
                "that must reach these parameters for another purpose needs them detached or "
                "requires_grad_(False) meanwhile")
        acc = self._acc()
        if self._versions is not None and acc is not None and acc.micro_batches > 0:
            if [t._version for t in self._sums] != self._versions:
                raise RuntimeError(
                    f"{where}: the gradient buckets were modified in place inside a window, so the window's "
                    "sum is lost. Clipping param.grad inside a window (torch.nn.utils.clip_grad_norm_ or "
                    "clip_grad_value_ before acc.step) does this: pass max_norm= to GradAccumulator instead, "
                    "which clips the window's normalized sum at the step as for one large batch. So does "
                    "optimizer.zero_grad(set_to_none=False) (use zero_grad(), harmless anywhere, or none) or "
                    "any in-place op on param.grad between two micro-batches. acc.discard_window() drops the "
                    "damaged window")

    @contextlib.contextmanager
    def backward(self):
        """Around the autograd backward of ``acc.backward``: a loss that reached no managed
        parameter raises before the window counts it; a backward that raised after reaching
        some is remembered, for the next call's error."""
        before, mark = self._buckets.accumulations, self._buckets.mark()
        try:
            yield
        except BaseException as exc:
            if self._buckets.accumulations != before:
                self._failed = f"{type(exc).__name__}: {exc}"
            raise
        self._buckets.settle(mark)
        if self._buckets.accumulations == before:
            raise ValueError(
                "acc.backward(loss): the loss reaches none of this GradAccumulator's parameters (its backward "
                "accumulated no gradient into them): the window would count a micro-batch with a zero "
                "gradient. Was it computed from another model, or from detached outputs? Nothing was counted")

    @contextlib.contextmanager
    def stepping(self):
        """Context in which ``optimizer.step()`` is the accumulator's own call."""
        self._stepping = True
        try:
            yield
        finally:
            self._stepping = False

    def warn_if_open(self, acc, how: str, stacklevel: int) -> None:
        if acc.window_open() and not self._saved:
            warnings.warn(
                f"a GradAccumulator {how} with {acc.micro_batches} micro-batch(es) in a window that no optimizer "
                "step used: they are lost. Close a partial last window with acc.step(optimizer, force=True), "
                "or drop it on purpose with acc.discard_window()", OpenWindowWarning, stacklevel=stacklevel + 1)

    def dropped(self, acc) -> None:
        """``acc`` is being garbage-collected (its ``__del__``)."""
        if not self._released and not _exiting:
            self.warn_if_open(acc, "was garbage-collected", stacklevel=2)

    def release(self) -> None:
        global _hook
        acc = self._acc()
        if not self._released and acc is not None:
            self.warn_if_open(acc, "was released", stacklevel=3)  # the user's acc.release()
        self._released = True
        _live.discard(self)
        if not _live and _hook is not None:
            # A user's call, not a collection inside torch's hook loop: the dict may change here.
            _hook.remove()
            _hook = None

    # ------------------------------------------------------------------ the optimizer hook
    def _steps_managed(self, optimizer) -> bool:
        known = self._managed.get(optimizer)
        if known is None:
            known = any(id(p) in self._param_ids for p in _optimizer_params(optimizer))
            self._managed.set(optimizer, known)
        return known

    def before_optimizer_step(self, optimizer) -> None:
        if self._stepping or not self._steps_managed(optimizer):
            return
        acc = self._acc()
        if acc is None:
            return
        self.check(f"{type(optimizer).__name__}.step()")
        if acc.window_open():
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() was called directly while this GradAccumulator's window "
                f"holds {acc.micro_batches} micro-batch(es) not yet normalized, unscaled or clipped: it would "
                "step with the raw sum. Call acc.step(optimizer) instead (it returns None until the window "
                "is full; step(optimizer, force=True) closes a partial one). Nothing was changed")

