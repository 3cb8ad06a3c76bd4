"""Triton kernels and their launch helpers. No policy lives here: inputs are validated and
the backend is chosen in ``fusedaccum``; each launch helper has the signature of the
matching function in ``fusedaccum.reference``."""

from .accumulate import accumulate_, sq_slots
from .unscale_clip import apply, finalize, norm_partials, unscale_clip_

__all__ = ["accumulate_", "apply", "finalize", "norm_partials", "sq_slots", "unscale_clip_"]
