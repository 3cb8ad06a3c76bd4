"""FSDP2 (``torch.distributed.fsdp.fully_shard``) reduces; the buckets hold this rank's shards.

Every sharded parameter's ``.grad`` is a DTensor whose local tensor is a view into a flat
fp32 bucket (``GradBuckets`` does that for any DTensor parameter); FSDP2 adds each new
reduce-scattered gradient into an existing sharded ``.grad`` in place (``foreach_reduce``:
``sharded_param.grad._local_tensor += new_sharded_grad``, after casting it to the sharded
parameter's dtype), so the window's sum lands in the bucket with no copy. Uneven shards:
the local tensor is the unpadded shard, so padding never enters the sums or the norm.

Two window modes (``GradAccumulator(..., fsdp_sync=...)``):

- ``"micro_batch"`` (default): FSDP reduce-scatters after every micro-batch (K per window);
  between micro-batches only the sharded fp32 sums are held (FSDP's memory model).
- ``"window"``: ``accumulate(model)`` calls ``set_requires_gradient_sync(False)`` on all but
  the window's last micro-batch: one reduce-scatter per window, but FSDP holds every
  parameter's unsharded gradient across the window (in ``reduce_dtype``, which must then be
  fp32 so that the window's sum is an fp32 sum).

At ``step``: FSDP divided its reduction by ``F`` (its gradient divide factor, by default the
number of data-parallel ranks): the normalizer becomes ``global count / F``; the count, with
the window's loss and statistics, is all-reduced as one small fp64 vector (``global_normalizer``). The norm's per-program partials are made global by one
``all_gather_single`` over the shard group (``reduce_partials``); the replicas of an
HSDP mesh hold equal values and are not gathered. FSDP2 after tensor parallel on a (dp, tp)
mesh: ``mesh`` (the count over dp only; the partials masked and gathered over dp and tp). No
host sync; every rank decides alike.
"""

from .._dtensor import gather_partials
from . import mesh as _mesh
from .base import Engine, Window, dist, global_normalizer, local_normalizer, wait

__all__ = ["FSDP1", "FSDP2", "MODES", "check_fsdp2", "is_fsdp1", "is_fsdp2", "refuse_flat_params"]

MODES = ("micro_batch", "window")


def _fsdp():
    import torch.distributed.fsdp as fsdp

    return fsdp


def is_fsdp2(model) -> bool:
    # FSDPModule is public from torch 2.6; an older torch has no FSDP2 model to see.
    cls = getattr(_fsdp(), "FSDPModule", None) if dist().is_available() else None
    return cls is not None and isinstance(model, cls)


def is_fsdp1(model) -> bool:
    return dist().is_available() and isinstance(model, _fsdp().FullyShardedDataParallel)


_FSDP1_MESSAGE = (
    "FSDP1 (FullyShardedDataParallel) is not supported: it flattens the parameters into FlatParameters "
    "and manages their gradients itself, so GradAccumulator's buckets cannot hold them. Use FSDP2 "
    "(torch.distributed.fsdp.fully_shard on the sub-modules and the root), which GradAccumulator "
    "supports, or DistributedDataParallel")


def refuse_flat_params(params) -> None:
    if not dist().is_available():
        return
    flat = _fsdp().FlatParameter
    if any(isinstance(p, flat) for p in params):
        raise ValueError(_FSDP1_MESSAGE)


def _param_groups(model) -> list:
    """Every FSDP parameter group under ``model`` (one per fully_shard call with parameters)."""
    groups = []
    for m in model.modules():
        if isinstance(m, _fsdp().FSDPModule):
            groups += [g for g in m._get_fsdp_state()._fsdp_param_groups if g not in groups]
    return groups


def _mesh_ranks(mesh) -> list:
    return sorted(mesh.mesh.flatten().tolist())


def check_fsdp2(model, params, process_group, mode: str = "micro_batch") -> None:
    """Raise when FSDP2 ``model`` cannot reduce ``params`` (this accumulator's parameters) into
    the buckets correctly, saying what to do instead. Changes nothing."""
    if mode not in MODES:
        raise ValueError(f"fsdp_sync must be one of {MODES}, got {mode!r}")
    groups = _param_groups(model)
    if not groups:
        raise ValueError(f"the FSDP2 model {type(model).__name__} shards no parameter: call fully_shard on "
                         "modules that hold parameters (and on the root)")
    fsdp_params = [fp for g in groups for fp in g.fsdp_params]
    managed = {id(fp.sharded_param) for fp in fsdp_params}
    missing = [p for p in params if id(p) not in managed]
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ValueError(
            f"{len(missing)} parameters of this GradAccumulator (shapes {shapes}) are not sharded by the FSDP2 "
            "model given (no fully_shard covers them): nobody would reduce their gradients across ranks. Call "
            "fully_shard on the root module too (it takes the parameters no sub-module took), or build the "
            "GradAccumulator over the FSDP2 model's parameters only")
    meshes = []
    for g in groups:  # each fully_shard(mesh=None) builds its own, equal, default mesh
        if not any(g.mesh_info.mesh == m for m in meshes):
            meshes.append(g.mesh_info.mesh)
    if len(meshes) != 1:
        raise ValueError(f"the FSDP2 model's modules are sharded over {len(meshes)} different device meshes: "
                         "one GradAccumulator supports one mesh (the global norm is gathered over it)")
    mesh = meshes[0]
    info = groups[0].mesh_info
    if mesh.ndim > 2 or (mesh.ndim == 2 and not hasattr(info, "replicate_process_group")):
        raise ValueError(f"an FSDP2 mesh of {mesh.ndim} dimensions that is not HSDP (replicate, shard): "
                         "supported are a 1-D mesh (FSDP) and a 2-D (replicate, shard) mesh (HSDP)")
    _mesh.layout(groups, dist().get_world_size())  # tensor parallel: supported, or refused by name
    if process_group is False:
        raise ValueError("this GradAccumulator was built with process_group=False but the model is an FSDP2 "
                         "module, which reduce-scatters the gradients across its mesh anyway: leave "
                         "process_group=None (FSDP2 reduces; the accumulator follows its mesh)")
    if process_group is not None and sorted(dist().get_process_group_ranks(process_group)) != _mesh_ranks(mesh):
        raise ValueError(
            f"process_group (ranks {sorted(dist().get_process_group_ranks(process_group))}) contradicts the "
            f"FSDP2 model's device mesh (ranks {_mesh_ranks(mesh)}): the gradients are reduced over the mesh. "
            "Leave process_group=None with an FSDP2 model")
    offloaded = [fp for fp in fsdp_params if fp.offload_to_cpu]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} FSDP2 parameters use CPUOffloadPolicy: FSDP2 then moves each reduced gradient "
            "to the host and the optimizer steps there, so the fused step would run on the CPU. Drop the "
            "offload policy (fully_shard(..., offload_policy=OffloadPolicy())) to use GradAccumulator, or "
            "train the offloaded model without it")
    if mode == "window":
        # The dtype FSDP2 sums unsharded gradients in across no-sync backwards (its dtype
        # attributes are set at the first forward, so read from the policy).
        lowp = sorted({str(g.mp_policy.reduce_dtype or g.mp_policy.param_dtype or fp.sharded_param.dtype)
                       .replace("torch.", "") for g in groups for fp in g.fsdp_params} - {"float32"})
        if lowp:
            raise ValueError(
                f"fsdp_sync='window' with FSDP2 accumulating the unsharded gradients in {'/'.join(lowp)}: "
                "across the window FSDP2 holds the sum in its reduce dtype, so it would not be an fp32 sum. "
                "Use MixedPrecisionPolicy(reduce_dtype=torch.float32), or fsdp_sync='micro_batch' (each "
                "micro-batch reduced, then summed in the fp32 buckets)")


class FSDP2(Engine):
    """FSDP2 reduce-scatters into the sharded buckets; the norm's partials are gathered."""

    wraps = staticmethod(is_fsdp2)

    @staticmethod
    def check(model, params, process_group, options=None) -> None:
        options = options or {}
        if options.get("noise_scale"):
            # The sharded buckets hold gradients already averaged over the ranks after each
            # reduce-scatter, so a micro-batch's norm is not a small batch's of known size.
            raise ValueError("noise_scale is not supported with FSDP2 models yet: the sharded buckets never hold "
                             "one rank's micro-batch gradient alone. Build the GradAccumulator with "
                             "noise_scale=False (StepResult.loss is still global)")
        check_fsdp2(model, params, process_group, options.get("fsdp_sync", "micro_batch"))

    def __init__(self, model, options=None):
        self.options = dict(options or {})
        self.mode = self.options.get("fsdp_sync", "micro_batch")
        self._model = model
        self._groups = _param_groups(model)
        info = self._groups[0].mesh_info
        self.mesh = info.mesh
        self.world_size = self.mesh.size()  # every data-parallel rank (shard x replicate); tp ranks not
        self.layout = _mesh.layout(self._groups, dist().get_world_size())
        # The count vector: over the default group (the mesh is the world), or over dp only under
        # tensor parallel (the tp ranks of a dp rank see the same items).
        self.group = self.layout.count_group
        self.shard_group = info.shard_process_group
        self.shard_size = info.shard_mesh_size
        if self.layout.tp:
            self.reduce_partials = None  # mesh_norm_hook over (dp, tp): needs the buckets, built at the step
        else:
            self.reduce_partials = gather_partials(self.shard_group, self.shard_size) if self.shard_size > 1 else None
        self._hook_for = None  # the accums whose (dp, tp) norm hook reduce_partials is
        self._synced = {model}

    @property
    def communicates(self) -> bool:
        return self.world_size > 1

    def hand_over(self, cls, model, params) -> Engine:
        if model is self._model or (cls is FSDP2 and self._owns(model)):
            return self
        raise ValueError(f"a {type(model).__name__} model that is not part of the FSDP2 model this "
                         "GradAccumulator follows: one GradAccumulator follows one data-parallel model")

    def _owns(self, module) -> bool:
        return any(m is module for m in self._model.modules())

    def start_window(self, buckets) -> None:
        # Autograd accumulates into FSDP2's unsharded parameters (created at the first forward and
        # kept), not into the sharded ones the buckets hook: count those too, so that a backward
        # outside acc.backward is seen in both window modes (fusedaccum.guards).
        buckets.watch((fp._unsharded_param, fp.sharded_param) for g in self._groups for fp in g.fsdp_params
                      if hasattr(fp, "_unsharded_param"))

    def discard(self) -> None:
        # Under "window" FSDP2 holds the window's no-sync backwards as unsharded gradients (in
        # .grad, or upcast to its reduce dtype) and adds them into the next reduce-scatter:
        # dropped with the window, or they would reach the next step.
        for g in self._groups:
            for fp in g.fsdp_params:
                fp.unsharded_accumulated_grad = None
                if getattr(fp, "_unsharded_param", None) is not None:
                    fp._unsharded_param.grad = None

    def micro_batch(self, model, window: Window, *, sync: bool, lowp: bool):
        if self.mode == "window" and model is self._model:
            # Only the last micro-batch of a window reduce-scatters (the whole model: recurse).
            model.set_requires_gradient_sync(bool(sync))
            return _Flag(window, unsynced=not sync)
        return _Flag(window, unsynced=False)

    def divide_factor(self) -> float:
        """What FSDP2 divided the reduced gradients by (its gradient divide factor)."""
        factors = {g.gradient_divide_factor for g in self._groups}
        if len(factors) != 1:
            raise ValueError(f"the FSDP2 modules use different gradient divide factors {sorted(map(str, factors))}: "
                             "the window's normalization needs one (set_gradient_divide_factor on the root)")
        factor = factors.pop()
        return float(self.world_size) if factor is None else float(factor)

    def reduce(self, accums, window: Window, force: bool, device):
        if window.unsynced:
            raise RuntimeError(
                "the last micro-batch of this window ran with FSDP2's set_requires_gradient_sync(False) "
                "(fsdp_sync='window': accumulate() cannot know that a partial window ends early), so its "
                "gradients are still unsharded and unreduced inside FSDP. Run the last micro-batch of a partial "
                "window as accumulate(model, sync=True), then step(optimizer, force=True)")
        factor = self.divide_factor()
        if self.layout.tp and self._hook_for is not accums:
            # Local work (placements and local sizes); every rank builds its own at its first step.
            params = [fp.sharded_param for g in self._groups for fp in g.fsdp_params]
            self.reduce_partials = self.layout.norm_hook(_mesh.owned_buckets(params, accums))
            self._hook_for = accums
        if self.communicates:
            count, works = global_normalizer(window, self.group, self.world_size, force, device)
            wait(works)
            items = count if window.items_given else None
        else:
            count, items = local_normalizer(window), window.items()
        return count / factor, items

    def check_saveable(self, window: Window) -> None:
        if self.mode == "window" and window.micro > 0:
            raise RuntimeError(
                "state_dict() mid-window with fsdp_sync='window': FSDP2 holds this window's gradients, "
                "unsharded, in its own buffers, not in the GradAccumulator's buckets. Save at a window "
                "boundary, or use fsdp_sync='micro_batch' (then the buckets hold the whole window)")

    def __repr__(self) -> str:
        return f"FSDP2(mode={self.mode!r}, world_size={self.world_size}, shard_size={self.shard_size})"


class _Flag:
    """A context that tells the window whether the micro-batch runs without a gradient sync."""

    def __init__(self, window: Window, unsynced: bool):
        self.window, self.unsynced = window, unsynced

    def __enter__(self):
        self.window.context_unsynced = self.unsynced  # recorded by the micro-batch's backward
        return None

    def __exit__(self, *exc):
        self.window.context_unsynced = None
        return False


class FSDP1:
    """FullyShardedDataParallel (FSDP1): refused when shown, before anything changes."""

    wraps = staticmethod(is_fsdp1)

    @staticmethod
    def check(model, params, process_group, options=None) -> None:
        raise ValueError(_FSDP1_MESSAGE)
