"""``FusedAccumulation``: fusedaccum's GradAccumulator in a Hugging Face Accelerate loop.

Accelerate's own accumulation (``accelerator.accumulate(model)`` + ``accelerator.backward(loss)``)
divides every micro-batch loss by ``gradient_accumulation_steps``, so the epoch's partial last
window (which ``accelerator.sync_gradients`` closes at the end of the dataloader) and
token-weighted losses come out scaled wrong, and ``accelerator.clip_grad_norm_`` unscales and
clips through torch's chain with host syncs. Here the loop keeps ``accelerator.accumulate(model)``
(DDP's ``no_sync`` and the window boundaries, including the dataloader's end) and replaces the
two lines that backpropagate and step::

    accelerator = Accelerator(gradient_accumulation_steps=8, mixed_precision="bf16")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    fused = FusedAccumulation(accelerator, model, max_norm=1.0)          # new
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            fused.backward(loss)                # was accelerator.backward(loss)
            fused.step(optimizer)               # was clip_grad_norm_ / optimizer.step() / zero_grad()
        scheduler.step()                        # unchanged

``fused.step`` steps when ``accelerator.sync_gradients`` says the window is complete (the K-th
micro-batch, or the dataloader's last), normalized by the window's true size.
"""

import accelerate as _accelerate
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from .. import GradAccumulator, LossScaler
from . import _rank_state

__all__ = ["FusedAccumulation"]

# Engines whose gradients are plain (replicated, full) param.grad: one process, or DDP.
_REFUSED_ENGINES = {DistributedType.DEEPSPEED: "DeepSpeed owns accumulation, loss scaling and clipping",
                    DistributedType.FSDP: "FSDP shards the gradients",
                    DistributedType.MEGATRON_LM: "Megatron-LM owns accumulation",
                    DistributedType.XLA: "XLA reduces gradients in its own optimizer step"}


class FusedAccumulation:
    """A GradAccumulator set up from an ``Accelerator``: its ``gradient_accumulation_steps``,
    its engine (DDP model or a single process) and, when Accelerate made a GradScaler for fp16,
    a ``LossScaler`` with the same settings in its place.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the model returned by ``accelerator.prepare`` (a DDP wrapper under multi-process).
        max_norm, norm_type: clip the window's global gradient norm (None: no clipping).
        scaler: a ``LossScaler`` to use instead of the one derived from Accelerate's.

    ``backward(loss, num_items=None)`` and ``step(optimizer)`` replace ``accelerator.backward``
    and the clip/step/zero_grad lines; ``state_dict``/``load_state_dict`` make it a checkpointable
    object (``accelerator.register_for_checkpointing(fused)``). ``accumulator`` is the
    GradAccumulator; ``last_result`` the last ``StepResult``.
    """

    def __init__(self, accelerator: "_accelerate.Accelerator", model, *, max_norm=None, norm_type: float = 2.0,
                 scaler: "LossScaler | None" = None):
        if not isinstance(accelerator, _accelerate.Accelerator):
            raise TypeError(f"accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
        engine = accelerator.distributed_type
        if engine in _REFUSED_ENGINES:
            raise ValueError(f"FusedAccumulation does not support {engine.value}: {_REFUSED_ENGINES[engine]}")
        if accelerator.mixed_precision == "fp8":
            raise ValueError("FusedAccumulation does not support mixed_precision='fp8' (its scaling lives in "
                             "the fp8 recipe, not in a loss scale)")
        if accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False):
            raise ValueError("GradientAccumulationPlugin(sync_each_batch=True) all-reduces every micro-batch's "
                             "running sum under DDP: the accumulator expects one reduction per window")
        if scaler is None and accelerator.scaler is not None:
            s = accelerator.scaler  # a torch GradScaler, used by accelerator.backward only: replaced
            scaler = LossScaler(init_scale=s.get_scale(), growth_factor=s.get_growth_factor(),
                                backoff_factor=s.get_backoff_factor(), growth_interval=s.get_growth_interval())
        self.accelerator = accelerator
        self.accumulator = GradAccumulator(model, accelerator.gradient_accumulation_steps, max_norm=max_norm,
                                           norm_type=norm_type, scaler=scaler)
        self.last_result = None

    def backward(self, loss, num_items=None) -> None:
        """``GradAccumulator.backward``: ``loss`` a micro-batch MEAN, or a SUM over ``num_items``
        items (given on every micro-batch: the window is then divided by its total items)."""
        self.accumulator.backward(loss, num_items=num_items)

    def step(self, optimizer):
        """Close the window when Accelerate says it is complete (``sync_gradients``): normalize,
        unscale, clip and step, skipping on inf/NaN. Returns the ``StepResult``, or None while
        the window accumulates. ``optimizer`` may be the prepared (Accelerated) optimizer: its
        wrapped torch optimizer is stepped, so Accelerate's own scaler and sync logic stay out."""
        if not self.accelerator.sync_gradients:
            return None
        acc = self.accumulator
        if acc.micro_batches == 0:
            raise RuntimeError("FusedAccumulation.step with no backward in this window: call fused.backward(loss) "
                               "inside accelerator.accumulate(model) before fused.step(optimizer)")
        if acc.micro_batches < acc.accumulation_steps and not self.accelerator.gradient_state.end_of_dataloader:
            # sync_gradients is True outside accelerator.accumulate(): stepping here would make
            # every micro-batch its own window.
            raise RuntimeError(
                f"accelerator.sync_gradients is True after {acc.micro_batches} of {acc.accumulation_steps} "
                "micro-batches, not at the end of a prepared dataloader: run each micro-batch's forward, "
                "fused.backward and fused.step inside `with accelerator.accumulate(model):`")
        if isinstance(optimizer, AcceleratedOptimizer):
            optimizer = optimizer.optimizer
        # The dataloader's last batch closes a partial window: force it (a full one needs no force,
        # which spares data-parallel runs the all-reduce of the micro-batch count).
        self.last_result = acc.step(optimizer, force=acc.micro_batches < acc.accumulation_steps)
        return self.last_result

    @property
    def micro_batches(self) -> int:
        return self.accumulator.micro_batches

    def state_dict(self) -> dict:
        """Every rank's accumulator state (its partial window is its own), gathered: under
        multi-process a collective, which ``accelerator.save_state`` runs on every rank before
        one process writes the file."""
        return _rank_state.gather(self.accumulator.state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """This rank's window out of ``state_dict()``; a window saved on another number of
        processes is refused (one saved between windows loads on any)."""
        self.accumulator.load_state_dict(_rank_state.select(state_dict, "FusedAccumulation"))

    def release(self) -> None:
        """Give the parameters up (``GradAccumulator.release``)."""
        self.accumulator.release()
