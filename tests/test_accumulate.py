import math

import pytest
import torch

import fusedaccum
from fusedaccum.kernels._launch import BLOCK

from helpers import GRAD_DTYPES, SIZES, assert_close, randn, same_bits


def _scale(kind: str, value: float, device):
    return value if kind == "float" else torch.tensor(value, device=device)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
@pytest.mark.parametrize("mode", ["add", "overwrite", "add+zero_grad"])
def test_accumulate_matches_float64(backend, device, n, dtype, scale_kind, mode):
    acc = randn(n, torch.float32, device, seed=1)
    grad = randn(n, dtype, device, seed=2, scale=3.0)
    overwrite, zero_grad = mode == "overwrite", mode == "add+zero_grad"
    base = torch.zeros(n, dtype=torch.float64) if overwrite else acc.double().cpu()
    expected = base + grad.double().cpu() * 0.37
    grad_before = grad.clone()

    out = fusedaccum.accumulate_(acc, grad, _scale(scale_kind, 0.37, device), zero_grad=zero_grad, overwrite=overwrite)

    assert out is acc
    assert_close(acc, expected, torch.float32)
    if zero_grad:
        assert torch.equal(grad, torch.zeros_like(grad))
    else:
        assert same_bits(grad, grad_before)


def test_accumulate_accepts_any_grad_shape_and_cpu_scalar_tensor(backend, device):
    acc = randn(12, torch.float32, device, seed=3)
    grad = randn(12, torch.bfloat16, device, seed=4).view(3, 4)
    expected = acc.double().cpu() + grad.double().cpu().reshape(-1) * 2
    fusedaccum.accumulate_(acc, grad, torch.tensor(2.0, dtype=torch.float64))
    assert_close(acc, expected, torch.float32)


def test_accumulate_propagates_inf_and_nan(backend, device):
    acc = randn(BLOCK + 1, torch.float32, device, seed=5)
    grad = randn(BLOCK + 1, torch.bfloat16, device, seed=6)
    grad[0], grad[BLOCK // 2], grad[-1] = float("inf"), float("nan"), -float("inf")
    fusedaccum.accumulate_(acc, grad, 1.0)
    assert acc[0].item() == float("inf") and acc[-1].item() == -float("inf")
    assert torch.isnan(acc[BLOCK // 2])
    assert torch.isfinite(acc[1:BLOCK // 2]).all() and torch.isfinite(acc[BLOCK // 2 + 1:-1]).all()


def test_accumulate_is_deterministic(backend, device):
    runs = []
    for _ in range(2):
        acc = randn(7919, torch.float32, device, seed=7)
        fusedaccum.accumulate_(acc, randn(7919, torch.float16, device, seed=8), 1 / 3)
        runs.append(acc)
    assert same_bits(runs[0], runs[1])


def test_grid_stride_loop_covers_every_tile(device):
    """More tiles than programs: each program walks several tiles (the loop only large
    buckets take on a GPU), forced here with a tiny program cap."""
    if device.type == "cpu":
        from conftest import _triton_usable

        if _triton_usable("cpu"):
            pytest.skip(_triton_usable("cpu"))
    from fusedaccum.kernels.accumulate import accumulate_

    n = 5 * BLOCK + 3
    acc = randn(n, torch.float32, device, seed=9)
    grad = randn(n, torch.bfloat16, device, seed=10)
    expected = acc.double().cpu() + grad.double().cpu() * 0.5
    accumulate_(acc, grad, 0.5, zero_grad=True, overwrite=False, max_programs=2)
    assert_close(acc, expected, torch.float32)
    assert torch.equal(grad, torch.zeros_like(grad))


BAD_INPUTS = {
    "acc not fp32": (lambda d: (torch.zeros(8, dtype=torch.bfloat16, device=d), torch.ones(8, device=d)), TypeError, "acc has dtype bfloat16"),
    "grad integer": (lambda d: (torch.zeros(8, device=d), torch.ones(8, dtype=torch.int32, device=d)), TypeError, "grad has dtype int32"),
    "grad float64": (lambda d: (torch.zeros(8, device=d), torch.ones(8, dtype=torch.float64, device=d)), TypeError, "grad has dtype float64"),
    "sizes differ": (lambda d: (torch.zeros(8, device=d), torch.ones(9, device=d)), ValueError, "acc has 8 elements but grad has 9"),
    "acc non-contiguous": (lambda d: (torch.zeros(16, device=d)[::2], torch.ones(8, device=d)), ValueError, "acc must be a dense contiguous"),
    "grad non-contiguous": (lambda d: (torch.zeros(8, device=d), torch.ones(4, 4, device=d)[:, :2]), ValueError, "grad must be a dense contiguous"),
    "mixed devices": (lambda d: (torch.zeros(8, device=d), torch.ones(8, device="meta")), ValueError, "grad on meta"),
    "acc is grad": (lambda d: (lambda t: (t, t))(torch.zeros(8, device=d)), ValueError, "overlap"),
    "acc not a tensor": (lambda d: ([0.0] * 8, torch.ones(8, device=d)), TypeError, "acc must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_accumulate_rejects_bad_input_and_changes_nothing(backend, device, case):
    make, error, message = BAD_INPUTS[case]
    acc, grad = make(device)
    before = [t.clone() for t in (acc, grad) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    with pytest.raises(error, match=message):
        fusedaccum.accumulate_(acc, grad, 2.0, zero_grad=True)
    after = [t for t in (acc, grad) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    assert all(same_bits(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("scale, error, message", [
    (torch.ones(2), ValueError, "scale must be a float or a one-element real tensor"),
    (torch.tensor(True), ValueError, "one-element real tensor"),
    (torch.tensor(1j), ValueError, "one-element real tensor"),
    ("2", TypeError, "scale must be a float"),
    (True, TypeError, "scale must be a float"),
])
def test_accumulate_rejects_bad_scale(backend, device, scale, error, message):
    acc, grad = torch.zeros(4, device=device), torch.ones(4, device=device)
    with pytest.raises(error, match=message):
        fusedaccum.accumulate_(acc, grad, scale, zero_grad=True)
    assert torch.equal(acc, torch.zeros(4, device=device)) and torch.equal(grad, torch.ones(4, device=device))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64])
def test_accumulate_takes_a_scale_tensor_of_any_real_dtype(backend, device, dtype):
    acc, grad = torch.zeros(5, device=device), torch.full((5,), 1.5, device=device)
    fusedaccum.accumulate_(acc, grad, torch.tensor(3, dtype=dtype, device=device))
    assert torch.equal(acc, torch.full((5,), 4.5, device=device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_reference_cpu_pieces_give_the_same_bits(monkeypatch, dtype, scale_kind):
    """The reference works through cache-sized pieces on the CPU when grad is bf16/fp16:
    shrink the piece so several (and a ragged last one) run on a small bucket."""
    import fusedaccum.reference as reference

    monkeypatch.setenv("FUSEDACCUM_BACKEND", "torch")
    acc = randn(BLOCK + 1, torch.float32, "cpu", seed=21)
    grad = randn(BLOCK + 1, dtype, "cpu", seed=22)
    whole = acc.clone()
    scale = _scale(scale_kind, 0.37, "cpu")
    reference._add_(whole, grad.float(), scale)  # one piece, fp32 copy of grad: the expected bits
    monkeypatch.setattr(reference, "CPU_PIECE", 1000)
    fusedaccum.accumulate_(acc, grad, scale)
    assert same_bits(acc, whole)


# ---- issue 10 ----------------------------------------------------------------------------

@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_accumulate_rounds_once_like_an_fma(backend, device, scale_kind):
    """Item 8: acc + grad * scale is rounded once in both backends (the Triton kernel rounded
    the product first: under cancellation most elements differed)."""
    g = torch.Generator().manual_seed(51)
    grad = torch.rand(BLOCK + 7, generator=g, dtype=torch.float64) + 0.5
    scale = 1.0 + 2.0 ** -20
    acc64 = -(grad * scale) + grad * 2.0 ** -30  # cancels all but a sliver
    acc = acc64.float().to(device)
    expected = acc.double().cpu() + grad.float().double() * scale  # exact: then one rounding
    fusedaccum.accumulate_(acc, grad.float().to(device), _scale(scale_kind, scale, device))
    assert torch.equal(acc.cpu(), expected.float())
    # inf + (-FLT_MAX * 65536): the exact product is finite inside an fma, so inf, not NaN.
    acc = torch.tensor([float("inf")], device=device)
    fusedaccum.accumulate_(acc, torch.tensor([-3.4028235e38], device=device), _scale(scale_kind, 65536.0, device))
    assert float(acc) == float("inf")


@pytest.mark.parametrize("value", [1e39, -1e39])
def test_accumulate_scale_outside_fp32_is_inf_in_both_forms(backend, device, value):
    """Item 3: a Python float beyond fp32 behaves as the same float64 tensor (+-inf), in both
    backends, instead of an error in one."""
    results = []
    for scale in (value, torch.tensor(value, dtype=torch.float64, device=device)):
        acc = torch.zeros(3, device=device)
        fusedaccum.accumulate_(acc, torch.tensor([1.0, -2.0, 0.0], device=device), scale)
        results.append(acc.cpu())
    assert same_bits(results[0], results[1])
    assert results[0][0] == math.copysign(math.inf, value) and math.isnan(results[0][2])
