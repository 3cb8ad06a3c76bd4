"""Flat gradient buckets: every parameter's ``.grad`` is a view into one contiguous buffer
per (device, dtype), so the fused ops touch a whole model in one launch per bucket.

A DTensor parameter (an FSDP2 shard) gets a DTensor ``.grad`` with the parameter's mesh,
placements and global shape, whose local tensor is the view: the bucket holds this rank's
local shard only (unpadded: an uneven shard's padding is never in a bucket)."""

import weakref
from dataclasses import dataclass, field

import torch

from ._dtensor import dtensor_type, replica_key
from .ops import GRAD_DTYPES, _dense_layout, accumulate_

_OWNER_ATTR = "_fusedaccum_owner"  # on each parameter: a weak reference to its GradBuckets
# Which backward is running (torch's register_multi_grad_hook uses it too). A torch without it
# gets a fresh object each time: the end-of-backward callback is then queued per re-attach.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", object)


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

    @torch.no_grad()
    def zero_unattached(self) -> None:
        """End of a backward that found detached gradients: a parameter whose grad is still
        None (zero_grad, then no gradient this time) reads zero in the bucket."""
        self.queued_for = None
        for p, view in self.pairs:
            if p.grad is None:
                view.zero_()


def _remove_handles(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


def _local(p: torch.Tensor, dtensor) -> torch.Tensor:
    """What the bucket holds of ``p``: its local shard for a DTensor, else ``p`` itself."""
    return p._local_tensor if dtensor is not None and isinstance(p, dtensor) else p


@dataclass(eq=False)
class Bucket:
    """The parameters of one device and dtype, and their flat gradient storage.

    ``views`` are what ``param.grad`` is set to (a DTensor around the view for a DTensor
    parameter). ``accum`` is the fp32 accumulation buffer. For fp32 parameters it is also where the
    gradients land (``param.grad`` are views into it, and autograd accumulates in place).
    For bf16/fp16 parameters the gradients land in ``landing`` (parameter dtype), which the
    accumulate kernel folds into ``accum``.
    """

    device: torch.device
    dtype: torch.dtype
    params: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    numel: int = 0
    accum: torch.Tensor = None
    landing: "torch.Tensor | None" = None
    views: list = field(default_factory=list)

    @property
    def grads(self) -> torch.Tensor:
        """The flat buffer that ``param.grad`` are views of."""
        return self.accum if self.landing is None else self.landing


class GradBuckets:
    """Allocate flat gradient buckets for ``params`` and attach ``param.grad`` as views.

    Parameters without ``requires_grad`` are skipped; a parameter listed twice is kept once;
    parameters on several devices or of several dtypes get one bucket per (device, dtype)
    (and, for DTensor parameters, per set of mesh dimensions they are replicated along).
    A gradient a parameter already holds is copied into its view.

    ``optimizer.zero_grad()`` (``set_to_none=True`` by default) would detach the views; a
    post-accumulate-grad hook on every parameter re-attaches them: a detached parameter's
    fresh gradient overwrites its view (what ``zero_grad`` meant, for that parameter only,
    so ``set_to_none`` on some parameters or a replaced ``.grad`` work too), and at the end
    of that backward the views of parameters whose grad is still None are zeroed. Until
    a backward reaches one of its parameters the bucket keeps the old values: read it
    through ``param.grad``, or call ``zero_()``. With ``backward(create_graph=True)`` the
    views hold the values but no graph (no double backward through ``param.grad``).

    A parameter belongs to one GradBuckets at a time (another raises); ``release()`` gives
    them up, and so does dropping the GradBuckets (once garbage-collected, its hooks are
    removed; each ``param.grad`` still points at its view until replaced).
    """

    def __init__(self, params, *, accum_dtype: torch.dtype = torch.float32):
        if accum_dtype != torch.float32:
            raise ValueError(f"accum_dtype must be torch.float32, got {accum_dtype}")
        if isinstance(params, torch.Tensor):
            params = [params]
        seen, unique = set(), []
        for i, p in enumerate(params):
            if isinstance(p, dict):  # an optimizer param group
                raise TypeError("params must be tensors; pass model.parameters() or a list of tensors, "
                                "not optimizer param groups")
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
            if not p.requires_grad or id(p) in seen:
                continue
            if p.dtype not in GRAD_DTYPES:
                raise TypeError(f"params[{i}] (shape {tuple(p.shape)}) has dtype {p.dtype}; "
                                "supported: float32, bfloat16, float16")
            if p.is_sparse:
                raise TypeError(f"params[{i}] is sparse; only dense parameters are supported")
            owner = getattr(p, _OWNER_ATTR, None)
            if owner is not None and owner() is not None:
                # Two owners would re-point and zero each other's views on every backward.
                raise ValueError(
                    f"params[{i}] (shape {tuple(p.shape)}) already belongs to another GradBuckets "
                    "(e.g. a GradAccumulator built earlier over the same model): call .release() on "
                    "that one first")
            seen.add(id(p))
            unique.append(p)
        if not unique:
            raise ValueError("no parameter requires grad")
        dtensor = dtensor_type()
        #: whether the buckets hold shards of DTensor parameters (FSDP2)
        self.sharded = dtensor is not None and any(isinstance(p, dtensor) for p in unique)

        groups: dict = {}
        for p in unique:
            # DTensor parameters also by the mesh dims they are replicated along (tensor parallel:
            # a norm weight beside Colwise/Rowwise shards): each bucket's norm is counted once or not.
            key = (p.device, p.dtype, replica_key(p))
            if key not in groups:
                groups[key] = Bucket(device=p.device, dtype=p.dtype)
            b = groups[key]
            b.params.append(p)
            b.offsets.append(b.numel)
            b.numel += _local(p, dtensor).numel()
        self.buckets: list[Bucket] = list(groups.values())
        for b in self.buckets:
            b.accum = torch.zeros(b.numel, dtype=torch.float32, device=b.device)
            if b.dtype != torch.float32:
                b.landing = torch.zeros(b.numel, dtype=b.dtype, device=b.device)
            for p, off in zip(b.params, b.offsets):
                local = _local(p, dtensor)
                view = b.grads[off:off + local.numel()]
                # The parameter's own strides (channels_last, a transpose) where they are
                # dense: autograd and DDP expect a gradient laid out like its parameter.
                dense = _dense_layout(local)
                view = view.as_strided(local.shape, local.stride()) if dense else view.view(local.shape)
                if local is not p:
                    # FSDP2 adds each reduce-scattered shard into grad._local_tensor in place.
                    view = dtensor.from_local(view, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                              run_check=False)
                if p.grad is not None:
                    view.copy_(p.grad)
                b.views.append(view)
        owner = weakref.ref(self)
        for p in unique:
            setattr(p, _OWNER_ATTR, owner)
        # The hooks live on the parameters: they must not hold self, or a GradBuckets dropped
        # without release() would never be collected and would keep its parameters owned.
        reattach = _Reattach([(p, view) for b in self.buckets for p, view in zip(b.params, b.views)])
        reattach.untracked.update(i for i, (p, _) in enumerate(reattach.pairs) if _local(p, dtensor) is not p)
        self._reattach = reattach
        self._hooks = [p.register_post_accumulate_grad_hook(reattach.hook(i, view))
                       for i, (p, view) in enumerate(reattach.pairs)]
        self._remove_hooks = weakref.finalize(self, _remove_handles, self._hooks)
        self._watched: set = set()
        self.attach()

    def attach(self) -> None:
        """Point every ``param.grad`` at its view (again)."""
        for b in self.buckets:
            for p, view in zip(b.params, b.views):
                if p.grad is not view:
                    p.grad = view

    @torch.no_grad()
    def start_window(self) -> None:
        """A window's first backward is about to run: the processed gradient of the last step
        (in param.grad until now) makes way, and no parameter is used yet."""
        for b in self.buckets:
            if b.landing is None:
                b.accum.zero_()  # autograd accumulates into it in place
            else:
                b.landing.zero_()  # accum is reset lazily by fold_landing(first=True)
        self.reset_used()

    def fold_landing(self, first: bool, sq_out: list, sq_weight=None) -> None:
        """bf16/fp16 buckets, after a backward: ``accum (+)= landing``, ``landing = 0`` for the
        next backward, in one pass per bucket. ``first`` (the window's first backward): accum is
        overwritten, not read, which is the window's reset. With ``sq_weight``, each landing's
        weighted Σg² goes into ``sq_out[i]`` (the i-th low-precision bucket's slots)."""
        for i, b in enumerate(b for b in self.buckets if b.landing is not None):
            sq = {} if sq_weight is None else dict(sq_out=sq_out[i], sq_weight=sq_weight)
            accumulate_(b.accum, b.landing, 1.0, zero_grad=True, overwrite=first, **sq)

    @torch.no_grad()
    def zero_(self) -> None:
        """Zero every bucket (accumulation and landing buffers)."""
        for b in self.buckets:
            b.accum.zero_()
            if b.landing is not None:
                b.landing.zero_()

    def release(self) -> None:
        """Give the parameters up: remove the hooks and the ownership mark, so another
        GradBuckets may take them. Each ``param.grad`` keeps its current values as its own
        tensor, detached from the buckets."""
        self._remove_hooks()
        for b in self.buckets:
            for p, view in zip(b.params, b.views):
                if getattr(p, _OWNER_ATTR, lambda: None)() is self:
                    delattr(p, _OWNER_ATTR)
                if p.grad is view:
                    p.grad = view.clone()

    @property
    def params(self) -> list:
        return [p for b in self.buckets for p in b.params]

    def watch(self, tensors) -> None:
        """Count autograd accumulations into ``tensors`` too: parameters that stand in for the
        managed ones in the backward (FSDP2's unsharded parameters), for the guards. An item
        may be a pair ``(stand_in, param)``: an accumulation into the stand-in then also marks
        ``param`` used (``used``)."""
        index = {id(p): i for i, (p, _) in enumerate(self._reattach.pairs)}
        for t in tensors:
            t, p = t if isinstance(t, tuple) else (t, None)
            if id(t) not in self._watched:
                self._watched.add(id(t))
                i = None if p is None else index.get(id(p))
                self._reattach.untracked.discard(i)
                hook = self._reattach.count if i is None else self._reattach.count_for(i)
                self._hooks.append(t.register_post_accumulate_grad_hook(hook))

    @property
    def used(self) -> list:
        """Per parameter (in ``params`` order), whether autograd accumulated a gradient into it
        (or into a watched stand-in) since ``reset_used()``: host bools, set by the hooks. A
        DTensor parameter without a watched stand-in always reads True (nothing can tell)."""
        r = self._reattach
        return [u or i in r.untracked for i, u in enumerate(r.used)]

    def reset_used(self) -> None:
        self._reattach.used[:] = [False] * len(self._reattach.used)

    @property
    def accumulations(self) -> int:
        """How many times autograd has accumulated a gradient into one of the parameters (a
        host-side counter, bumped by the post-accumulate-grad hooks)."""
        return self._reattach.accumulations

    def __iter__(self):
        return iter(self.buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    def __repr__(self) -> str:
        parts = ", ".join(f"{b.device}/{str(b.dtype).replace('torch.', '')}: {len(b.params)} params, "
                          f"{b.numel} elements" for b in self.buckets)
        return f"GradBuckets({parts})"
