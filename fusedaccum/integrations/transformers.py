"""``FusedAccumTrainer``: Hugging Face ``transformers.Trainer`` with fusedaccum's GradAccumulator.

A mixin, put before ``Trainer`` (or any subclass of it, e.g. TRL's ``SFTTrainer``)::

    class MyTrainer(FusedAccumTrainer, transformers.Trainer):
        pass

How Trainer 5.x runs a window (``Trainer._run_epoch``): it prefetches the window's
micro-batches, counts their label tokens (``num_items_in_batch``, when the model takes loss
kwargs or a ``compute_loss_func`` is given), runs ``training_step`` on each (under DDP's
``no_sync`` on all but the last), then ``_clip_grad_norm`` (when ``max_grad_norm > 0``) and
``_get_grad_norm``, ``optimizer.step()``, the scheduler unless Accelerate's scaler skipped,
``model.zero_grad()``, and logging with ``self._tr_loss`` and the grad norm.

What this mixin overrides, and why each is enough:

- ``training_step`` (public): the micro-batch's summed token loss and its token count go to
  ``GradAccumulator.backward``; Trainer's normalization is undone case by case (see
  ``_micro_batch_loss``). It returns 0: the window's loss is added to Trainer's running loss
  at the step, so the logged ``loss`` is the window's loss.
- ``_clip_grad_norm`` / ``_get_grad_norm`` (private, pinned by the tests): close the window
  with ``GradAccumulator.step`` and return its pre-clip norm (a device tensor; Trainer reads it
  only when it logs).
- ``create_optimizer`` / ``create_scheduler`` (public): wrap the optimizer so that Trainer's
  ``optimizer.step()`` replays the accumulator's decision, and the scheduler so that a skipped
  window does not step it (``_transformers_parts``).

See docs/integrations.md for the cases that are exact and what is refused.
"""

import torch
import transformers  # noqa: F401 - fails here, with the import error, when the extra is missing

from .. import GradAccumulator, LossScaler
from ._transformers_parts import SkipAwareScheduler, WindowOptimizer

__all__ = ["FusedAccumTrainer", "SUPPORTED_TRANSFORMERS"]

#: The transformers versions this mixin supports (pyproject's extra); the test suite pins 5.25.0 and
#: fails when a release changes a Trainer method the mixin overrides or relies on.
SUPPORTED_TRANSFORMERS = ">=5.25,<6"


class FusedAccumTrainer:
    """Mixin over ``transformers.Trainer``: every micro-batch's backward through
    ``GradAccumulator.backward`` (fp32 sums, also for bf16 weights), the clip and the step through
    ``GradAccumulator.step`` (one multiplier ``1/tokens x clip``, skipped on inf/NaN on the device
    with fused optimizers), one DDP all-reduce per window.

    Each window is one large batch of all its label tokens: a model that takes
    ``num_items_in_batch`` (HF models), a ``compute_loss_func`` or a ``compute_loss`` that divides
    its sum by ``num_items_in_batch`` is called with ``num_items_in_batch=1`` and so returns the
    micro-batch's summed loss; any other loss (``loss_is_scaled_for_ga = False``, or a model
    without loss kwargs) is a per-micro-batch mean and is weighted by ``micro_batch_items``.

    Attributes:
        accumulator: the ``GradAccumulator`` (built at the first training step, when the model
            Trainer trains, possibly DDP-wrapped, is known); None before.
        last_result: the last window's ``StepResult``.
        label_shift: None (default): count label tokens over ``labels[..., 1:]`` where Trainer
            knows the loss shifts labels (causal LMs); True/False to say so for a custom model.
    """

    label_shift: "bool | None" = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fused_check_setup()
        self.accumulator = None
        self.last_result = None
        self._fused_model = None
        self._fused_pending_state = None
        self.fused_scaler = None
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            # Accelerate's GradScaler would unscale and check with host syncs: the accumulator's
            # LossScaler, with the same settings, takes its place.
            self.fused_scaler = LossScaler(init_scale=scaler.get_scale(), growth_factor=scaler.get_growth_factor(),
                                           backoff_factor=scaler.get_backoff_factor(),
                                           growth_interval=scaler.get_growth_interval())
            self.accelerator.scaler = None

    # ------------------------------------------------------------------ refusals
    def _fused_check_setup(self) -> None:
        """Refuse, before training starts, what the accumulator cannot do right."""
        engine = None
        if getattr(self, "is_deepspeed_enabled", False):
            engine = "DeepSpeed (it owns accumulation, loss scaling and clipping)"
        elif getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False):
            version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
            engine = (f"FSDP{version} (it shards the gradients; Trainer's FSDP path is not wired to the "
                      "accumulator's FSDP2 engine)")
        elif getattr(self, "is_distributed_loading_by_transformers", False):
            engine = "a tensor-parallel / distributed-loading plan (sharded DTensor parameters)"
        elif getattr(self, "is_model_parallel", False) or self.args.n_gpu > 1:
            engine = "model parallelism or torch DataParallel (n_gpu > 1)"
        if engine is not None:
            raise ValueError(f"FusedAccumTrainer does not support {engine}: use one process or DDP")
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and any(getattr(pc, f"{x}_enabled", False) for x in ("cp", "sp", "tp")):
            raise ValueError("FusedAccumTrainer does not support context, sequence or tensor parallelism "
                             "(parallelism_config): the label-token counts and gradients are split")
        if self.args.optim in ("lomo", "adalomo"):
            raise ValueError(f"FusedAccumTrainer does not support optim={self.args.optim!r}: LOMO fuses the "
                             "update into the backward, there is no window to accumulate")
        if self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False):
            raise ValueError("FusedAccumTrainer does not support sync_each_batch=True: DDP would all-reduce every "
                             "micro-batch's running sum; the accumulator expects one reduction per window")
        if self.args.world_size > 1 and self.model is not None:
            lowp = sorted({str(p.dtype).replace("torch.", "") for p in self.model.parameters()
                           if p.requires_grad and p.dtype != torch.float32})
            if lowp:
                raise ValueError(
                    f"FusedAccumTrainer under DDP needs fp32 trainable parameters, got {'/'.join(lowp)}: their "
                    "gradients leave param.grad after every backward, so DDP would all-reduce every micro-batch "
                    "in low precision. Keep fp32 weights with bf16=True (autocast), or train in one process")

    # ------------------------------------------------------------------ optimizer and scheduler
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not isinstance(optimizer, WindowOptimizer):
            self.optimizer = WindowOptimizer(optimizer, self)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not isinstance(scheduler, (SkipAwareScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
            self.lr_scheduler = SkipAwareScheduler(scheduler)
        return self.lr_scheduler

    def _fused_window_optimizer(self) -> WindowOptimizer:
        opt = self.optimizer
        while not isinstance(opt, WindowOptimizer):
            inner = getattr(opt, "optimizer", None)
            if inner is None or inner is opt:
                raise RuntimeError(
                    f"FusedAccumTrainer found no WindowOptimizer in {type(self.optimizer).__name__}: the optimizer "
                    "must be created by create_optimizer (an optimizer passed as Trainer(optimizers=(opt, sched)) "
                    "is wrapped there too; one built elsewhere is not)")
            opt = inner
        return opt

    # ------------------------------------------------------------------ the accumulator
    def _fused_accumulator(self, model) -> GradAccumulator:
        if self.accumulator is not None and model is self._fused_model:
            return self.accumulator
        if self.accumulator is not None:
            if self.accumulator.micro_batches:
                raise RuntimeError("FusedAccumTrainer: the trained model changed in the middle of a window")
            self.accumulator.release()
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        clip = self.args.max_grad_norm
        self.accumulator = GradAccumulator(model if ddp else self.model, self.args.gradient_accumulation_steps,
                                           max_norm=float(clip) if clip and clip > 0 else None,
                                           scaler=self.fused_scaler)
        self._fused_model = model
        if self._fused_pending_state is not None:
            state, self._fused_pending_state = self._fused_pending_state, None
            self.accumulator.load_state_dict(state)
        return self.accumulator

    def _fused_load_accumulator_state(self, state: dict) -> None:
        if self.accumulator is None:
            self._fused_pending_state = state  # resume: loaded before the first training step builds it
        else:
            self.accumulator.load_state_dict(state)

    def micro_batch_items(self, inputs) -> "torch.Tensor | None":
        """The micro-batch's label-token count (a 0-d device tensor), or None without labels.
        Trainer's rule: ``shift_labels`` when the batch has them, else ``labels[..., 1:]`` when the
        loss shifts labels (``label_shift``, or Trainer's causal-LM detection), else ``labels``;
        tokens equal to -100 do not count. Override for another notion of items."""
        if "shift_labels" in inputs:
            labels = inputs["shift_labels"]
        elif "labels" in inputs and isinstance(inputs["labels"], torch.Tensor):
            shift = self.label_shift if self.label_shift is not None else self._loss_shifts_labels
            labels = inputs["labels"][..., 1:] if shift else inputs["labels"]
        else:
            return None
        return labels.ne(-100).sum()

    def _loss_is_sum_with(self, num_items_in_batch) -> bool:
        """Whether ``compute_loss`` divides its sum by ``num_items_in_batch`` (Trainer's own rule
        for whether the loss is "already scaled for gradient accumulation")."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _micro_batch_loss(self, model, inputs, num_items_in_batch):
        """(summed loss, items): the micro-batch's loss as a sum over its ``items`` label tokens,
        or (mean, None) when the batch has no labels to count."""
        items = self.micro_batch_items(inputs)  # before compute_loss, which may pop the labels
        summed = self._loss_is_sum_with(num_items_in_batch)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=1 if summed else None)
        if summed:
            # compute_loss multiplies a num_items-normalized loss by the number of processes (it
            # expects a count gathered over all ranks): undone here, exact for powers of two.
            if self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func):
                world = self.accelerator.num_processes // self.get_tp_size()
                if world != 1:
                    loss = loss / world
            if items is None:
                raise ValueError("FusedAccumTrainer: the loss is normalized by num_items_in_batch but the batch has "
                                 "no 'labels' to count: override micro_batch_items(inputs)")
            return loss, items
        return (loss, None) if items is None else (loss * items, items)

    # ------------------------------------------------------------------ Trainer's hooks
    def training_step(self, model, inputs, num_items_in_batch=None):
        acc = self._fused_accumulator(model)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        # Trainer enters DDP's no_sync() itself on all but a window's last micro-batch: tell the
        # accumulator what it decided, so that DDP all-reduces once per window (a partial one too).
        sync = bool(getattr(model, "require_backward_grad_sync", True))
        with acc.accumulate(model, sync=sync):
            loss, items = self._micro_batch_loss(model, inputs, num_items_in_batch)
            acc.backward(loss, num_items=items)
        # The window's loss joins Trainer's running loss at the step (_fused_step).
        return torch.zeros((), device=self.args.device)

    def _fused_step(self):
        acc = self.accumulator
        if acc is None or acc.micro_batches == 0:
            raise RuntimeError("FusedAccumTrainer: Trainer closed a window without a training_step (was "
                               "training_step overridden without calling FusedAccumTrainer.training_step?)")
        sched = self.lr_scheduler
        if isinstance(sched, SkipAwareScheduler):
            sched.resolve()  # the previous window's scheduler step: this window's LR
        opt = self._fused_window_optimizer()
        opt._capture = True
        try:
            result = acc.step(opt, force=acc.micro_batches < acc.accumulation_steps)
        finally:
            opt._capture = False
        self.last_result = result
        if isinstance(sched, SkipAwareScheduler):
            sched.window_stepped(result.found_inf)
        self._tr_loss += result.loss  # over all ranks already: Trainer's gather-mean keeps it
        return result.total_norm

    def _clip_grad_norm(self, model):
        return self._fused_step()

    def _get_grad_norm(self, model, grad_norm=None):
        # max_grad_norm <= 0: Trainer skips the clip hook and asks for the norm alone.
        return self._fused_step() if grad_norm is None else grad_norm
