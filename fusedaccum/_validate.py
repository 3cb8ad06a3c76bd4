"""``GradAccumulator``'s argument checks and its BatchNorm warning (everything before a change)."""

import math
import numbers
import warnings
import weakref

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .ops import _norm_order
from .scaler import LossScaler

__all__ = ["BatchNormWatch", "check_args", "check_host_items", "check_items", "check_loss",
           "check_no_open_part", "check_pipeline"]


def check_args(accumulation_steps, max_norm, norm_type, scaler):
    """Returns (accumulation_steps, max_norm, norm_type) normalized."""
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
    return int(accumulation_steps), max_norm, norm_type


def check_pipeline(pipeline_group, scaler, noise: bool) -> None:
    """What pipeline stages (``pipeline_group``) cannot combine with yet; the group itself is
    checked by ``fusedaccum.parallel.check_pipeline_group``."""
    if pipeline_group is None:
        return
    if scaler is not None:
        # A stage before the last backpropagates activation gradients that already carry the
        # last stage's loss scale; scaling its surrogate loss again would square it.
        raise ValueError("scaler with pipeline_group: the activation gradients a stage receives already carry "
                         "the loss scale, so only the last stage may scale; not supported yet. Train the "
                         "pipeline in bf16/fp32 without a LossScaler")
    if noise:
        raise ValueError("noise_scale with pipeline_group: a micro-batch's gradient norm would need one more "
                         "collective over the stages per micro-batch; not supported. Build the GradAccumulator "
                         "with noise_scale=False (StepResult.loss is still the last stage's, on every stage)")


def check_params(params):
    """(module or None, list of params) from a module, a tensor or an iterable; one device."""
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
    return module, params


def check_loss(loss, end_micro_batch: bool, noise: bool) -> None:
    """``acc.backward``'s loss (and, with ``end_micro_batch=False``, that the signals allow it)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss must be a scalar (one element), got shape {tuple(loss.shape)}; "
                         "reduce it with .mean() or .sum()")
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: was it computed under torch.no_grad(), "
                         "or from parameters with requires_grad=False?")
    if not end_micro_batch and noise:
        # A micro-batch's small-batch norm is taken after its backward: with parts, of a part only.
        raise ValueError("backward(..., end_micro_batch=False) with noise_scale on: the noise statistics need "
                         "one backward per micro-batch (a micro-batch's gradient norm is taken right after its "
                         "backward). Sum the micro-batch's losses into one backward, or build the "
                         "GradAccumulator without noise_scale")


def check_no_open_part(parts: int, where: str) -> None:
    if parts:
        raise RuntimeError(
            f"{where} inside a micro-batch: its last acc.backward (of {parts}) passed end_micro_batch=False, so the "
            "micro-batch is not finished. Finish it with a backward that ends it (end_micro_batch=True, the "
            "default) first, or acc.discard_window() to drop the window")


def check_host_items(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n < 0:
        raise ValueError(f"num_items must be a number >= 0 or a one-element tensor, got {n!r}")
    return n


def check_items(num_items, window, device):
    """Validate num_items for the window's next micro-batch; return (host_part, device_part)."""
    given = num_items is not None
    # items_given is set by the window's first backward: with several backwards per micro-batch
    # (end_micro_batch=False) it is set before micro counts one.
    if (window.micro > 0 or window.items_given is not None) and given != window.items_given:
        had = "with" if window.items_given else "without"
        raise ValueError(
            f"num_items must be given on every micro-batch of a window or on none (on each of its backwards): "
            f"the backwards before this one "
            f"({window.micro} finished micro-batch(es)) came {had} num_items, this one "
            f"{'with' if given else 'without'}")
    if not given:
        return 0, None
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1 or num_items.is_complex() or num_items.dtype == torch.bool:
            raise ValueError(f"num_items must be a one-element real tensor, got shape "
                             f"{tuple(num_items.shape)} dtype {num_items.dtype}")
        if num_items.device.type == "cpu" and device.type != "cpu":
            return check_host_items(num_items.item()), None  # a host tensor: no device sync
        if num_items.device != device:
            raise ValueError(f"num_items is on {num_items.device}, the parameters on {device}")
        # Not checked for > 0: that would read the device. A window of 0 items gives a
        # non-finite gradient, found_inf, and a skipped step.
        # A copy: the caller may reuse (and refill) its counter tensor.
        return 0, num_items.detach().reshape(()).to(torch.float64, copy=True)
    return check_host_items(num_items), None


class BatchNormWatch:
    """Warns once when a model holds BatchNorm layers in training mode under accumulation."""

    def __init__(self, accumulation_steps: int):
        self.accumulation_steps = accumulation_steps
        self.warned = False
        self._layers = weakref.WeakKeyDictionary()  # model -> its BatchNorm layers

    def check(self, model, stacklevel: int) -> None:
        if self.warned or self.accumulation_steps == 1 or not isinstance(model, torch.nn.Module):
            return
        # The module walk once per model; the training flags on every call (a layer may be
        # switched to train mode at any time).
        if model not in self._layers:
            self._layers[model] = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
        for name, m in self._layers[model]:
            if m.training:
                self.warned = True
                warnings.warn(
                    f"{type(m).__name__} layer {name or '(root)'!r} is in training mode: with gradient "
                    f"accumulation its batch statistics (and running statistics) come from each "
                    f"micro-batch, not from the window of {self.accumulation_steps}, so training differs "
                    "from one large batch. Consider GroupNorm/LayerNorm, or BatchNorm in eval mode.",
                    UserWarning, stacklevel=stacklevel + 1)
                return
