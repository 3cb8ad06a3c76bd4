"""One checkpoint, every rank's window: the accumulator state of a data-parallel run, gathered.

Mid-window a ``GradAccumulator``'s sums are its own rank's (DDP all-reduces once per window, at
its last micro-batch), so each rank has a different partial window to save. Lightning and
Accelerate call the objects' ``state_dict()`` on every rank but write the file from one process
(global rank 0; Accelerate's ``save_on_each_node``: one per node), and every rank then loads that
one file. Saving only the writer's state makes every rank resume with the writer's partial
window: the others' micro-batches are lost and the writer's counted once per rank.

So ``gather`` (a collective: every rank calls it, at the same point) collects all ranks' states
into one dict keyed by rank, which any writer can save, and ``select`` gives each rank its own
back. A window resumed on another number of ranks has no right split of its sums: refused; an
empty window (a checkpoint between windows) loads on any number.
"""

import torch

__all__ = ["gather", "select", "rank_and_world"]

FORMAT = "fusedaccum.per_rank_accumulator_state"


def rank_and_world() -> "tuple[int, int]":
    """This process's rank and the world size of the default process group (0, 1 without one):
    the group Lightning's and Accelerate's DDP reduce over."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _to_cpu(obj):
    """Tensors moved to the host: another rank unpickles them, which a CUDA tensor of this rank's
    device would put on that device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def gather(state: dict) -> dict:
    """``{"format", "world_size", "ranks": [state of rank 0, 1, ...]}``. Under a process group a
    collective (``all_gather_object``, over host copies): every rank must call it, and every rank
    gets the whole dict, so whichever process writes the file writes all windows. Costs, at save
    time only, world_size copies of a mid-window state's fp32 sums in each rank's host memory."""
    rank, world = rank_and_world()
    if world == 1:
        return {"format": FORMAT, "world_size": 1, "ranks": [state]}
    states = [None] * world
    torch.distributed.all_gather_object(states, _to_cpu(state))
    return {"format": FORMAT, "world_size": world, "ranks": states}


def _micro(state) -> int:
    return state.get("micro_batches", 0) if isinstance(state, dict) else 0


def select(saved: dict, owner: str, rank: "int | None" = None, world: "int | None" = None) -> dict:
    """This rank's accumulator state out of ``gather``'s dict (``owner`` names the caller in
    errors). Also takes a plain ``GradAccumulator.state_dict()`` (checkpoints written before the
    states were gathered): on one rank as it is, on several only between windows (it holds one
    rank's partial window at most). Raises, changing nothing, where the window cannot be split."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    if not isinstance(saved, dict):
        raise TypeError(f"{owner}: the accumulator state must be a dict, got {type(saved).__name__}")
    if saved.get("format") != FORMAT:  # one accumulator's own state dict
        if world > 1 and _micro(saved) > 0:
            raise ValueError(
                f"{owner}: the checkpoint holds one accumulator state with a window of {_micro(saved)} "
                f"micro-batch(es), but this run has {world} ranks: it was saved by one rank only (an older "
                "fusedaccum, or a state_dict() saved by hand), and the other ranks' micro-batches are not "
                "in it. Resume from a checkpoint taken between windows, or saved by this version")
        return saved
    ranks = saved.get("ranks")
    saved_world = saved.get("world_size")
    if not isinstance(ranks, list) or saved_world != len(ranks) or not ranks:
        raise ValueError(f"{owner}: malformed per-rank accumulator state (world_size={saved_world!r}, "
                         f"{type(ranks).__name__} of ranks)")
    if saved_world == world:
        return ranks[rank]
    open_windows = {r: _micro(s) for r, s in enumerate(ranks) if _micro(s) > 0}
    if open_windows:
        raise ValueError(
            f"{owner}: the checkpoint was saved by {saved_world} rank(s) in the middle of a window (micro-batches "
            f"per rank: {open_windows}), and this run has {world}: a partial window's sums are per rank and "
            f"cannot be split over another number of ranks. Resume on {saved_world} rank(s), or from a "
            "checkpoint taken between windows (any number of ranks)")
    return ranks[0]  # an empty window: the ranks' states differ in nothing that is per rank
