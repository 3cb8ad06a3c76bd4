"""The public fused ops: validate, then run the implementation ``_backend`` picks.

Every check happens before anything is written, so a rejected call changes nothing.
None of these ops synchronises with the host (except ``clip_grad_norm_`` with
``error_if_nonfinite=True``, which must look at the norm, as torch's does).
"""

import functools
import math
import struct
import types
import warnings
from collections.abc import Iterable

import torch

from . import _backend
from ._layout import GRAD_DTYPES, _covering_buckets
from ._partials import OwedApply, _pad_slots, check_given, check_norm_out, merged  # noqa: F401 (re-exported)

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s
_FP32 = struct.Struct("f")


def _check_flat(t, name: str, dtypes=GRAD_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected {allowed}")
    if t.is_sparse or not t.is_contiguous():
        raise ValueError(f"{name} must be a dense contiguous tensor (shape {tuple(t.shape)}, strides {t.stride()})")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Memory ranges, not storages: two storages can share memory (torch.from_numpy of one
    # array twice, storages made from one pointer).
    if torch.compiler.is_compiling():
        return False  # a traced tensor has no address (docs/kernels.md, "Custom ops")
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _fp32(value: float) -> float:
    """value rounded to fp32, as the kernels read it (beyond the fp32 range: +-inf), so a
    Python number and the same number as a float64 tensor mean the same in both backends."""
    if torch.compiler.is_compiling():
        return value  # maybe symbolic there; the kernels round it as they read it (docs/kernels.md, "Custom ops")
    try:  # a C cast to float, rounding to nearest: numpy.float32's, at a tenth of its cost
        return _FP32.unpack(_FP32.pack(value))[0]
    except OverflowError:  # it rounds to +-inf
        return math.copysign(math.inf, value)


def _number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "cpu":
        raise TypeError(f"{name} must be a Python number or a CPU tensor (reading a device tensor would sync)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def _scalar(value, name: str, device: torch.device):
    """A float (rounded to fp32), or a one-element fp32 tensor on ``device`` (read by the
    kernel: no sync)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a float or a one-element real tensor, "
                             f"got shape {tuple(value.shape)} dtype {value.dtype}")
        if value.device == device:
            return value.reshape(()).to(torch.float32)
        if value.device.type == "cpu":
            return _fp32(float(value))  # a host tensor: reading it does not wait for the device
        raise ValueError(f"{name} is on {value.device}, the buckets on {device}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    return _fp32(float(value))


def _norm_order(norm_type) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}") from None
    if not p > 0:  # also rejects NaN
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    return p


@torch.no_grad()
def accumulate_(acc: torch.Tensor, grad: torch.Tensor, scale=1.0, *, zero_grad: bool = False,
                overwrite: bool = False, sq_out: "torch.Tensor | None" = None, sq_weight=1.0,
                norm_out: "torch.Tensor | None" = None, norm_slot: int = 0, inv_scale=1.0, norm_type=2.0,
                norm_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``acc += grad * scale`` in one pass; returns ``acc``.

    acc: contiguous fp32 tensor. grad: contiguous fp32/bf16/fp16 tensor with as many
    elements (any shape), on the same device. scale: float or one-element tensor.
    ``zero_grad=True`` also writes zeros into ``grad`` in the same pass (for a landing
    bucket that the next backward accumulates into). ``overwrite=True`` computes
    ``acc = grad * scale`` without reading ``acc`` (the first micro-batch of a window).
    ``sq_out`` (fp32, contiguous, ``sq_slots(acc)`` slots, e.g. zeros): the same pass adds
    ``sq_weight * Σ grad²`` (of grad as given, before ``zero_grad``) into its slots, or sets
    them to it with ``overwrite``; ``sq_out.sum()`` is the running total. ``sq_weight``: a
    float or a one-element tensor. Used by the gradient noise scale (``fusedaccum.signals``).
    ``norm_out`` (fp32 ``[5, slots]``): the same pass also writes the norm partials of the
    finished ``acc`` into its columns ``norm_slot`` to ``norm_slot + sq_slots(acc) - 1``, the
    same bits as the norm pass of ``unscale_clip_(acc, inv_scale, norm_type=norm_type)`` with
    the result stored as ``norm_dtype`` (a window's last accumulate pass: the step needs no norm
    pass over ``acc``; docs/kernels.md).
    """
    _check_flat(acc, "acc", (torch.float32,))
    _check_flat(grad, "grad")
    if grad.device != acc.device:
        raise ValueError(f"acc is on {acc.device} but grad on {grad.device}")
    if grad.numel() != acc.numel():
        raise ValueError(f"acc has {acc.numel()} elements but grad has {grad.numel()}")
    if _overlap(acc, grad):
        raise ValueError("acc and grad overlap in memory")
    s = _scalar(scale, "scale", acc.device)
    extra = {}
    if sq_out is not None:
        _check_flat(sq_out, "sq_out", (torch.float32,))
        if sq_out.device != acc.device or sq_out.numel() == 0:
            raise ValueError(f"sq_out must hold at least one element on {acc.device}, got {sq_out.numel()} on "
                             f"{sq_out.device}")
        if _overlap(sq_out, acc) or _overlap(sq_out, grad):
            raise ValueError("sq_out overlaps acc or grad in memory")
        extra.update(sq_out=sq_out.view(-1), sq_weight=_scalar(sq_weight, "sq_weight", acc.device))
    if norm_out is not None:
        slots = sq_slots(acc)
        check_norm_out(norm_out, norm_slot, slots, acc, {"acc": acc, "grad": grad, "sq_out": sq_out})
        if sq_out is not None and sq_out.numel() < slots:
            raise ValueError(f"sq_out has {sq_out.numel()} slots; with norm_out it needs sq_slots(acc) = {slots}")
        if norm_dtype not in GRAD_DTYPES:
            raise TypeError(f"norm_dtype must be one of {GRAD_DTYPES}, got {norm_dtype!r}")
        extra.update(norm_out=norm_out, norm_slot=int(norm_slot), inv_scale=_scalar(inv_scale, "inv_scale", acc.device),
                     norm_type=_norm_order(norm_type), norm_dtype=norm_dtype)
    _backend.operators(acc.device).accumulate_(
        acc.view(-1), grad.view(-1), s, zero_grad=bool(zero_grad), overwrite=bool(overwrite), **extra)
    return acc


@torch.no_grad()
def _sum_squares(tensors) -> torch.Tensor:
    """Σx² over flat fp32/bf16/fp16 tensors on one device, fp64 0-d; one read pass (the
    norm's phase 1 and its one-program finalize), no sync."""
    flat = [t.view(-1) for t in tensors]
    impl = _backend.operators(flat[0].device)
    norm = impl.finalize(impl.norm_partials(flat, 1.0, 2.0), 1.0, None, 2.0, 0.0)[0]
    return norm.double().square()


def sq_slots(t: torch.Tensor) -> int:
    """How many ``sq_out`` slots ``accumulate_`` fills for ``t`` (its backend's choice)."""
    return _backend.implementation(t.device).sq_slots(t.numel())


def _as_list(tensors, name: str) -> list:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(tensors).__name__}")
    return list(tensors)


@torch.no_grad()
def _unscale_clip_stats(buckets, inv_scale=1.0, max_norm=None, norm_type=2.0, eps=CLIP_EPS, *,
                        out=None, skip_if_nonfinite=True, reduce_partials=None, apply=True, partials=None):
    """``unscale_clip_`` returning the fp32 ``[total_norm, found_inf, coef, store_overflow]``
    tensor; ``store_overflow`` is 1.0 when found_inf comes from an overflow on store alone (all
    values finite, a result too large for its fp16/bf16 destination: no loss scale cures it).

    It runs in three phases of the backend: ``norm_partials`` (one read pass: a small fp32
    tensor whose last dim holds one slot per program or bucket), ``finalize`` (the stats) and
    ``apply`` (one read-write pass). ``reduce_partials``, a callable ``partials -> partials``,
    runs between the first two: concatenating the partials of several ranks along the last
    dim (``torch.cat(..., -1)`` of an ``all_gather``) makes the stats those of the union of
    all ranks' buckets (sharded gradients). It must keep the device and the number of rows.
    ``apply=False`` stops after the finalize and returns ``(stats, OwedApply)``: the apply pass
    is the caller's to run later, or to hand to a fused optimizer (``_optim.Fold``). ``partials``:
    per bucket None or its partials already taken (``accumulate_(norm_out=...)`` of its last
    pass, with the same ``inv_scale``, ``norm_type`` and ``out`` dtype); the norm pass runs over the others."""
    buckets = _as_list(buckets, "buckets")
    if not buckets:
        raise ValueError("buckets is empty")
    for i, b in enumerate(buckets):
        _check_flat(b, f"buckets[{i}]")
    device = buckets[0].device
    for i, b in enumerate(buckets):
        if b.device != device:
            raise ValueError(f"buckets[{i}] is on {b.device} but buckets[0] on {device}")
        for j in range(i):
            if _overlap(b, buckets[j]):
                raise ValueError(f"buckets[{i}] and buckets[{j}] overlap in memory")
    flat = [b.view(-1) for b in buckets]
    if out is not None:
        out = _as_list(out, "out")
        if len(out) != len(buckets):
            raise ValueError(f"out has {len(out)} tensors for {len(buckets)} buckets")
        for i, (o, b) in enumerate(zip(out, buckets)):
            _check_flat(o, f"out[{i}]")
            if o.device != device or o.numel() != b.numel():
                raise ValueError(f"out[{i}] ({o.numel()} elements on {o.device}) does not match "
                                 f"buckets[{i}] ({b.numel()} elements on {device})")
        out = _in_place_as_flat(out, flat)
        for i, (o, b) in enumerate(zip(out, buckets)):
            if o is flat[i]:
                continue
            # Any other overlap would read values the pass has already written.
            for j, x in enumerate(buckets):
                if _overlap(o, x):
                    raise ValueError(f"out[{i}] overlaps buckets[{j}] in memory; out[{i}] must be "
                                     f"buckets[{i}] itself (same memory and dtype) or separate memory")
            for j in range(i):
                if _overlap(o, out[j]):
                    raise ValueError(f"out[{i}] and out[{j}] overlap in memory")
    max_norm, p, eps = _clip_args(max_norm, norm_type, eps)
    inv = _scalar(inv_scale, "inv_scale", device)
    if reduce_partials is not None and not callable(reduce_partials):
        raise TypeError(f"reduce_partials must be a callable partials -> partials, got {type(reduce_partials).__name__}")
    return _checked_stats(flat, out, inv, max_norm, p, eps, skip_if_nonfinite=skip_if_nonfinite,
                          reduce_partials=reduce_partials, apply=apply, partials=partials)


def _clip_args(max_norm, norm_type, eps) -> tuple:
    """(max_norm, p, eps) checked, as the kernels read them: fp32 floats (max_norm None: no clipping)."""
    p = _norm_order(norm_type)
    if max_norm is not None:
        max_norm = _fp32(_number(max_norm, "max_norm"))
        if not max_norm >= 0:
            raise ValueError(f"max_norm must be >= 0 or None, got {max_norm}")
    eps = _fp32(_number(eps, "eps"))  # the kernels add it in fp32
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0 (in fp32), got {eps}")
    return max_norm, p, eps


def _in_place_as_flat(out: list, flat: list) -> list:
    """``out``'s tensors 1-D; one in place (its bucket's memory and dtype) is its bucket's
    tensor in ``flat`` itself, so the backends can tell."""
    return [f if o.data_ptr() == f.data_ptr() and o.dtype == f.dtype else o.view(-1) for o, f in zip(out, flat)]


@torch.no_grad()
def _checked_stats(flat, out, inv, max_norm, p, eps, *, skip_if_nonfinite=True, reduce_partials=None,
                   apply=True, partials=None):
    """``_unscale_clip_stats`` past its checks: ``flat`` 1-D buckets, ``out`` None or as
    ``_in_place_as_flat`` gives, ``inv`` as ``_scalar`` gives, the rest as ``_clip_args`` gives.
    GradAccumulator's step calls it on its own buckets, whose checks are a fixed cost per step."""
    impl = _backend.operators(flat[0].device)
    if partials is None:
        partials = impl.norm_partials(flat, inv, p, out=out)
    else:
        partials = merged(impl, flat, check_given(partials, flat, impl), inv, p, out)
    if reduce_partials is not None:
        # Ranks with shards of different sizes get different slot counts from the kernels; a
        # gather needs one shape everywhere, so pad to the bound that depends on the bucket count only.
        partials = _pad_slots(partials, len(flat) * impl.MAX_SLOTS_PER_BUCKET)
        reduced = reduce_partials(partials)
        if (not isinstance(reduced, torch.Tensor) or reduced.dtype != partials.dtype
                or reduced.device != partials.device or reduced.shape[:-1] != partials.shape[:-1]):
            raise ValueError(f"reduce_partials must return a {partials.dtype} tensor on {partials.device} of shape "
                             f"{tuple(partials.shape[:-1])} + (slots,), got "
                             + (f"{reduced.dtype} {tuple(reduced.shape)} on {reduced.device}"
                                if isinstance(reduced, torch.Tensor) else type(reduced).__name__))
        partials = reduced
    stats = impl.finalize(partials, inv, max_norm, p, eps)
    owed = OwedApply(functools.partial(impl.apply, flat, stats, out, bool(skip_if_nonfinite)))
    if not apply:
        return stats, owed
    owed()
    return stats


def unscale_clip_(buckets, inv_scale=1.0, max_norm=None, norm_type=2.0, eps=CLIP_EPS, *, out=None):
    """Unscale, check for inf/NaN, take the global norm and clip, over flat buckets.

    One read pass computes ``total_norm`` (0-d fp32: the ``norm_type``-norm of all of
    ``buckets * inv_scale``, before clipping; kept in range by power-of-two scaling, so tiny
    or huge raw values do not underflow or overflow it) and ``found_inf`` (0-d fp32: 1.0 if
    ``inv_scale`` or an element of ``buckets * inv_scale`` is inf/NaN, if ``total_norm``
    exceeds fp32, or if a result would round to inf in the dtype it is stored in: fp16/bf16
    buckets in place, or such tensors of ``out``). Then, unless ``found_inf``, every bucket
    is multiplied (in fp32, rounded once) in place or into the matching tensor of ``out`` by
    ``inv_scale * min(1, max_norm / (total_norm + eps))``; no clipping when ``max_norm`` is
    None; 0 / 0 (an all-zero gradient, ``max_norm = eps = 0``) leaves it as it is. When
    ``found_inf`` the buckets (and ``out``) keep every bit. The decision is taken on the
    device: no host synchronisation. Python numbers are rounded to fp32 first (beyond its
    range: +-inf), as the kernels read them. See docs/numerics.md.

    buckets: a contiguous fp32/bf16/fp16 tensor or a sequence of them, on one device.
    inv_scale: float or one-element tensor. norm_type: a number > 0, or inf.
    Returns ``(total_norm, found_inf)``.
    """
    stats = _unscale_clip_stats(buckets, inv_scale, max_norm, norm_type, eps, out=out)
    return stats[0], stats[1]


def _fusable_clip_args(max_norm, norm_type) -> bool:
    if isinstance(max_norm, (torch.Tensor, bool)) or isinstance(norm_type, torch.Tensor):
        return False  # float() of a device tensor would sync
    try:
        return float(max_norm) >= 0 and float(norm_type) > 0
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *,
                    pipeline_group=None):
    """Drop-in for ``torch.nn.utils.clip_grad_norm_``: same arguments, same results.

    When the gradients are exactly the contents of flat buffers (e.g. ``GradBuckets``), the
    norm and the scaling run as fused kernels over the buffers: one read pass and one
    read-write pass, no host sync. Otherwise this calls torch's implementation: for
    gradients that are not such views, any fp16 gradients (torch takes their norm in fp16),
    and arguments outside ``max_norm >= 0`` and ``norm_type > 0`` (numbers, not tensors).
    bf16 beside wider gradients: torch rounds the bf16 group's norm to bf16 before combining
    it; the fused norm does not, so the two differ within one bf16 rounding of that part.
    ``error_if_nonfinite=True`` reads the norm on the host (one sync), as torch does; the
    gradients are then left unscaled when it raises.
    FSDP2 (DTensor) gradients: the same passes over the local shards (in place when they
    tile a flat buffer, a ``GradAccumulator``'s; else over a packed copy per dtype, written
    back), with one all-gather of the norm's partials per mesh dimension that shards a
    gradient between them (FSDP2 and HSDP: 1; FSDP2 after tensor parallel on (dp, tp): 2;
    pieces replicated along a dimension counted once); the norm comes back as a replicated
    DTensor, as torch's. Whether the fused path or torch's
    runs depends only on what every rank shares (placements, dtypes, arguments), so that all
    ranks enter the same collective.
    ``pipeline_group`` (a ProcessGroup or 1-D DeviceMesh, one rank per pipeline stage): the norm
    is the one over every stage's gradients (one all-gather of compact partials over the group)
    and each stage clips its own; always the fused passes (fp16 too, its norm in fp32), over a
    packed copy when the gradients tile no flat buffer. Not with DTensor gradients yet.
    """
    if isinstance(parameters, torch.Tensor):
        params = [parameters]
    else:
        params = list(parameters)
        if isinstance(parameters, types.GeneratorType) and not params:
            # torch's message and stack level: the warning points at the caller's line.
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [p.grad for p in params if p.grad is not None]
    if pipeline_group is not None:  # one gather over the stages, whatever each stage holds
        from .parallel.pipeline import clip_grad_norm_stages

        return clip_grad_norm_stages(params, grads, max_norm, norm_type, error_if_nonfinite, pipeline_group)
    if grads and torch.distributed.is_available():
        from . import _dtensor

        if any(_dtensor.is_dtensor(g) for g in grads):  # FSDP2 shards: their norm is gathered
            return _dtensor.clip_grad_norm_(params, grads, max_norm, norm_type, error_if_nonfinite, foreach)
    buffers = _covering_buckets(grads) if grads and _fusable_clip_args(max_norm, norm_type) else None
    dtypes = {g.dtype for g in grads}
    if buffers is None or torch.float16 in dtypes:
        # fp16 (alone or beside wider grads): torch takes the fp16 grads' norm as an fp16
        # number (inf above 65504) and its clip follows that; the fused fp32 norm would not.
        # Other arguments the fused path does not take (a tensor max_norm, norm_type <= 0,
        # ...) go to torch too, which decides what they mean.
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    return _fused_clip(buffers, dtypes, max_norm, norm_type, error_if_nonfinite)


def _fused_clip(buffers, dtypes, max_norm, norm_type, error_if_nonfinite, reduce_partials=None) -> torch.Tensor:
    """The fused clip over flat ``buffers`` with torch's return dtype and error; the norm is
    global over ranks with ``reduce_partials`` (sharded gradients)."""
    stats = _unscale_clip_stats(buffers, 1.0, float(max_norm), norm_type, CLIP_EPS, reduce_partials=reduce_partials,
                                skip_if_nonfinite=bool(error_if_nonfinite))
    total_norm = stats[0].to(functools.reduce(torch.promote_types, dtypes))
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`")
    return total_norm
