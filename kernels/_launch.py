"""Grid arithmetic shared by the launch helpers.

Every kernel here walks its bucket with a grid-stride loop over tiles of ``BLOCK``
elements. The grid is capped at ``MAX_PROGRAMS`` so that the reductions have a fixed,
small number of per-program partial slots: the same bucket size always gives the same
partials in the same order, hence bitwise-identical norms across calls and GPUs.
"""

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
