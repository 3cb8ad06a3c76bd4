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

After such an error the window is no longer the sum of its micro-batches: ``acc.discard_window()``
drops it (or fix the loop and start over).
"""

import contextlib
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["WindowGuard"]


def _optimizer_params(optimizer):
    for group in optimizer.param_groups:
        yield from group["params"]


class WindowGuard:
    """The accumulator's side of the guards. It holds the accumulator weakly (the global
    optimizer hook must not keep it alive) and asks it only ``window_open()``."""

    def __init__(self, accumulator, buckets, sums: "list[torch.Tensor]"):
        self._acc = weakref.ref(accumulator)
        self._buckets = buckets
        self._param_ids = {id(p) for p in buckets.params}
        # The tensors whose in-place changes mean the window's sum changed: the fp32 buckets that
        # param.grad are views of (landing buckets are zero between backwards: erasing them is harmless).
        self._sums = list(sums)
        self._versions = None
        self._seen_accumulations = buckets.accumulations
        self._stepping = False
        self._managed: dict = {}  # id(optimizer) -> (param-group signature, whether it steps managed params)
        handle = register_optimizer_step_pre_hook(_pre_step_hook(weakref.ref(self)))
        self._finalizer = weakref.finalize(self, handle.remove)

    # ------------------------------------------------------------------ bookkeeping by the accumulator
    def sync(self) -> None:
        """The accumulator has just written the buckets itself: this is the state to expect."""
        self._seen_accumulations = self._buckets.accumulations
        self._versions = [t._version for t in self._sums]

    def check(self, where: str) -> None:
        """Raise if something outside the accumulator changed the window since ``sync()``."""
        if self._buckets.accumulations != self._seen_accumulations:
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
                    f"{where}: the gradient buckets were modified in place inside a window (e.g. "
                    "optimizer.zero_grad(set_to_none=False), or an in-place op on param.grad, between two "
                    "micro-batches): the window's sum is lost. Use optimizer.zero_grad() (set_to_none=True, "
                    "harmless anywhere) or none at all; acc.discard_window() drops the damaged window")

    @contextlib.contextmanager
    def stepping(self):
        """Context in which ``optimizer.step()`` is the accumulator's own call."""
        self._stepping = True
        try:
            yield
        finally:
            self._stepping = False

    def release(self) -> None:
        self._finalizer()

    # ------------------------------------------------------------------ the optimizer hook
    def _steps_managed(self, optimizer) -> bool:
        signature = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        known = self._managed.get(id(optimizer))
        if known is None or known[0] != signature:
            known = (signature, any(id(p) in self._param_ids for p in _optimizer_params(optimizer)))
            self._managed[id(optimizer)] = known
        return known[1]

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


def _pre_step_hook(guard_ref):
    def hook(optimizer, args, kwargs):
        guard = guard_ref()
        if guard is not None:
            guard.before_optimizer_step(optimizer)

    return hook
