"""GradAccumulator: the gradient-accumulation training loop, correct and free of host syncs.

One window = the micro-batches of one optimizer step. The buckets hold the *sum* of the
window's (scaled) micro-batch gradients; normalization (1/micro-batches or 1/items), the
loss-scale unscale, the inf/NaN check, the global norm and the clip are folded into one
multiplier and applied by one fused pass at the step (``ops._unscale_clip_stats``).
Because the normalizer is applied last, a partial last window and micro-batches of
different sizes are exact without any bookkeeping on the user's side.

Bucket life cycle (``b`` one ``GradBuckets`` bucket):

    fp32 params (param.grad are views of b.accum):
        first backward of a window: b.accum.zero_()   (not earlier: after step() it holds the
                                                       processed gradient, kept for inspection)
        backward: autograd adds into the views in place
        step:     b.accum *= coef  (in place)         -> param.grad = processed gradient
    bf16/fp16 params (param.grad are views of b.landing, b.accum is fp32):
        first backward of a window: b.landing.zero_() (it holds the processed gradient)
        after each backward: accumulate_(b.accum, b.landing, zero_grad=True,
                                         overwrite=<first micro-batch>)   one pass; the
                             overwrite makes the reset of b.accum free (no zero pass)
        step:     b.landing = b.accum * coef           -> param.grad = processed gradient

The only host sync on the step path is ``found_inf.item()`` for optimizers without the
fused AMP contract (one per optimizer step); see ``GradAccumulator.step``.

Data parallel (``fusedaccum.distributed``): exactly one party all-reduces the window, once
per step. Without a DDP wrapper the accumulator does, in ``step`` right before the fused
pass: ``all_reduce(SUM)`` of every ``b.accum`` (async, all launched, then waited on), and
the normalizer becomes global (``world_size * micro_batches``, or the all-reduced item
count), so ``coef``, the norm and ``found_inf`` are those of the global gradient on every
rank: all ranks skip or step together with no collective for the decision. Under DDP
(fp32 parameters only) DDP's mean all-reduce of the window happens in the last backward
(``no_sync`` before), and the multiplier becomes ``world_size / global_items``.
"""

import contextlib
import math
import numbers
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed as _dist
from .buckets import GradBuckets
from .ops import CLIP_EPS, _norm_order, _unscale_clip_stats, accumulate_
from .scaler import LossScaler

__all__ = ["GradAccumulator", "StepResult"]

_STATE_VERSION = 1


@dataclass(frozen=True)
class StepResult:
    """What ``GradAccumulator.step`` returns at a window boundary.

    total_norm: 0-d fp32 device tensor, the global ``norm_type``-norm of the window's
        normalized, unscaled gradient before clipping (inf/NaN when ``found_inf``).
    found_inf: 0-d fp32 device tensor, 1.0 when the gradient held inf/NaN and the optimizer
        step was skipped, else 0.0.
    micro_batches: how many micro-batches the window accumulated (on this rank).
    num_items: the window's total items (int, float or 0-d device tensor), or None when the
        window was normalized by ``micro_batches``. Data parallel: the total over all ranks
        (0-d fp64 device tensor), the number the gradient was divided by.
    """

    total_norm: torch.Tensor
    found_inf: torch.Tensor
    micro_batches: int
    num_items: "int | float | torch.Tensor | None"


def _state_survives_device_skip(optimizer) -> bool:
    """Whether a step that a fused optimizer skips on the device leaves its state as it was.

    A fused optimizer creates a parameter's state in the first step that sees its gradient,
    and SGD(fused=True, momentum != 0) creates momentum buffers uninitialised (empty_like):
    a skipped step would leave garbage that the next step reads (torch.amp.GradScaler has
    the same hole). So every parameter with a gradient must already have its state; until
    then, the caller syncs instead. SGD keeps no state without momentum, and needs none."""
    sgd = isinstance(optimizer, torch.optim.SGD)
    return all(optimizer.state.get(p) or p.grad is None
               for group in optimizer.param_groups if not (sgd and group.get("momentum", 0) == 0)
               for p in group["params"])


class GradAccumulator:
    """Accumulate ``accumulation_steps`` micro-batches into fp32 buckets, then take one
    optimizer step that equals one large-batch step.

    Args:
        params: the parameters to train (``model.parameters()``), or the model itself (then
            BatchNorm layers are checked at each window start, not only in ``accumulate``).
            All must be on one device; fp32, bf16 and fp16 are supported.
        accumulation_steps: micro-batches per optimizer step (K >= 1).
        max_norm: clip the window's gradient to this global norm (None: no clipping).
        norm_type: order of the norm (a number > 0, or ``inf``), as in ``clip_grad_norm_``.
        scaler: a ``LossScaler`` for fp16 training (None: no loss scaling).
        accum_dtype: the accumulation dtype; only ``torch.float32`` is supported.
        process_group: who all-reduces the gradients across data-parallel ranks (see below).
            None (default): the default group when torch.distributed is initialized with
            world size > 1 and no DistributedDataParallel model has been shown to this
            accumulator; nobody otherwise. A ``ProcessGroup``: that group. False: never
            communicate (the parameters are not data-parallel).

    Usage::

        acc = GradAccumulator(model.parameters(), accumulation_steps=8, max_norm=1.0)
        for x, y in loader:                      # micro-batches
            with acc.accumulate(model):          # no_sync() for DDP, all but the last
                loss = loss_fn(model(x), y)      # per-micro-batch mean
                acc.backward(loss)
            if acc.step(optimizer) is not None:  # None until the window is full
                scheduler.step()
        if acc.micro_batches:                    # the epoch's partial last window, if any
            acc.step(optimizer, force=True)

    Token-weighted losses: pass the loss as a SUM over the micro-batch's items and
    ``num_items`` (int or 0-d device tensor) on every micro-batch; the window is then
    normalized by its total items, the full-batch per-item mean.

    ``optimizer.zero_grad()`` is not needed (each window starts from zero by itself) but
    harmless between windows, and with ``set_to_none=True`` (the default) also within one,
    including right before ``step`` as in a hand-written loop.
    Never ``zero_grad(set_to_none=False)`` inside a window: for fp32 parameters it erases the sum.
    A parameter belongs to one GradAccumulator at a time: building a second one over the
    same parameters raises until ``release()`` is called on the first.

    Data parallel (run the same loop on every rank, each on its share of the data):

    - no DDP wrapper: ``step`` all-reduces (sum) each fp32 bucket once, and divides by
      ``world_size * micro_batches`` (or by the global item count, itself all-reduced).
      Nothing is communicated during the micro-batches. Broadcast the initial weights
      first (``fusedaccum.broadcast_parameters(model)``), as DDP's constructor would.
    - ``DistributedDataParallel`` over fp32 parameters: show it to the accumulator
      (``GradAccumulator(ddp_model, ...)`` or ``accumulate(ddp_model)``, which enters
      ``no_sync()`` on all but the last micro-batch); DDP then reduces once per window and
      the accumulator communicates only the item count (with ``num_items``). A partial
      window closed by ``step(force=True)`` ran its last micro-batch under ``no_sync()``
      (``accumulate`` cannot know it was the last): ``step`` all-reduces its buckets then.
      Refused, with an error that says what to do instead: DDP with bf16/fp16 parameters
      (DDP would reduce every micro-batch), with ``gradient_as_bucket_view=True`` (DDP would
      take ``param.grad`` away from the buckets), or not covering all the parameters.

    One reducer only: a DDP model shown to the accumulator turns its own reduction off; a
    DDP model with an explicit ``process_group`` (or False) raises, and so does a DDP model
    shown only after the accumulator has already reduced a window itself. The accumulator
    cannot see a DDP wrapper it is never shown: that model gets no ``no_sync``, DDP
    averages every micro-batch's running sum and the accumulator sums once more, which is
    still the right gradient (both are linear, and averaging equal values changes nothing)
    but K+1 all-reduces per window instead of one; show the model.
    ``step(force=True)`` is exact when the partial window's length differs across ranks: it
    all-reduces the micro-batch count too. The calls are collectives: every rank needs at
    least one micro-batch per window and must call ``step`` alike (same ``force``,
    ``num_items`` on all ranks or on none).
    """

    def __init__(self, params, accumulation_steps: int, *, max_norm: "float | None" = None,
                 norm_type: float = 2.0, scaler: "LossScaler | None" = None,
                 accum_dtype: torch.dtype = torch.float32, process_group=None):
        # Validate everything before the buckets re-point any param.grad.
        if (isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, numbers.Integral)
                or accumulation_steps < 1):
            raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if max_norm is not None:
            if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not max_norm >= 0:
                raise ValueError(f"max_norm must be a number >= 0 or None, got {max_norm!r}")
            max_norm = float(max_norm)
        norm_type = _norm_order(norm_type)
        if scaler is not None and not isinstance(scaler, LossScaler):
            raise TypeError(f"scaler must be a fusedaccum.LossScaler or None, got {type(scaler).__name__} "
                            "(a torch.amp.GradScaler's state_dict() loads into a LossScaler)")
        module = params if isinstance(params, torch.nn.Module) else None
        if module is not None:
            params = module.parameters()
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        devices = {p.device for p in params if isinstance(p, torch.Tensor) and p.requires_grad}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}: "
                             "the global norm and the skip decision are taken on one device")
        _dist.check_process_group(process_group)
        if module is not None and _dist.is_ddp(module):
            _dist.check_ddp(module, [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad],
                            process_group)

        self.buckets = GradBuckets(params, accum_dtype=accum_dtype)
        self.accumulation_steps = int(accumulation_steps)
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scaler = scaler
        self.device = self.buckets.buckets[0].device
        self._module = module
        self._param_ids = {id(p) for p in self.buckets.params}
        self._accums = [b.accum for b in self.buckets]
        # Where the processed gradient goes: in place for fp32, the landing bucket otherwise.
        self._outs = None if all(b.landing is None for b in self.buckets) else [
            b.accum if b.landing is None else b.landing for b in self.buckets]
        self._lowp = [b for b in self.buckets if b.landing is not None]
        self._optimizers_checked: dict = {}
        self._bn_warned = False
        self._bn_layers = weakref.WeakKeyDictionary()  # model -> its BatchNorm layers
        self._process_group = process_group
        # Who all-reduces: _ddp_comm once a DDP model has been shown; else _comm, fixed at the
        # first step that reduces (an auto "nobody" stays open: a DDP model may still come).
        self._ddp_comm: "_dist.Comm | None" = None
        self._comm: "_dist.Comm | None" = None
        self._ddp_checked = weakref.WeakSet()  # the DDP models already checked
        if module is not None and _dist.is_ddp(module):
            self._ddp_checked.add(module)
            self._ddp_comm = _dist.ddp_comm(module)
        self._reset_window()

    # ------------------------------------------------------------------ window state
    def _reset_window(self) -> None:
        self._micro = 0  # micro-batches accumulated in this window (host int: no sync)
        self._items_given: "bool | None" = None  # whether num_items came with this window's micro-batches
        self._items_host = 0  # Python-number part of the window's items
        self._items_dev: "torch.Tensor | None" = None  # device part (fp64 0-d), summed without sync
        self._unsynced = False  # last backward ran under DDP no_sync
        self._processed = None  # (stats, items) once step() closed the window and the optimizer has not run

    @property
    def micro_batches(self) -> int:
        """Micro-batches accumulated in the current window."""
        return self._micro

    @property
    def params(self) -> list:
        return self.buckets.params

    def _scale_active(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    # ------------------------------------------------------------------ checks
    def _check_items(self, num_items):
        """Validate num_items for the next micro-batch; return (host_part, device_part)."""
        given = num_items is not None
        if self._micro > 0 and given != self._items_given:
            had = "with" if self._items_given else "without"
            raise ValueError(
                f"num_items must be given on every micro-batch of a window or on none: micro-batches 1.."
                f"{self._micro} of this window came {had} num_items, micro-batch {self._micro + 1} "
                f"{'with' if given else 'without'}")
        if not given:
            return 0, None
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1 or num_items.is_complex() or num_items.dtype == torch.bool:
                raise ValueError(f"num_items must be a one-element real tensor, got shape "
                                 f"{tuple(num_items.shape)} dtype {num_items.dtype}")
            if num_items.device.type == "cpu" and self.device.type != "cpu":
                return self._check_host_items(num_items.item()), None  # a host tensor: no device sync
            if num_items.device != self.device:
                raise ValueError(f"num_items is on {num_items.device}, the parameters on {self.device}")
            # Not checked for > 0: that would read the device. A window of 0 items gives a
            # non-finite gradient, found_inf, and a skipped step.
            # A copy: the caller may reuse (and refill) its counter tensor.
            return 0, num_items.detach().reshape(()).to(torch.float64, copy=True)
        return self._check_host_items(num_items), None

    @staticmethod
    def _check_host_items(n):
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n < 0:
            raise ValueError(f"num_items must be a number >= 0 or a one-element tensor, got {n!r}")
        return n

    def _check_optimizer(self, optimizer) -> None:
        if not callable(getattr(optimizer, "step", None)) or not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        groups = optimizer.param_groups
        signature = tuple((id(g["params"]), len(g["params"])) for g in groups)
        if self._optimizers_checked.get(id(optimizer)) == signature:
            return
        for gi, g in enumerate(groups):
            for pi, p in enumerate(g["params"]):
                if p.requires_grad and id(p) not in self._param_ids:
                    raise ValueError(
                        f"optimizer.param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}, {p.dtype}) "
                        "is not managed by this GradAccumulator: its gradient would be neither accumulated "
                        "nor normalized; build the GradAccumulator over the same parameters")
        self._optimizers_checked[id(optimizer)] = signature

    def _warn_batchnorm(self, model, stacklevel: int) -> None:
        if self._bn_warned or self.accumulation_steps == 1 or not isinstance(model, torch.nn.Module):
            return
        # The module walk once per model; the training flags on every call (a layer may be
        # switched to train mode at any time).
        if model not in self._bn_layers:
            self._bn_layers[model] = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
        for name, m in self._bn_layers[model]:
            if m.training:
                self._bn_warned = True
                warnings.warn(
                    f"{type(m).__name__} layer {name or '(root)'!r} is in training mode: with gradient "
                    f"accumulation its batch statistics (and running statistics) come from each "
                    f"micro-batch, not from the window of {self.accumulation_steps}, so training differs "
                    "from one large batch. Consider GroupNorm/LayerNorm, or BatchNorm in eval mode.",
                    UserWarning, stacklevel=stacklevel + 1)
                return

    # ------------------------------------------------------------------ micro-batches
    @contextlib.contextmanager
    def accumulate(self, model, *, sync: "bool | None" = None):
        """Context for the forward and backward of one micro-batch.

        When ``model`` has ``no_sync()`` (DDP), it is entered on all but the last micro-batch
        of a window, so gradients are all-reduced once per window; otherwise nothing is done.
        ``sync=True`` forces DDP's all-reduce on this micro-batch (optional on the last
        micro-batch of a partial window: without it, ``step(force=True)`` all-reduces the
        window's buckets itself over DDP's group).

        no_sync is used only when every parameter is fp32: bf16/fp16 gradients move from
        ``param.grad`` into the fp32 bucket after each backward, so a wrapper must reduce
        each micro-batch (a skipped reduce could not be caught up; a real DDP model is
        refused in that case, see below). Also warns once when ``model`` holds BatchNorm
        layers in training mode.

        A ``DistributedDataParallel`` model turns the accumulator's own all-reduce off (DDP
        reduces) after checking that DDP can do it right; it raises, before the forward and
        changing nothing, for bf16/fp16 parameters, ``gradient_as_bucket_view=True``, DDP not
        covering every parameter, an explicit ``process_group``, or an accumulator that has
        already reduced a window itself (see the class docstring).
        """
        if _dist.is_ddp(model) and model not in self._ddp_checked:
            self._adopt_ddp(model)
        self._warn_batchnorm(model, stacklevel=3)  # the user's with-statement, through contextlib
        no_sync = getattr(model, "no_sync", None)
        last = self._micro + 1 >= self.accumulation_steps
        if sync is None:
            sync = last
        if sync or not callable(no_sync) or self._lowp:
            yield
            self._unsynced = False
            return
        with no_sync():
            yield
        self._unsynced = True

    def _adopt_ddp(self, ddp) -> None:
        """DDP all-reduces from now on: check it can, then turn the accumulator's reduction off."""
        _dist.check_ddp(ddp, self.buckets.params, self._process_group)
        if self._comm is not None and self._comm.reduces_grads:
            raise RuntimeError(
                "this GradAccumulator has already all-reduced its own gradients (process_group=None chose "
                "the default group at its first step, when no DistributedDataParallel model had been shown "
                "to it); with a DDP model now, both would reduce. Show the DDP model from the start: "
                "GradAccumulator(ddp_model, ...), or accumulate(ddp_model) on every micro-batch")
        comm = _dist.ddp_comm(ddp)
        if self._ddp_comm is not None and self._ddp_comm != comm:
            raise ValueError("a second DistributedDataParallel model with another process group: one "
                             "GradAccumulator follows one DDP model")
        self._ddp_comm = comm
        self._ddp_checked.add(ddp)

    def backward(self, loss: torch.Tensor, num_items=None) -> None:
        """Backward of one micro-batch's ``loss``, folded into the window's buckets.

        Without ``num_items``, ``loss`` is the micro-batch's mean and the window is divided by
        the number of micro-batches it accumulated. With ``num_items`` (given on every
        micro-batch of the window; an int or a one-element device tensor, summed on the
        device), ``loss`` is a SUM over that many items and the window is divided by its
        total items. The loss is multiplied by the scaler's scale when a scaler is set.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (one element), got shape {tuple(loss.shape)}; "
                             "reduce it with .mean() or .sum()")
        if not loss.requires_grad:
            raise ValueError("loss does not require grad: was it computed under torch.no_grad(), "
                             "or from parameters with requires_grad=False?")
        if self._processed is not None:
            raise RuntimeError("step() processed this window's gradient but optimizer.step() raised: call "
                               "step(optimizer) again to finish the window before the next backward")
        if self._micro >= self.accumulation_steps:
            raise RuntimeError(f"this window already holds accumulation_steps={self.accumulation_steps} "
                               "micro-batches: call step(optimizer) before the next backward")
        host_items, dev_items = self._check_items(num_items)

        first = self._micro == 0
        if first:
            if self._module is not None:
                self._warn_batchnorm(self._module, stacklevel=2)  # the user's backward() call
            self._start_window()
        # optimizer.zero_grad(set_to_none=True) may have detached the views: re-point them
        # (identity checks only) so autograd accumulates into the buckets.
        self.buckets.attach()
        scaled = self.scaler.scale(loss) if self._scale_active() else loss
        scaled.reshape(()).backward()
        for b in self._lowp:
            # One pass: accum (+)= landing, landing = 0 for the next backward. On the first
            # micro-batch accum is overwritten, not read: that is the window's reset.
            accumulate_(b.accum, b.landing, 1.0, zero_grad=True, overwrite=first)

        self._micro += 1
        self._items_given = num_items is not None
        self._items_host += host_items
        if dev_items is not None:
            self._items_dev = dev_items if self._items_dev is None else self._items_dev + dev_items

    @torch.no_grad()
    def _start_window(self) -> None:
        # The processed gradient of the last step lives in param.grad until now.
        for b in self.buckets:
            if b.landing is None:
                b.accum.zero_()  # autograd accumulates into it in place
            else:
                b.landing.zero_()  # accum is reset lazily by overwrite=True

    # ------------------------------------------------------------------ step
    def _resolve_comm(self) -> "_dist.Comm":
        """Who all-reduces this window (see the class docstring)."""
        if self._ddp_comm is not None:
            return self._ddp_comm
        if self._comm is None:
            comm = _dist.resolve(self._process_group)
            if comm.kind == "local" and self._process_group is None:
                return comm  # not fixed: torch.distributed may be initialized, a DDP model shown, later
            self._comm = comm
        return self._comm

    def _normalizer(self, comm: "_dist.Comm", force: bool):
        """The window's normalizer, global over the ranks: (host number or 0-d fp64 device
        tensor, work handles to wait on). Launches the count's all-reduce when it can differ
        between ranks (num_items, or a forced partial window); no host sync."""
        host = self._items_host if self._items_given else self._micro
        dev = self._items_dev if self._items_given else None
        if not comm.communicates:
            return (host if dev is None else dev + host), []
        if not (self._items_given or force):
            # Every rank closes a full window of accumulation_steps micro-batch means.
            return host * comm.world_size, []
        count = torch.full((1,), host, dtype=torch.float64, device=self.device)
        if dev is not None:
            count += dev
        return count.reshape(()), _dist.all_reduce_async([count], comm.group)

    def _inv_scale(self, denom):
        """1 / (loss_scale * denom): a float, or a 0-d fp32 device tensor (no sync)."""
        scale = self.scaler.scale_tensor(self.device) if self._scale_active() else None
        if scale is None and not isinstance(denom, torch.Tensor):
            return 1.0 / denom if denom else math.inf  # 0 items: a non-finite step, skipped
        if scale is not None:
            denom = scale.double() * denom
        # A window of <= 0 items (a negative device count): an inf inverse, skipped as on overflow.
        return torch.where(denom > 0, denom, 0.0).reciprocal().float()

    def step(self, optimizer, *, force: bool = False) -> "StepResult | None":
        """Close the window when it holds ``accumulation_steps`` micro-batches (or, with
        ``force=True``, any number >= 1), else return None.

        Closing: one fused pass computes the norm and the inf/NaN flag of the normalized,
        unscaled gradient, and writes ``grad * inv * min(1, max_norm / (norm + eps))`` into
        every ``param.grad`` (parameter dtype; it stays there until the next window's first
        ``backward``). Then ``optimizer.step()`` runs unless inf/NaN was found, the scaler
        is updated, and a new window starts.

        Host syncs: optimizers with PyTorch's fused AMP contract
        (``_step_supports_amp_scaling``, e.g. ``AdamW(fused=True)``, ``SGD(fused=True)``)
        receive ``found_inf`` as a device tensor and skip on the device: no sync, once every
        parameter with a gradient has its optimizer state (after the first successful step that
        saw it; ``SGD(fused=True)`` without momentum needs none; before, ``SGD(fused=True)``
        with momentum would keep uninitialised momentum buffers from a step skipped on the
        device). Any other optimizer, and a fused one until then, costs exactly one sync per
        optimizer step (``found_inf.item()`` decides whether to call ``optimizer.step()``).
        Nothing else reads the device.

        If ``optimizer.step()`` raises, the window stays closed with its processed gradient
        in ``param.grad``: call ``step`` again (e.g. with a fixed optimizer) to finish it;
        ``backward`` and ``state_dict`` refuse until then.

        A window whose ``num_items`` add up to 0 or less (a negative device count) has no
        gradient to normalize: its step is
        skipped as on overflow (``found_inf`` = 1; a scaler backs off), with a warning when
        the count is a host number.

        Data parallel, without DDP: before the fused pass, one ``all_reduce(SUM)`` per
        bucket, plus one of the window's item count (fp64, one element, on the device) with
        ``num_items`` or ``force=True``; under DDP only that count, unless the window's last
        micro-batch ran under ``no_sync()`` (a partial window closed with ``force=True``):
        then the buckets too, over DDP's group. All launched at once (``async_op=True``),
        then waited on. A collective: call it on every rank alike.
        """
        if self._processed is None:
            if self._micro == 0:
                if force:
                    raise RuntimeError("step(force=True) with nothing accumulated: call backward() at least "
                                       "once in this window first")
                return None
            if self._micro < self.accumulation_steps and not force:
                return None
            self._check_optimizer(optimizer)
            self._processed = self._close_window(force)
        else:
            self._check_optimizer(optimizer)
        stats, items = self._processed
        total_norm, found_inf = stats[0], stats[1]
        # If the optimizer raises, the window stays closed and processed: a retry steps with
        # the same gradient instead of normalizing and clipping it a second time.
        self._optimizer_step(optimizer, found_inf)
        if self._scale_active():
            self.scaler.update(found_inf)
        result = StepResult(total_norm=total_norm, found_inf=found_inf, micro_batches=self._micro, num_items=items)
        self._reset_window()
        return result

    def _close_window(self, force: bool):
        """All-reduce (data parallel), then the fused unscale/norm/clip pass into param.grad.
        Returns (stats, the window's item count for the result)."""
        comm = self._resolve_comm()
        if self._unsynced and comm.kind != "ddp":
            raise RuntimeError(
                "the last micro-batch of this window ran under model.no_sync() of a model that is not a "
                "DistributedDataParallel shown to this GradAccumulator, so nobody all-reduced the window's "
                "gradients; use accumulate(model, sync=True) on the last micro-batch of a partial window")
        # Under DDP, a last micro-batch run under no_sync() (a partial window closed by
        # force=True: accumulate() cannot know it is the last) was reduced by nobody: reduce
        # the window's sums here instead, over DDP's group, and normalize as the accumulator's
        # own reduction does.
        reduce_here = comm.reduces_grads or (self._unsynced and comm.communicates)
        if self._items_given and self._items_dev is None and self._items_host == 0 and not comm.communicates:
            warnings.warn(f"the window's {self._micro} micro-batches hold 0 items in total (num_items): there is "
                          "no gradient to normalize, so the step is skipped as on overflow (found_inf = 1)",
                          RuntimeWarning, stacklevel=3)

        # Data parallel: the count (tiny, needed first) and then every bucket, all in flight at
        # once; waiting makes the fused pass below see the global sums (on CUDA/NCCL wait()
        # orders the streams, the host does not block).
        denom, works = self._normalizer(comm, force)
        if reduce_here:
            works += _dist.all_reduce_async(self._accums, comm.group)
        for work in works:
            work.wait()
        global_items = denom if self._items_given and comm.communicates else None
        if comm.kind == "ddp" and comm.communicates and not reduce_here:
            # DDP averaged the sums over the ranks: multiply by world_size / global count.
            denom = denom / comm.world_size if isinstance(denom, torch.Tensor) else self._micro
        # optimizer.zero_grad() between the last backward and here would leave the optimizer
        # no gradient to step with: the window's sum is in the buckets, so point at it again.
        self.buckets.attach()
        stats = _unscale_clip_stats(self._accums, self._inv_scale(denom), self.max_norm, self.norm_type, CLIP_EPS,
                                    out=self._outs)
        return stats, (self._window_items() if global_items is None else global_items)

    def _window_items(self):
        if not self._items_given:
            return None
        if self._items_dev is None:
            return self._items_host
        return self._items_dev + self._items_host

    @staticmethod
    def _optimizer_step(optimizer, found_inf: torch.Tensor) -> None:
        if (getattr(optimizer, "_step_supports_amp_scaling", False) and not _takes_grad_scaler(optimizer)
                and _state_survives_device_skip(optimizer)):
            # torch.amp.GradScaler's contract for fused optimizers: the gradients are already
            # unscaled (grad_scale None); found_inf makes the kernel skip the update, and
            # undo its step count, on the device.
            optimizer.grad_scale = None
            optimizer.found_inf = found_inf
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale
                del optimizer.found_inf
        elif not found_inf.item():  # the one host sync per optimizer step, documented in step()
            optimizer.step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The partial window (bucket sums, micro-batch and item counts) and the scaler.

        Save it with the model's and optimizer's state dicts; a run resumed from the three
        continues bit-identically. Reads the scaler's scale on the host (one sync).
        Data parallel: mid-window the sums are this rank's own (not yet all-reduced), so
        every rank saves and loads its own state dict."""
        if self._processed is not None:
            raise RuntimeError("step() processed this window's gradient but optimizer.step() raised: call "
                               "step(optimizer) again to finish the window before saving")
        mid_window = self._micro > 0
        return {
            "version": _STATE_VERSION,
            "accumulation_steps": self.accumulation_steps,
            "micro_batches": self._micro,
            "items_given": self._items_given,
            "items_host": self._items_host,
            "items_device": None if self._items_dev is None else self._items_dev.clone(),
            "bucket_layout": [(str(b.dtype), b.numel) for b in self.buckets],
            # Mid-window the fp32 sums are the whole state (landing buffers are zero then);
            # between windows the buckets are reset before the next window accumulates.
            "buckets": [b.accum.clone() for b in self.buckets] if mid_window else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``'s window and scaler; every check runs before anything changes."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        required = ("version", "micro_batches", "items_given", "items_host", "items_device", "bucket_layout",
                    "buckets", "scaler")
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise KeyError(f"GradAccumulator state dict lacks {missing}")
        if state_dict["version"] != _STATE_VERSION:
            raise ValueError(f"GradAccumulator state dict version {state_dict['version']!r}; "
                             f"this fusedaccum reads version {_STATE_VERSION}")
        layout = [(str(b.dtype), b.numel) for b in self.buckets]
        saved_layout = [tuple(x) for x in state_dict["bucket_layout"]]
        if saved_layout != layout:
            raise ValueError(f"the state dict's buckets {saved_layout} do not match this GradAccumulator's "
                             f"{layout} (different parameters?)")
        micro = state_dict["micro_batches"]
        if (isinstance(micro, bool) or not isinstance(micro, numbers.Integral)
                or not 0 <= micro <= self.accumulation_steps):
            raise ValueError(f"micro_batches={micro!r} in the state dict; expected 0..{self.accumulation_steps}")
        buckets = state_dict["buckets"]
        if micro > 0:
            if buckets is None or len(buckets) != len(layout):
                raise ValueError("the state dict holds a partial window but not its bucket contents")
            for i, (t, b) in enumerate(zip(buckets, self.buckets)):
                if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1
                        or t.numel() != b.numel):
                    raise ValueError(f"state dict bucket {i} is not a 1-D fp32 tensor of {b.numel} elements")
        if (state_dict["scaler"] is None) != (self.scaler is None):
            raise ValueError("the state dict was saved " + ("with" if self.scaler is None else "without") +
                             " a scaler but this GradAccumulator has " + ("none" if self.scaler is None else "one"))
        items_dev = state_dict["items_device"]
        if items_dev is not None and (not isinstance(items_dev, torch.Tensor) or items_dev.numel() != 1):
            raise ValueError("items_device in the state dict must be None or a one-element tensor")
        if state_dict["items_given"] not in (None, True, False):
            raise ValueError(f"items_given={state_dict['items_given']!r} in the state dict; expected a bool or None")
        self._check_host_items(state_dict["items_host"])

        if self.scaler is not None:
            self.scaler.load_state_dict(state_dict["scaler"])  # validates before it changes anything
        self._reset_window()
        with torch.no_grad():
            if micro > 0:
                for t, b in zip(buckets, self.buckets):
                    b.accum.copy_(t)
                    if b.landing is not None:
                        b.landing.zero_()
        self._micro = int(micro)
        self._items_given = state_dict["items_given"] if micro > 0 else None
        self._items_host = state_dict["items_host"]
        self._items_dev = None if items_dev is None else items_dev.to(self.device, torch.float64).reshape(())

    def release(self) -> None:
        """Give the parameters up (``GradBuckets.release``), e.g. before building another
        GradAccumulator over the same model."""
        self.buckets.release()

    def __repr__(self) -> str:
        return (f"GradAccumulator(accumulation_steps={self.accumulation_steps}, max_norm={self.max_norm}, "
                f"norm_type={self.norm_type}, scaler={self.scaler!r}, micro_batches={self._micro}, "
                f"{self.buckets!r})")


_GRAD_SCALER_KWARG: dict = {}


def _takes_grad_scaler(optimizer) -> bool:
    """Optimizers with the older ``step(grad_scaler=...)`` contract expect a GradScaler object;
    they get the synchronous path instead."""
    cls = type(optimizer)
    if cls not in _GRAD_SCALER_KWARG:
        import inspect

        try:
            _GRAD_SCALER_KWARG[cls] = "grad_scaler" in inspect.signature(optimizer.step).parameters
        except (TypeError, ValueError):
            _GRAD_SCALER_KWARG[cls] = False
    return _GRAD_SCALER_KWARG[cls]
