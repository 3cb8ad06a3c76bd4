"""GradAccumulator across 2 processes (gloo on CPU) against one float64 process on all the data.

Each launch starts two workers (this file run as a script, one per rank; rendezvous through a
FileStore in a temporary folder: no ports), which run every scenario in turn over one process
group, save what they saw (weights, norms, flags, the collectives they issued) with
``torch.save`` and destroy the group. The tests below compare those records with a float64
large-batch reference computed here. One launch for the torch backend serves most tests;
one more runs an equivalence scenario through the Triton kernels (under the interpreter).

Counting collectives: the worker wraps ``torch.distributed.all_reduce`` (the accumulator
calls it through the module, so every call of its own is seen with its tensor's size and
dtype); DDP's all-reduces go through its C++ reducer instead and are counted with a
communication hook.

Tolerance: as in test_accumulator.py, 1e-5 on O(1) weights after <= 3 fp32 steps (measured
differences are ~1e-7; a wrong normalization or clip moves them by > 1e-3).
"""

import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _multiproc as mp  # the gloo launcher the multi-process tests share

WORLD = 2
K = 3
IN, HID, OUT = 6, 12, 3
NUMEL = IN * HID + HID + HID * OUT + OUT  # 123: one fp32 bucket
MAX_NORM = 0.2
TOL = 1e-5
BF16_ULP = 2.0**-8

# Rows per micro-batch: plan[window][rank] = sizes of that rank's micro-batches. The last
# mean window is partial (closed by step(force=True)) and has 2 micro-batches on rank 0, 1 on rank 1.
MEAN_PLAN = [[[2, 2, 2], [2, 2, 2]], [[2, 2, 2], [2, 2, 2]], [[2, 2], [2]]]
# Token-weighted: uneven counts within and across ranks (7 vs 6 rows, then 6 vs 9).
ITEMS_PLAN = [[[1, 4, 2], [3, 1, 2]], [[2, 2, 2], [5, 1, 3]]]


# ---------------------------------------------------------------- shared by workers and tests

class Mixed(nn.Module):
    """bf16 first layer, fp32 second: two buckets."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(IN, HID), nn.Linear(HID, OUT)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.to(self.l1.weight.dtype))).to(self.l2.weight.dtype))


def make_model(kind="fp32", seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Mixed()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if kind == "mixed":
        model.l1.to(torch.bfloat16)
    elif kind == "bf16":
        model.to(torch.bfloat16)
    return model


def make_opt(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=1e-2)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, lr=5e-2, weight_decay=1e-2, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=5e-2, weight_decay=1e-2)
    raise ValueError(name)


def window_data(plan, w, seed=7):
    """[rank][micro] -> (x, y) float64: window w's rows, rank 0's micro-batches first."""
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
    """Sum over rows ("tokens") of each row's mean squared error."""
    return (out64(model, x) - y).pow(2).mean(-1).sum()


def reference(plan, per_item, max_norm, opt_name="sgd", skip=(), naive=False, kind="fp32"):
    """float64, one process, one optimizer step per window over all ranks' rows.
    naive=True: each rank normalizes by its own items and the ranks are averaged (wrong)."""
    model = make_model(kind).double()
    opt = make_opt("adamw" if opt_name == "adamw_fused" else opt_name, model.parameters())
    norms = []
    for w in range(len(plan)):
        if w in skip:
            continue
        parts = window_data(plan, w)
        opt.zero_grad()
        if naive:
            loss = sum(sum(sum_loss(model, x, y) for x, y in micro) / sum(len(x) for x, _ in micro)
                       for micro in parts) / len(parts)
        else:
            x = torch.cat([x for micro in parts for x, _ in micro])
            y = torch.cat([y for micro in parts for _, y in micro])
            loss = sum_loss(model, x, y) / len(x) if per_item else mean_loss(model, x, y)
        loss.backward()
        norms.append(float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))))
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
    return [p.detach() for p in model.parameters()], norms


# ---------------------------------------------------------------- worker (one process per rank)

CALLS = []  # (numel, dtype) of every torch.distributed.all_reduce call in this process


def _install_counter():
    import torch.distributed as dist

    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        CALLS.append((tensor.numel(), str(tensor.dtype).replace("torch.", "")))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    return original


def _ddp_counting_hook(original_all_reduce):
    """A DDP comm hook doing what DDP's default does (mean), counting its all-reduces."""
    import torch.distributed as dist

    def hook(state, bucket):
        state["n"] += 1
        t = bucket.buffer().div_(dist.get_world_size())
        return original_all_reduce(t, async_op=True).get_future().then(lambda fut: fut.value()[0])

    return hook


def _train(acc, model, opt, plan, rank, per_item, *, shown=True, items_as=("int", "tensor"), inject=None,
           hook_state=None, sync_partial=True):
    """Run plan's windows on this rank (forward through ``model``, inside acc.accumulate(model)
    when ``shown``); returns what the tests check."""
    rec = {"micro_calls": [], "step_calls": [], "ddp_calls": [], "norms": [], "found_inf": [], "params": [],
           "scale": [], "num_items": []}
    hooked = lambda: hook_state["n"] if hook_state else 0  # noqa: E731
    for w in range(len(plan)):
        micro = window_data(plan, w)[rank]
        forced = any(len(sizes) < K for sizes in plan[w])
        for k, (x, y) in enumerate(micro):
            if inject == (w, rank, k):
                x = x.clone()
                x[0, 0] = float("inf")
            before, ddp_before = len(CALLS), hooked()
            sync = True if forced and k == len(micro) - 1 and sync_partial else None
            with acc.accumulate(model, sync=sync) if shown else nullcontext():
                if per_item:
                    n = len(x) if items_as[w % len(items_as)] == "int" else torch.tensor(len(x))
                    acc.backward(sum_loss(model, x, y), num_items=n)
                else:
                    acc.backward(mean_loss(model, x, y))
            rec["micro_calls"].append(len(CALLS) - before)
            rec["ddp_calls"].append(hooked() - ddp_before)
        before = len(CALLS)
        res = acc.step(opt, force=forced)
        rec["step_calls"].append(CALLS[before:])
        rec["norms"].append(float(res.total_norm))
        rec["found_inf"].append(float(res.found_inf))
        rec["num_items"].append(None if res.num_items is None else float(res.num_items))
        rec["params"].append([p.detach().clone() for p in acc.params])
        if acc.scaler is not None:
            rec["scale"].append(acc.scaler.get_scale())
    return rec


def scenario_mean_clip(rank, world, original):
    import fusedaccum
    from fusedaccum import GradAccumulator

    model = make_model(seed=0 if rank == 0 else 100 + rank)  # different on purpose: broadcast below
    fusedaccum.broadcast_parameters(model)
    acc = GradAccumulator(model, K, max_norm=MAX_NORM)  # process_group=None: the default group
    return _train(acc, model, make_opt("sgd", model.parameters()), MEAN_PLAN, rank, per_item=False)


def scenario_items_clip(rank, world, original):
    from fusedaccum import GradAccumulator

    model = make_model()
    acc = GradAccumulator(model.parameters(), K, max_norm=MAX_NORM)
    return _train(acc, model, make_opt("sgd", model.parameters()), ITEMS_PLAN, rank, per_item=True,
                  shown=False)  # backward() alone, no accumulate()


def scenario_mixed_items(rank, world, original):
    import torch.distributed as dist

    from fusedaccum import GradAccumulator

    model = make_model("mixed")
    acc = GradAccumulator(model, K, process_group=dist.group.WORLD)  # explicit group
    return _train(acc, model, make_opt("sgd", model.parameters()), ITEMS_PLAN, rank, per_item=True)


def scenario_mixed_items_folded(rank, world, original):
    """mixed_items with the bf16 layer's gradients added by the CPU's fold hooks (forced: the
    layer is small), under the explicit process group."""
    import fusedaccum._fold_hook

    default, asked = fusedaccum._fold_hook.direct_arrival, []
    fusedaccum._fold_hook.direct_arrival = lambda device, numel: asked.append(numel) or "hook"
    try:
        return scenario_mixed_items(rank, world, original) | {"folded": asked}
    finally:
        fusedaccum._fold_hook.direct_arrival = default


def scenario_inf_one_rank(rank, world, original):
    from fusedaccum import GradAccumulator, LossScaler

    model = make_model()
    acc = GradAccumulator(model, K, max_norm=MAX_NORM, scaler=LossScaler(init_scale=2.0**10))
    plan = MEAN_PLAN[:2] + MEAN_PLAN[:1]
    return _train(acc, model, make_opt("adamw_fused", model.parameters()), plan, rank, per_item=False,
                  inject=(1, 1, 1))  # window 1, rank 1, micro-batch 1: inf in the input


def scenario_ddp_mean(rank, world, original):
    from fusedaccum import GradAccumulator

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)  # DDP's own all-reduce, no hook
    acc = GradAccumulator(ddp.parameters(), K, max_norm=MAX_NORM)
    return _train(acc, ddp, make_opt("sgd", model.parameters()), MEAN_PLAN, rank, per_item=False)


def scenario_ddp_mean_quickstart(rank, world, original):
    """The README's loop under DDP: accumulate(ddp) with no sync= hint, so the forced partial
    window's last micro-batch runs under no_sync(); step(force=True) reduces it."""
    from fusedaccum import GradAccumulator

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    acc = GradAccumulator(ddp, K, max_norm=MAX_NORM)
    return _train(acc, ddp, make_opt("sgd", model.parameters()), MEAN_PLAN, rank, per_item=False,
                  sync_partial=False)


def scenario_ddp_items(rank, world, original):
    from fusedaccum import GradAccumulator

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = {"n": 0}
    ddp.register_comm_hook(state, _ddp_counting_hook(original))
    acc = GradAccumulator(ddp, K, max_norm=MAX_NORM)  # the DDP model itself
    return _train(acc, ddp, make_opt("sgd", model.parameters()), ITEMS_PLAN, rank, per_item=True,
                  hook_state=state)


def scenario_ddp_unshown(rank, world, original):
    """DDP never shown to the accumulator: DDP reduces every micro-batch, the accumulator
    once more at the step. Wasteful, but the gradient is still right (see the docstring)."""
    from fusedaccum import GradAccumulator

    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    acc = GradAccumulator(model.parameters(), K, max_norm=MAX_NORM)
    return _train(acc, ddp, make_opt("sgd", model.parameters()), ITEMS_PLAN, rank, per_item=True, shown=False)


def scenario_refusals(rank, world, original):
    import torch.distributed as dist

    from fusedaccum import GradAccumulator

    out = {}

    def catch(name, fn):
        try:
            fn()
            out[name] = None
        except (ValueError, RuntimeError, TypeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"

    def enter(acc, ddp):
        with acc.accumulate(ddp):
            out["body_ran"] = True  # never, if accumulate refuses

    x, y = window_data(MEAN_PLAN, 0)[rank][0]

    # bf16 parameters under DDP.
    m = make_model("bf16")
    ddp = nn.parallel.DistributedDataParallel(m)
    catch("bf16_ctor", lambda: GradAccumulator(ddp, K))
    acc = GradAccumulator(m.parameters(), K)  # the refused constructor claimed nothing
    catch("bf16_accumulate", lambda: enter(acc, ddp))
    out["bf16_untouched"] = acc.micro_batches == 0
    acc.release()

    # gradient_as_bucket_view=True: what it does, then the refusal.
    m = make_model()
    ddp = nn.parallel.DistributedDataParallel(m, gradient_as_bucket_view=True)
    acc = GradAccumulator(m.parameters(), 1)
    acc.backward(mean_loss(ddp, x, y))  # not shown to accumulate(): DDP syncs this backward
    bucket = acc.buckets.buckets[0]
    out["gabv_grads_left_bucket"] = all(p.grad is not view for p, view in zip(bucket.params, bucket.views))
    acc.release()
    acc = GradAccumulator(m.parameters(), K)
    catch("gabv", lambda: enter(acc, ddp))
    acc.release()

    # An explicit process_group (or False) and DDP: two owners of the reduction.
    m = make_model()
    ddp = nn.parallel.DistributedDataParallel(m)
    for name, pg in (("explicit_group", dist.group.WORLD), ("group_false", False)):
        acc = GradAccumulator(m.parameters(), K, process_group=pg)
        catch(name, lambda: enter(acc, ddp))
        acc.release()
    catch("explicit_group_ctor", lambda: GradAccumulator(ddp, K, process_group=dist.group.WORLD))
    catch("bad_group", lambda: GradAccumulator(m.parameters(), K, process_group="world"))

    # DDP not covering every parameter of the accumulator.
    extra = nn.Parameter(torch.zeros(3))
    acc = GradAccumulator(list(m.parameters()) + [extra], K)
    catch("not_covered", lambda: enter(acc, ddp))
    acc.release()

    # Shown a DDP model only after reducing a window itself.
    acc = GradAccumulator(m.parameters(), 1)
    opt = make_opt("sgd", m.parameters())
    acc.backward(mean_loss(m, x, y))
    before = len(CALLS)
    acc.step(opt)
    out["own_step_calls"] = len(CALLS) - before
    catch("late_ddp", lambda: enter(acc, ddp))
    acc.release()
    out.setdefault("body_ran", False)
    return out


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def worker(rank, world, rdzv, out_dir, names):
    original = _install_counter()
    mp.run_worker(rank, world, rdzv, out_dir, names, lambda name: SCENARIOS[name](rank, world, original),
                  timeout_s=30)


# ---------------------------------------------------------------- launching (pytest side)

def launch(tmp_path, backend, names, timeout=90, script=__file__):
    """Run ``names`` (scenarios) on WORLD workers, each ``script`` run as a script (this file,
    or another test file whose ``__main__`` adds its scenarios and calls ``worker``)."""
    return mp.launch(script, tmp_path, WORLD, (",".join(names),), timeout,
                     env={"FUSEDACCUM_BACKEND": backend, "TRITON_INTERPRET": "1"})


TORCH_SCENARIOS = ["mean_clip", "items_clip", "mixed_items", "mixed_items_folded", "inf_one_rank", "ddp_mean", "ddp_mean_quickstart",
                   "ddp_items", "ddp_unshown", "refusals"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    ranks = launch(tmp_path_factory.mktemp("dist_torch"), "torch", TORCH_SCENARIOS)
    return {name: [r.get(name, {"error": "not run (an earlier scenario failed)"}) for r in ranks]
            for name in TORCH_SCENARIOS}


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


def assert_in_sync(records):
    r0, r1 = records
    for w, (a, b) in enumerate(zip(r0["params"], r1["params"])):
        assert all(same_bits(p, q) for p, q in zip(a, b)), f"ranks differ after window {w}"


def assert_matches(records, ref, ref_norms, tol=TOL, norm_rtol=1e-5):
    assert_in_sync(records)
    init = [p.detach() for p in make_model().parameters()]
    final = records[0]["params"][-1]
    assert max_diff(final, ref) <= tol
    assert max_diff([p.double() for p in init], ref) >= 10 * tol  # it trained
    torch.testing.assert_close(torch.tensor(records[0]["norms"]), torch.tensor(ref_norms, dtype=torch.float32),
                               rtol=norm_rtol, atol=0)


def test_mean_two_ranks_equal_one_process(runs):
    """Half the data on each rank, K micro-batch means per window, clipping active, and a
    forced partial window of 2 micro-batches on rank 0 and 1 on rank 1 (its normalizer, 3,
    is all-reduced): the weights of one float64 process over all the data. Rank 1 starts
    from other weights, which broadcast_parameters replaces with rank 0's."""
    records = ok(runs["mean_clip"])
    ref, norms = reference(MEAN_PLAN, per_item=False, max_norm=MAX_NORM)
    assert min(norms) > 2 * MAX_NORM  # clipping is active in every window
    assert_matches(records, ref, norms)


def test_token_weighted_two_ranks_equal_one_process(runs):
    """Uneven item counts within and across ranks: the gradient is divided by the GLOBAL
    item count (all-reduced); dividing on each rank by its own, then averaging, is wrong."""
    records = ok(runs["items_clip"])
    ref, norms = reference(ITEMS_PLAN, per_item=True, max_norm=MAX_NORM)
    assert min(norms) > 2 * MAX_NORM
    assert_matches(records, ref, norms)
    assert records[0]["num_items"] == records[1]["num_items"] == [13.0, 15.0]  # global totals
    naive, _ = reference(ITEMS_PLAN, per_item=True, max_norm=MAX_NORM, naive=True)
    assert max_diff(records[0]["params"][-1], naive) > 100 * TOL  # the data tells them apart


def test_collectives_one_all_reduce_per_bucket_per_step(runs):
    """Own reduction: no collective during any micro-batch; at each step one all_reduce per
    bucket (fp32, the bucket's size), plus one of the fp64 count vector (the item count and
    the window's signals: [count, loss, noise-scale sums (3), micro-batches], then one "used"
    flag per parameter (4): fusedaccum/_usage.py). Under DDP: only
    that vector; DDP's own all-reduce only on the last micro-batch of a window."""
    bucket = (NUMEL, "float32")
    count = (6 + 4, "float64")
    for rank, rec in enumerate(ok(runs["mean_clip"])):
        assert rec["micro_calls"] == [0] * (8 - rank)  # the partial window: 2 micro-batches, 1
        assert rec["step_calls"] == [[count, bucket]] * 3
    for rec in ok(runs["items_clip"]):
        assert rec["micro_calls"] == [0] * 6
        assert rec["step_calls"] == [[count, bucket]] * 2
    bf16_numel = IN * HID + HID
    for rec in ok(runs["mixed_items"]):  # two buckets: bf16 layer (fp32 sums) and fp32 layer
        assert rec["micro_calls"] == [0] * 6
        assert rec["step_calls"] == [[count, (bf16_numel, "float32"), (NUMEL - bf16_numel, "float32")]] * 2
    for rank, rec in enumerate(ok(runs["ddp_mean"])):
        assert rec["micro_calls"] == [0] * (8 - rank)
        assert rec["step_calls"] == [[count]] * 3
    for rank, rec in enumerate(ok(runs["ddp_mean_quickstart"])):  # the partial window: nobody else reduced it
        assert rec["micro_calls"] == [0] * (8 - rank)
        assert rec["step_calls"] == [[count], [count], [count, bucket]]
    for rank, rec in enumerate(ok(runs["ddp_items"])):
        assert rec["micro_calls"] == [0] * 6
        assert rec["step_calls"] == [[count]] * 2
        assert rec["ddp_calls"] == [0, 0, 1] * 2  # one DDP bucket, once per window


def test_mixed_precision_buckets_two_ranks(runs):
    records = ok(runs["mixed_items"])
    ref, norms = reference(ITEMS_PLAN, per_item=True, max_norm=None, kind="mixed")
    assert_in_sync(records)
    wmax = max(p.abs().max().item() for p in ref)
    assert max_diff(records[0]["params"][-1], ref) <= len(ITEMS_PLAN) * BF16_ULP * wmax
    torch.testing.assert_close(torch.tensor(records[0]["norms"]), torch.tensor(norms, dtype=torch.float32),
                               rtol=BF16_ULP, atol=0)


def test_folded_bf16_gradients_two_ranks_equal_the_view_path(runs):
    """The fold hook only changes how the bf16 gradients reach the fp32 sums that the group
    all-reduces at the step: the same bits as autograd's add into the views, on both ranks."""
    folded, views = ok(runs["mixed_items_folded"]), ok(runs["mixed_items"])
    assert all(rec["folded"] == [IN * HID, HID] for rec in folded)  # the bf16 layer's weight and bias
    assert_in_sync(folded)
    for a, b in zip(folded, views):
        assert a["norms"] == b["norms"]
        assert all(same_bits(x, y) for x, y in zip(a["params"][-1], b["params"][-1]))


def test_inf_on_one_rank_skips_everywhere(runs):
    """An inf in rank 1's second micro-batch of window 1: after the all-reduce both ranks see
    it, both skip (fused AdamW, on the device), keep their weights bit for bit, back the loss
    scale off alike, and train the next window like a reference that never saw window 1."""
    r0, r1 = records = ok(runs["inf_one_rank"])
    assert r0["found_inf"] == r1["found_inf"] == [0.0, 1.0, 0.0]
    assert_in_sync(records)
    assert all(same_bits(a, b) for a, b in zip(r0["params"][0], r0["params"][1]))  # skipped
    assert max_diff(r0["params"][2], [p.double() for p in r0["params"][1]]) > 100 * TOL  # trained after
    assert r0["scale"] == r1["scale"] == [2.0**10, 2.0**9, 2.0**9]
    plan = MEAN_PLAN[:2] + MEAN_PLAN[:1]
    ref, _ = reference(plan, per_item=False, max_norm=MAX_NORM, opt_name="adamw_fused", skip=(1,))
    assert max_diff(r0["params"][2], ref) <= TOL


def test_ddp_with_accumulate_equals_one_process(runs):
    """DDP over fp32 parameters, accumulate(ddp) (no_sync on all but the last micro-batch):
    mean windows with a forced partial one, and token-weighted windows (DDP averaged the
    sum-losses: multiplier world_size / global items)."""
    ref, norms = reference(MEAN_PLAN, per_item=False, max_norm=MAX_NORM)
    assert_matches(ok(runs["ddp_mean"]), ref, norms)
    assert_matches(ok(runs["ddp_mean_quickstart"]), ref, norms)  # no sync=True on the partial window
    ref, norms = reference(ITEMS_PLAN, per_item=True, max_norm=MAX_NORM)
    assert_matches(ok(runs["ddp_items"]), ref, norms)


def test_ddp_not_shown_is_still_right(runs):
    """A DDP model never shown to the accumulator: DDP averages every micro-batch's running
    sum, the accumulator sums once more; linear and idempotent, so still the right step."""
    records = ok(runs["ddp_unshown"])
    ref, norms = reference(ITEMS_PLAN, per_item=True, max_norm=MAX_NORM)
    assert_matches(records, ref, norms)
    # count + signals + a used flag per parameter, bucket
    assert records[0]["step_calls"] == [[(6 + 4, "float64"), (NUMEL, "float32")]] * 2


def test_refused_ddp_cases_raise_clearly(runs):
    r0, r1 = ok(runs["refusals"])
    assert {k: (v is None) for k, v in r0.items()} == {k: (v is None) for k, v in r1.items()}
    out = r0
    assert not out["body_ran"] and out["bf16_untouched"]
    for key in ("bf16_ctor", "bf16_accumulate"):
        assert out[key].startswith("ValueError") and "bfloat16" in out[key]
        assert "Drop the DDP wrapper" in out[key] and "broadcast_parameters" in out[key]
    # Why gradient_as_bucket_view is refused: DDP takes param.grad out of the buckets.
    assert out["gabv_grads_left_bucket"]
    assert out["gabv"].startswith("ValueError") and "gradient_as_bucket_view=False" in out["gabv"]
    for key in ("explicit_group", "group_false", "explicit_group_ctor"):
        assert out[key].startswith("ValueError") and "only one of them" in out[key]
    assert out["bad_group"].startswith("TypeError") and "ProcessGroup" in out["bad_group"]
    assert out["not_covered"].startswith("ValueError") and "(3,)" in out["not_covered"]
    assert out["own_step_calls"] == 2  # the bucket, and the count vector with the window's loss
    assert out["late_ddp"].startswith("RuntimeError") and "already all-reduced" in out["late_ddp"]


def test_triton_backend_two_ranks(tmp_path):
    """Token-weighted windows with clipping through the Triton kernels (interpreter)."""
    import importlib.util

    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    records = ok([r["items_clip"] for r in launch(tmp_path, "triton", ["items_clip"])])
    ref, norms = reference(ITEMS_PLAN, per_item=True, max_norm=MAX_NORM)
    assert_matches(records, ref, norms)


def test_single_process_never_communicates(monkeypatch):
    """Without an initialized process group (process_group=None), nothing is communicated."""
    import torch.distributed as dist

    from fusedaccum import GradAccumulator

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group exists in this process")

    def forbidden(*args, **kwargs):
        raise AssertionError("all_reduce called in a single process")

    monkeypatch.setattr(dist, "all_reduce", forbidden)
    model = make_model()
    acc = GradAccumulator(model, 2)
    for x, y in window_data(ITEMS_PLAN, 0)[0][:2]:
        acc.backward(sum_loss(model, x, y), num_items=len(x))
    assert acc.step(make_opt("sgd", model.parameters())).num_items == 5


if __name__ == "__main__":
    rank, world, rdzv, out_dir, names = sys.argv[1:6]
    worker(int(rank), int(world), rdzv, out_dir, names.split(","))
