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

Data parallel: the accumulator asks its engine (``fusedaccum.parallel``, one object per
engine: none, process group, DDP) what a micro-batch runs in, what the step reduces before
the norm and how the normalizer becomes global; it holds no engine-specific branch.
"""

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from . import _checkpoint, _optim, _validate
from .buckets import GradBuckets
from .guards import WindowGuard
from .ops import CLIP_EPS, _unscale_clip_stats, accumulate_
from .parallel import Window, engine_for
from .scaler import LossScaler

__all__ = ["GradAccumulator", "StepResult"]


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
        # Validate everything (the engine's checks too) before the buckets re-point any param.grad.
        accumulation_steps, max_norm, norm_type = _validate.check_args(accumulation_steps, max_norm, norm_type,
                                                                       scaler)
        module, params = _validate.check_params(params)
        self._engine = engine_for(process_group, module,
                                  [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad])

        self.buckets = GradBuckets(params, accum_dtype=accum_dtype)
        self.accumulation_steps = accumulation_steps
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
        self._bn = _validate.BatchNormWatch(self.accumulation_steps)
        self._reset_window()
        # fp32 buckets are where param.grad accumulate: an in-place change to them is a change of the sum.
        self._guard = WindowGuard(self, self.buckets, [b.accum for b in self.buckets if b.landing is None])
        self._guard.sync()

    # ------------------------------------------------------------------ window state
    def _reset_window(self) -> None:
        self._win = Window()
        self._processed = None  # (stats, items) once step() closed the window and the optimizer has not run

    def window_open(self) -> bool:
        """Whether the window holds micro-batches that no optimizer step has used yet."""
        return self._win.micro > 0 or self._processed is not None

    def discard_window(self) -> None:
        """Drop the current window (its micro-batches and sums) without a step: after a guard
        reported a damaged window, or to skip a window on purpose."""
        self.buckets.zero_()
        self._reset_window()
        self._guard.sync()

    @property
    def micro_batches(self) -> int:
        """Micro-batches accumulated in the current window."""
        return self._win.micro

    @property
    def params(self) -> list:
        return self.buckets.params

    def _scale_active(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

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
        self._engine = self._engine.adopt(model, self.buckets.params)  # checks; may hand over to a wrapper's
        self._bn.check(model, stacklevel=3)  # the user's with-statement, through contextlib
        last = self._win.micro + 1 >= self.accumulation_steps
        with self._engine.micro_batch(model, self._win, sync=last if sync is None else sync,
                                      lowp=bool(self._lowp)):
            yield

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
        win = self._win
        if win.micro >= self.accumulation_steps:
            raise RuntimeError(f"this window already holds accumulation_steps={self.accumulation_steps} "
                               "micro-batches: call step(optimizer) before the next backward")
        host_items, dev_items = _validate.check_items(num_items, win, self.device)
        self._guard.check("acc.backward()")

        first = win.micro == 0
        if first:
            if self._module is not None:
                self._bn.check(self._module, stacklevel=2)  # the user's backward() call
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

        self._guard.sync()
        win.micro += 1
        win.items_given = num_items is not None
        win.items_host += host_items
        if dev_items is not None:
            win.items_dev = dev_items if win.items_dev is None else win.items_dev + dev_items

    @torch.no_grad()
    def _start_window(self) -> None:
        # The processed gradient of the last step lives in param.grad until now.
        for b in self.buckets:
            if b.landing is None:
                b.accum.zero_()  # autograd accumulates into it in place
            else:
                b.landing.zero_()  # accum is reset lazily by overwrite=True

    # ------------------------------------------------------------------ step
    def _inv_scale(self, denom):
        """1 / (loss_scale * denom): a float, or a 0-d fp32 device tensor (no sync)."""
        scale = self.scaler.scale_tensor(self.device) if self._scale_active() else None
        if scale is None and not isinstance(denom, torch.Tensor):
            return 1.0 / denom if denom else math.inf  # 0 items: a non-finite step, skipped
        if scale is not None:
            denom = scale.double() * denom
        return denom.reciprocal().float()

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

        A window whose ``num_items`` add up to 0 has no gradient to normalize: its step is
        skipped as on overflow (``found_inf`` = 1; a scaler backs off), with a warning when
        the count is a host number.

        Data parallel, without DDP: before the fused pass, one ``all_reduce(SUM)`` per
        bucket, plus one of the window's item count (fp64, one element, on the device) with
        ``num_items`` or ``force=True``; under DDP only that count, unless the window's last
        micro-batch ran under ``no_sync()`` (a partial window closed with ``force=True``):
        then the buckets too, over DDP's group. All launched at once (``async_op=True``),
        then waited on. A collective: call it on every rank alike.
        """
        self._guard.check("acc.step()")
        if self._processed is None:
            if self._win.micro == 0:
                if force:
                    raise RuntimeError("step(force=True) with nothing accumulated: call backward() at least "
                                       "once in this window first")
                return None
            if self._win.micro < self.accumulation_steps and not force:
                return None
            _optim.check_optimizer(optimizer, self._param_ids, self._optimizers_checked)
            self._processed = self._close_window(force)
            self._guard.sync()
        else:
            _optim.check_optimizer(optimizer, self._param_ids, self._optimizers_checked)
        stats, items = self._processed
        total_norm, found_inf = stats[0], stats[1]
        # If the optimizer raises, the window stays closed and processed: a retry steps with
        # the same gradient instead of normalizing and clipping it a second time.
        with self._guard.stepping():
            _optim.optimizer_step(optimizer, found_inf)
        if self._scale_active():
            self.scaler.update(found_inf)
        result = StepResult(total_norm=total_norm, found_inf=found_inf, micro_batches=self._win.micro,
                            num_items=items)
        self._reset_window()
        return result

    def _close_window(self, force: bool):
        """The engine's reductions, then the fused unscale/norm/clip pass into param.grad.
        Returns (stats, the window's item count for the result)."""
        denom, items = self._engine.reduce(self._accums, self._win, force, self.device)
        if isinstance(denom, numbers.Real) and denom == 0:
            warnings.warn(f"the window's {self._win.micro} micro-batches hold 0 items in total (num_items): "
                          "there is no gradient to normalize, so the step is skipped as on overflow "
                          "(found_inf = 1)", RuntimeWarning, stacklevel=3)
        # optimizer.zero_grad() between the last backward and here would leave the optimizer
        # no gradient to step with: the window's sum is in the buckets, so point at it again.
        self.buckets.attach()
        hook = self._engine.reduce_partials
        stats = _unscale_clip_stats(self._accums, self._inv_scale(denom), self.max_norm, self.norm_type, CLIP_EPS,
                                    out=self._outs, **({} if hook is None else {"reduce_partials": hook}))
        return stats, items

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The partial window (bucket sums, micro-batch and item counts) and the scaler.

        Save it with the model's and optimizer's state dicts; a run resumed from the three
        continues bit-identically. Reads the scaler's scale on the host (one sync).
        Data parallel: mid-window the sums are this rank's own (not yet all-reduced), so
        every rank saves and loads its own state dict."""
        return _checkpoint.save_state(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``'s window and scaler; every check runs before anything changes."""
        _checkpoint.load_state(self, state_dict, _validate.check_host_items)
        self._guard.sync()

    def release(self) -> None:
        """Give the parameters up (``GradBuckets.release``), e.g. before building another
        GradAccumulator over the same model."""
        self._guard.release()
        self.buckets.release()

    def __repr__(self) -> str:
        return (f"GradAccumulator(accumulation_steps={self.accumulation_steps}, max_norm={self.max_norm}, "
                f"norm_type={self.norm_type}, scaler={self.scaler!r}, micro_batches={self._win.micro}, "
                f"{self.buckets!r})")
