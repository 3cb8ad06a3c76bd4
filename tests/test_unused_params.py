"""Parameters that get no gradient in a window (an unused head or expert, a layer frozen
meanwhile) reach the optimizer with ``grad is None``, as in a large batch, so AdamW neither
decays nor moves them; parameters frozen at construction and unfrozen later are refused.

Reference: plain torch, one large batch per window (``zero_grad(set_to_none=True)``, the
mean of the micro-batch means, one backward), with the same data and the same heads used.
Compared: every weight and every optimizer state tensor (and which parameters have state).
On the original main the unused head got ``grad == 0``: AdamW's weight decay and momentum
moved it (differences ~1e-2 here), and its state existed where the reference has none.

Data parallel (2 gloo processes, each running this file as a script): the process-group
engine and DDP(find_unused_parameters=True), with the head used on one rank only in some
windows and on none in others, against the one-process reference over all ranks' data and
against plain DDP's own large-batch run.
"""

import datetime
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _multiproc as mp

IN, HID, OUT = 5, 7, 3
K = 3
WORLD = 2
TOL = 1e-6
# USE[w][rank][micro]: whether micro-batch micro of rank in window w runs head b.
USE = [
    [[False, True, False], [False, False, False]],  # rank 0 only, one micro-batch
    [[False, False, False], [False, False, False]],  # nobody
    [[False, False, False], [True, False, False]],  # rank 1 only
    [[False, False, False], [False, False, False]],  # nobody
    [[True, False, True], [True, True, True]],  # everybody
]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.a, self.b = nn.Linear(IN, HID), nn.Linear(HID, OUT), nn.Linear(HID, OUT)

    def forward(self, x, use_b):
        h = torch.tanh(self.trunk(x))
        out = self.a(h)
        return out + self.b(h) if use_b else out


def make_model(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def make_opt(params):
    return torch.optim.AdamW(params, lr=5e-2, weight_decay=0.1)


def data(w, rank, k, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * w + 10 * rank + k)
    return torch.randn(4, IN, generator=g).to(dtype), torch.randn(4, OUT, generator=g).to(dtype)


def loss_of(model, w, rank, k, use):
    x, y = data(w, rank, k, next(model.parameters()).dtype)
    return F.mse_loss(model(x, use).float(), y.float())


def reference(use, ranks, windows, freeze=None):
    """Plain torch large batch over ``ranks``' micro-batches; ``freeze[w]``: names of
    parameters frozen during window w."""
    model = make_model()
    opt = make_opt(model.parameters())
    for w in range(windows):
        for name, p in model.named_parameters():
            p.requires_grad_(name not in (freeze or {}).get(w, ()))
        opt.zero_grad(set_to_none=True)
        total = sum(loss_of(model, w, r, k, use[w][r][k]) for r in ranks for k in range(K))
        (total / (len(ranks) * K)).backward()
        opt.step()
    return model, opt


def assert_same_training(model, opt, ref_model, ref_opt, tol=TOL):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach().float(), q.detach(), atol=tol, rtol=0, msg=name)
    with_state = [name for name, p in model.named_parameters() if opt.state.get(p)]
    ref_state = [name for name, p in ref_model.named_parameters() if ref_opt.state.get(p)]
    assert with_state == ref_state
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key, value in ref_opt.state.get(q, {}).items():
            torch.testing.assert_close(opt.state[p][key].float(), value.float(), atol=tol, rtol=0)


def test_unused_head_gets_no_update_one_process():
    """Head b unused in windows 1 and 3: grad None at the step, no weight decay, no momentum."""
    from fusedaccum import GradAccumulator

    use = [u[0] for u in USE]  # rank 0's pattern, alone
    model = make_model()
    opt = make_opt(model.parameters())
    acc = GradAccumulator(model, K)
    for w in range(len(USE)):
        for k in range(K):
            acc.backward(loss_of(model, w, 0, k, use[w][k]))
        assert acc.step(opt) is not None
        grads_none = [name for name, p in model.named_parameters() if p.grad is None]
        assert grads_none == ([] if any(use[w]) else ["b.weight", "b.bias"])
    ref_model, ref_opt = reference([[u] for u in use], [0], len(USE))
    assert_same_training(model, opt, ref_model, ref_opt)
    acc.release()


def test_layer_frozen_after_construction_does_not_move():
    """A managed layer frozen for some windows (LoRA-style) gets no gradient: grad None, no
    decay; unfrozen again, it trains (it is in the buckets: nothing to adopt)."""
    from fusedaccum import GradAccumulator

    model = make_model()
    opt = make_opt(model.parameters())
    acc = GradAccumulator(model, K)
    freeze = {1: ("a.weight", "a.bias"), 2: ("a.weight", "a.bias")}
    use = [[[True] * K]] * 4
    for w in range(4):
        for name, p in model.named_parameters():
            p.requires_grad_(name not in freeze.get(w, ()))
        for k in range(K):
            acc.backward(loss_of(model, w, 0, k, True))
        acc.step(opt)
    for p in model.parameters():
        p.requires_grad_(True)
    ref_model, ref_opt = reference(use, [0], 4, freeze=freeze)
    assert_same_training(model, opt, ref_model, ref_opt)
    acc.release()


@pytest.mark.parametrize("path", ["landing", "view", "hook", "mixed"])
def test_unused_bf16_parameters_keep_their_bits(path, monkeypatch):
    """bf16 parameters, on each path into the fp32 sums (the landing bucket's accumulate pass;
    direct: autograd's add into fp32 views, the CPU's fold hooks, or both in one bucket): the
    unused head keeps every bit."""
    import fusedaccum._fold_hook
    import fusedaccum.buckets
    from fusedaccum import GradAccumulator

    if path == "landing":
        monkeypatch.setattr(fusedaccum.buckets, "grad_dtype_supported", lambda: False)
    elif not fusedaccum.buckets.grad_dtype_supported():
        pytest.skip(f"the direct path ({path}) needs Tensor.grad_dtype, which this torch lacks")
    else:
        monkeypatch.setattr(fusedaccum._fold_hook, "direct_arrival", lambda device, numel: path if path != "mixed"
                            else ("hook" if numel > 10 else "view"))
    model = make_model(torch.bfloat16)
    opt = make_opt(model.parameters())
    acc = GradAccumulator(model, 2)
    before = [p.detach().clone() for p in model.b.parameters()]
    for k in range(2):
        acc.backward(loss_of(model, 0, 0, k, False))
    acc.step(opt)
    assert model.b.weight.grad is None and model.b.bias.grad is None
    assert all(torch.equal(p, q) for p, q in zip(model.b.parameters(), before))
    assert model.a.weight.grad is not None and model.b not in opt.state
    # The next window re-attaches the views: b trains again when used.
    acc.backward(loss_of(model, 1, 0, 0, True))
    bucket = acc.buckets.buckets[0]
    assert any(bucket.folded) == (path in ("hook", "mixed")) and all(bucket.folded) == (path == "hook")
    assert (bucket.landing is None) == (path != "landing")
    assert model.b.weight.grad is bucket.attached[4]  # None where the hooks fold
    acc.step(opt, force=True)
    assert not torch.equal(model.b.weight, before[0])
    acc.release()


def test_resume_mid_window_remembers_which_parameters_were_used():
    """Head b used only before the checkpoint: after the resume it still gets its gradient;
    the resumed run equals the uninterrupted reference."""
    from fusedaccum import GradAccumulator

    use = [[[True, False, False]], [[False, False, False]]]
    model = make_model()
    opt = make_opt(model.parameters())
    acc = GradAccumulator(model, K)
    for w in range(2):
        for k in range(K):
            if (w, k) == (0, 1):
                state = (acc.state_dict(), {n: t.clone() for n, t in model.state_dict().items()})
                acc.release()
                model = make_model()
                model.load_state_dict(state[1])
                opt = make_opt(model.parameters())
                acc = GradAccumulator(model, K)
                acc.load_state_dict(state[0])
            acc.backward(loss_of(model, w, 0, k, use[w][0][k]))
        acc.step(opt)
    ref_model, ref_opt = reference(use, [0], 2)
    assert_same_training(model, opt, ref_model, ref_opt)
    acc.release()


def test_unused_under_fsdp2_single_rank(tmp_path):
    """FSDP2 (world size 1, in process): the buckets learn which sharded parameter got a
    gradient from FSDP2's unsharded parameters; an unused head gets grad None as above."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group yet")
    from torch.distributed.fsdp import fully_shard

    from fusedaccum import GradAccumulator

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    try:
        model = make_model()
        for layer in (model.trunk, model.a, model.b):
            fully_shard(layer)
        fully_shard(model)
        opt = make_opt(model.parameters())
        acc = GradAccumulator(model, K)
        use = [u[0] for u in USE]
        for w in range(len(USE)):
            for k in range(K):
                with acc.accumulate(model):
                    acc.backward(loss_of(model, w, 0, k, use[w][k]))
            acc.step(opt)
        full = make_model()
        full.load_state_dict({n: p.full_tensor() for n, p in model.state_dict().items()})
        ref_model, _ = reference([[u] for u in use], [0], len(USE))
        for (name, p), q in zip(full.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), atol=TOL, rtol=0, msg=name)
        acc.release()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- item 5: unfrozen after construction

def test_unfreezing_after_construction_is_refused_before_anything_changes():
    from fusedaccum import GradAccumulator

    model = make_model()
    model.b.requires_grad_(False)
    acc = GradAccumulator(model, K)
    opt = make_opt(model.parameters())
    acc.backward(loss_of(model, 0, 0, 0, True))
    model.b.requires_grad_(True)  # unfrozen mid-training, optimizer over model.parameters()
    sums = [b.accum.clone() for b in acc.buckets]
    with pytest.raises(RuntimeError, match=r"b\.weight, b\.bias.*release\(\)"):
        acc.backward(loss_of(model, 0, 0, 1, True))
    assert acc.micro_batches == 1 and model.b.weight.grad is None
    assert all(torch.equal(s, b.accum) for s, b in zip(sums, acc.buckets))
    # Frozen again: the loop goes on; the window is unharmed.
    model.b.requires_grad_(False)
    acc.backward(loss_of(model, 0, 0, 1, True))
    acc.step(opt, force=True)
    acc.release()


def test_unfrozen_parameters_train_right_with_a_new_accumulator():
    """The documented way: release at a window boundary, build a new accumulator (and
    optimizer); the run equals the large batch that unfroze b at the same point."""
    from fusedaccum import GradAccumulator

    model = make_model()
    model.b.requires_grad_(False)
    acc = GradAccumulator(model.parameters(), K)  # an iterable: names are params[i]
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    for k in range(K):
        acc.backward(loss_of(model, 0, 0, k, True))
    acc.step(opt)
    model.b.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"params\[4\] \(shape \(3, 7\)\), params\[5\]"):
        acc.backward(loss_of(model, 1, 0, 0, True))
    acc.release()
    acc = GradAccumulator(model, K)
    opt.add_param_group({"params": list(model.b.parameters())})
    for k in range(K):
        acc.backward(loss_of(model, 1, 0, k, True))
    acc.step(opt)

    ref = make_model()
    ref.b.requires_grad_(False)
    ref_opt = make_opt([p for p in ref.parameters() if p.requires_grad])
    for w in range(2):
        if w == 1:
            ref.b.requires_grad_(True)
            ref_opt.add_param_group({"params": list(ref.b.parameters())})
        ref_opt.zero_grad(set_to_none=True)
        (sum(loss_of(ref, w, 0, k, True) for k in range(K)) / K).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=TOL, rtol=0)
    acc.release()


def test_parameter_owned_by_another_accumulator_is_not_refused():
    """A GAN-style split: frozen for this accumulator, trained by another one."""
    from fusedaccum import GradAccumulator

    model = make_model()
    model.b.requires_grad_(False)
    acc = GradAccumulator(model, K)
    model.b.requires_grad_(True)
    model.trunk.requires_grad_(False)
    model.a.requires_grad_(False)
    other = GradAccumulator(model.b.parameters(), 1)
    other.backward(loss_of(model, 0, 0, 0, True))
    model.requires_grad_(True)
    model.b.requires_grad_(False)
    acc.backward(loss_of(model, 0, 0, 0, False))  # b owned by `other`: not this one's concern
    assert acc.micro_batches == 1
    other.release()
    acc.release()


# ---------------------------------------------------------------- data parallel (2 processes)

def _train_dp(model, acc, opt, rank, wrapped=None):
    for w in range(len(USE)):
        for k in range(K):
            with acc.accumulate(wrapped or model):
                out = loss_of(wrapped or model, w, rank, k, USE[w][rank][k])
                acc.backward(out)
        acc.step(opt)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                      if opt.state.get(p)}}


def scenario_group(rank):
    from fusedaccum import GradAccumulator

    model = make_model()
    opt = make_opt(model.parameters())
    return _train_dp(model, GradAccumulator(model, K), opt, rank)


def scenario_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fusedaccum import GradAccumulator

    model = make_model()
    ddp = DDP(model, find_unused_parameters=True)
    opt = make_opt(model.parameters())
    return _train_dp(model, GradAccumulator(ddp, K), opt, rank, wrapped=ddp)


def scenario_plain_ddp(rank):
    """DDP's own large batch: what it does with globally unused parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model, find_unused_parameters=True)
    opt = make_opt(model.parameters())
    for w in range(len(USE)):
        opt.zero_grad(set_to_none=True)
        for k in range(K):
            ctx = ddp.no_sync() if k < K - 1 else torch.enable_grad()
            with ctx:
                (loss_of(ddp, w, rank, k, USE[w][rank][k]) / K).backward()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                      if opt.state.get(p)}}


def worker(rank, world, rdzv, out_dir, names):
    mp.run_worker(rank, world, rdzv, out_dir, names, lambda name: globals()["scenario_" + name](rank), 30)


def test_unused_across_ranks_group_and_ddp(tmp_path):
    # The workers import the fusedaccum next to this file, whatever the environment installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    names = "group,ddp,plain_ddp"
    recs = mp.launch(__file__, tmp_path, WORLD, [names], timeout=120, env=env)
    ref_model, ref_opt = reference(USE, range(WORLD), len(USE))
    ref_params = dict(ref_model.named_parameters())
    ref_state = {n: ref_opt.state[p] for n, p in ref_model.named_parameters() if ref_opt.state.get(p)}
    for name in names.split(","):
        for r in range(WORLD):
            rec = recs[r][name]
            assert "error" not in rec, rec.get("error")
            for n, p in rec["params"].items():
                torch.testing.assert_close(p, ref_params[n].detach(), atol=TOL, rtol=0, msg=f"{name} {n}")
            assert set(rec["state"]) == set(ref_state), name
            for n, st in rec["state"].items():
                for key, v in st.items():
                    torch.testing.assert_close(v.float(), ref_state[n][key].float(), atol=TOL, rtol=0)


if __name__ == "__main__":
    rank, world, rdzv, out_dir, names = sys.argv[1:6]
    worker(int(rank), int(world), rdzv, out_dir, names.split(","))
