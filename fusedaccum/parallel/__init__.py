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
from .pipeline import Pipeline, check_pipeline_group

#: engines that come with a wrapper model (``cls.wraps(model)``, ``cls.check(model, params,
#: process_group, options)``, ``cls(model, options)``); FSDP1 only refuses
WRAPPERS = (DDP, FSDP2, FSDP1)

__all__ = ["DDP", "FSDP2", "MODES", "WRAPPERS", "Auto", "Engine", "Group", "Local", "Pipeline", "Window",
           "broadcast_parameters", "check_pipeline_group", "check_process_group", "engine_for", "select"]


def engine_for(process_group, module, params, options=None) -> Engine:
    """The engine of a new GradAccumulator: checks everything, changes nothing."""
    check_process_group(process_group)
    options = dict(options or {})
    if options.get("fsdp_sync", "micro_batch") not in MODES:
        raise ValueError(f"fsdp_sync must be one of {MODES}, got {options['fsdp_sync']!r}")
    refuse_flat_params(params)
    pipeline_group = check_pipeline_group(options.pop("pipeline_group", None))
    norm_type = options.pop("norm_type", 2.0)
    engine = select(process_group, options)
    if pipeline_group is not None and process_group is None:
        engine = _stage_engine(pipeline_group, module, params, options)
    engine = engine if module is None else engine.adopt(module, params)
    return engine if pipeline_group is None else Pipeline(engine, pipeline_group, norm_type)


def _stage_engine(pipeline_group, module, params, options) -> Engine:
    """``process_group=None`` under pipeline stages: the default group would span every stage
    (all-reducing buckets of different layers), so it means no data parallel within the stage
    when the pipeline is the whole world, a wrapper model's group otherwise."""
    from .base import dist

    if dist().get_world_size() == dist().get_world_size(pipeline_group) or any(
            cls.wraps(module) for cls in WRAPPERS):
        engine = Local(None)
        engine.options = dict(options)
        return engine
    raise ValueError(
        f"pipeline_group has {dist().get_world_size(pipeline_group)} of the world's {dist().get_world_size()} "
        "ranks, so each stage is data-parallel too, but process_group=None and no DistributedDataParallel model "
        "was given: the default group would all-reduce gradients of different stages together. Pass "
        "process_group=<this stage's data-parallel group> or GradAccumulator(ddp_model, ...)")
