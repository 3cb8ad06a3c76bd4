"""Shared test helpers: the tolerance table, float64 oracles and bitwise comparison."""

import torch

from fusedaccum._tolerances import NORM_RTOL, TOL  # noqa: F401 - the one table (selfcheck reads it too)
from fusedaccum.kernels._launch import BLOCK

GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 7919]  # 7919: a prime


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), check_dtype=False, **TOL[dtype])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t, so NaN == NaN and -0.0 != 0.0."""
    int_type = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.detach().contiguous().view(int_type).clone()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def randn(n: int, dtype: torch.dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def norm64(tensors, p: float) -> torch.Tensor:
    flat = torch.cat([t.double().reshape(-1).cpu() for t in tensors])
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return torch.linalg.vector_norm(flat, p)


def read_by_cpu_reference(depth: int = 2) -> bool:
    """Whether the host read a spy sees (the spy's caller, ``depth`` frames up) comes from the CPU
    reference, which reads its own CPU flags by design (docs/numerics.md): no device to wait for."""
    import os
    import sys

    return sys._getframe(depth).f_code.co_filename.endswith(os.path.join("fusedaccum", "reference.py"))
