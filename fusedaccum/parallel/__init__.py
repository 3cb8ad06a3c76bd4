"""Data-parallel engines, one per module, each one ``Engine`` object (see ``base``):

- ``local``: one process, or ``process_group=False``: nothing is communicated;
- ``group``: the accumulator all-reduces its buckets over a process group at ``step``
  (``process_group`` given, or None with torch.distributed initialized);
- ``ddp``: DistributedDataParallel reduces once per window (``no_sync()`` before);
- ``fsdp2``: FSDP2 (``fully_shard``) reduce-scatters into the buckets, which hold this
  rank's shards; the norm's partials are gathered at the step.

Exactly one party reduces a window's gradient. ``select`` gives the engine of a
``process_group`` argument; a wrapper model shown to the accumulator hands the window to its
own engine (``Engine.adopt``). A new engine is a new module here, and an entry in ``WRAPPERS``
when it comes with a wrapper model.
"""

from .base import Engine, Window, check_process_group
from .ddp import DDP
from .fsdp2 import FSDP1, FSDP2, MODES, refuse_flat_params
from .group import Auto, Group, broadcast_parameters, select
from .local import Local

#: engines that come with a wrapper model (``cls.wraps(model)``, ``cls.check(model, params,
#: process_group, options)``, ``cls(model, options)``); FSDP1 only refuses
WRAPPERS = (DDP, FSDP2, FSDP1)

__all__ = ["DDP", "FSDP2", "MODES", "WRAPPERS", "Auto", "Engine", "Group", "Local", "Window", "broadcast_parameters",
           "check_process_group", "engine_for", "select"]


def engine_for(process_group, module, params, options=None) -> Engine:
    """The engine of a new GradAccumulator: checks everything, changes nothing."""
    check_process_group(process_group)
    options = dict(options or {})
    if options.get("fsdp_sync", "micro_batch") not in MODES:
        raise ValueError(f"fsdp_sync must be one of {MODES}, got {options['fsdp_sync']!r}")
    refuse_flat_params(params)
    engine = select(process_group, options)
    return engine if module is None else engine.adopt(module, params)
