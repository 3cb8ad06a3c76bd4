"""Data-parallel training with ``GradAccumulator``, on ``torch.distributed``.

Exactly one party all-reduces a window's gradient, once per optimizer step:

- the accumulator (no DDP wrapper; ``process_group`` a group, or None with torch.distributed
  initialized over more than one rank): at ``step``, one ``all_reduce(SUM)`` per fp32
  accumulation bucket, launched together (``async_op=True``) and then waited on, right
  before the fused unscale/norm/clip pass. 1/world_size, or the window's global item count,
  is folded into that pass's single multiplier;
- ``DistributedDataParallel`` (fp32 parameters, ``gradient_as_bucket_view=False``):
  ``accumulate(ddp_model)`` enters ``no_sync()`` on all but the last micro-batch, so DDP
  all-reduces (mean) the window's sums once, during the last backward.

With ``num_items``, or a partial window closed by ``step(force=True)``, the window's
normalizer (items, or micro-batches) differs between ranks, so it is all-reduced too: one
more ``all_reduce`` of one fp64 element, on the device (no host sync), in either mode.

This module only decides who reduces and checks the DDP cases; the communication is
``torch.distributed``'s.
"""

from dataclasses import dataclass

import torch

__all__ = ["broadcast_parameters"]


def _dist():
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Comm:
    """Who all-reduces the gradients, over which group.

    kind: "local" (nobody: one process, or process_group=False), "reduce" (the accumulator,
        sum over ``group``), "ddp" (DistributedDataParallel, mean over ``group``).
    group: the process group (None: the default group).
    world_size: its size.
    """

    kind: str
    group: object = None
    world_size: int = 1

    @property
    def communicates(self) -> bool:
        """Whether the window's normalizer must be made global (more than one rank)."""
        return self.kind != "local" and self.world_size > 1

    @property
    def reduces_grads(self) -> bool:
        """Whether the accumulator itself all-reduces its buckets."""
        return self.kind == "reduce" and self.world_size > 1


LOCAL = Comm("local")


def check_process_group(process_group) -> None:
    """``process_group`` must be None (auto), False (never communicate) or a ProcessGroup."""
    if process_group is None or process_group is False:
        return
    if not _dist().is_available() or not isinstance(process_group, _dist().ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, None (the default group when "
                        f"torch.distributed is initialized) or False (no communication), got "
                        f"{type(process_group).__name__}")


def resolve(process_group) -> Comm:
    """The accumulator's own reduction for a ``process_group`` argument (no DDP model seen)."""
    if process_group is False:
        return LOCAL
    dist = _dist()
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return LOCAL
        world = dist.get_world_size()
        return Comm("reduce", None, world) if world > 1 else LOCAL
    return Comm("reduce", process_group, dist.get_world_size(process_group))


def is_ddp(model) -> bool:
    if not _dist().is_available():
        return False
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def ddp_comm(ddp) -> Comm:
    group = getattr(ddp, "process_group", None)
    return Comm("ddp", group, _dist().get_world_size(group))


def check_ddp(ddp, params, process_group) -> None:
    """Raise when ``ddp`` (a DistributedDataParallel) cannot all-reduce ``params`` (this
    accumulator's parameters) correctly, saying what to do instead. Changes nothing."""
    if process_group is not None:
        given = "process_group=False" if process_group is False else "a process_group"
        raise ValueError(
            f"this GradAccumulator was built with {given} and the model is wrapped in "
            "DistributedDataParallel: only one of them may own the gradient all-reduce. Leave "
            "process_group=None with a DDP model (DDP reduces), or drop the DDP wrapper (the "
            "GradAccumulator reduces, once per optimizer step)")
    if getattr(ddp, "gradient_as_bucket_view", False):
        raise ValueError(
            "DistributedDataParallel(gradient_as_bucket_view=True) re-points param.grad into DDP's own "
            "buckets on the synchronising backward, so the all-reduced gradient would bypass this "
            "GradAccumulator's buckets and every rank would step on its own local sum. Build DDP with "
            "gradient_as_bucket_view=False (the default), or drop the DDP wrapper and let the "
            "GradAccumulator all-reduce its fp32 buckets (process_group=None or a group)")
    lowp = sorted({str(p.dtype).replace("torch.", "") for p in params if p.dtype != torch.float32})
    if lowp:
        raise ValueError(
            f"DistributedDataParallel over {'/'.join(lowp)} parameters: their gradients move from param.grad "
            "into this GradAccumulator's fp32 buckets after every backward, so DDP would have to all-reduce "
            "every micro-batch (accumulation_steps all-reduces per optimizer step, in low precision). Drop "
            "the DDP wrapper, build GradAccumulator(model, ...) with process_group=None (the default group) "
            "or a group: it all-reduces the fp32 sums once per step. Broadcast the initial weights yourself "
            "then (fusedaccum.broadcast_parameters(model)), as DDP's constructor did")
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    reduced = {id(p) for name, p in ddp.module.named_parameters() if name not in ignored}
    missing = [p for p in params if id(p) not in reduced]
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ValueError(
            f"{len(missing)} parameters of this GradAccumulator (shapes {shapes}) are not all-reduced by the "
            "DistributedDataParallel model given (not among its parameters, or ignored by it): every rank "
            "would step with its own gradient for them. Wrap the whole model in DDP, or build the "
            "GradAccumulator over the DDP model's parameters only")


def all_reduce_async(tensors, group) -> list:
    """Launch ``all_reduce(SUM)`` on every tensor at once; returns the work handles."""
    dist = _dist()
    return [dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True) for t in tensors]


@torch.no_grad()
def broadcast_parameters(params, src: int = 0, process_group=None) -> None:
    """Copy ``params`` from rank ``src`` (a global rank) to every rank of ``process_group``.

    ``params``: a module (its parameters and buffers) or an iterable of tensors. What
    DistributedDataParallel's constructor does; call it once before training when the
    GradAccumulator, not DDP, all-reduces the gradients. One ``broadcast`` per tensor.
    """
    if isinstance(params, torch.nn.Module):
        tensors = list(params.parameters()) + list(params.buffers())
    elif isinstance(params, torch.Tensor):
        tensors = [params]
    else:
        tensors = list(params)
    dist = _dist()
    for t in tensors:
        dist.broadcast(t.detach(), src=src, group=process_group)
