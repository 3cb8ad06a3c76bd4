"""Pipeline stages (``GradAccumulator(..., pipeline_group=pg)``): each stage holds its own
parameters; the norm, the skip decision, the normalizer and the window's loss are global.

A pipeline-parallel rank owns some layers; its buckets hold those layers' gradients only. The
``Pipeline`` engine wraps the stage's data-parallel engine (none, a process group, DDP) and
adds, per window, two collectives over the pipeline group ``pg`` (one rank per stage):

- before the data-parallel reduction: one ``broadcast`` of the fp64 pair ``[item count, Σ
  loss]`` of this window from the last stage (the highest rank of ``pg``, the one that computes
  the loss in GPipe / 1F1B / interleaved schedules). The other stages cannot know either:
  their "loss" is a surrogate (``(out * grad_out).sum()``) and they may not hold the labels.
  Every stage then divides by the same global count and reports the same ``StepResult.loss``
  and ``num_items``; the data-parallel all-reduce that follows sums them within the stage
  (pp ranks of one dp index see the same micro-batches).
- between the norm's two phases: each stage's partials (after its own data-parallel gather,
  if any) are compacted to a fixed ``[5, 3]`` (one slot per store dtype limit: fp32, fp16, bf16)
  and all-gathered over ``pg``. Stages hold different numbers of buckets, so their raw partials
  have different widths, which a gather cannot take; the compact form has one width
  everywhere with no host exchange. The finalize then sees every stage's slots, in rank order:
  the same total norm, ``found_inf`` and clip coefficient, bit for bit, on every rank, so every
  stage skips or steps together.

Every collective is entered by every rank of ``pg`` at every window, whatever the local data.
"""

import math

import torch

from ..reference import ROW_BAD, ROW_EXP, ROW_LIMIT, ROW_MAX, ROW_SUM, store_limit
from .base import Engine, Window, dist

__all__ = ["Pipeline", "check_pipeline_group", "clip_grad_norm_stages", "compact_partials", "pipeline_partials"]

# The store limits a slot can carry, one compact slot each; the first also takes any other.
_LIMITS = (math.inf, store_limit(torch.float16), store_limit(torch.bfloat16))
# compact_partials builds its columns as (sum, exp, bad, max, limit): rows in the partials' order.
_ROW_ORDER = sorted(range(5), key=[ROW_SUM, ROW_EXP, ROW_BAD, ROW_MAX, ROW_LIMIT].__getitem__)


def check_pipeline_group(pipeline_group):
    """None, or the ProcessGroup of ``pipeline_group`` (a ProcessGroup, or a 1-D DeviceMesh
    such as ``world_mesh["pp"]``). Raises TypeError otherwise; changes nothing."""
    if pipeline_group is None:
        return None
    d = dist()
    if d.is_available():
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(pipeline_group, DeviceMesh):
            if pipeline_group.ndim != 1:
                raise ValueError(f"pipeline_group as a DeviceMesh must be 1-D (the pp dimension, "
                                 f"world_mesh['pp']), got {pipeline_group.ndim} dimensions")
            pipeline_group = pipeline_group.get_group()
        if isinstance(pipeline_group, d.ProcessGroup):
            return pipeline_group
    raise TypeError(f"pipeline_group must be a torch.distributed.ProcessGroup (one rank per pipeline stage) or "
                    f"a 1-D DeviceMesh, or None, got {type(pipeline_group).__name__}")


def compact_partials(partials: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The norm's partials (``[5, slots]``, any width) folded into ``[5, 3]``: one slot per store
    limit, each at its largest scale exponent (p = 1, 2) or largest |x| (other p), in fp64 then rounded once to fp32 (one rounding,
    relative 6e-8, of a part of the norm). The per-limit maximum keeps the overflow-on-store test
    exact: fp32 rounding is monotonic, so ``max|x| * coef >= limit`` iff some slot's is. On the
    device, no sync."""
    sums, exps, bad, maxes, limits = partials.unbind(0)
    zero = partials.new_zeros(())
    fp16, bf16 = limits == _LIMITS[1], limits == _LIMITS[2]
    cols = []
    for k, limit in enumerate(_LIMITS):
        mask = (~(fp16 | bf16)) if k == 0 else (fp16 if k == 1 else bf16)
        if math.isinf(norm_type):  # the slots hold maxima at exponent 0
            s, e = torch.where(mask, sums, zero).max(), zero
        elif norm_type not in (1.0, 2.0):  # the slots hold Σ(|x|/m)^p relative to their max m
            m = torch.where(mask, maxes.double(), 0.0)
            s = (torch.where(mask, sums.double(), 0.0) * torch.where(m > 0, m / m.max(), 0.0).pow(norm_type)).sum()
            s, e = s.float(), zero
        else:
            e = torch.where(mask, exps, zero - 126).max()
            scale = torch.exp2(norm_type * (exps.double() - e.double()))
            s = (torch.where(mask, sums.double(), 0.0) * scale).sum().float()
        cols.append(torch.stack([s, e, torch.where(mask, bad, zero).max(), torch.where(mask, maxes, zero).max(),
                                 zero + limit]))
    rows = torch.stack(cols, dim=1)
    return rows[list(_ROW_ORDER)]


def pipeline_partials(group, norm_type: float, inner=None):
    """A ``reduce_partials`` hook (``ops._unscale_clip_stats``): ``inner`` (a stage's own
    data-parallel gather) first, then the compact partials all-gathered over ``group``."""
    from .._dtensor import gather_partials

    size = dist().get_world_size(group)
    gather = gather_partials(group, size)

    def reduce_partials(partials: torch.Tensor) -> torch.Tensor:
        if inner is not None:
            partials = inner(partials)
        return gather(compact_partials(partials, norm_type))

    return reduce_partials


class Pipeline(Engine):
    """One pipeline stage: the stage's data-parallel engine ``inner`` plus the pp collectives."""

    def __init__(self, inner: Engine, group, norm_type: float):
        if type(inner).__name__ == "FSDP2":
            # FSDP2's engine all-reduces the count over the default group, which spans every
            # stage here (each would count the items pp times), and requires its mesh to be the world.
            raise ValueError("an FSDP2 model inside a pipeline stage (pipeline_group=...) is not supported yet: "
                             "use a process_group (the stage's data-parallel group) or DDP per stage")
        d = dist()
        self.inner, self.pp_group, self.norm_type = inner, group, float(norm_type)
        self.pp_size = d.get_world_size(group)
        self.loss_rank = max(d.get_process_group_ranks(group))  # global rank of the last stage
        self.options, self.process_group = inner.options, inner.process_group

    # What the accumulator asks of its engine: the stage's own answers, plus pp.
    world_size = property(lambda self: self.inner.world_size)  # data-parallel ranks of the stage
    group = property(lambda self: self.inner.group)

    @property
    def communicates(self) -> bool:
        return self.pp_size > 1 or self.inner.communicates

    @property
    def reduce_partials(self):
        if self.pp_size == 1:
            return self.inner.reduce_partials
        return pipeline_partials(self.pp_group, self.norm_type, self.inner.reduce_partials)

    def adopt(self, model, params) -> Engine:
        inner = self.inner.adopt(model, params)
        return self if inner is self.inner else Pipeline(inner, self.pp_group, self.norm_type)

    def start_window(self, buckets) -> None:
        self.inner.start_window(buckets)

    def discard(self) -> None:
        self.inner.discard()

    def check_saveable(self, window: Window) -> None:
        self.inner.check_saveable(window)

    def syncs_in_backward(self, needs_small_batch: bool) -> bool:
        return self.inner.syncs_in_backward(needs_small_batch)

    def micro_batch(self, model, window: Window, *, sync: bool, lowp: bool):
        return self.inner.micro_batch(model, window, sync=sync, lowp=lowp)

    def reduce(self, accums, window: Window, force: bool, device):
        if self.pp_size > 1:
            self._from_last_stage(window, device)
        return self.inner.reduce(accums, window, force, device)

    def _from_last_stage(self, window: Window, device) -> None:
        """The last stage's item count and Σ loss replace this stage's (one broadcast)."""
        pair = torch.zeros(2, dtype=torch.float64, device=device)
        if window.items_given:
            pair[0] += window.items_host
            if window.items_dev is not None:
                pair[0] += window.items_dev.to(torch.float64)
        if window.signals is not None:
            pair[1:] = window.signals[:1]
        dist().broadcast(pair, src=self.loss_rank, group=self.pp_group)
        if window.items_given:
            window.items_host, window.items_dev = 0, pair[0]
        if window.signals is not None:
            window.signals[:1] = pair[1:]

    def __repr__(self) -> str:
        return f"Pipeline({self.inner!r}, stages={self.pp_size})"


@torch.no_grad()
def clip_grad_norm_stages(params, grads, max_norm, norm_type, error_if_nonfinite, pipeline_group):
    """``fusedaccum.clip_grad_norm_(..., pipeline_group=pg)``: the fused passes over this stage's
    gradients with the compact partials gathered over the stages. Every rank takes this path
    (the choice rests on the argument alone): a stage with fp16 gradients, gradients that tile
    no buffer or no gradients at all still enters the same gather."""
    from .._layout import GRAD_DTYPES, _covering_buckets
    from ..ops import _fusable_clip_args, _fused_clip
    from .._dtensor import is_dtensor

    group = check_pipeline_group(pipeline_group)
    if not _fusable_clip_args(max_norm, norm_type):
        raise ValueError(f"clip_grad_norm_ with pipeline_group takes max_norm >= 0 and norm_type > 0 as numbers "
                         f"(not tensors), got max_norm={max_norm!r}, norm_type={norm_type!r}")
    if any(is_dtensor(g) for g in grads):
        raise ValueError("clip_grad_norm_ with pipeline_group over DTensor gradients is not supported yet: "
                         "call it without pipeline_group per stage and all-reduce norm**p over the stages")
    dtypes = {g.dtype for g in grads}
    if not dtypes <= set(GRAD_DTYPES):
        raise TypeError(f"clip_grad_norm_ with pipeline_group: gradients of dtypes {sorted(map(str, dtypes))}; "
                        f"supported are {[str(d) for d in GRAD_DTYPES]}")
    buffers, packed = [], []
    for dtype in sorted(dtypes, key=str):  # one buffer per dtype: in place when the grads tile one
        local = [g for g in grads if g.dtype == dtype]
        covering = _covering_buckets(local)
        if covering is not None and len(covering) == 1:
            buffers.append(covering[0])
        else:
            flat = torch.cat([g.reshape(-1) for g in local])
            buffers.append(flat)
            packed.append((local, flat))
    if not buffers:  # a stage without gradients still takes part in the gather
        device = params[0].device if params else torch.device("cpu")
        buffers, dtypes = [torch.empty(0, device=device)], {torch.float32}
    hook = pipeline_partials(group, float(norm_type))
    total = _fused_clip(buffers, dtypes, max_norm, norm_type, error_if_nonfinite, reduce_partials=hook)
    for local, flat in packed:
        torch._foreach_copy_(local, [piece.view(g.shape) for piece, g in zip(flat.split([g.numel() for g in local]),
                                                                             local)])
    return total
