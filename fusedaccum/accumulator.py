"""GradAccumulator: the gradient-accumulation training loop, correct and free of host syncs.

One window = the micro-batches of one optimizer step. The buckets hold the *sum* of the
window's (scaled) micro-batch gradients; normalization (1/micro-batches or 1/items), the
loss-scale unscale, the inf/NaN check, the global norm and the clip are folded into one
multiplier and applied by one fused pass at the step (``ops._unscale_clip_stats``).
Because the normalizer is applied last, a partial last window and micro-batches of
different sizes are exact without any bookkeeping on the user's side.

The buckets' life cycle per dtype (fp32, bf16/fp16 through a landing buffer or directly):
docs/kernels.md, "Bucket life cycle".

Host syncs on the step path, and when: docs/guide.md, "Host syncs". Data parallel: the
accumulator asks its engine (``fusedaccum.parallel``: one object per engine) what a
micro-batch runs in and what the step reduces; it holds no engine-specific branch.
"""

import contextlib

import torch

from . import _checkpoint, _last_pass, _optim, _validate
from ._close import close_window
from ._usage import ParamUsage
from . import signals as _signals
from .buckets import GradBuckets
from .guards import WindowGuard
from .ops import _sum_squares, sq_slots
from .parallel import Window, engine_for
from ._store_watch import StoreOverflowWatch
from .scaler import LossScaler, window_scale
from .step_result import StepResult

__all__ = ["GradAccumulator", "StepResult"]


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
            world size > 1 and no DistributedDataParallel or FSDP2 model has been shown to
            this accumulator; nobody otherwise. A ``ProcessGroup``: that group. False: never
            communicate (the parameters are not data-parallel).
        noise_scale: False (default), True, or a ``NoiseScaleSettings`` (smoothing, an
            ``AdaptiveSteps`` policy): the gradient noise statistics of every window in
            ``StepResult.noise_scale`` (docs/signals.md). Needs ``norm_type=2``.
        fsdp_sync: with an FSDP2 model, when FSDP2 reduce-scatters: ``"micro_batch"``
            (default: after every micro-batch; only sharded gradients are held) or
            ``"window"`` (``accumulate`` turns the sync off on all but the last micro-batch:
            one reduce-scatter per window, unsharded fp32 gradients held across it).
        pipeline_group: this rank's pipeline-parallel group (one rank per stage; a ProcessGroup
            or a 1-D DeviceMesh): the norm, the skip and the normalizer become global across
            stages, the count and loss are the last stage's (docs/nd-parallel.md).

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

    ``optimizer.zero_grad()`` is not needed; with ``set_to_none=True`` (the default) it is
    harmless anywhere. The misuses that would corrupt a window (``loss.backward()``,
    ``optimizer.step()`` or ``zero_grad(set_to_none=False)`` inside it) raise before a step
    uses it (docs/guide.md, "Misuses"). A parameter belongs to one GradAccumulator at a time.

    Data parallel: run the same loop on every rank; exactly one engine of
    ``fusedaccum.parallel`` reduces, once per window: the accumulator itself (no wrapper),
    ``DistributedDataParallel`` or FSDP2 (``fully_shard``) shown to it as the model or
    through ``accumulate``. What is communicated when, and what is refused:
    docs/data-parallel.md and docs/fsdp2.md. ``backward`` and ``step`` are then collectives:
    every rank calls them alike.
    """

    def __init__(self, params, accumulation_steps: int, *, max_norm: "float | None" = None,
                 norm_type: float = 2.0, scaler: "LossScaler | None" = None,
                 accum_dtype: torch.dtype = torch.float32, process_group=None, noise_scale=False,
                 fsdp_sync: str = "micro_batch", pipeline_group=None):
        # Validate everything (the engine's checks too) before the buckets re-point any param.grad.
        accumulation_steps, max_norm, norm_type = _validate.check_args(accumulation_steps, max_norm, norm_type,
                                                                       scaler)
        noise_settings = _signals.settings_from(noise_scale)
        if noise_settings is not None and norm_type != 2.0:
            raise ValueError(f"noise_scale needs the window's 2-norm, but norm_type={norm_type}: use norm_type=2 "
                             "(the default) with noise_scale")
        module, params = _validate.check_params(params)
        _validate.check_pipeline(pipeline_group, scaler, noise_settings is not None)
        self._engine = engine_for(process_group, module,
                                  [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad],
                                  {"fsdp_sync": fsdp_sync, "noise_scale": noise_settings is not None,
                                   "pipeline_group": pipeline_group, "norm_type": norm_type})

        self.buckets = GradBuckets(params, accum_dtype=accum_dtype, direct=None if noise_settings is None else False)
        self._k = accumulation_steps
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scaler = scaler
        self.device = self.buckets.buckets[0].device
        self._module = module
        self._param_ids = {id(p) for p in self.buckets.params}
        self._accums = [b.accum for b in self.buckets]
        self._lowp = [b for b in self.buckets if b.landing is not None]
        # Store-overflow skips in a row, without a scaler (only fp16/bf16 gradients can overflow on store).
        self._store_watch = StoreOverflowWatch() if any(b.dtype != torch.float32 for b in self.buckets) else None
        self._optimizers_checked, self._fold = _optim.OptimizerMemo(), _optim.Fold(self.buckets.params, self.device)
        self._bn = _validate.BatchNormWatch(self.accumulation_steps)
        self._signals = _signals.WindowSignals(self.buckets, noise_settings, sq_slots)
        self._wrapper_syncs = False  # the current micro-batch's backward runs a wrapper's reduction
        self._usage = ParamUsage(self.buckets, module, params)
        self._reset_window()
        # fp32 buckets are where param.grad accumulate: an in-place change to them is a change of the sum.
        self._guard = WindowGuard(self, self.buckets, [b.accum for b in self.buckets if b.landing is None])
        self._guard.sync()

    # ------------------------------------------------------------------ window state
    def _reset_window(self) -> None:
        self._win = Window()
        self._processed = None  # (stats, items, signals, owed apply) once step() closed the window, the optimizer not run
        self._signals.reset()

    def window_open(self) -> bool:
        """Whether the window holds micro-batches that no optimizer step has used yet."""
        return self._win.micro > 0 or self._processed is not None

    def discard_window(self) -> None:
        """Drop the current window (its micro-batches and sums) without a step: after a guard
        reported a damaged window, or to skip a window on purpose."""
        self.buckets.zero_()
        self._engine.discard()
        self._reset_window()
        self._guard.sync()

    @property
    def micro_batches(self) -> int:
        """Micro-batches accumulated in the current window."""
        return self._win.micro

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step. Settable between windows (the normalization is
        per window, so it stays exact); refused mid-window. Data parallel: set it alike on
        every rank (the adaptive policy does)."""
        return self._k

    @accumulation_steps.setter
    def accumulation_steps(self, k: int) -> None:
        k = _validate.check_args(k, None, 2.0, None)[0]
        if self._win.micro or self._processed is not None:
            raise RuntimeError(f"accumulation_steps can only change between windows: this window already holds "
                               f"{self._win.micro} micro-batches; set it after step() closes the window")
        self._k = k

    @property
    def noise_scale(self) -> "dict | None":
        """The last window's noise statistics as Python floats (``NoiseScale.to_host()``:
        one host sync, on request only), or None when off or before the first window."""
        last = self._signals.last
        return None if last is None else last.to_host()

    @property
    def accumulation_steps_changes(self) -> list:
        """Every change the adaptive policy made (``StepsChange``), in order."""
        return [] if self._signals.tracker is None else list(self._signals.tracker.changes)

    @property
    def params(self) -> list:
        """The parameters this accumulator manages: those given with ``requires_grad``, each once, grouped by bucket."""
        return self.buckets.params

    def _scale_active(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    # ------------------------------------------------------------------ micro-batches
    @contextlib.contextmanager
    def accumulate(self, model, *, sync: "bool | None" = None):
        """Context for the forward and backward of one micro-batch; what it enters is the
        engine's (``fusedaccum.parallel``).

        A model with ``no_sync()`` (DDP) runs all but the window's last micro-batch under it,
        so gradients are all-reduced once per window (only when every parameter is fp32:
        bf16/fp16 gradients leave ``param.grad`` after each backward, so a wrapper must
        reduce each micro-batch). An FSDP2 model with ``fsdp_sync="window"`` gets
        ``set_requires_gradient_sync(False)`` likewise; with ``"micro_batch"``, nothing.
        ``sync=True`` forces the reduction on this micro-batch: for the last micro-batch of a
        partial window (needed under FSDP2's window mode; under DDP, ``step(force=True)``
        all-reduces the buckets itself otherwise). Also warns once when ``model`` holds
        BatchNorm layers in training mode.

        A DDP or FSDP2 model takes the reduction over after checking that it can do it right;
        it raises, before the forward and changing nothing, in the cases the class docstring
        lists, or when the accumulator has already reduced a window itself.
        """
        self._guard.check_released("acc.accumulate()")
        self._engine = self._engine.adopt(model, self.buckets.params)  # checks; may hand over to a wrapper's
        self._bn.check(model, stacklevel=3)  # the user's with-statement, through contextlib
        if not self.window_open() and not self._win.parts:
            self.buckets.end_step()  # before the forward: direct buckets' step buffers are freed
        last = self._win.micro + 1 >= self.accumulation_steps
        small = self._signals.tracker is not None and self._k == 1  # the statistics need K = 1's unreduced sums
        sync = last and self._engine.syncs_in_backward(small) if sync is None else sync
        # Whether a wrapper (DDP) reduces in this backward: its buckets are then no small batch.
        self._wrapper_syncs = sync and self._engine.communicates and callable(getattr(model, "no_sync", None))
        try:
            with self._engine.micro_batch(model, self._win, sync=sync, lowp=bool(self._lowp)):
                yield
        finally:
            self._wrapper_syncs = False

    def backward(self, loss: torch.Tensor, num_items=None, *, retain_graph: "bool | None" = None,
                 end_micro_batch: bool = True) -> None:
        """Backward of one micro-batch's ``loss``, folded into the window's buckets.

        Without ``num_items``, ``loss`` is the micro-batch's mean and the window is divided by
        the number of micro-batches it accumulated. With ``num_items`` (given on every
        micro-batch of the window; an int or a one-element device tensor, summed on the
        device), ``loss`` is a SUM over that many items and the window is divided by its
        total items. The loss is multiplied by the scaler's scale when a scaler is set.

        Several backwards in one micro-batch (separate graphs, or ``retain_graph=True``, passed
        to autograd): ``end_micro_batch=False`` on all but the last; they count as one micro-batch
        and their losses and ``num_items`` add up (docs/guide.md, "Several backwards in one micro-batch").
        """
        _validate.check_loss(loss, end_micro_batch, self._signals.tracker is not None)
        self._usage.check_thawed()
        if self._processed is not None:
            raise RuntimeError("step() processed this window's gradient but optimizer.step() raised: call "
                               "step(optimizer) again to finish the window before the next backward")
        win = self._win
        if win.micro >= self.accumulation_steps:
            raise RuntimeError(f"this window already holds accumulation_steps={self.accumulation_steps} "
                               "micro-batches: call step(optimizer) before the next backward")
        host_items, dev_items = _validate.check_items(num_items, win, self.device)
        self._guard.check("acc.backward()")

        first = win.micro == 0 and not win.parts  # the window's first backward
        if first:
            if self._module is not None:
                self._bn.check(self._module, stacklevel=2)  # the user's backward() call
            self._engine.start_window(self.buckets)
            self.buckets.start_window()
            win.scale = window_scale(self.scaler, self.device)  # kept: a shared scaler may change mid-window
        # optimizer.zero_grad(set_to_none=True) may have detached the views: re-point them
        # (identity checks only) so autograd accumulates into the buckets.
        self.buckets.attach()
        scaled = loss if win.scale is None else loss * win.scale.to(loss.device, non_blocking=True)
        with self._guard.backward():  # raises if no managed parameter got a gradient: nothing counted yet
            scaled.reshape(()).backward(retain_graph=retain_graph)
        # Noise scale: whether this micro-batch is a small batch, and its 1/items² weight.
        weight = self._signals.weight(first, self._samples_first, host_items, dev_items, num_items is not None)
        last = _last_pass.ask(self, num_items, host_items, dev_items, end_micro_batch)  # the norm too, if last
        self.buckets.fold_landing(first, self._signals.sq, weight, last)  # bf16/fp16: into the fp32 sums
        self._signals.after_backward(loss, first, weight, _sum_squares)

        self._guard.sync()
        win.add_micro_batch(num_items is not None, host_items, dev_items, end_micro_batch)

    def _samples_first(self) -> bool:
        """Whether the fp32 buckets after this window's first backward hold a small batch:
        not the window itself (K > 1, or data parallel), not already reduced by a wrapper."""
        return not self._wrapper_syncs and (self._k > 1 or self._engine.communicates)

    # ------------------------------------------------------------------ step
    def step(self, optimizer, *, force: bool = False) -> "StepResult | None":
        """Close the window when it holds ``accumulation_steps`` micro-batches (or, with
        ``force=True``, any number >= 1), else return None.

        Closing: one fused pass computes the norm and the inf/NaN flag of the normalized,
        unscaled gradient, and writes ``grad * inv * min(1, max_norm / (norm + eps))`` into
        every ``param.grad`` (parameter dtype, until the next window's first ``backward``; torch's
        fused Adam/AdamW/SGD/Adagrad over fp32 parameters write it in their own kernel). Then
        ``optimizer.step()`` runs unless inf/NaN was found, the scaler is updated, and a new window starts.

        Host syncs: none with a fused optimizer (``AdamW(fused=True)``...) once every parameter
        with a gradient has its optimizer state; otherwise exactly one per optimizer step
        (``found_inf.item()``). Why: docs/guide.md, "Host syncs".

        If ``optimizer.step()`` raises, the window stays closed with its processed gradient
        in ``param.grad``: call ``step`` again (e.g. with a fixed optimizer) to finish it;
        ``backward`` and ``state_dict`` refuse until then.

        A window whose ``num_items`` add up to 0 or less (a negative device count) has no
        gradient to normalize: its step is
        skipped as on overflow (``found_inf`` = 1; a scaler backs off), with a warning when
        the count is a host number.

        Data parallel: the engine's collectives (docs/data-parallel.md) run right before the
        fused pass, launched asynchronously and waited on. A collective: call it on every rank.
        """
        self._guard.check("acc.step()")
        _validate.check_no_open_part(self._win.parts, "step()")
        if self._processed is None:
            if self._win.micro == 0:
                if force:
                    raise RuntimeError("step(force=True) with nothing accumulated: call backward() at least "
                                       "once in this window first")
                return None
            if self._win.micro < self.accumulation_steps and not force:
                return None
            _optim.check_optimizer(optimizer, self._param_ids, self._optimizers_checked)
            self._processed = close_window(self, force)
            self._guard.sync()
        else:
            _optim.check_optimizer(optimizer, self._param_ids, self._optimizers_checked)
        stats, items, signals, owed = self._processed
        total_norm, found_inf = stats[0], stats[1]
        # If the optimizer raises, the window stays closed and processed: a retry steps with
        # the same gradient instead of normalizing and clipping it a second time.
        with self._guard.stepping():
            _optim.window_step(optimizer, stats, owed, self._fold, self._guard.sync)  # apply, or fold into fused
        if self._scale_active():
            self.scaler.update(found_inf, store_overflow=stats[3])
        elif self._store_watch is not None:  # no scaler: a window that never fits its fp16/bf16 gradient warns too
            self._store_watch.note(stats[3] != 0)
        loss, noise, items_per_micro = signals
        micro = self._win.micro
        self._reset_window()
        change = None
        if noise is not None:
            # The adaptive policy: reads the host once every `every` windows (AdaptiveSteps).
            change = self._signals.tracker.decide(noise, items_per_micro, self._engine.world_size, self._k)
            if change is not None:
                self._k = change.new
        return StepResult(total_norm=total_norm, found_inf=found_inf, micro_batches=micro, num_items=items,
                          loss=loss, noise_scale=noise, accumulation_steps_change=change)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The partial window (bucket sums, micro-batch and item counts) and the scaler.

        Save it with the model's and optimizer's state dicts; a run resumed from the three
        continues bit-identically. Reads the scaler's scale on the host (one sync).
        Data parallel: mid-window the sums are this rank's own (not yet all-reduced), so
        every rank saves and loads its own state dict."""
        _validate.check_no_open_part(self._win.parts, "state_dict()")
        return _checkpoint.save_state(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore ``state_dict()``'s window and scaler; every check runs before anything changes."""
        _checkpoint.load_state(self, state_dict, _validate.check_host_items)
        self._guard.sync(saved=True)

    def release(self) -> None:
        """Give the parameters up (``GradBuckets.release``), e.g. before building another
        GradAccumulator over the same model. Warns if the window holds micro-batches no step
        used (as does collecting an accumulator, or one alive at exit); later calls raise."""
        self._guard.release()
        self.buckets.release()

    def __del__(self):  # micro-batches nobody stepped: warn (fusedaccum.guards.OpenWindowWarning)
        if "_guard" in self.__dict__:
            self._guard.dropped(self)

    def __repr__(self) -> str:
        return (f"GradAccumulator(accumulation_steps={self.accumulation_steps}, max_norm={self.max_norm}, "
                f"norm_type={self.norm_type}, scaler={self.scaler!r}, micro_batches={self._win.micro}, "
                f"{self.buckets!r})")
