"""One rank of tests/test_mesh2d.py: FSDP2 after tensor parallel on a (2, 2) ("dp", "tp") gloo mesh.

Run as ``python _mesh2d_worker.py RANK WORLD RDZV OUT_DIR``; every scenario runs in this one
launch and its record is saved to OUT_DIR/rank{RANK}.pt. The model and the data are shared with
the test (which computes the float64 one-process reference from them).
"""

import datetime
import functools
import sys

import torch
from torch import nn

D, H = 5, 6  # H / tp = 3 rows per tp rank, then 2 + 1 over dp; D = 5: 3 + 2 -- every shard uneven
K, WINDOWS, MAX_NORM, LR = 2, 3, 0.05, 0.5
TIMEOUT = datetime.timedelta(seconds=10)


class Net(nn.Module):
    """norm (plain: replicated over tp) -> up (Colwise) -> relu -> down (Rowwise: its bias replicated
    over tp) + residual -> head (plain: replicated over tp)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        h = self.norm(x)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def make_model(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7 + (1.0 if p.dim() == 1 and p.numel() == D else 0.0))
    return model.to(dtype)


def micro_data(w, k, dp_rank):
    """Micro-batch k of window w on data-parallel rank dp_rank (both its tp ranks): float64
    (x, y), 1 to 3 rows: uneven item counts over the dp ranks."""
    rows = 1 + (w + 2 * k + dp_rank) % 3
    g = torch.Generator().manual_seed(100 * w + 10 * k + dp_rank)
    return torch.randn(rows, D, generator=g, dtype=torch.float64) * 2, torch.randn(rows, 1, generator=g,
                                                                                   dtype=torch.float64)


def sum_loss(out, y):
    return ((out - y) ** 2).sum()


def mesh_of(shape, names):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    # The init_process_group timeout does not reach a device mesh's sub-groups (torch 2.13):
    # gloo options carrying it do, so a collective mismatch fails instead of hanging.
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = TIMEOUT
    return init_device_mesh("cpu", shape, mesh_dim_names=names, backend_override={n: ("gloo", opts) for n in names})


def _replicated_in(module, inputs, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs)


def tp_fsdp_model(mesh, replicate_plain=False):
    """Colwise ``up``, Rowwise ``down`` over tp, then fully_shard over dp. ``replicate_plain``:
    ``norm`` and ``head`` become replicated DTensors on the tp mesh too (as SequenceParallel
    norms are), else they stay plain (sharded over dp only, the same on every tp rank)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = make_model()
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    if replicate_plain:
        for m in (model.norm, model.head):
            distribute_module(m, mesh["tp"], input_fn=_replicated_in, output_fn=lambda mod, out, mesh: out.to_local())
    fully_shard(model, mesh=mesh["dp"])
    return model


# ---------------------------------------------------------------- scenarios

def _train(mesh, mode, replicate_plain):
    from fusedaccum import GradAccumulator

    dp = mesh.get_local_rank("dp")
    model = tp_fsdp_model(mesh, replicate_plain)
    acc = GradAccumulator(model, K, max_norm=MAX_NORM, fsdp_sync=mode)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    results = []
    for w in range(WINDOWS):
        for k in range(K):
            x, y = micro_data(w, k, dp)
            with acc.accumulate(model):
                acc.backward(sum_loss(model(x.float()), y.float()), num_items=x.shape[0])
        r = acc.step(opt)
        results.append((r.total_norm.item(), r.loss.item(), float(r.num_items), bool(r.found_inf.item())))
    x, y = micro_data(0, 0, dp)  # an inf on one rank only: every rank skips, weights unchanged
    before = [p.full_tensor().clone() for p in model.parameters()]
    for k in range(K):
        with acc.accumulate(model):
            loss = sum_loss(model(x.float()), y.float())
            acc.backward(loss * (float("inf") if (k == 1 and mesh.get_rank() == 3) else 1.0), num_items=1)
    skipped = bool(acc.step(opt).found_inf.item())
    same = all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    return {"steps": results, "params": [b.detach() for b in before], "inf_skipped": skipped, "inf_unchanged": same,
            "buckets": len(acc.buckets)}


def scenario_micro_batch(mesh):
    return _train(mesh, "micro_batch", False)


def scenario_window(mesh):
    return _train(mesh, "window", True)


def scenario_clip(mesh):
    """A plain backward, then fusedaccum's clip against torch's on the same 2-D DTensor grads."""
    import torch.distributed as dist

    import fusedaccum

    out = {}
    x, y = micro_data(0, 0, mesh.get_local_rank("dp"))
    model = tp_fsdp_model(mesh, replicate_plain=True)  # torch's clip needs one mesh
    sum_loss(model(x.float()), y.float()).backward()
    saved = [p.grad.to_local().clone() for p in model.parameters()]
    for norm_type in (2.0, 1.0, float("inf")):
        for p, g in zip(model.parameters(), saved):
            p.grad.to_local().copy_(g)
        calls = []
        real = {n: getattr(dist, n) for n in ("all_gather_single", "all_gather_into_tensor", "all_reduce")
                if hasattr(dist, n)}
        for n, fn in real.items():
            setattr(dist, n, lambda *a, _n=n, _fn=fn, **kw: (calls.append(_n), _fn(*a, **kw))[1])
        try:
            norm = fusedaccum.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type)
        finally:
            for n, fn in real.items():
                setattr(dist, n, fn)
        rec = {"norm": norm.full_tensor(), "ours": [p.grad.full_tensor() for p in model.parameters()],
               "calls": calls, "placements": [str(p.grad.placements) for p in model.parameters()]}
        for p, g in zip(model.parameters(), saved):
            p.grad.to_local().copy_(g)
        rec["unclipped"] = [p.grad.full_tensor() for p in model.parameters()]
        if norm_type != float("inf"):  # torch's inf-norm raises on an empty shard (_foreach_norm)
            rec["ref"] = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type).full_tensor()
            rec["torch"] = [p.grad.full_tensor() for p in model.parameters()]
        out[norm_type] = rec
    return out


def _refusal(build):
    from fusedaccum import GradAccumulator

    model = build()
    try:
        GradAccumulator(model, K, max_norm=MAX_NORM)
    except ValueError as e:
        return {"message": str(e), "untouched": all(p.grad is None for p in model.parameters())}
    return {"message": None}


def scenario_refusals(mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def plain_on_dp():  # FSDP2 over the dp sub-mesh, no tensor parallel: tp ranks would double-count
        model = make_model()
        fully_shard(model, mesh=mesh["dp"])
        return model

    cp_mesh = mesh_of((2, 2), ("dp", "cp"))

    def context_parallel():
        model = make_model()
        fully_shard(model, mesh=cp_mesh["dp"])
        return model

    hsdp_mesh = mesh_of((1, 2, 2), ("dp_replicate", "dp_shard", "tp"))

    def hsdp_tp():
        model = make_model()
        parallelize_module(model, hsdp_mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(model, mesh=hsdp_mesh["dp_replicate", "dp_shard"])
        return model

    def noise():
        from fusedaccum import GradAccumulator

        model = tp_fsdp_model(mesh)
        try:
            GradAccumulator(model, K, noise_scale=True)
        except ValueError as e:
            return {"message": str(e), "untouched": all(p.grad is None for p in model.parameters())}
        return {"message": None}

    return {"no_tp_submesh": _refusal(plain_on_dp), "context_parallel": _refusal(context_parallel),
            "hsdp_tp": _refusal(hsdp_tp), "noise_scale": noise()}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}
NAMES = ["micro_batch", "window", "clip", "refusals"]


def worker(rank, world, rdzv, out_dir):
    from _multiproc import run_worker

    # Built once, after the group exists and before the first scenario, on every rank alike.
    mesh = functools.cache(lambda: mesh_of((2, 2), ("dp", "tp")))
    # No destroy_process_group: after a timed-out collective it could wait on the peers.
    run_worker(rank, world, rdzv, out_dir, NAMES, lambda name: SCENARIOS[name](mesh()), TIMEOUT.total_seconds(),
               destroy=False)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
