"""Flat gradient buckets: every parameter's ``.grad`` is a view into one contiguous buffer
per (device, dtype), so the fused ops touch a whole model in one launch per bucket.

A DTensor parameter (an FSDP2 shard) gets a DTensor ``.grad`` with the parameter's mesh,
placements and global shape, whose local tensor is the view: the bucket holds this rank's
local shard only (unpadded: an uneven shard's padding is never in a bucket)."""

import weakref
from dataclasses import dataclass, field

import torch

from . import _fold_hook
from ._dtensor import dtensor_type, replica_key
from ._reattach import _Reattach, remove_handles
from ._layout import _dense_layout
from .ops import GRAD_DTYPES, accumulate_

_OWNER_ATTR = "_fusedaccum_owner"  # on each parameter: a weak reference to its GradBuckets


def grad_dtype_supported() -> bool:
    """Whether this torch lets a parameter's ``.grad`` have another dtype than the parameter
    (``Tensor.grad_dtype``, torch 2.13): bf16/fp16 gradients can then be fp32 bucket views.
    Detected by the feature, not the version string."""
    return hasattr(torch.Tensor, "grad_dtype")


def _local(p: torch.Tensor, dtensor) -> torch.Tensor:
    """What the bucket holds of ``p``: its local shard for a DTensor, else ``p`` itself."""
    return p._local_tensor if dtensor is not None and isinstance(p, dtensor) else p


def _view_of(flat: torch.Tensor, off: int, p: torch.Tensor, dtensor) -> torch.Tensor:
    """``p``'s gradient as a view of ``flat`` from ``off``."""
    local = _local(p, dtensor)
    view = flat[off:off + local.numel()]
    # The parameter's own strides (channels_last, a transpose) where they are
    # dense: autograd and DDP expect a gradient laid out like its parameter.
    view = view.as_strided(local.shape, local.stride()) if _dense_layout(local) else view.view(local.shape)
    if local is not p:
        # FSDP2 adds each reduce-scattered shard into grad._local_tensor in place.
        view = dtensor.from_local(view, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                  run_check=False)
    return view


@dataclass(eq=False)
class Bucket:
    """The parameters of one device and dtype, and their flat gradient storage.

    ``views`` are what ``param.grad`` is set to (a DTensor around the view for a DTensor
    parameter). ``accum`` is the fp32 accumulation buffer. For fp32 parameters it is also where the
    gradients land (``param.grad`` are views into it, and autograd accumulates in place).
    For bf16/fp16 parameters the gradients land in ``landing`` (parameter dtype), which the
    accumulate kernel folds into ``accum``; or, ``direct``, straight in ``accum`` as for fp32
    (``param.grad_dtype`` is None; ``folded``: a large parameter on the CPU, whose hook adds its
    gradient, ``_fold_hook``), and the step rounds the processed gradient into ``step_out``
    (parameter dtype), which exists from the step until the next window starts. ``attached``:
    each ``param.grad`` between backwards (its view; None where folded).
    """

    device: torch.device
    dtype: torch.dtype
    params: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    numel: int = 0
    accum: torch.Tensor = None
    landing: "torch.Tensor | None" = None
    views: list = field(default_factory=list)
    direct: bool = False
    folded: list = field(default_factory=list)
    attached: list = field(default_factory=list)
    step_out: "torch.Tensor | None" = None
    step_views: list = field(default_factory=list)
    grad_dtypes: list = field(default_factory=list)  # direct: each parameter's grad_dtype before

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
    An owner that runs every backward meant for the parameters itself (GradAccumulator) calls
    ``defer_reattach()``: the hooks then only record, and ``settle()`` after each of its
    backwards does the rest, so no Python code runs per parameter per backward (but for
    the fold hooks of folded parameters).

    A parameter belongs to one GradBuckets at a time (another raises); ``release()`` gives
    them up, and so does dropping the GradBuckets (once garbage-collected, its hooks are
    removed; each ``param.grad`` still points at its view until replaced).

    ``direct`` (bf16/fp16 parameters): False (default) lands their gradients in a bucket of
    their dtype, folded into fp32 by ``fold_landing``; True makes their ``.grad`` fp32 views
    of ``accum`` (``param.grad_dtype = None``), so autograd adds each backward into fp32
    itself (a large one on the CPU: its hook, ``_fold_hook``; its ``.grad`` is None between
    backwards, so only ``zero_()`` resets its sum): no landing bucket (4 B of gradient per
    parameter, not 6). Needs
    ``Tensor.grad_dtype`` (``grad_dtype_supported()``) and no DTensor parameter; None: True
    where both hold. ``release()`` restores each parameter's ``grad_dtype``.
    """

    def __init__(self, params, *, accum_dtype: torch.dtype = torch.float32, direct: "bool | None" = False):
        if accum_dtype != torch.float32:
            raise ValueError(f"accum_dtype must be torch.float32, got {accum_dtype}")
        if direct and not grad_dtype_supported():
            raise RuntimeError(f"GradBuckets(direct=True) needs Tensor.grad_dtype, which torch {torch.__version__} "
                               "lacks: use direct=False (a landing bucket in the parameter dtype)")
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
        if direct and self.sharded:
            # FSDP2 writes each reduce-scattered shard into grad._local_tensor in its own dtype.
            raise ValueError("GradBuckets(direct=True) with DTensor (FSDP2) parameters: FSDP2 hands over "
                             "gradients in the parameter dtype; use direct=False")
        #: whether bf16/fp16 gradients go straight into the fp32 buckets (``direct``)
        self.direct = grad_dtype_supported() and not self.sharded if direct is None else bool(direct)

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
            b.direct = self.direct and b.dtype != torch.float32
            if b.dtype != torch.float32 and not b.direct:
                b.landing = torch.zeros(b.numel, dtype=b.dtype, device=b.device)
            for p, off in zip(b.params, b.offsets):
                view = _view_of(b.grads, off, p, dtensor)
                if p.grad is not None:
                    view.copy_(p.grad)
                fold = b.direct and _fold_hook.direct_arrival(b.device, view.numel()) == "hook"
                if b.direct:
                    # None, not float32: the step hands the optimizer param-dtype views, and
                    # autograd still adds into an fp32 .grad in place (checked in the tests).
                    b.grad_dtypes.append(p.grad_dtype)
                    p.grad = None
                    if not fold:
                        p.grad_dtype = None
                b.views.append(view)
                b.folded.append(fold)
                b.attached.append(None if fold else view)
        owner = weakref.ref(self)
        for p in unique:
            setattr(p, _OWNER_ATTR, owner)
        # The hooks live on the parameters: they must not hold self, or a GradBuckets dropped
        # without release() would never be collected and would keep its parameters owned.
        reattach = _Reattach([(p, view) for b in self.buckets for p, view in zip(b.params, b.views)])
        reattach.untracked.update(i for i, (p, _) in enumerate(reattach.pairs) if _local(p, dtensor) is not p)
        folds = _fold_hook.fold_hooks(reattach, self.buckets)
        reattach.folded.update(folds)
        self._reattach = reattach
        #: whether the hooks re-point at once (else ``settle()`` does, after the owner's backward)
        self.eager = True
        self._hooks = [p.register_post_accumulate_grad_hook(folds[i] if i in folds else reattach.hook(i, view))
                       for i, (p, view) in enumerate(reattach.pairs)]
        self._hooks += [reattach.pairs[i][0].register_hook(_fold_hook.steal) for i in folds]
        self._remove_hooks = weakref.finalize(self, remove_handles, self._hooks)
        self._watched: set = set()
        self.attach()

    def attach(self) -> None:
        """Point every ``param.grad`` at its view (again); None where folded."""
        for b in self.buckets:
            for p, want in zip(b.params, b.attached):
                if p.grad is not want:
                    p.grad = want

    def defer_reattach(self) -> None:
        """For an owner that runs every backward meant for these parameters itself, between
        ``mark()`` and ``settle()`` (GradAccumulator): each parameter's hook then only records
        that autograd reached it (a builtin ``list.append``, no Python frame: a hook per
        parameter per backward was most of the fixed cost of a small model's window), and
        ``settle()`` does the rest once per backward. A backward outside the owner's is still
        counted (``accumulations``), but not re-pointed. DTensor buckets and folded parameters
        keep their eager hooks."""
        if not self.eager or self.sharded:
            return
        r = self._reattach
        for i, (p, _) in enumerate(r.pairs):
            if i not in r.folded:
                self._hooks[i].remove()
                self._hooks[i] = p.register_post_accumulate_grad_hook(r.touched.append)
        self.eager = False

    def _versions(self) -> int:
        # Every in-place write through a view bumps its bucket's shared version counter once.
        return sum(b.grads._version for b in self.buckets)

    def mark(self):
        """Before a backward the owner runs (``eager=False``): what ``settle()`` compares with."""
        return None if self.eager else (len(self._reattach.touched), self._versions())

    def settle(self, mark) -> None:
        """After that backward: count it, mark its parameters used, and re-point what it
        replaced. Autograd adds into an attached ``.grad`` in place, one version bump per
        parameter: when the buckets moved by exactly as many bumps as parameters were reached,
        no ``.grad`` was replaced, and the per-parameter check is skipped. (Only a backward whose
        own hooks both replace one ``.grad`` and write another in place could offset the count:
        the replaced one is then re-pointed at its view by the next ``attach()``, as on main a
        ``.grad`` assigned between two backwards is.)"""
        if mark is None:
            return
        r, (n0, v0) = self._reattach, mark
        if self._versions() - v0 != len(r.touched) - n0 and r.reattach_all(r.touched[n0:]):
            r.zero_unattached()
        r.fold()

    def step_outputs(self) -> "list | None":
        """Where the step writes each bucket's processed gradient (``out=`` of the apply pass):
        None when every bucket is fp32 (in place); else per bucket its accum (fp32), its landing
        bucket, or for a direct bucket a new buffer of the parameter dtype (``step_out``: the
        optimizer wants param-dtype gradients; fused and foreach AdamW refuse fp32 ones for
        bf16 parameters), which ``param.grad`` then points at, until ``end_step()``."""
        if all(b.dtype == torch.float32 for b in self.buckets):
            return None
        for b in self.buckets:
            if b.direct and b.step_out is None:
                b.step_out = torch.empty(b.numel, dtype=b.dtype, device=b.device)
                b.step_views = [_view_of(b.step_out, off, p, None) for p, off in zip(b.params, b.offsets)]
            for p, view in zip(b.params, b.step_views):
                p.grad = view
        return [b.step_out if b.direct else b.grads for b in self.buckets]

    def end_step(self) -> None:
        """A new window starts (or this one is dropped): direct buckets free their step
        buffers, and ``param.grad`` are fp32 bucket views again, for autograd to add into
        (None where folded)."""
        if any(b.step_out is not None for b in self.buckets):
            for b in self.buckets:
                b.step_out, b.step_views = None, []
            self.attach()

    @torch.no_grad()
    def start_window(self) -> None:
        """A window's first backward is about to run: the processed gradient of the last step
        (in param.grad until now) makes way, and no parameter is used yet."""
        self.end_step()
        for b in self.buckets:
            if b.landing is None:
                b.accum.zero_()  # autograd accumulates into it in place
            else:
                b.landing.zero_()  # accum is reset lazily by fold_landing(first=True)
        self.reset_used()

    #: the norm partials the last ``fold_landing`` wrote (``fusedaccum._last_pass.LastPass``), or None
    last_pass = None

    def fold_landing(self, first: bool, sq_out: list, sq_weight=None, norm=None) -> None:
        """bf16/fp16 buckets, after a backward: ``accum (+)= landing``, ``landing = 0`` for the
        next backward, in one pass per bucket. ``first`` (the window's first backward): accum is
        overwritten, not read, which is the window's reset. With ``sq_weight``, each landing's
        weighted Σg² goes into ``sq_out[i]`` (the i-th low-precision bucket's slots). ``norm`` (a
        ``_last_pass.LastPass``): the same pass writes the norm partials of each finished sum."""
        self.last_pass = norm  # a later fold replaces what an earlier one wrote
        for i, b in enumerate(b for b in self.buckets if b.landing is not None):
            sq = {} if sq_weight is None else dict(sq_out=sq_out[i], sq_weight=sq_weight)
            if norm is not None:
                sq.update(norm.args(b))
            accumulate_(b.accum, b.landing, 1.0, zero_grad=True, overwrite=first, **sq)
            if norm is not None:
                norm.done(b, sq)

    @torch.no_grad()
    def zero_(self) -> None:
        """Zero every bucket (accumulation and landing buffers)."""
        self.end_step()
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
            for i, (p, view) in enumerate(zip(b.params, b.views)):
                if getattr(p, _OWNER_ATTR, lambda: None)() is self:
                    delattr(p, _OWNER_ATTR)
                if b.direct:
                    # The parameter's own grad_dtype again, so its gradient is in its dtype.
                    g, p.grad = p.grad, None
                    p.grad_dtype = b.grad_dtypes[i]
                    if g is None and b.folded[i]:
                        g = view  # between backwards its sum is in the view alone
                    ours = g is view or (b.step_views and g is b.step_views[i])
                    p.grad = None if g is None else g.to(p.dtype, copy=bool(ours))
                elif p.grad is view:
                    p.grad = view.clone()
            b.step_out, b.step_views = None, []

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
        r.mark_touched()
        return [u or i in r.untracked for i, u in enumerate(r.used)]

    def all_used(self) -> bool:
        """Whether ``used`` is all True (without building the list: the usual case, every step)."""
        r = self._reattach
        r.mark_touched()
        return all(r.used) or all(u or i in r.untracked for i, u in enumerate(r.used))

    def reset_used(self) -> None:
        self._reattach.fold()
        self._reattach.used[:] = [False] * len(self._reattach.used)

    @property
    def accumulations(self) -> int:
        """How many times autograd has accumulated a gradient into one of the parameters (a
        host-side counter, bumped by the post-accumulate-grad hooks)."""
        return self._reattach.accumulations + len(self._reattach.touched)

    def __iter__(self):
        return iter(self.buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    def __repr__(self) -> str:
        parts = ", ".join(f"{b.device}/{str(b.dtype).replace('torch.', '')}: {len(b.params)} params, "
                          f"{b.numel} elements" for b in self.buckets)
        return f"GradBuckets({parts})"
