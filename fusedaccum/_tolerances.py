"""The one tolerance table: how far a fused op's result may be from a float64 computation, by the
dtype the result is stored in. The tests (tests/helpers.py) and ``python -m fusedaccum selfcheck``
both read it; docs/numerics.md and docs/kernels.md print it."""

import torch

# Every result is computed in fp32 or better and rounded once, to nearest even, to its storage
# dtype (the interpreted Triton kernels too: kernels/_tile.py), so the bound is half an ulp of that
# dtype (2**-8 bf16, 2**-11 fp16) plus fp32 arithmetic; atol covers values near 0.
TOL = {
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2.0 ** -8 + 2e-6, atol=1e-6),
    torch.float16: dict(rtol=2.0 ** -11 + 2e-6, atol=1e-6),
}
# Norms are reductions in fp32 (per-program partials) folded in fp64: relative error grows
# like sqrt(n) * fp32 eps, far under this for the sizes tested.
NORM_RTOL = 1e-5
