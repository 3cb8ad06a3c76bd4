"""Several backwards in one micro-batch: ``acc.backward(loss, end_micro_batch=False)`` on all
but the last. They count as one micro-batch (the window closes after K real micro-batches and
is divided by K, or by the items the parts add up to), and the low-precision accumulate pass
runs after every backward (each part's landing gradient folds into the fp32 sum).

Reference: plain torch, one large batch per window (float64 copy of the model), whose loss is
the mean over micro-batches of the micro-batch's summed parts. On the original main each
backward counted as a micro-batch: the window closed after K/2 micro-batches and was divided
by K (and ``retain_graph`` did not exist).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

IN, HID, OUT = 5, 6, 3
K = 2
TOLS = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_model(dtype):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def batch(w, k, part, dtype):
    g = torch.Generator().manual_seed(100 * w + 10 * k + part)
    return torch.randn(3, IN, generator=g).to(dtype), torch.randn(3, OUT, generator=g).to(dtype)


def parts(model, w, k, retain):
    """The micro-batch's two losses: two graphs, or one graph used twice (retain_graph)."""
    dtype = next(model.parameters()).dtype
    x0, y0 = batch(w, k, 0, dtype)
    if retain:
        out = model(x0).double()
        return [F.mse_loss(out, y0.double()), out.pow(2).mean() * 0.1]
    x1, y1 = batch(w, k, 1, dtype)
    return [F.mse_loss(model(x0).double(), y0.double()), F.mse_loss(model(x1).double(), y1.double()) * 0.5]


def reference(windows, retain, num_items=None):
    model = make_model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for w in range(windows):
        opt.zero_grad()
        total = sum(sum(parts(model, w, k, retain)) for k in range(K))
        (total / (num_items if num_items else K)).backward()
        opt.step()
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("retain", [False, True])
def test_two_backwards_per_micro_batch_match_the_large_batch(dtype, retain):
    from fusedaccum import GradAccumulator

    model = make_model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    acc = GradAccumulator(model, K)
    results = []
    for w in range(2):
        for k in range(K):
            a, b = parts(model, w, k, retain)
            acc.backward(a, retain_graph=retain, end_micro_batch=False)
            assert acc.micro_batches == k
            acc.backward(b)
            assert acc.micro_batches == k + 1
            result = acc.step(opt)
            assert (result is None) == (k < K - 1)
        results.append(result)
    assert [r.micro_batches for r in results] == [K, K]
    ref = reference(2, retain)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), atol=TOLS[dtype], rtol=0)
    acc.release()


def test_num_items_of_the_parts_add_up():
    """Token-weighted parts: each part's loss is a sum over its items; the micro-batch holds
    their total, and the window's loss is the large batch's per-item mean."""
    from fusedaccum import GradAccumulator

    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    acc = GradAccumulator(model, K)
    for k in range(K):
        a, b = parts(model, 0, k, False)
        acc.backward(a * 9, num_items=9, end_micro_batch=False)  # mse over 9 elements, as a sum
        acc.backward(b * 9, num_items=torch.tensor(9.0))
    result = acc.step(opt)
    assert result.micro_batches == K and float(result.num_items) == 4 * 9
    ref = make_model(torch.float64)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    total = sum(sum(parts(ref, 0, k, False)) * 9 for k in range(K))
    (total / 36).backward()
    ref_opt.step()
    torch.testing.assert_close(result.loss, total.detach() / 36, atol=1e-6, rtol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), atol=1e-5, rtol=0)
    acc.release()


def test_open_micro_batch_refuses_step_and_state_dict():
    from fusedaccum import GradAccumulator

    model = make_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    acc = GradAccumulator(model, 1)
    a, b = parts(model, 0, 0, False)
    acc.backward(a, end_micro_batch=False)
    with pytest.raises(RuntimeError, match="end_micro_batch=False"):
        acc.step(opt, force=True)
    with pytest.raises(RuntimeError, match="end_micro_batch=False"):
        acc.state_dict()
    with pytest.raises(ValueError, match="num_items must be given on every micro-batch"):
        acc.backward(b, num_items=3)
    acc.backward(b)
    assert acc.step(opt).micro_batches == 1
    # discard_window drops an open micro-batch too
    acc.backward(a.detach().requires_grad_() * 0 + parts(model, 1, 0, False)[0], end_micro_batch=False)
    acc.discard_window()
    acc.backward(parts(model, 1, 0, False)[1])
    assert acc.step(opt).micro_batches == 1
    acc.release()


def test_parts_refused_with_noise_scale():
    from fusedaccum import GradAccumulator

    model = make_model(torch.float32)
    acc = GradAccumulator(model, K, noise_scale=True)
    a, _ = parts(model, 0, 0, False)
    with pytest.raises(ValueError, match="noise statistics need one backward per micro-batch"):
        acc.backward(a, end_micro_batch=False)
    assert acc.micro_batches == 0 and not acc.window_open()
    acc.release()
