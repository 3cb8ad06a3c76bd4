"""GradAccumulator over FSDP2 (``fully_shard``) models: 2 and 4 processes on gloo (CPU) against
one float64 process on all the data.

As in test_distributed.py: each launch starts one worker per rank (this file run as a
script; rendezvous through a FileStore, no ports), which runs every scenario in turn over one
process group and saves what it saw with ``torch.save``; the tests compare those records with
a float64 large-batch reference computed here. Two launches serve most tests: 2 ranks (most
scenarios) and 4 ranks (uneven and empty shards, HSDP on a 2x2 mesh); a third (2 ranks) runs
through the Triton kernels.

The model has three Linear layers, each wrapped with ``fully_shard``, and the root too: 3
FSDP parameter groups, so 3 reduce-scatters per synchronising backward. Its rows (8, 13, 3)
do and do not divide by 2 and 4 ranks; on 4 ranks the last layer's rank-3 shard is empty.

Counting collectives: the worker wraps ``torch.distributed``'s ``all_reduce`` (the
accumulator's item count), ``reduce_scatter_single`` (FSDP2's gradients) and
``all_gather_single`` (FSDP2's parameters during the micro-batches; the accumulator's norm
partials at the step) before the process group exists; FSDP2 and the accumulator call them
through the module, so every call is seen.

Tolerances: 1e-5 on O(1) weights after 3 fp32 AdamW windows with active clipping (measured
~1e-7); bf16 compute (MixedPrecisionPolicy param_dtype=bf16): 1e-2 relative to the largest weight.
"""

import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _multiproc as mp  # the gloo launcher the multi-process tests share

IN, H1, H2, OUT = 6, 8, 13, 3
K = 3
MAX_NORM = 0.2
TOL = 1e-5
GROUPS = 3  # FSDP parameter groups: l1, l2, l3 (the root holds no parameter of its own)


def mean_plan(world):
    """rows per micro-batch: plan[window][rank]; the last window is partial (2 micro-batches,
    on every rank: FSDP2's forward all-gathers, so all ranks run as many) and closed by
    step(force=True)."""
    full = [[2, 2, 2]] * world
    return [full, full, [[2, 2]] * world]


def items_plan(world):
    """Token-weighted: uneven item counts within and across ranks."""
    sizes = [[1, 4, 2], [3, 1, 2], [2, 1, 1], [1, 2, 5]]
    other = [[2, 2, 2], [5, 1, 3], [1, 1, 4], [3, 3, 1]]
    return [sizes[:world], other[:world], sizes[:world][::-1]]


# ---------------------------------------------------------------- shared by workers and tests

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(IN, H1), nn.Linear(H1, H2), nn.Linear(H2, OUT)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def make_model():
    g = torch.Generator().manual_seed(0)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def window_data(plan, w, seed=7):
    """[rank][micro] -> (x, y) float64: window w's rows, rank 0's first."""
    g = torch.Generator().manual_seed(seed * 1000 + w)
    sizes = [s for rank_sizes in plan[w] for s in rank_sizes]
    x = torch.randn(sum(sizes), IN, generator=g, dtype=torch.float64)
    y = torch.randn(sum(sizes), OUT, generator=g, dtype=torch.float64)
    out, start = [], 0
    for rank_sizes in plan[w]:
        out.append([])
        for s in rank_sizes:
            out[-1].append((x[start:start + s], y[start:start + s]))
            start += s
    return out


def out64(model, x):
    return model(x.to(next(model.parameters()).dtype)).double()


def mean_loss(model, x, y):
    return F.mse_loss(out64(model, x), y)


def sum_loss(model, x, y):
    return (out64(model, x) - y).pow(2).mean(-1).sum()


def make_opt(params, fused=False):
    return torch.optim.AdamW(params, lr=5e-2, weight_decay=1e-2, **({"fused": True} if fused else {}))


LOSSES = {}  # reference() -> the large-batch loss of each window, keyed by (plan, per_item)


def reference(plan, per_item, max_norm=MAX_NORM, skip=()):
    """float64, one process, one AdamW step per window over all ranks' rows."""
    model = make_model().double()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, weight_decay=1e-2)
    norms = []
    for w in range(len(plan)):
        if w in skip:
            continue
        parts = window_data(plan, w)
        x = torch.cat([x for micro in parts for x, _ in micro])
        y = torch.cat([y for micro in parts for _, y in micro])
        opt.zero_grad()
        loss = (sum_loss(model, x, y) / len(x)) if per_item else mean_loss(model, x, y)
        LOSSES.setdefault((str(plan), per_item), []).append(loss.item())
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
    return [p.detach() for p in model.parameters()], norms


# ---------------------------------------------------------------- worker (one process per rank)

CALLS = []  # (name, numel, dtype) of every counted collective in this process
DEPTH = []  # the counted collectives running now


def _install_counters():
    import torch.distributed as dist

    originals = {}
    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_single", "all_gather_single"):
        original = getattr(dist, name)
        originals[name] = original

        def counting(*args, _original=original, _name=name, **kwargs):
            t = args[0] if args else next(iter(kwargs.values()))
            if not DEPTH:  # all_gather_into_tensor calls all_gather_single: count the outer call only
                CALLS.append((_name, t.numel(), str(t.dtype).replace("torch.", "")))
            DEPTH.append(_name)
            try:
                return _original(*args, **kwargs)
            finally:
                DEPTH.pop()

        setattr(dist, name, counting)
    return originals


def fsdp_model(mp=None, mesh=None, dtype=torch.float32, **kwargs):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_model().to(dtype)
    mp = mp or MixedPrecisionPolicy()
    for layer in (model.l1, model.l2, model.l3):
        fully_shard(layer, mesh=mesh, mp_policy=mp, **kwargs)
    fully_shard(model, mesh=mesh, mp_policy=mp, **kwargs)
    return model


def full_params(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def ours(calls):
    return [c for c in calls if c[0] in ("all_reduce", "all_gather_into_tensor")]


AG_PER_MICRO = 2 * GROUPS  # FSDP2's parameter all-gathers: each group in the forward, again in the backward


def _train(acc, model, opt, plan, rank, per_item, *, shown=True, sync_partial=True, inject=None):
    rec = {"micro": [], "step": [], "norms": [], "loss": [], "found_inf": [], "num_items": [], "params": [], "scale": [],
           "local_numels": [p.to_local().numel() for p in acc.params]}
    for w in range(len(plan)):
        micro = window_data(plan, w)[rank]
        forced = any(len(sizes) < K for sizes in plan[w])
        for k, (x, y) in enumerate(micro):
            if inject == (w, rank, k):
                x = x.clone()
                x[0, 0] = float("inf")
            before = len(CALLS)
            sync = True if forced and sync_partial and k == len(micro) - 1 else None
            with acc.accumulate(model, sync=sync) if shown else nullcontext():
                if per_item:
                    n = len(x) if (w + k) % 2 else torch.tensor(len(x))
                    acc.backward(sum_loss(model, x, y), num_items=n)
                else:
                    acc.backward(mean_loss(model, x, y))
            rec["micro"].append(CALLS[before:])
        before = len(CALLS)
        res = acc.step(opt, force=forced)
        rec["step"].append(CALLS[before:])
        rec["norms"].append(float(res.total_norm))
        rec["loss"].append(float(res.loss))
        rec["found_inf"].append(float(res.found_inf))
        rec["num_items"].append(None if res.num_items is None else float(res.num_items))
        rec["params"].append(full_params(model))
        if acc.scaler is not None:
            rec["scale"].append(acc.scaler.get_scale())
    return rec


def scenario_mean_micro(rank, world):
    from fusedaccum import GradAccumulator

    model = fsdp_model()
    acc = GradAccumulator(model, K, max_norm=MAX_NORM)  # fsdp_sync="micro_batch", the default
    return _train(acc, model, make_opt(model.parameters()), mean_plan(world), rank, per_item=False)


def scenario_mean_window(rank, world):
    from fusedaccum import GradAccumulator

    model = fsdp_model()
    acc = GradAccumulator(model, K, max_norm=MAX_NORM, fsdp_sync="window")
    return _train(acc, model, make_opt(model.parameters()), mean_plan(world), rank, per_item=False)


def scenario_items_micro(rank, world):
    from fusedaccum import GradAccumulator

    model = fsdp_model()
    acc = GradAccumulator(model, K, max_norm=MAX_NORM)
    return _train(acc, model, make_opt(model.parameters()), items_plan(world), rank, per_item=True, shown=False)


def scenario_items_window(rank, world):
    from fusedaccum import GradAccumulator

    model = fsdp_model()
    acc = GradAccumulator(model.parameters(), K, max_norm=MAX_NORM, fsdp_sync="window")  # shown by accumulate
    return _train(acc, model, make_opt(model.parameters()), items_plan(world), rank, per_item=True)


def _bf16(reduce_dtype, mode):
    def scenario(rank, world):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from fusedaccum import GradAccumulator

        model = fsdp_model(MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype))
        acc = GradAccumulator(model, K, max_norm=MAX_NORM, fsdp_sync=mode)
        return _train(acc, model, make_opt(model.parameters()), items_plan(world), rank, per_item=True)

    return scenario


scenario_bf16_fp32reduce_micro = _bf16(torch.float32, "micro_batch")
scenario_bf16_fp32reduce_window = _bf16(torch.float32, "window")
scenario_bf16_bf16reduce_micro = _bf16(torch.bfloat16, "micro_batch")


def scenario_bf16_params_micro(rank, world):
    """bf16 parameters before fully_shard: bf16 sharded grads land in a bf16 bucket, folded
    into the fp32 one after each backward."""
    from fusedaccum import GradAccumulator

    model = fsdp_model(dtype=torch.bfloat16)
    acc = GradAccumulator(model, K, max_norm=MAX_NORM)
    rec = _train(acc, model, make_opt(model.parameters()), items_plan(world), rank, per_item=True)
    rec["landing"] = [b.landing is not None and b.landing.dtype == torch.bfloat16 for b in acc.buckets]
    return rec


def scenario_inf_one_rank(rank, world):
    from fusedaccum import GradAccumulator, LossScaler

    model = fsdp_model()
    acc = GradAccumulator(model, K, max_norm=MAX_NORM, scaler=LossScaler(init_scale=2.0**10))
    plan = mean_plan(world)[:2] * 2
    rec = _train(acc, model, make_opt(model.parameters(), fused=True), plan, rank, per_item=False,
                 inject=(2, 1, 1))  # window 2, rank 1, micro-batch 1
    return rec


def scenario_host_reads(rank, world):
    """What converts a tensor to a host value (a sync on CUDA) in a window with fused AdamW
    (after its first step), tensor num_items and a scaler, and in clip_grad_norm_."""
    import fusedaccum
    from fusedaccum import GradAccumulator, LossScaler
    from helpers import read_by_cpu_reference

    model = fsdp_model()
    acc = GradAccumulator(model, K, max_norm=MAX_NORM, scaler=LossScaler())
    opt = make_opt(model.parameters(), fused=True)
    plan = items_plan(world)

    def window(w):
        for x, y in window_data(plan, w)[rank]:
            with acc.accumulate(model):
                acc.backward(sum_loss(model, x, y), num_items=torch.tensor(len(x)))
        return acc.step(opt)

    window(0)  # the optimizer's state now exists: skips are decided on the device
    reads = {}
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "__int__", "tolist")}

    def spy(name):
        def read(self, *args, **kwargs):
            if not read_by_cpu_reference():
                reads.setdefault(phase, []).append(name)
            return originals[name](self, *args, **kwargs)
        return read

    try:
        for name in originals:
            setattr(torch.Tensor, name, spy(name))
        phase = "control"
        torch.ones(()).item()  # the spy sees a read
        phase = "window"
        res = window(1)
        phase = "clip"
        fusedaccum.clip_grad_norm_(model.parameters(), 0.01)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    return {"reads": reads, "stepped": res is not None}


def scenario_clip_grad_norm(rank, world):
    """fusedaccum.clip_grad_norm_ on DTensor grads in buckets vs torch's on the same grads."""
    import fusedaccum

    out = {}
    x, y = window_data(mean_plan(world), 0)[rank][0]
    for norm_type in (2.0, 1.0, float("inf")):
        model = fsdp_model()
        buckets = fusedaccum.GradBuckets(model.parameters())
        mean_loss(model, x * 3, y).backward()  # FSDP2 reduce-scatters into the bucket views
        grads = [p.grad.to_local().clone() for p in model.parameters()]
        dtensor_grads = [p.grad.full_tensor() for p in model.parameters()]
        before = len(CALLS)
        norm = fusedaccum.clip_grad_norm_(model.parameters(), 0.05, norm_type)
        calls = CALLS[before:]
        ours_clipped = [p.grad.full_tensor() for p in model.parameters()]
        in_buckets = all(p.grad.to_local().untyped_storage().data_ptr() == buckets.buckets[0].accum.untyped_storage()
                         .data_ptr() for p in model.parameters())
        for p, g in zip(model.parameters(), grads):
            p.grad.to_local().copy_(g)
        ref = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, norm_type)
        out[norm_type] = {"norm": norm.full_tensor(), "ref": ref.full_tensor(), "calls": calls,
                          "type": type(norm).__name__, "ours": ours_clipped,
                          "torch": [p.grad.full_tensor() for p in model.parameters()],
                          "unclipped": dtensor_grads, "in_buckets": in_buckets}
        buckets.release()
    return out


def scenario_resume(rank, world):
    """state_dict mid-window (per rank), a fresh model/optimizer/accumulator loads it: bit-identical."""
    from fusedaccum import GradAccumulator

    plan = items_plan(world)
    data = [window_data(plan, w)[rank] for w in range(len(plan))]
    flat = [(w, k, x, y) for w in range(len(plan)) for k, (x, y) in enumerate(data[w])]

    def run(model, opt, acc, steps):
        for w, k, x, y in steps:
            with acc.accumulate(model):
                acc.backward(sum_loss(model, x, y), num_items=len(x))
            acc.step(opt)

    model = fsdp_model()
    opt, acc = make_opt(model.parameters()), GradAccumulator(model, K, max_norm=MAX_NORM)
    run(model, opt, acc, flat)
    straight = [p.to_local().clone() for p in model.parameters()]

    model = fsdp_model()
    opt, acc = make_opt(model.parameters()), GradAccumulator(model, K, max_norm=MAX_NORM)
    cut = K + 1  # one window and one micro-batch of the next
    run(model, opt, acc, flat[:cut])
    saved = {"acc": acc.state_dict(), "opt": opt.state_dict(),
             "model": [p.to_local().clone() for p in model.parameters()]}
    acc.release()
    model = fsdp_model()
    with torch.no_grad():
        for p, t in zip(model.parameters(), saved["model"]):
            p.to_local().copy_(t)
    opt, acc = make_opt(model.parameters()), GradAccumulator(model, K, max_norm=MAX_NORM)
    opt.load_state_dict(saved["opt"])
    acc.load_state_dict(saved["acc"])
    run(model, opt, acc, flat[cut:])
    resumed = [p.to_local().clone() for p in model.parameters()]
    return {"straight": straight, "resumed": resumed, "micro_saved": saved["acc"]["micro_batches"],
            "layout": saved["acc"]["bucket_layout"]}


def scenario_uneven_slots(rank, world):
    """Shards over one kernel tile on one rank only (4160 vs 4096 elements: 2 vs 1 program
    slots in the Triton norm): the gathered partials still line up; the norm is the full one."""
    from torch.distributed.fsdp import fully_shard

    from fusedaccum import GradAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 129, bias=False))
    fully_shard(model[0])
    fully_shard(model)
    acc = GradAccumulator(model, 1)  # no clipping: param.grad is then the normalized gradient
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(rank))
    with acc.accumulate(model):
        acc.backward(model(x).square().mean())
    res = acc.step(torch.optim.SGD(model.parameters(), lr=0.0))
    full = torch.cat([p.grad.full_tensor().reshape(-1) for p in model.parameters()])
    return {"norm": float(res.total_norm), "full_norm": full.double().norm().item(),
            "local_numels": [p.to_local().numel() for p in model.parameters()]}


def scenario_refusals(rank, world):
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    from fusedaccum import GradAccumulator

    out = {}

    def catch(name, fn):
        try:
            fn()
            out[name] = None
        except (ValueError, RuntimeError, TypeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"

    x, y = window_data(mean_plan(world), 0)[rank][0]
    model = fsdp_model()
    opt = make_opt(model.parameters())

    # An FSDP1 model (refused when shown), and its FlatParameters (refused when given).
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import FlatParameter

    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # the type is what is checked
    acc = GradAccumulator(model, K)
    catch("fsdp1_accumulate", lambda: acc.accumulate(fsdp1).__enter__())
    out["fsdp1_untouched"] = acc.micro_batches == 0 and type(acc._engine).__name__ == "FSDP2"
    acc.release()
    flat = FlatParameter.__new__(FlatParameter, torch.zeros(3), requires_grad=True)
    catch("fsdp1_params", lambda: GradAccumulator([flat], K))

    # process_group: False, or a group that is not the mesh; the mesh's own group is fine.
    catch("group_false", lambda: GradAccumulator(model, K, process_group=False))
    sub = dist.new_group([0])
    catch("group_other", lambda: GradAccumulator(model, K, process_group=sub))
    catch("group_world", lambda: GradAccumulator(model, K, process_group=dist.group.WORLD).release())
    catch("bad_mode", lambda: GradAccumulator(model, K, fsdp_sync="sometimes"))
    catch("noise_scale", lambda: GradAccumulator(model, K, noise_scale=True))

    # Sharded parameters but no FSDP2 model shown: refused before the first backward.
    acc = GradAccumulator(model.parameters(), K)
    before = [t.clone() for t in acc._accums]
    catch("unshown", lambda: acc.backward(mean_loss(model, x, y)))
    out["unshown_untouched"] = acc.micro_batches == 0 and all(torch.equal(a, b) for a, b in zip(before, acc._accums))
    acc.release()

    # Parameters that the FSDP2 model does not shard.
    extra = nn.Parameter(torch.zeros(3))
    catch("not_covered", lambda: GradAccumulator(model.parameters(), K).release() or
          GradAccumulator(list(model.parameters()) + [extra], K).accumulate(model).__enter__())
    for p in list(model.parameters()) + [extra]:  # the refused accumulator above still owns them
        if hasattr(p, "_fusedaccum_owner"):
            del p._fusedaccum_owner

    # Window mode with a bf16 reduce dtype: the window's sum would be a bf16 sum inside FSDP2.
    bf16 = fsdp_model(MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    catch("window_bf16", lambda: GradAccumulator(bf16, K, fsdp_sync="window"))

    # CPU offload.
    off = fsdp_model(offload_policy=CPUOffloadPolicy(pin_memory=False))
    catch("offload", lambda: GradAccumulator(off, K))

    # Window mode: mid-window state_dict, and a forced partial window without sync=True.
    acc = GradAccumulator(model, K, fsdp_sync="window")
    with acc.accumulate(model):
        acc.backward(mean_loss(model, x, y))
    catch("window_state_dict", acc.state_dict)
    catch("window_force_unsynced", lambda: acc.step(opt, force=True))
    out["window_force_kept"] = acc.micro_batches == 1
    with acc.accumulate(model, sync=True):
        acc.backward(mean_loss(model, x, y))
    out["window_force_after_sync"] = acc.step(opt, force=True).micro_batches
    acc.release()
    return out


def scenario_hsdp(rank, world):
    """HSDP: a (replicate=2, shard=2) mesh, token-weighted, micro-batch mode."""
    from torch.distributed.device_mesh import init_device_mesh

    from fusedaccum import GradAccumulator

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = fsdp_model(mesh=mesh)
    acc = GradAccumulator(model, K, max_norm=MAX_NORM)
    return _train(acc, model, make_opt(model.parameters()), items_plan(world), rank, per_item=True)


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def worker(rank, world, rdzv, out_dir, names):
    _install_counters()
    mp.run_worker(rank, world, rdzv, out_dir, names, lambda name: SCENARIOS[name](rank, world), timeout_s=20)


# ---------------------------------------------------------------- launching (pytest side)

def launch(tmp_path, world, names, backend="torch", timeout=150):
    return mp.launch(__file__, tmp_path, world, (",".join(names),), timeout,
                     env={"FUSEDACCUM_BACKEND": backend, "TRITON_INTERPRET": "1"})


TWO = ["mean_micro", "mean_window", "items_micro", "items_window", "bf16_fp32reduce_micro",
       "bf16_fp32reduce_window", "bf16_bf16reduce_micro", "bf16_params_micro", "inf_one_rank", "clip_grad_norm",
       "host_reads", "resume", "refusals"]
FOUR = ["mean_micro", "items_window", "hsdp"]


def _runs(tmp_path_factory, world, names):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    ranks = launch(tmp_path_factory.mktemp(f"fsdp2_{world}"), world, names)
    return {name: [r.get(name, {"error": "not run (an earlier scenario failed)"}) for r in ranks] for name in names}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _runs(tmp_path_factory, 2, TWO)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _runs(tmp_path_factory, 4, FOUR)


def ok(records):
    for rank, rec in enumerate(records):
        if "error" in rec:
            pytest.fail(f"rank {rank} failed:\n{rec['error']}")
    return records


def same_bits(a, b):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(ints[a.element_size()]), b.reshape(-1).view(ints[b.element_size()])))


def max_diff(params, ref):
    return max((p.double() - q).abs().max().item() for p, q in zip(params, ref))


def assert_matches(records, ref, ref_norms, tol=TOL, norm_rtol=1e-5):
    for rec in records[1:]:  # every rank sees the same full weights
        assert all(same_bits(p, q) for p, q in zip(rec["params"][-1], records[0]["params"][-1]))
    final = records[0]["params"][-1]
    assert max_diff(final, ref) <= tol
    init = [p.detach().double() for p in make_model().parameters()]
    assert max_diff(init, ref) >= 100 * tol  # it trained
    torch.testing.assert_close(torch.tensor(records[0]["norms"]), torch.tensor(ref_norms, dtype=torch.float32),
                               rtol=norm_rtol, atol=0)


RS = ("reduce_scatter_single",)


def rs_count(calls):
    return sum(c[0] in RS for c in calls)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["micro", "window"])
def test_equals_one_process(two, four, world, mode):
    """Mean windows (with a forced partial one) and token-weighted windows, both window modes,
    AdamW with active clipping: the weights of one float64 process on all the data."""
    runs = two if world == 2 else four
    name = {("micro", 2): ["mean_micro", "items_micro"], ("window", 2): ["mean_window", "items_window"],
            ("micro", 4): ["mean_micro"], ("window", 4): ["items_window"]}[mode, world]
    for n in name:
        per_item = n.startswith("items")
        plan = items_plan(world) if per_item else mean_plan(world)
        LOSSES.clear()
        ref, norms = reference(plan, per_item)
        assert min(norms) > 2 * MAX_NORM  # clipping is active in every window
        assert_matches(ok(runs[n]), ref, norms)
        # StepResult.loss: the window's large-batch loss, global over the ranks, the same on each.
        losses = LOSSES[str(plan), per_item]
        for rec in ok(runs[n]):
            assert rec["loss"] == pytest.approx(losses, rel=1e-6)
        if per_item:
            totals = [float(sum(sum(r) for r in plan[w])) for w in range(len(plan))]
            assert all(rec["num_items"] == totals for rec in runs[n])  # global over the ranks
        numels = [rec["local_numels"] for rec in runs[n]]
        assert [sum(col) for col in zip(*numels)] == [p.numel() for p in make_model().parameters()]
        if world == 4:
            assert 0 in numels[3]  # the last layer's 3 rows leave rank 3 an empty shard


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_per_window(two, four, world):
    """Micro-batch mode: FSDP2's 3 reduce-scatters per micro-batch; window mode: 3 per window,
    on its last micro-batch. Ours, at the step only: one all_gather_single of the norm's
    partials, and one all_reduce of the fp64 count vector (the item count, the window's loss,
    the noise statistics: docs/signals.md), which the window's global loss needs at every step."""
    runs = two if world == 2 else four
    gather = ("all_gather_single", "all_gather_into_tensor")
    count = ("all_reduce", 6 + 6, "float64")  # and a "used" flag per parameter (6)
    for name in ("mean_micro", "items_window") + (("mean_window", "items_micro") if world == 2 else ()):
        plan = items_plan(world) if name.startswith("items") else mean_plan(world)
        for rank, rec in enumerate(ok(runs[name])):
            lengths = [len(plan[w][rank]) for w in range(len(plan))]
            assert all(ours(c) == [] for c in rec["micro"])  # nothing of ours during micro-batches
            # ... and no extra all-gather: FSDP2's own, as many in every micro-batch, in both modes
            assert [sum(c[0] == "all_gather_single" for c in m) for m in rec["micro"]] == [AG_PER_MICRO] * sum(lengths)
            if name.endswith("micro"):
                assert [rs_count(c) for c in rec["micro"]] == [GROUPS] * sum(lengths)
            else:
                expected = [GROUPS if k == n - 1 else 0 for n in lengths for k in range(n)]
                assert [rs_count(c) for c in rec["micro"]] == expected
            for w, calls in enumerate(rec["step"]):
                expected_ours = [count]
                assert [c for c in calls if c[0] == "all_reduce"] == expected_ours
                assert [c[0] for c in calls if c[0] in gather] == ["all_gather_single"]
                assert len(calls) == len(expected_ours) + 1  # nothing else


def rel_diff(params, ref):
    """||params - ref|| / ||ref|| over all the weights."""
    d = torch.cat([(p.double() - q).reshape(-1) for p, q in zip(params, ref)])
    return (d.norm() / torch.cat([q.reshape(-1) for q in ref]).norm()).item()


def test_mixed_precision_bf16_compute(two):
    """MixedPrecisionPolicy(param_dtype=bf16) with fp32 and with bf16 reduce_dtype: the weights
    within 1e-2 (relative, over all of them) of the float64 reference, the norms within 2e-2
    (bf16 forward and backward; the sums are held in the fp32 buckets)."""
    ref, norms = reference(items_plan(2), per_item=True)
    for name in ("bf16_fp32reduce_micro", "bf16_fp32reduce_window", "bf16_bf16reduce_micro"):
        records = ok(two[name])
        assert rel_diff(records[0]["params"][-1], ref) <= 1e-2, name
        torch.testing.assert_close(torch.tensor(records[0]["norms"]), torch.tensor(norms, dtype=torch.float32),
                                   rtol=2e-2, atol=0)
    records = ok(two["bf16_params_micro"])
    assert all(rec["landing"] == [True] for rec in records)
    assert rel_diff(records[0]["params"][-1], ref) <= 1e-2, (rel_diff(records[0]["params"][-1], ref))
    for rec in two["bf16_fp32reduce_micro"]:  # reduce-scattered in fp32, every micro-batch
        assert all(c[2] == "float32" for m in rec["micro"] for c in m if c[0] in RS)
    for rec in two["bf16_bf16reduce_micro"]:
        assert all(c[2] == "bfloat16" for m in rec["micro"] for c in m if c[0] in RS)


def test_inf_on_one_rank_skips_everywhere(two):
    """An inf in rank 1's input in window 2: both ranks skip (fused AdamW on the device), the
    weights stay bit-identical, the scale backs off alike, training continues."""
    r0, r1 = records = ok(two["inf_one_rank"])
    assert r0["found_inf"] == r1["found_inf"] == [0.0, 0.0, 1.0, 0.0]
    assert r0["scale"] == r1["scale"] == [2.0**10, 2.0**10, 2.0**9, 2.0**9]
    for rec in records:
        assert all(same_bits(a, b) for a, b in zip(rec["params"][1], rec["params"][2]))  # skipped
        assert max_diff(rec["params"][3], [p.double() for p in rec["params"][2]]) > 100 * TOL  # trained after
    plan = mean_plan(2)[:2] * 2
    ref, _ = reference(plan, per_item=False, skip=(2,))
    assert max_diff(r0["params"][3], ref) <= TOL


def test_clip_grad_norm_matches_torch_on_dtensor_grads(two):
    """The fused clip over bucket-backed DTensor grads: torch's norm and clipped grads, with one
    all_gather_single and no other collective."""
    for rank, out in enumerate(ok(two["clip_grad_norm"])):
        for norm_type, r in out.items():
            assert r["in_buckets"]
            assert r["type"] == "DTensor"
            torch.testing.assert_close(r["norm"], r["ref"], rtol=1e-6, atol=0)
            for a, b, g in zip(r["ours"], r["torch"], r["unclipped"]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            assert max_diff(r["ours"], [g.double() for g in r["unclipped"]]) > 1e-3  # it clipped
            assert [c[0] for c in r["calls"]] == ["all_gather_single"], (rank, norm_type, r["calls"])


def test_no_host_reads_on_the_step_path(two):
    """Backward, step (fused AdamW with state, a scaler, tensor num_items) and clip_grad_norm_
    over FSDP2 shards: no tensor is read on the host."""
    for rec in ok(two["host_reads"]):
        assert rec["stepped"] and rec["reads"] == {"control": ["item"]}


def test_resume_mid_window_is_bit_identical(two):
    for rec in ok(two["resume"]):
        assert rec["micro_saved"] == 1
        assert all(same_bits(a, b) for a, b in zip(rec["straight"], rec["resumed"]))
    l0, l1 = two["resume"][0]["layout"], two["resume"][1]["layout"]
    n = sum(p.numel() for p in make_model().parameters())
    assert l0[0][1] + l1[0][1] == n  # each rank saved its own shards; together, every element once


def test_refusals_are_clear_and_change_nothing(two):
    r0, r1 = ok(two["refusals"])
    assert {k: v is None for k, v in r0.items()} == {k: v is None for k, v in r1.items()}
    out = r0
    assert out["fsdp1_accumulate"].startswith("ValueError") and "FSDP2" in out["fsdp1_accumulate"]
    assert out["fsdp1_untouched"]
    assert out["fsdp1_params"].startswith("ValueError") and "FullyShardedDataParallel" in out["fsdp1_params"]
    assert out["group_false"].startswith("ValueError") and "process_group=None" in out["group_false"]
    assert out["group_other"].startswith("ValueError") and "contradicts" in out["group_other"]
    assert out["group_world"] is None  # the mesh's own group is no contradiction
    assert out["bad_mode"].startswith("ValueError") and "fsdp_sync" in out["bad_mode"]
    assert out["noise_scale"].startswith("ValueError") and "noise_scale=False" in out["noise_scale"]
    assert out["unshown"].startswith("RuntimeError") and "accumulate(fsdp_model)" in out["unshown"]
    assert out["unshown_untouched"]
    assert out["not_covered"].startswith("ValueError") and "(3,)" in out["not_covered"]
    assert out["window_bf16"].startswith("ValueError") and "reduce_dtype=torch.float32" in out["window_bf16"]
    assert out["offload"].startswith("ValueError") and "CPUOffloadPolicy" in out["offload"]
    assert out["window_state_dict"].startswith("RuntimeError") and "window boundary" in out["window_state_dict"]
    assert out["window_force_unsynced"].startswith("RuntimeError") and "sync=True" in out["window_force_unsynced"]
    assert out["window_force_kept"] and out["window_force_after_sync"] == 2


def test_hsdp_four_ranks(four):
    """HSDP (replicate 2 x shard 2): FSDP2 reduce-scatters within a shard group and all-reduces
    across the replicas; the norm's partials are gathered over the shard group only."""
    records = ok(four["hsdp"])
    ref, norms = reference(items_plan(4), per_item=True)
    assert_matches(records, ref, norms)
    for rec in records:
        for calls in rec["step"]:
            gathers = [c for c in calls if c[0] == "all_gather_single"]
            assert len(gathers) == 1



def test_triton_backend_two_ranks(tmp_path):
    """Token-weighted windows with clipping through the Triton kernels (interpreter): the norm's
    partials of the kernels' programs are gathered between their norm and finalize phases."""
    import importlib.util

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    runs = launch(tmp_path, 2, ["items_micro", "uneven_slots"], backend="triton")
    records = ok([r["items_micro"] for r in runs])
    ref, norms = reference(items_plan(2), per_item=True)
    assert_matches(records, ref, norms)
    uneven = ok([r["uneven_slots"] for r in runs])
    assert [rec["local_numels"] for rec in uneven] == [[4160], [4096]]
    for rec in uneven:
        assert rec["norm"] == pytest.approx(rec["full_norm"], rel=1e-5)



@pytest.fixture
def single_rank(tmp_path):
    """A gloo process group of world size 1 in this process (e.g. one GPU with NCCL)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_single_rank_in_process(single_rank):
    """World size 1: no gather hook, FSDP2 divides by nothing, the weights of the float64 reference."""
    from fusedaccum import GradAccumulator

    model = fsdp_model()
    acc = GradAccumulator(model, K, max_norm=MAX_NORM)
    assert acc._engine.reduce_partials is None
    rec = _train(acc, model, make_opt(model.parameters()), items_plan(1), 0, per_item=True)
    ref, norms = reference(items_plan(1), per_item=True)
    assert_matches([rec], ref, norms)
    acc.release()


@pytest.mark.parametrize("mode", ["micro_batch", "window"])
def test_guard_sees_a_stray_backward(single_rank, mode):
    """loss.backward() inside accumulate under FSDP2 (world size 1, in process): autograd fills
    FSDP2's unsharded parameters, which the buckets watch too; the next acc.backward raises."""
    from fusedaccum import GradAccumulator

    model = fsdp_model()
    acc = GradAccumulator(model, K, fsdp_sync=mode)
    (x, y), = window_data(mean_plan(1), 0)[0][:1]
    with acc.accumulate(model):
        acc.backward(mean_loss(model, x, y))
    with acc.accumulate(model):
        mean_loss(model, x, y).backward()  # the mistake
    with pytest.raises(RuntimeError, match=r"outside acc\.backward"):
        acc.backward(mean_loss(model, x, y))
    acc.release()

if __name__ == "__main__":
    rank, world, rdzv, out_dir, names = sys.argv[1:6]
    worker(int(rank), int(world), rdzv, out_dir, names.split(","))
