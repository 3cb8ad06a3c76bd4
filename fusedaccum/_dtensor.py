"""Sharded (DTensor) gradients: the norm's partials gathered over the shard group, the fused
unscale/norm/clip pass with that hook, and ``clip_grad_norm_`` over DTensor gradients.

``fusedaccum.ops._unscale_clip_stats(..., reduce_partials=callable)`` (the phased kernels)
takes the hook directly; until that lands, ``unscale_clip_stats`` below computes the same
thing in two passes: the local Σ|x|^p per bucket (fp64; max |x| for the inf-norm), made
global by the hook (one collective), the multiplier on the device, then the fused pass with
that multiplier and no clip of its own. No host sync either way.
"""

import functools
import inspect
import math

import torch

from .ops import CLIP_EPS, GRAD_DTYPES, _covering_buckets, _fusable_clip_args, _unscale_clip_stats

__all__ = ["clip_grad_norm_", "dtensor_type", "gather_partials", "is_dtensor", "unscale_clip_stats"]

_TAKES_HOOK = "reduce_partials" in inspect.signature(_unscale_clip_stats).parameters


@torch.no_grad()
def unscale_clip_stats(buckets, inv_scale, max_norm, norm_type, eps, *, out=None, reduce_partials=None,
                       skip_if_nonfinite=True):
    """``ops._unscale_clip_stats`` over buckets whose norm is global only after
    ``reduce_partials`` (None: the buckets are global already)."""
    if reduce_partials is None:
        return _unscale_clip_stats(buckets, inv_scale, max_norm, norm_type, eps, out=out,
                                   skip_if_nonfinite=skip_if_nonfinite)
    if _TAKES_HOOK:
        return _unscale_clip_stats(buckets, inv_scale, max_norm, norm_type, eps, out=out,
                                   skip_if_nonfinite=skip_if_nonfinite, reduce_partials=reduce_partials)
    device = buckets[0].device
    p = float(norm_type)
    # Raw values, as the kernels sum them: |inv| is applied to the norm at the end. An inf/NaN
    # element makes its bucket's partial inf/NaN, and so the global norm: no separate flag.
    if math.isinf(p):
        parts = [b.abs().amax().double() if b.numel() else torch.zeros((), dtype=torch.float64, device=device)
                 for b in buckets]
    else:
        parts = [b.double().abs().pow(p).sum() for b in buckets]
    gathered = reduce_partials(torch.stack(parts))
    if math.isinf(p):
        raw = gathered.max().float()
    else:
        # Σ|x|^p folded in fp64 and rounded to fp32 before the root, as the finalize does.
        total = gathered.sum().float()
        raw = total if p == 1.0 else total.sqrt() if p == 2.0 else total.pow(1.0 / p)
    inv = (inv_scale.to(torch.float32) if isinstance(inv_scale, torch.Tensor)
           else torch.full((), inv_scale, dtype=torch.float32, device=device))
    norm = raw * inv.abs()
    found_inf = (~torch.isfinite(norm)).to(torch.float32)
    coef = inv.clone() if max_norm is None else inv * torch.clamp(max_norm / (norm + eps), max=1.0)
    # A non-finite multiplier makes the local pass find inf/NaN, so it skips exactly when the
    # global norm did (every rank alike); unless the caller asked to scale anyway.
    apply = torch.where(found_inf > 0, torch.full_like(coef, math.nan), coef) if skip_if_nonfinite else coef
    _unscale_clip_stats(buckets, apply, None, norm_type, eps, out=out, skip_if_nonfinite=skip_if_nonfinite)
    return torch.stack([norm, found_inf, coef])


def dtensor_type():
    """torch's DTensor class, or None where torch.distributed is not built."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def gather_partials(group, world_size: int):
    """A ``reduce_partials`` hook: one ``all_gather_into_tensor`` of the local partials (slots
    along the last dim) over ``group``; returns them concatenated along the slots, rank by
    rank, so that every rank finalizes the same numbers in the same order (bitwise alike)."""
    def reduce_partials(partials: torch.Tensor) -> torch.Tensor:
        local = partials.reshape(-1)  # flat: gloo gathers along dim 0 only
        out = local.new_empty(world_size * local.numel())
        torch.distributed.all_gather_into_tensor(out, local, group=group)
        out = out.view((world_size,) + tuple(partials.shape))
        return out.movedim(0, -2).reshape(*partials.shape[:-1], world_size * partials.shape[-1])

    return reduce_partials


def shard_group(grads):
    """(mesh, the group over which ``grads`` are sharded, its size), or None when they are not all
    DTensors on one mesh sharded along one mesh dimension and replicated along the others
    (FSDP2; HSDP), the layouts whose norm is the gathered sum of the local ones."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, dims = grads[0].device_mesh, set()
    for g in grads:
        if not is_dtensor(g) or g.device_mesh != mesh:
            return None
        sharded = [i for i, pl in enumerate(g.placements) if isinstance(pl, Shard)]
        if len(sharded) != 1 or not all(isinstance(pl, (Shard, Replicate)) for pl in g.placements):
            return None
        dims.add(sharded[0])
    if len(dims) != 1:
        return None
    dim = dims.pop()
    return mesh, mesh.get_group(dim), mesh.size(dim)


@torch.no_grad()
def clip_grad_norm_(params, grads, max_norm, norm_type, error_if_nonfinite, foreach):
    """``fusedaccum.clip_grad_norm_`` for DTensor gradients: the fused pass over the flat
    buffers behind their local shards, with one gather of the norm's partials; torch's
    implementation when they are not such views (or for the arguments torch decides)."""
    from torch.distributed.tensor import DTensor, Replicate

    sharding = shard_group(grads)
    local = [g._local_tensor for g in grads]
    buffers = (_covering_buckets(local) if sharding is not None and _fusable_clip_args(max_norm, norm_type)
               else None)
    dtypes = {g.dtype for g in local}
    if buffers is None or torch.float16 in dtypes or not dtypes <= set(GRAD_DTYPES):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    mesh, group, size = sharding
    hook = gather_partials(group, size) if size > 1 else None
    stats = unscale_clip_stats(buffers, 1.0, float(max_norm), norm_type, CLIP_EPS, reduce_partials=hook,
                               skip_if_nonfinite=bool(error_if_nonfinite))
    total = stats[0].to(functools.reduce(torch.promote_types, dtypes))
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`")
    # Every rank holds the global norm: a replicated DTensor, as torch returns a DTensor.
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
