"""Worker of tests/test_pipeline.py: a 2-stage pipeline written by hand (each stage owns two
layers; activations go forward and their gradients back with send/recv), on 2 ranks (one per
stage) or 4 (2 stages x 2 data-parallel ranks). Run as a script: rank, world, rdzv, out_dir.
Every group is built with a collective timeout, so a mismatch fails instead of hanging."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedaccum  # noqa: E402
from _multiproc import run_worker  # noqa: E402

DIMS = (4, 8, 8, 8, 3)  # layers 0-1 on stage 0, 2-3 on stage 1
# rows[window][dp index] = rows of each micro-batch; window 1 overflows on stage 0 (skipped
# everywhere), window 3 is partial (step(force=True)).
ROWS = [[[1, 4, 2], [3, 1, 2]], [[2, 2, 1], [1, 3, 2]], [[2, 3, 1], [5, 1, 3]], [[2, 1], [3, 2]]]
OVERFLOW = 1
K = 3
MAX_NORM = 0.3
LR, MOMENTUM = 0.1, 0.9
TIMEOUT = datetime.timedelta(seconds=30)


def full_model(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in zip(DIMS[:-1], DIMS[1:])]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    return nn.ModuleList(layers).to(dtype)


def run_layers(layers, x, last):
    for i, layer in enumerate(layers):
        x = layer(x)
        if not (last and i == len(layers) - 1):
            x = torch.tanh(x)
    return x


def batch(window, dp, k, dtype=torch.float32):
    n = ROWS[window][dp][k]
    g = torch.Generator().manual_seed(1000 * window + 100 * dp + k)
    return torch.randn(n, DIMS[0], generator=g).to(dtype), torch.randn(n, DIMS[-1], generator=g).to(dtype)


def clip_grads(stage):
    """Gradients for the clip_grad_norm_ check: stage 0 holds fp32 and bf16, stage 1 fp32 only
    (so the stages' raw partials have different widths)."""
    g = torch.Generator().manual_seed(7 + stage)
    shapes = [(5, 3), (7,)] if stage == 0 else [(4, 4)]
    grads = [torch.randn(s, generator=g) * (2.0 + stage) for s in shapes]
    if stage == 0:
        grads.append((torch.randn(6, generator=g) * 3).to(torch.bfloat16))
    return grads


def train(rank, world):
    stages, dp_size = 2, world // 2
    stage, dp = rank // dp_size, rank % dp_size
    dp_groups = [dist.new_group([s * dp_size + d for d in range(dp_size)], timeout=TIMEOUT) for s in range(stages)]
    pp_groups = [dist.new_group([s * dp_size + d for s in range(stages)], timeout=TIMEOUT) for d in range(dp_size)]
    pp, peer = pp_groups[dp], (1 - stage) * dp_size + dp
    layers = full_model()[2 * stage: 2 * stage + 2]
    # One stage per rank: process_group=None means no data parallel; with dp, the stage's group.
    acc = fusedaccum.GradAccumulator(layers.parameters(), K, max_norm=MAX_NORM, pipeline_group=pp,
                                     process_group=None if dp_size == 1 else dp_groups[stage])
    opt = torch.optim.SGD(layers.parameters(), lr=LR, momentum=MOMENTUM)
    steps = []
    for w, rows in enumerate(ROWS):
        for k in range(len(rows[dp])):
            x, y = batch(w, dp, k)
            n = x.shape[0]
            if stage == 0:
                out = run_layers(layers, x, last=False)
                dist.send(out.detach(), dst=peer)
                grad = torch.empty_like(out)
                dist.recv(grad, src=peer)
                surrogate = (out * grad).sum()
                if w == OVERFLOW and k == 0:  # stage 0 alone overflows: every stage must skip
                    surrogate = surrogate + layers[0].weight.sum() * float("inf")
                acc.backward(surrogate, num_items=0)  # the last stage's count is broadcast
            else:
                inp = torch.empty(n, DIMS[2])
                dist.recv(inp, src=peer)
                inp.requires_grad_(True)
                loss = ((run_layers(layers, inp, last=True) - y) ** 2).sum()
                acc.backward(loss, num_items=n)
                dist.send(inp.grad, dst=peer)
        r = acc.step(opt, force=len(rows[dp]) < K)
        steps.append([float(r.total_norm), float(r.found_inf), float(r.loss), float(r.num_items)])
    record = {"stage": stage, "steps": steps, "params": [p.detach().clone() for p in layers.parameters()]}
    # fusedaccum.clip_grad_norm_ over the stages (the pp group of dp index 0 and 1 alike).
    params = [torch.zeros_like(g, requires_grad=True) for g in clip_grads(stage)]
    for p, g in zip(params, clip_grads(stage)):
        p.grad = g.clone()
    total = fusedaccum.clip_grad_norm_(params, 1.5, pipeline_group=pp)
    record["clip"] = {"total": float(total), "grads": [p.grad.float() for p in params]}
    return record


def main(rank, world, rdzv, out_dir):
    # Saves {"train": record}; a failure is saved as the record {"error": traceback}.
    run_worker(rank, world, rdzv, out_dir, ["train"], lambda _: train(rank, world), TIMEOUT.total_seconds())


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
