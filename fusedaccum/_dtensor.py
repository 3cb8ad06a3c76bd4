"""Sharded (DTensor: FSDP2, HSDP, FSDP2 after tensor parallel) gradients: the ``reduce_partials``
hooks that make the norm's partials global (one gather per mesh dimension that shards), and
``clip_grad_norm_`` over DTensor grads."""

import torch

from ._layout import GRAD_DTYPES, _covering_buckets
from .ops import _fused_clip, _fusable_clip_args

__all__ = ["clip_grad_norm_", "compose", "dtensor_type", "gather_partials", "grad_layout", "is_dtensor", "mesh_norm_hook",
           "replica_key"]


def dtensor_type():
    """torch's DTensor class, or None where torch.distributed is not built."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor  # public from torch 2.5
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def gather_partials(group, world_size: int):
    """A ``reduce_partials`` hook: one all-gather (``all_gather_single``; before torch 2.13
    ``all_gather_into_tensor``) of the local partials (slots along the last dim) over
    ``group``; returns them concatenated along the slots, rank by rank, so that every rank
    finalizes the same numbers in the same order (bitwise alike)."""
    def reduce_partials(partials: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        local = partials.reshape(-1)  # flat: gloo gathers along dim 0 only
        out = local.new_empty(world_size * local.numel())
        gather(out, local, group=group)
        out = out.view((world_size,) + tuple(partials.shape))
        return out.movedim(0, -2).reshape(*partials.shape[:-1], world_size * partials.shape[-1])

    return reduce_partials


def replica_key(t):
    """Per mesh dimension, whether DTensor ``t`` is replicated along it (a tuple of bools); None
    for a plain tensor. Placements are global, so every rank computes the same key: the
    buckets are split by it, so that each bucket's norm partials are either counted or not
    (a piece replicated over ``tp`` once, not ``tp`` times)."""
    return tuple(pl.is_replicate() for pl in t.placements) if is_dtensor(t) else None


def grad_layout(grads):
    """(mesh, per grad its ``replica_key``) when ``grads`` are all DTensors on one mesh, each
    sharded (``Shard``, ``_StridedShard``) or replicated along every dimension, sharded along
    at least one: FSDP2, HSDP, FSDP2 after tensor parallel. None otherwise (``Partial``: a
    pending sum; several meshes), for torch's implementation."""
    mesh = grads[0].device_mesh if is_dtensor(grads[0]) else None
    keys = []
    for g in grads:
        if not is_dtensor(g) or g.device_mesh != mesh or any(pl.is_partial() for pl in g.placements):
            return None
        keys.append(replica_key(g))
    if not any(not all(k) for k in keys):
        return None  # nothing sharded: not FSDP2's layout
    return mesh, keys


def compose(*hooks):
    """One ``reduce_partials`` hook that applies ``hooks`` (None: skipped) in order: e.g. the
    mesh's gathers, then a pipeline group's."""
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def reduce_partials(partials):
        for hook in hooks:
            partials = hook(partials)
        return partials

    return reduce_partials


def mesh_norm_hook(mesh, keys, buffers):
    """The ``reduce_partials`` hook of flat ``buffers`` (the norm's inputs, in order) whose
    elements are DTensor pieces on ``mesh`` replicated along the dims ``keys[i]`` says.

    Each element must count once: along a dimension where some buffer is sharded, this rank's
    partials of a buffer *replicated* there are replaced by neutral ones unless its coordinate
    there is 0; then one all-gather per such dimension (in mesh order) concatenates the
    partials, so every rank finalizes the same numbers in the same order. A dimension along
    which every buffer is replicated (HSDP's replicas) is neither masked nor gathered: every
    replica finalizes equal numbers on its own. Which dims and buffers: placements only (what
    every rank shares); the slots a buffer fills: its local size (this rank's, local work)."""
    from .ops import _pad_slots, sq_slots

    dims = [d for d in range(mesh.ndim) if any(not k[d] for k in keys)]
    coord = mesh.get_coordinate()
    masked = [any(k[d] and coord[d] != 0 for d in dims) for k in keys]
    gathers = [gather_partials(mesh.get_group(d), mesh.size(d)) for d in dims if mesh.size(d) > 1]
    spans, start = [], 0
    for buf, drop in zip(buffers, masked):
        n = sq_slots(buf)  # the slots norm_partials gives this buffer (its backend's grid)
        if drop:
            spans.append((start, start + n))
        start += n
    cache = {}

    def mask(partials):
        width = partials.shape[-1]
        if width not in cache:  # built once, by fills on the device (no host copy)
            drop = torch.zeros(width, dtype=torch.bool, device=partials.device)
            for a, b in spans:
                drop[a:b] = True
            cache[width] = (drop, _pad_slots(partials[:, :0], 1))
        drop, neutral = cache[width]
        return torch.where(drop, neutral, partials)

    return compose(mask if spans else None, *gathers)


@torch.no_grad()
def clip_grad_norm_(params, grads, max_norm, norm_type, error_if_nonfinite, foreach):
    """``fusedaccum.clip_grad_norm_`` for DTensor gradients: the fused passes over the local
    pieces, then one gather of the norm's partials per mesh dimension along which some
    gradient is sharded (FSDP2: 1; HSDP: 1, the replicas not; FSDP2 after tensor parallel on
    a (dp, tp) mesh: 2), pieces replicated along a gathered dimension counted once
    (``mesh_norm_hook``); torch's implementation for the layouts, dtypes and arguments the
    fused path does not take.

    Which of the two runs decides which collective every rank enters (gathers of partials,
    or torch's all-reduces), so the choice rests only on what all ranks share: placements,
    dtypes, arguments. Never on local memory layout: with uneven shards one rank's shards can
    tile a flat buffer while another's hold gaps (FSDP2's padding), and a choice made on that
    hangs the job. The layout only decides, locally, whether the passes run on the buffer in
    place or on a packed copy written back after."""
    from torch.distributed.tensor import DTensor, Replicate

    layout = grad_layout(grads)
    dtypes = {g.dtype for g in grads}
    if (layout is None or not _fusable_clip_args(max_norm, norm_type) or torch.float16 in dtypes
            or not dtypes <= set(GRAD_DTYPES)):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    mesh, keys = layout
    # One buffer per (dtype, replication), in an order every rank shares: the partials' width
    # (the gathers' size) then depends on placements and dtypes only.
    order = sorted({(g.dtype, k) for g, k in zip(grads, keys)}, key=lambda dk: (str(dk[0]), dk[1]))
    groups = [[g._local_tensor for g, k in zip(grads, keys) if (g.dtype, k) == dk] for dk in order]
    buffers, packed = [], []
    for local in groups:
        covering = _covering_buckets(local)
        if covering is not None and len(covering) == 1:
            buffers.append(covering[0])  # a GradAccumulator's bucket: in place
        else:
            flat = torch.cat([t.reshape(-1) for t in local])
            buffers.append(flat)
            packed.append((local, flat))
    hook = mesh_norm_hook(mesh, [k for _, k in order], buffers)
    total = _fused_clip(buffers, dtypes, max_norm, norm_type, error_if_nonfinite, reduce_partials=hook)
    for local, flat in packed:
        torch._foreach_copy_(local, [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in local]),
                                                                             local)])
    # Every rank holds the global norm: a replicated DTensor, as torch returns a DTensor.
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
