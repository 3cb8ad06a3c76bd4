"""The two stand-ins ``FusedAccumTrainer`` puts into ``transformers.Trainer``: the optimizer it
steps and the LR scheduler that does not step after a skipped window. Kept apart from the
mixin so that each file stays readable; neither imports transformers."""

import torch

from .. import _optim

__all__ = ["WindowOptimizer", "SkipAwareScheduler"]


class WindowOptimizer(torch.optim.Optimizer):
    """The optimizer Trainer (and Accelerate's ``AcceleratedOptimizer`` around it) sees.

    ``GradAccumulator.step`` runs in Trainer's clip hook, before the ``on_pre_optimizer_step``
    callbacks; the update itself must wait for Trainer's own ``optimizer.step()``. So the
    accumulator steps this object in capture mode, which records what it was told (the
    device ``found_inf`` of a fused optimizer, or "step" after the accumulator's host check;
    nothing when that check skipped the window), and Trainer's call replays it on the real
    optimizer. State, param groups and state dicts are the real optimizer's; the state dict
    carries the accumulator's (the loss scale) under ``"fusedaccum"``, so Trainer's
    ``optimizer.pt`` holds it and ``resume_from_checkpoint`` restores it.

    ``Optimizer.__init__`` is not called on purpose: this object holds no state of its own,
    and torch's global step hooks (the accumulator's misuse guard among them) must see the
    real optimizer's step, not this one's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trainer):
        self.optimizer = optimizer
        self._trainer = trainer
        self._capture = False
        self._pending = None  # None: nothing to replay; ("step", found_inf or None)

    # What the accumulator reads to pick the device-side skip: the real optimizer's answer.
    @property
    def _step_supports_amp_scaling(self):
        return (getattr(self.optimizer, "_step_supports_amp_scaling", False)
                and not _optim.takes_grad_scaler(self.optimizer))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def __getattr__(self, name):
        # Only reached for names this object lacks (e.g. an optimizer's own train()/eval()).
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"WindowOptimizer({self.optimizer!r})"

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FusedAccumTrainer steps the optimizer once per window without a closure")
        if self._capture:
            self._pending = ("step", getattr(self, "found_inf", None))
            return None
        pending, self._pending = self._pending, None
        if pending is None:
            return None  # the accumulator skipped this window (inf/NaN, found on the host)
        found_inf = pending[1]
        if found_inf is None:
            return self.optimizer.step()
        _optim.optimizer_step(self.optimizer, found_inf)  # skipped on the device when found_inf
        return None

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)

    def state_dict(self):
        # A held-back scheduler step changes param_groups' lr: settle it before they are saved.
        sched = getattr(self._trainer, "lr_scheduler", None)
        if isinstance(sched, SkipAwareScheduler):
            sched.resolve()
        sd = self.optimizer.state_dict()
        acc = getattr(self._trainer, "accumulator", None)
        if acc is not None:
            sd = dict(sd, fusedaccum=acc.state_dict())
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        acc_state = state_dict.pop("fusedaccum", None)
        self.optimizer.load_state_dict(state_dict)
        if acc_state is not None:
            self._trainer._fused_load_accumulator_state(acc_state)


class _HostFlag:
    """A device flag read on the host later: on CUDA a non-blocking copy into pinned memory
    and an event, so that reading it waits for the step that produced it, not for the work
    queued after it (the next window's forward and backward)."""

    def __init__(self, flag: torch.Tensor):
        if flag.is_cuda:
            self._host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = flag, None

    def value(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)


class SkipAwareScheduler:
    """Trainer's LR scheduler, stepped only after windows that were not skipped.

    Trainer steps its scheduler after every window unless Accelerate's GradScaler reports a
    skip, which would read the flag on the host at once. Here ``step()`` after a window is
    held back, and decided when the next LR is needed: before the next window's optimizer
    step (by then the flag is usually computed; on CUDA only that step is waited for), or
    when the LR or the scheduler's state is read (logging, checkpoints). The LR of every
    optimizer step is the one a large-batch loop that skips the same windows would use.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._pending = None  # _HostFlag of the window whose step is held back
        self._flag = None  # set by the trainer right after each window's step

    def window_stepped(self, found_inf: torch.Tensor) -> None:
        self._flag = found_inf

    def step(self, *args, **kwargs):
        self.resolve()
        flag, self._flag = self._flag, None
        if flag is None or args or kwargs:
            return self.scheduler.step(*args, **kwargs)
        self._pending = _HostFlag(flag)
        return None

    def resolve(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.value():
            self.scheduler.step()

    def get_last_lr(self):
        self.resolve()
        return self.scheduler.get_last_lr()

    def state_dict(self):
        self.resolve()
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict):
        self._pending = None
        self.scheduler.load_state_dict(state_dict)

    def __getattr__(self, name):
        if name == "scheduler":
            raise AttributeError(name)
        self.resolve()
        return getattr(self.scheduler, name)

    def __repr__(self) -> str:
        return f"SkipAwareScheduler({self.scheduler!r})"
