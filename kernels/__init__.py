"""Triton kernels and their launch helpers. No policy lives here: inputs are validated and
the backend is chosen in ``fusedaccum``; each launch helper has the signature of the
matching function in ``fusedaccum.reference``."""

from .accumulate import accumulate_, sq_slots
from ._launch import MAX_PROGRAMS as MAX_SLOTS_PER_BUCKET  # norm_partials: one slot per program
from .unscale_clip import apply, finalize, norm_partials, unscale_clip_

__all__ = ["MAX_SLOTS_PER_BUCKET", "accumulate_", "apply", "finalize", "norm_partials", "sq_slots", "unscale_clip_"]
