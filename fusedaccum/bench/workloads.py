"""What the rows call besides fusedaccum's public ops: PyTorch's chain, the torch.compile
expressions, the norm pass alone, and the stand-ins (injected gradients, a no-op optimizer)."""

from __future__ import annotations

from typing import Callable

import torch

from fusedaccum import _backend

MAX_NORM = 1.0


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")


def _randn(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(n, device=device).mul_(1e-2).to(dtype)


def _holders(grads: list, device: torch.device) -> list:
    """Parameters whose ``.grad`` are ``grads``, for torch's clip_grad_norm_ (which takes
    parameters). Their data is a zero-stride expand of one element: no memory."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(1, device=device).expand(g.shape))
        p.grad = g
        params.append(p)
    return params


def _compiled(fn: Callable) -> Callable:
    # A fresh dynamo cache per compiled row: the same function compiled for every N and dtype
    # would otherwise pass dynamo's recompile limit (8) and silently run eagerly.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _acc_expr(acc, grad):
    acc.add_(grad)


def _unscale_clip_expr(g, inv, max_norm: float):
    # unscale_clip_ written as one expression for torch.compile: read pass (norm, inf check),
    # then one read-write pass.
    norm = torch.linalg.vector_norm(g, dtype=torch.float32) * inv.abs()
    found_inf = ~torch.isfinite(norm)
    coef = inv * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    g.mul_(torch.where(found_inf, torch.ones_like(coef), coef))
    return norm, found_inf


def _norm_expr(g):
    return torch.linalg.vector_norm(g, dtype=torch.float32)


def torch_chain(grads: list, params: list, inv: torch.Tensor) -> Callable:
    """The step preprocessing a PyTorch user runs today: GradScaler.unscale_'s kernel, then
    clip_grad_norm_(foreach=True). found_inf is a fresh tensor per step, as in GradScaler."""
    def step():
        found_inf = torch.zeros(1, device=inv.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
        return torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True), found_inf
    return step


def _total_norm(grads: list) -> torch.Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def norm_pass(bucket: torch.Tensor, inv: torch.Tensor):
    """The read pass of ``unscale_clip_`` alone (its first phase, ``norm_partials``), on the
    backend the bucket's device gets: partial norms and non-finite codes, no finalize, no
    apply. Returns ``(run, total_norm)``: ``total_norm()`` folds what the last ``run()``
    left into the 2-norm of the bucket, for the tests (not timed)."""
    impl = _backend.implementation(bucket.device)
    last = []

    def run():
        last[:] = [impl.norm_partials([bucket], inv, 2.0)]
        return last[0]

    def total_norm():
        return impl.finalize(last[0], inv, None, 2.0, 0.0)[0].double()
    return run, total_norm


class _InjectGrads(torch.autograd.Function):
    """A loss whose backward hands every parameter a fixed gradient: the window rows then time
    the gradient landing, the accumulation and the step, not a model. (The gradient of the
    loss is ignored; the values only need to stay finite.)"""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_out):
        return (None, *ctx.grads)


class NullOptimizer(torch.optim.Optimizer):
    """An optimizer whose step does nothing, so the window rows time gradient handling, not
    an update. It declares PyTorch's fused-AMP contract (``found_inf`` handed over as a device
    tensor, as ``AdamW(fused=True)`` does), so ``GradAccumulator.step`` has no host sync. Its
    state is filled from the start, as a fused optimizer's is after its first step (before
    it, ``GradAccumulator`` takes the synchronous path)."""

    _step_supports_amp_scaling = True

    def __init__(self, params):
        super().__init__(params, {})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["initialized"] = True

    def step(self, closure=None):
        return None


