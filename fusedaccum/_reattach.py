"""The post-accumulate-grad hooks' shared state for GradBuckets: re-pointing a detached
``param.grad`` at its bucket view, counting autograd's accumulations (for the guards) and
marking which parameters got a gradient (for the unused-parameter semantics). Eagerly, one
Python hook per parameter; deferred (``GradBuckets.defer_reattach``), a builtin ``list.append``
per parameter whose records the owner settles once per backward."""

import torch

# Which backward is running (torch's register_multi_grad_hook uses it too). A torch without it
# gets a fresh object each time: the end-of-backward callback is then queued per re-attach.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", object)


def remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


class _Reattach:
    """The post-accumulate-grad hooks' shared state. It holds no reference to the GradBuckets
    (the hooks live on the parameters, and must not keep it alive)."""

    def __init__(self, pairs: list):
        self.pairs = pairs  # (param, view) of every bucket
        # The backward whose end callback is queued: a backward that raised never ran its
        # callback, so a flag would stay set and skip the zeroing in every later backward.
        self.queued_for = None
        # Every autograd accumulation into a parameter, counted: the accumulator compares it with
        # the count its own backwards made to catch a backward that bypassed it (fusedaccum.guards).
        self.accumulations = 0
        # Which parameters (by index into pairs) autograd accumulated into since reset_used():
        # a parameter with none in a window gets no gradient at the step, as in a large batch.
        self.used = [False] * len(pairs)
        # DTensor (FSDP2) parameters get their gradient from FSDP2, not from autograd: they count
        # as used unless a watched stand-in (their unsharded parameter) tells.
        self.untracked: set = set()
        # Deferred mode: every parameter autograd accumulated into since the last settle(), appended
        # by the hook itself (list.append: no Python frame per parameter).
        self.touched: list = []
        self.index = {id(p): i for i, (p, _) in enumerate(pairs)}
        # Parameters whose fold hook adds their gradient into the view (``_fold_hook``): ``.grad``
        # None between backwards is their attached state.
        self.folded: set = set()

    def count(self, _tensor) -> None:
        self.accumulations += 1

    def count_for(self, i: int):
        """A watch hook that also marks parameter ``i`` used (its stand-in got a gradient)."""
        def count(_tensor) -> None:
            self.accumulations += 1
            self.used[i] = True

        return count

    def hook(self, i: int, view: torch.Tensor):
        def reattach(p: torch.Tensor) -> None:
            self.accumulations += 1
            self.used[i] = True
            if p.grad is view:
                return
            # p.grad was set to None (zero_grad) or replaced: what it holds now is the whole
            # gradient of p, so it overwrites p's view, and only p's.
            with torch.no_grad():
                view.copy_(p.grad)
            p.grad = view
            task = _graph_task_id()
            if self.queued_for != task:
                self.queued_for = task
                torch.autograd.Variable._execution_engine.queue_callback(self.zero_unattached)

        return reattach

    def reattach_all(self, params) -> bool:
        """What the eager hooks do at once, after the fact, for ``params``: a replaced grad is
        copied into its view and re-pointed. Returns whether one was."""
        replaced = False
        for p in params:
            view = self.pairs[self.index[id(p)]][1]
            if p.grad is not view and p.grad is not None:
                with torch.no_grad():
                    view.copy_(p.grad)
                p.grad = view
                replaced = True
        return replaced

    def mark_touched(self) -> None:
        """Mark the parameters in the deferred hooks' records used."""
        if self.touched and not all(self.used):
            ids = set(map(id, self.touched))
            if len(ids) == len(self.pairs):  # deferred hooks are on these parameters only: all reached
                self.used[:] = [True] * len(ids)
                return
            for i, (p, _) in enumerate(self.pairs):
                if id(p) in ids:
                    self.used[i] = True

    def fold(self) -> None:
        """Mark the records' parameters used and move their count into ``accumulations``."""
        self.mark_touched()
        self.accumulations += len(self.touched)
        self.touched.clear()

    @torch.no_grad()
    def zero_unattached(self) -> None:
        """End of a backward that found detached gradients: a parameter whose grad is still
        None (zero_grad, then no gradient this time) reads zero in the bucket."""
        self.queued_for = None
        for i, (p, view) in enumerate(self.pairs):
            if p.grad is None and i not in self.folded:
                view.zero_()
