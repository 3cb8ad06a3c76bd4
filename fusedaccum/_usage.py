"""Which parameters a window gave a gradient, and parameters unfrozen after construction.

A large batch leaves ``param.grad`` None for a parameter that no micro-batch reached (an
unused head or expert, a layer frozen meanwhile), and PyTorch's optimizers skip it: no
weight decay, no momentum step. The buckets always hold a view for every parameter, so
without this a window would hand such a parameter a zero gradient and the optimizer would
move it. The buckets' post-accumulate-grad hooks mark each parameter a backward reached
(host bools, no sync); at the step, every parameter that no rank marked gets ``grad = None``
for the optimizer (``GradBuckets.attach`` re-points it at the next backward).

Data parallel: a parameter used on one rank only has a gradient in the large batch, so the
"used" set must be global. The mask rides in the engine's count all-reduce whenever the
engine communicates (a fact every rank shares), so no rank ever decides alone whether to
issue a collective. Reading it back is a host sync, taken only on a rank that itself left
some parameter unused in the window (a parameter used locally is used globally).
"""

import torch

from .buckets import _OWNER_ATTR

__all__ = ["ParamUsage"]


def _owned_elsewhere(p: torch.Tensor) -> bool:
    owner = getattr(p, _OWNER_ATTR, None)
    return owner is not None and owner() is not None


class ParamUsage:
    """The accumulator's view of the buckets' "used" flags, and of the parameters that were
    frozen when it was built (``requires_grad=False``: no bucket holds them)."""

    def __init__(self, buckets, module, params: list):
        self._buckets = buckets
        names = {id(p): n for n, p in module.named_parameters()} if module is not None else {}
        seen, self._frozen = set(), []
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and not p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._frozen.append((names.get(id(p), f"params[{i}] (shape {tuple(p.shape)})"), p))

    def check_thawed(self) -> None:
        """Raise, naming them, when parameters frozen at construction require grad now: autograd
        would leave a raw running sum in their ``.grad`` (never normalized, unscaled, clipped or
        reset) for the optimizer. Adopting them would mean new buckets mid-training; a new
        accumulator does that explicitly. Host attribute reads only."""
        thawed = [name for name, p in self._frozen if p.requires_grad and not _owned_elsewhere(p)]
        if thawed:
            shown = ", ".join(thawed[:5]) + (f", ... ({len(thawed)} in all)" if len(thawed) > 5 else "")
            raise RuntimeError(
                f"parameters frozen (requires_grad=False) when this GradAccumulator was built require grad now: "
                f"{shown}. No bucket holds them, so their .grad would be a raw running sum of every backward "
                "(never normalized, unscaled, clipped or reset) and the optimizer would step with it. At a window "
                "boundary, call acc.release() and build a new GradAccumulator over the parameters (and a new "
                "optimizer over them, or add them as a param group), or freeze them again. Nothing was changed")

    def local_mask(self, device, communicates: bool) -> list:
        """``[mask]`` (fp64, 1.0 per used parameter) to append to the count vector when the
        engine communicates, else ``[]``. A host-to-device copy that does not wait on the device
        (pinned memory, ``non_blocking``) on an accelerator."""
        if not communicates:
            return []
        mask = torch.tensor(self._buckets.used, dtype=torch.float64)
        if device.type == "cpu":
            return [mask]
        return [mask.pin_memory().to(device, non_blocking=True)]

    def drop_unused(self, global_mask: "torch.Tensor | None") -> None:
        """``grad = None`` on every parameter no rank used in this window. ``global_mask``: the
        all-reduced ``local_mask`` (None in one process). Reads it on the host (one sync) only
        when this rank left a parameter unused."""
        if self._buckets.all_used():
            return
        used = self._buckets.used
        if global_mask is not None:
            used = [u or g > 0 for u, g in zip(used, global_mask.tolist())]
        for p, u in zip(self._buckets.params, used):
            if not u:
                p.grad = None

    def state_dict(self) -> list:
        return list(self._buckets.used)

    def load_state_dict(self, used) -> None:
        """``used``: a list of bools, one per parameter (None: a state saved before this was
        kept; then every parameter counts as used, as it did then)."""
        self.check_state(used)
        self._buckets._reattach.used[:] = [True] * len(self._buckets.params) if used is None else list(used)

    def check_state(self, used) -> None:
        n = len(self._buckets.params)
        if used is not None and (not isinstance(used, (list, tuple)) or len(used) != n
                                 or not all(isinstance(u, bool) for u in used)):
            raise ValueError(f"the state dict's used_params must be a list of {n} bools, got {used!r}")
