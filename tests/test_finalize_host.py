"""The reference's CPU finalize (fusedaccum/_finalize_host.py, host scalars) against its
tensor path (what other devices run): the same stats for random partials, edge values
included (0, subnormal, huge, inf, NaN, store limits, inv 0/inf/negative, max_norm 0)."""

import math
import random

import pytest
import torch

from fusedaccum import reference

VALUES = [0.0, 1e-45, 1e-30, 1.0, 3.5, 1e30, 3e38, math.inf, math.nan]


def _tensor_path(monkeypatch, *args):
    with monkeypatch.context() as m:
        m.setattr(reference, "_reads_host", lambda device: False)
        return reference.finalize(*args)


def _value(rng):
    return abs(rng.choice(VALUES + [rng.random() * 10.0 ** rng.randint(-40, 38)]))


@pytest.mark.parametrize("seed", range(4))
def test_host_finalize_equals_tensor_path(seed, monkeypatch):
    rng = random.Random(seed)
    for _ in range(150):
        slots = rng.choice([0, 1, 2, 3, 7])
        rows = [[_value(rng) for _ in range(slots)], [float(rng.randint(-126, 126)) for _ in range(slots)],
                [rng.choice([0.0, 0.0, 0.0, 1.0, 2.0]) for _ in range(slots)], [_value(rng) for _ in range(slots)],
                [rng.choice([math.inf, 65520.0, 3.3961e38]) for _ in range(slots)]]
        partials = torch.tensor(rows, dtype=torch.float32).reshape(5, slots)
        inv = rng.choice([1.0, 0.25, 1e-8, math.inf, 0.0, -0.5, 3e-39, torch.tensor(0.125)])
        args = (partials, inv, rng.choice([None, 0.0, 1.0, 1e-30, 5.0]), rng.choice([1.0, 2.0, math.inf]),
                rng.choice([0.0, 1e-6]))
        host = reference.finalize(*args)
        tensor = _tensor_path(monkeypatch, *args)
        assert host.dtype == torch.float32 and host.shape == (4,)
        # NaN payloads (the sign of an x86 default NaN) may differ; everything else bit for bit.
        assert torch.equal(host.isnan(), tensor.isnan()), (args, host, tensor)
        assert torch.equal(host.nan_to_num().view(torch.int32), tensor.nan_to_num().view(torch.int32)), \
            (args, host, tensor)


@pytest.mark.parametrize("sizes", [[0], [1], [1000, 0, 2049], [5000]])
@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e25])
def test_host_partials_equal_tensor_path(sizes, scale, monkeypatch):
    """The CPU 2-norm fast path's partials built on the host equal the tensor path's, and
    finalize to the same stats; out of SAFE_SUM (scale 1e25, 1e-20) both take the scaled path."""
    g = torch.Generator().manual_seed(sum(sizes))
    buckets = [torch.randn(n, generator=g) * scale for n in sizes]
    inv = torch.tensor(0.5)
    host = reference.norm_partials(buckets, inv, 2.0)
    with monkeypatch.context() as m:
        m.setattr(reference, "host_partials", lambda *a: None)
        tensor = reference.norm_partials(buckets, inv, 2.0)
    assert torch.equal(host, tensor)
    assert torch.equal(reference.finalize(host, inv, 1.0, 2.0, 1e-6), reference.finalize(tensor, inv, 1.0, 2.0, 1e-6))
