"""Meshes beyond one data-parallel dimension: FSDP2 after tensor parallel (torchtitan's 2-D layout).

``parallelize_module(model, world_mesh["tp"], plan)`` makes the parameters DTensors on the tp
mesh (``ColwiseParallel``: ``Shard(0)``; ``RowwiseParallel``: a ``Shard(1)`` weight and a
replicated bias; ``SequenceParallel``: replicated norms), then ``fully_shard(...,
mesh=world_mesh["dp"])`` shards each over dp: the sharded parameter (and its gradient) lives on
the concatenated ``(dp, tp)`` mesh, e.g. ``(_StridedShard(0), Shard(0))`` or ``(Shard(0),
Replicate())``. A parameter left plain (not parallelized) is sharded over the dp mesh only and
is the same on every tp rank. What that changes for ``GradAccumulator`` (``FSDP2`` asks here):

- the window's count vector (items, loss, statistics) is all-reduced over the dp group only:
  the tp ranks of one dp rank see the same data, so the world would count it ``tp`` times;
- the norm: the buckets are split by replication (``replica_key``), and the partials go
  through ``mesh_norm_hook`` on the ``(dp, tp)`` mesh: pieces replicated over tp count on
  tp coordinate 0 only, then one gather over dp and one over tp (2 collectives, a few floats
  per bucket each);
- the skip decision: every rank finalizes the same gathered partials, so all skip alike.

Everything here reads placements and meshes, which every rank shares; nothing communicates
at construction. Layouts not handled are refused (``check``), before anything changes.
"""

from .._dtensor import mesh_norm_hook
__all__ = ["MeshLayout", "layout", "owned_buckets"]

_CP = {"cp", "context"}
_EP = {"ep", "expert", "experts"}


def _names(mesh) -> list:
    """Every mesh dimension name of ``mesh`` and of its root (the world mesh it was cut from)."""
    names = list(mesh.mesh_dim_names or ())
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else None
    if root is not None and root is not mesh:
        names += list(root.mesh_dim_names or ())
    return names


def _tokens(names) -> set:
    return {tok for n in names for tok in n.lower().split("_")}


def _ranks(mesh) -> list:
    return sorted(mesh.mesh.flatten().tolist())


class MeshLayout:
    """The model-parallel side of one FSDP2 model: ``spmd`` (the mesh its gradients live on:
    the dp mesh, or dp × tp), ``tp`` (whether tensor parallel is present), ``count_group``
    (where the count vector is all-reduced: None for the default group, the dp group under
    tensor parallel)."""

    def __init__(self, dp_mesh, spmd, tp: bool, count_group):
        self.dp_mesh, self.spmd, self.tp, self.count_group = dp_mesh, spmd, tp, count_group

    def key(self, param) -> tuple:
        """Per ``spmd`` dimension, whether ``param`` (a sharded FSDP2 parameter) is replicated
        along it; a plain (dp-only) parameter is replicated along the tp dims."""
        own = tuple(pl.is_replicate() for pl in param.placements)
        if param.device_mesh == self.spmd:
            return own
        return own + (True,) * (self.spmd.ndim - len(own))

    def norm_hook(self, buckets):
        """The ``reduce_partials`` of the accumulator's buckets (``GradBuckets.buckets`` order)."""
        return mesh_norm_hook(self.spmd, [self.key(b.params[0]) for b in buckets], [b.accum for b in buckets])


def layout(groups, world_size: int) -> MeshLayout:
    """The layout of an FSDP2 model's parameter ``groups`` (one dp mesh, checked by the caller),
    or a ValueError naming the layout that is not supported. Changes nothing."""
    info = groups[0].mesh_info
    dp_mesh = info.mesh
    fsdp_params = [fp for g in groups for fp in g.fsdp_params]
    if getattr(info, "is_spmd_mesh", False):
        raise ValueError("fully_shard(..., dp_mesh_dims=...) (parameters distributed on one SPMD mesh for data and "
                         "model parallel) is not supported: GradAccumulator supports tensor parallel through "
                         "parallelize_module on the tp sub-mesh, then fully_shard over the dp sub-mesh")
    tp_specs = [fp._unsharded_dtensor_spec for fp in fsdp_params
                if getattr(fp, "_unsharded_dtensor_spec", None) is not None]
    names = _names(dp_mesh) + [n for s in tp_specs for n in _names(s.mesh)]
    if _tokens(names) & _CP:
        raise ValueError(f"a device mesh with dimensions {sorted(set(names))}: context parallel is not supported by "
                         "GradAccumulator (its sequence shards would need their own token counts and norm); train "
                         "without it, or without GradAccumulator")
    tp_meshes = []
    for s in tp_specs:
        if not any(s.mesh == m for m in tp_meshes):
            tp_meshes.append(s.mesh)
    if _tokens(names) & _EP or len(tp_meshes) > 1 or any(len(s.placements) > 1 for s in tp_specs):
        raise ValueError(f"model-parallel parameters on {len(tp_meshes)} mesh(es) with dimensions "
                         f"{sorted(set(names))}: expert parallel (or any model-parallel mesh besides one 1-D tensor "
                         "parallel mesh) is not supported by GradAccumulator; supported: FSDP2, HSDP, and FSDP2 after "
                         "tensor parallel on a (dp, tp) mesh")
    world = list(range(world_size))
    if not tp_specs:
        if _ranks(dp_mesh) != world:
            raise ValueError(
                f"the FSDP2 mesh covers ranks {_ranks(dp_mesh)} of a world of {world_size} and no parameter is "
                "tensor parallel: GradAccumulator needs the data-parallel mesh (times a tensor-parallel mesh, "
                "applied with parallelize_module before fully_shard) to be the whole world; other model-parallel "
                "layouts are not supported")
        return MeshLayout(dp_mesh, dp_mesh, False, None)
    if dp_mesh.ndim != 1:
        raise ValueError("HSDP (dp_replicate x dp_shard) together with tensor parallel is not supported by "
                         "GradAccumulator yet: use a 1-D dp mesh with tensor parallel (FSDP2 + TP), or HSDP "
                         "without tensor parallel")
    spmd = next(fp.sharded_param.device_mesh for fp in fsdp_params
                if getattr(fp, "_unsharded_dtensor_spec", None) is not None)
    if _ranks(spmd) != world:
        raise ValueError(f"the data-parallel x tensor-parallel mesh {tuple(spmd.mesh.shape)} covers ranks "
                         f"{_ranks(spmd)} of a world of {world_size}: GradAccumulator needs it to be the whole "
                         "world (other model-parallel dimensions, e.g. pipeline stages, are not supported)")
    for fp in fsdp_params:
        mesh = fp.sharded_param.device_mesh
        if not (mesh == spmd or mesh == dp_mesh):
            raise ValueError(f"an FSDP2 parameter on the mesh {mesh} besides the (dp, tp) mesh {spmd}: one "
                             "tensor-parallel mesh is supported")
    return MeshLayout(dp_mesh, spmd, True, info.shard_process_group)


def owned_buckets(params, accums):
    """The ``GradBuckets`` whose accumulation buffers are ``accums`` (the accumulator's), found
    through its parameters' owner mark: the engine sees the buffers only at the step."""
    from ..buckets import _OWNER_ATTR

    for p in params:
        owner = getattr(p, _OWNER_ATTR, None)
        buckets = owner() if owner is not None else None
        if buckets is not None and len(buckets) == len(accums) and all(b.accum is a for b, a in zip(buckets, accums)):
            return buckets
    raise RuntimeError("the FSDP2 engine could not find this GradAccumulator's buckets among its parameters")
