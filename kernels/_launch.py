"""Grid arithmetic shared by the launch helpers.

Every kernel here walks its bucket with a grid-stride loop over tiles of ``BLOCK``
elements. The grid is capped at ``MAX_PROGRAMS`` so that the reductions have a fixed,
small number of per-program partial slots: the same bucket size always gives the same
partials in the same order, hence bitwise-identical norms across calls and GPUs.
"""

import contextlib
import contextvars

import triton

BLOCK = 4096
NUM_WARPS = 8
# Enough programs to fill an H100/H200 (132 SMs) several times over with BLOCK=4096.
MAX_PROGRAMS = 1024


def grid_for(numel: int, max_programs: int = MAX_PROGRAMS) -> tuple[int, int]:
    """Return ``(programs, tiles_per_program)`` for a bucket of ``numel`` elements."""
    tiles = triton.cdiv(numel, BLOCK)
    programs = max(1, min(tiles, max_programs))
    return programs, triton.cdiv(tiles, programs)


# Set while a torch.library.triton_op body traces (fusedaccum._library): the launches then go
# through torch.library.wrap_triton, so torch.compile sees the kernels. Off otherwise, because
# wrap_triton's dispatch outside a triton_op costs time on every eager launch.
_TRACEABLE = contextvars.ContextVar("fusedaccum_traceable_launches", default=False)


@contextlib.contextmanager
def traceable_launches():
    token = _TRACEABLE.set(True)
    try:
        yield
    finally:
        _TRACEABLE.reset(token)


def launcher(kernel):
    """``kernel``, or ``torch.library.wrap_triton(kernel)`` inside ``traceable_launches()``."""
    if _TRACEABLE.get():
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel
