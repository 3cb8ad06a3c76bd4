"""The Lightning precision plugin, written once for ``lightning.pytorch`` and ``pytorch_lightning``.

How Lightning 2.x accumulates (loops/optimization/automatic.py, loops/training_epoch_loop.py):
every batch runs ``training_step``, divides its loss by ``accumulate_grad_batches``
(``ClosureResult.from_training_step_output``) and calls strategy.backward -> precision.backward,
under DDP ``no_sync()`` on all but a window's last batch. On the K-th batch of a window, and on
the epoch's last batch (a partial window, still divided by K), ``LightningModule.optimizer_step``
-> strategy.optimizer_step -> ``precision.optimizer_step(optimizer, model, closure)`` runs the
closure (training_step and backward of that batch), the ``on_before_optimizer_step`` hooks, the
clipping (``configure_gradient_clipping`` -> ``precision.clip_gradients``), then
``optimizer.step()``.

So the precision plugin sees every backward and every optimizer step: it is the one extension
point this needs. ``backward`` becomes ``GradAccumulator.backward``, ``optimizer_step`` becomes
``GradAccumulator.step`` (forced on the epoch's partial window, which Lightning closes), and
``clip_gradients`` only checks that the clip asked for is the one the accumulator applies after
accumulation. One thing is outside the plugin: the division by K, which happens before the plugin
sees the loss. For it, and to read ``num_items`` from ``training_step``'s dict, the plugin sets
``output_result_cls`` on this trainer's automatic-optimization loop (an instance attribute,
removed at teardown) to an adapter that calls ``ClosureResult.from_training_step_output`` with
``normalize=1``: the accumulator then sees the undivided loss and normalizes by the window's true
size.
"""

import contextlib
import importlib
from collections.abc import Mapping

import torch

from .. import GradAccumulator, LossScaler
from . import _rank_state

_PRECISIONS = {"32": "32-true", "32-true": "32-true", "16": "16-mixed", "16-mixed": "16-mixed",
               "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}
_REFUSED = {
    "16-true": "parameters in fp16 with no loss scaling and no fp32 master weights",
    "bf16-true": "parameters in bf16: not wired here (Lightning's HalfPrecision converts the module); use "
                 "'bf16-mixed', or a hand-written loop with GradAccumulator, which accumulates bf16 "
                 "parameters' gradients in fp32",
    "64-true": "GradAccumulator buckets hold fp32, bf16 and fp16 parameters only",
}
_AUTOCAST = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def _normalize_precision(precision) -> str:
    key = str(precision)
    if key in _PRECISIONS:
        return _PRECISIONS[key]
    key = {"64": "64-true", "16-true": "16-true", "bf16-true": "bf16-true"}.get(key, key)
    if key in _REFUSED:
        raise ValueError(f"FusedAccumPrecision(precision={precision!r}) is not supported: {_REFUSED[key]}. "
                         "Supported: '32-true', '16-mixed', 'bf16-mixed'")
    raise ValueError(f"FusedAccumPrecision(precision={precision!r}): expected '32-true', '16-mixed' or "
                     "'bf16-mixed'")


class _ClosureResultAdapter:
    """Stands in for the loop's ``output_result_cls``: the loss undivided, ``num_items`` noted."""

    def __init__(self, plugin, result_cls):
        self.plugin = plugin
        self.result_cls = result_cls

    def from_training_step_output(self, training_step_output, normalize: int = 1):
        items = None
        if isinstance(training_step_output, Mapping):
            items = training_step_output.get("num_items")
        self.plugin._next_items = items
        return self.result_cls.from_training_step_output(training_step_output, 1)


def make_precision_class(pl, module_name: str):
    """Build ``FusedAccumPrecision`` over ``pl`` (``lightning.pytorch`` or ``pytorch_lightning``),
    named as if defined in ``module_name`` (so that pickling, e.g. for ddp_spawn, finds it)."""
    automatic = importlib.import_module(pl.__name__ + ".loops.optimization.automatic")
    Precision = pl.plugins.precision.Precision
    MixedPrecision = pl.plugins.precision.MixedPrecision
    LightningModule = pl.LightningModule
    SingleDeviceStrategy = pl.strategies.SingleDeviceStrategy
    DDPStrategy = pl.strategies.DDPStrategy
    VALUE = pl.utilities.GradClipAlgorithmType.VALUE
    FITTING = pl.trainer.states.TrainerFn.FITTING

    class FusedAccumPrecision(Precision):
        """Lightning's gradient accumulation, AMP and clipping through one ``fusedaccum.GradAccumulator``.

        ``Trainer(accumulate_grad_batches=K, gradient_clip_val=c, plugins=[FusedAccumPrecision("16-mixed")])``
        (instead of ``precision="16-mixed"``): gradients are summed in fp32 buckets, a window is
        normalized by its true size (the epoch's partial last window too) or by its items,
        clipped after accumulation, unscaled and checked for inf/NaN in one fused pass, and the
        step is skipped on overflow without a host sync (fused optimizers). Checkpoints hold the
        partial window; a run resumed mid-window continues bit-identically (with a resumable
        dataloader, as Lightning requires for any mid-epoch resume).

        Args:
            precision: '32-true' ('32'), '16-mixed' ('16'; autocast fp16 + dynamic loss scaling)
                or 'bf16-mixed' ('bf16'; autocast bf16).
            scaler: a ``fusedaccum.LossScaler`` for '16-mixed' (default: ``LossScaler()``).
            norm_type: the clipping norm's order (``gradient_clip_val`` gives max_norm).
            log: log ``{prefix}loss`` (the window's loss, normalized as its gradient),
                ``{prefix}grad_norm`` (before clipping), ``{prefix}found_inf`` (1 for a skipped
                step) and, with a scaler, ``{prefix}loss_scale``, once per optimizer step.
            log_prefix: the prefix of those names.

        ``training_step`` returns the loss as usual (a micro-batch MEAN: the window is divided by
        its number of micro-batches), or ``{"loss": loss_sum, "num_items": n}`` (a SUM over n
        items, n an int or a 0-d tensor, on every batch: the window is divided by its total
        items). ``self.accumulator`` (the GradAccumulator, during fit) and ``self.last_result``
        (the last ``StepResult``) are there to read.
        """

        def __init__(self, precision="32-true", *, scaler: "LossScaler | None" = None, norm_type: float = 2.0,
                     log: bool = True, log_prefix: str = "fusedaccum/") -> None:
            self.precision = _normalize_precision(precision)
            if scaler is not None and not isinstance(scaler, LossScaler):
                raise TypeError(f"scaler must be a fusedaccum.LossScaler, got {type(scaler).__name__}")
            if scaler is not None and self.precision != "16-mixed":
                raise ValueError(f"precision={self.precision!r} does not scale the loss: pass a scaler only "
                                 "with '16-mixed'")
            self.scaler = (scaler or LossScaler()) if self.precision == "16-mixed" else None
            self.norm_type = norm_type
            self.log = bool(log)
            self.log_prefix = str(log_prefix)
            self.accumulator: "GradAccumulator | None" = None
            self.last_result = None
            self._device_type = "cuda" if torch.cuda.is_available() else "cpu"
            self._pending_state: "dict | None" = None
            self._loop = None
            self._trainer = None
            self._next_items = None  # num_items of the training_step whose backward comes next
            self._clip_checked = False  # clip_gradients ran (and agreed) on this step

        # -------------------------------------------------------------- set-up
        def connect(self, model, optimizers, lr_schedulers):
            lm = next((m for m in model.modules() if isinstance(m, LightningModule)), None)
            if lm is None:
                raise TypeError(f"FusedAccumPrecision found no LightningModule in {type(model).__name__}")
            param = next(lm.parameters(), None)
            if param is not None:
                self._device_type = param.device.type
            trainer = lm.trainer
            if trainer.state.fn != FITTING:
                return model, optimizers, lr_schedulers  # validate/test/predict: autocast only
            self._check_setup(trainer, lm, optimizers)
            self.teardown()  # a previous fit's accumulator gives the parameters up
            clip = trainer.gradient_clip_val
            ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
            self.accumulator = GradAccumulator(ddp if ddp is not None else lm, trainer.accumulate_grad_batches,
                                               max_norm=float(clip) if clip else None, norm_type=self.norm_type,
                                               scaler=self.scaler)
            loop = trainer.fit_loop.epoch_loop.automatic_optimization
            loop.output_result_cls = _ClosureResultAdapter(self, automatic.ClosureResult)
            self._loop, self._trainer = loop, trainer
            if self._pending_state is not None:
                state, self._pending_state = self._pending_state, None
                self.load_state_dict(state)
            return model, optimizers, lr_schedulers

        def _check_setup(self, trainer, lm, optimizers) -> None:
            """Refuse, before anything changes, what the accumulator cannot do right."""
            strategy = trainer.strategy
            if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or strategy.handles_gradient_accumulation:
                raise ValueError(
                    f"FusedAccumPrecision supports the single-device and DDP strategies, got "
                    f"{type(strategy).__name__}: FSDP shards the gradients and DeepSpeed owns accumulation and "
                    "clipping itself, so the accumulator's fp32 window sums would not be the gradients stepped")
            if not lm.automatic_optimization:
                raise ValueError("FusedAccumPrecision drives automatic optimization; with manual optimization use "
                                 "fusedaccum.GradAccumulator in training_step directly (acc.backward, acc.step)")
            if type(lm).backward is not LightningModule.backward:
                raise ValueError(f"{type(lm).__name__} overrides LightningModule.backward: FusedAccumPrecision runs "
                                 "every backward through GradAccumulator.backward and would bypass the override")
            if len(optimizers) != 1:
                raise ValueError(f"FusedAccumPrecision needs exactly one optimizer, got {len(optimizers)}")
            if isinstance(optimizers[0], torch.optim.LBFGS):
                raise ValueError("LBFGS re-evaluates its closure within one step: it cannot step on a window "
                                 "of accumulated micro-batches")
            if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == VALUE:
                raise ValueError("gradient_clip_algorithm='value' is not supported: the accumulator clips the "
                                 "window's global norm (gradient_clip_algorithm='norm')")
            loop = trainer.fit_loop.epoch_loop.automatic_optimization
            current = getattr(loop, "output_result_cls", None)
            if not (current is automatic.ClosureResult or isinstance(current, _ClosureResultAdapter)):
                raise RuntimeError(
                    f"{pl.__name__}'s automatic-optimization loop has output_result_cls={current!r}, not "
                    "ClosureResult: FusedAccumPrecision needs the undivided loss and was written against "
                    "Lightning 2.x")

        def teardown(self) -> None:
            if self._loop is not None and isinstance(self._loop.__dict__.get("output_result_cls"),
                                                     _ClosureResultAdapter):
                del self._loop.output_result_cls  # the class attribute (ClosureResult) shows again
            if self.accumulator is not None:
                self.accumulator.release()
            self.accumulator = None
            self._loop = self._trainer = None

        # -------------------------------------------------------------- forward
        @contextlib.contextmanager
        def forward_context(self):
            dtype = _AUTOCAST.get(self.precision)
            if dtype is None:
                yield
                return
            with torch.autocast(self._device_type, dtype=dtype, cache_enabled=False):
                yield

        # -------------------------------------------------------------- backward and step
        def _require_accumulator(self) -> GradAccumulator:
            if self.accumulator is None:
                raise RuntimeError("FusedAccumPrecision has no GradAccumulator: it is built when Trainer.fit sets "
                                   "up (manual optimization and manual_backward are not supported)")
            k = self._trainer.accumulate_grad_batches
            if k != self.accumulator.accumulation_steps:
                raise RuntimeError(
                    f"accumulate_grad_batches changed from {self.accumulator.accumulation_steps} to {k} during fit "
                    "(GradientAccumulationScheduler?): FusedAccumPrecision fixes the window size at set-up")
            return self.accumulator

        def backward(self, tensor, model, optimizer, *args, **kwargs) -> None:
            if args or kwargs:
                raise TypeError("FusedAccumPrecision.backward takes no extra backward arguments "
                                f"(got {len(args)} positional, {sorted(kwargs)})")
            acc = self._require_accumulator()
            items, self._next_items = self._next_items, None
            acc.backward(tensor, num_items=items)

        def optimizer_step(self, optimizer, model, closure, **kwargs):
            if kwargs:
                raise TypeError(f"FusedAccumPrecision steps the optimizer without arguments, got {sorted(kwargs)}")
            acc = self._require_accumulator()
            self._clip_checked = False
            closure_result = closure()  # training_step + backward of the window's last batch
            self._after_closure(model, optimizer)  # on_before_optimizer_step hooks, then clip_gradients
            if acc.max_norm is not None and not self._clip_checked:
                raise RuntimeError(
                    "configure_gradient_clipping did not call clip_gradients on this step, but the GradAccumulator "
                    f"clips every window to gradient_clip_val={acc.max_norm} after accumulation; "
                    "FusedAccumPrecision cannot skip clipping for one step")
            if acc.micro_batches == 0:
                return closure_result  # every training_step of the window returned None
            # Lightning closes the epoch's partial window here too: force that step.
            result = acc.step(optimizer, force=acc.micro_batches < acc.accumulation_steps)
            self.last_result = result
            if self.log:
                self._log(model, result)
            return closure_result

        def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None) -> None:
            """Check only: the GradAccumulator clips the window's normalized gradient in its step."""
            acc = self._require_accumulator()
            wanted = float(clip_val) if clip_val and clip_val > 0 else None
            if wanted is not None and gradient_clip_algorithm == VALUE:
                raise ValueError("gradient_clip_algorithm='value' is not supported: the accumulator clips the "
                                 "window's global norm")
            if wanted != acc.max_norm:
                raise ValueError(f"clip_gradients(gradient_clip_val={clip_val!r}) differs from the GradAccumulator's "
                                 f"max_norm={acc.max_norm} (the Trainer's gradient_clip_val at set-up); "
                                 "FusedAccumPrecision clips every window with one value")
            self._clip_checked = True

        def _log(self, model, result) -> None:
            # StepResult.loss: the window's loss normalized as its gradient, over all ranks.
            metrics = {"loss": result.loss, "grad_norm": result.total_norm,
                       "found_inf": result.found_inf}
            if self.scaler is not None:
                metrics["loss_scale"] = self.scaler.scale_tensor(result.total_norm.device)
            for name, value in metrics.items():
                model.log(self.log_prefix + name, value.detach().clone(), on_step=True, on_epoch=False,
                          batch_size=1)

        # -------------------------------------------------------------- checkpoints
        def state_dict(self) -> dict:
            """``{"accumulator": every rank's accumulator state}``. Under DDP a collective:
            Lightning's ``dump_checkpoint`` calls it on every rank and rank 0 writes the file."""
            if self.accumulator is None:
                return dict(self._pending_state or {})
            return {"accumulator": _rank_state.gather(self.accumulator.state_dict())}

        def load_state_dict(self, state_dict: dict) -> None:
            """This rank's window out of the checkpoint; a window saved on another number of ranks
            is refused (one saved between windows loads on any)."""
            if not state_dict:
                return
            if "accumulator" not in state_dict:
                raise KeyError("FusedAccumPrecision state dict lacks 'accumulator'")
            if self.accumulator is None:
                self._pending_state = dict(state_dict)  # applied when fit sets the accumulator up
                return
            self.accumulator.load_state_dict(_rank_state.select(state_dict["accumulator"], "FusedAccumPrecision"))

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            # A stock '16-mixed' checkpoint keeps GradScaler's state under MixedPrecision: LossScaler
            # reads the same keys, so the loss scale carries over to the switch.
            stock = checkpoint.get(MixedPrecision.__qualname__)
            if (self.scaler is not None and type(self).__qualname__ not in checkpoint and stock):
                self.scaler.load_state_dict(stock)

    FusedAccumPrecision.__module__ = module_name
    FusedAccumPrecision.__qualname__ = "FusedAccumPrecision"  # also the checkpoint key of its state
    return FusedAccumPrecision
