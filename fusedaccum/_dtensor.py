"""Sharded (DTensor, FSDP2) gradients: the ``reduce_partials`` hook that makes the norm's
partials global (one gather over the shard group), and ``clip_grad_norm_`` over DTensor grads."""

import torch

from .ops import GRAD_DTYPES, _covering_buckets, _fused_clip, _fusable_clip_args

__all__ = ["clip_grad_norm_", "dtensor_type", "gather_partials", "is_dtensor", "shard_group"]


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
    """``fusedaccum.clip_grad_norm_`` for DTensor gradients: the fused passes over the local
    shards, with one gather of the norm's partials; torch's implementation for the layouts,
    dtypes and arguments the fused path does not take.

    Which of the two runs decides which collective every rank enters (a gather of partials,
    or torch's all-reduce), so the choice rests only on what all ranks share: placements,
    dtypes, arguments. Never on local memory layout: with uneven shards one rank's shards can
    tile a flat buffer while another's hold gaps (FSDP2's padding), and a choice made on that
    hangs the job. The layout only decides, locally, whether the passes run on the buffer in
    place or on a packed copy written back after."""
    from torch.distributed.tensor import DTensor, Replicate

    sharding = shard_group(grads)
    dtypes = {g.dtype for g in grads}
    if (sharding is None or not _fusable_clip_args(max_norm, norm_type) or torch.float16 in dtypes
            or not dtypes <= set(GRAD_DTYPES)):
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    # One buffer per dtype, in an order every rank shares: the partials' width (the gather's
    # size) then depends on the dtypes only.
    groups = [[g._local_tensor for g in grads if g.dtype == dtype] for dtype in sorted(dtypes, key=str)]
    buffers, packed = [], []
    for local in groups:
        covering = _covering_buckets(local)
        if covering is not None and len(covering) == 1:
            buffers.append(covering[0])  # a GradAccumulator's bucket: in place
        else:
            flat = torch.cat([t.reshape(-1) for t in local])
            buffers.append(flat)
            packed.append((local, flat))
    mesh, group, size = sharding
    hook = gather_partials(group, size) if size > 1 else None
    total = _fused_clip(buffers, dtypes, max_norm, norm_type, error_if_nonfinite, reduce_partials=hook)
    for local, flat in packed:
        torch._foreach_copy_(local, [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in local]),
                                                                             local)])
    # Every rank holds the global norm: a replicated DTensor, as torch returns a DTensor.
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
