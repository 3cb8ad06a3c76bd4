"""The window as one state: ranks closing a window differently, resume mid-window, an exception
inside a micro-batch, each against the float64 large-batch reference of the same data.

Multi-process scenarios run on 2 gloo ranks through test_distributed.py's worker (its
collective timeout: a mismatch fails instead of hanging), all in one launch; the checks that
need no second process run here. Every micro-batch has 2 rows, so the mean of the
micro-batch means is the large batch's mean and the window's loss is the mean of all its
micro-batch losses.
"""

import dataclasses
import io
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _multiproc as mp  # noqa: E402
import test_distributed as td  # noqa: E402  (its worker-launch machinery)

K = td.K  # 3
TOL = td.TOL
LOSS_TOL = 1e-6
FULL = [2, 2, 2]


def reference(plan, make_model=td.make_model):
    """float64, one process, one SGD step per window over all ranks' rows: (weights after each
    window, each window's loss)."""
    model = make_model().double()
    opt = td.make_opt("sgd", model.parameters())
    params, losses = [], []
    for w in range(len(plan)):
        micro = [m for rank in td.window_data(plan, w) for m in rank]
        opt.zero_grad()
        loss = torch.stack([td.mean_loss(model, x, y) for x, y in micro]).mean()
        loss.backward()
        opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
        losses.append(float(loss.detach()))
    return params, losses


def roundtrip(obj):
    """What torch.save then torch.load give (a checkpoint on disk)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ---------------------------------------------------------------- scenarios (one process per rank)

class Run:
    """A model (wrapped in DDP or sharded by FSDP2, or not), its optimizer and accumulator,
    rebuilt from a checkpoint on demand, as a resumed job would."""

    def __init__(self, wrap, make_model=td.make_model):
        self.wrap, self.make_model = wrap, make_model
        self.build(None)

    def build(self, state):
        from fusedaccum import GradAccumulator

        model = self.make_model()
        if state is not None:
            with torch.no_grad():
                for p, t in zip(model.parameters(), state["model"]):
                    p.copy_(t)
        if self.wrap == "ddp":
            self.model = self.shown = nn.parallel.DistributedDataParallel(model)
        elif self.wrap == "fsdp2":
            self.model = self.shown = model
            _shard(model)
        else:
            self.model, self.shown = model, model
        self.params = list(model.parameters())
        self.opt = td.make_opt("sgd", self.params)
        self.acc = GradAccumulator(self.shown, K)
        if state is not None:
            self.opt.load_state_dict(state["opt"])
            self.acc.load_state_dict(state["acc"])

    def resume(self):
        """Save everything, drop it, build fresh objects and load (through bytes, as from disk)."""
        state = roundtrip({"model": [_full(p) for p in self.params], "opt": self.opt.state_dict(),
                           "acc": self.acc.state_dict()})
        self.acc.release()
        self.build(state)
        return state["acc"]

    def micro(self, x, y, sync=None):
        with self.acc.accumulate(self.shown, sync=sync):
            self.acc.backward(td.mean_loss(self.model, x, y))

    def weights(self):
        return [_full(p).clone() for p in self.params]


def _full(p):
    return p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in (model.l1, model.l2):
        fully_shard(layer)
    fully_shard(model)


UNEVEN = [[FULL, [2, 2]], [FULL, FULL]]  # window 0: rank 0 closes a full window, rank 1 a short one


def _uneven(rank, wrap, sync_short):
    """Rank 0 step() on a full window, rank 1 step(force=True) on a short one; then a full window."""
    run = Run(wrap)
    rec = {"params": [], "loss": [], "num_micro": []}
    for w in range(len(UNEVEN)):
        micro = td.window_data(UNEVEN, w)[rank]
        short = len(micro) < K
        for k, (x, y) in enumerate(micro):
            run.micro(x, y, sync=True if short and sync_short and k == len(micro) - 1 else None)
        res = run.acc.step(run.opt, force=short)
        rec["params"].append(run.weights())
        rec["loss"].append(float(res.loss))
    return rec


def scenario_ws_group_uneven(rank, world, original):
    return _uneven(rank, None, sync_short=False)


def scenario_ws_ddp_uneven(rank, world, original):
    """Under DDP the short window's last micro-batch synchronises (the documented recipe)."""
    return _uneven(rank, "ddp", sync_short=True)


RESUME = [[FULL, FULL], [[2, 2, 2], [2, 2, 2]], [[2, 2], [2, 2]]]  # the last window forced


def _resume(rank, wrap, make_model=td.make_model):
    """Window 0 straight; window 1 with a save/load after micro-batch 1, another right after
    that load, and one after micro-batch 2; window 2 (2 micro-batches, forced) with a save/load
    after its last micro-batch, then step(force=True) at once."""
    run = Run(wrap, make_model)
    rec = {"params": [], "loss": [], "saved": []}
    for w in range(len(RESUME)):
        micro = td.window_data(RESUME, w)[rank]
        for k, (x, y) in enumerate(micro):
            run.micro(x, y)
            if w == 1 and k == 0:
                rec["saved"].append(run.resume())
                rec["saved"].append(run.resume())  # saving again right after loading
            if (w == 1 and k == 1) or (w == 2 and k == 1):
                rec["saved"].append(run.resume())
        res = run.acc.step(run.opt, force=len(micro) < K)
        rec["params"].append(run.weights())
        rec["loss"].append(float(res.loss))
    return rec


def scenario_ws_group_resume(rank, world, original):
    return _resume(rank, None)


def scenario_ws_ddp_resume(rank, world, original):
    return _resume(rank, "ddp")


def _fsdp_model():
    import test_fsdp2 as tf

    return tf.make_model()


def scenario_ws_fsdp2_resume(rank, world, original):
    return _resume(rank, "fsdp2", _fsdp_model)


EXC = [[FULL, FULL], [[2], [2]]]


def scenario_ws_ddp_exception(rank, world, original):
    """Window 1: one micro-batch (under no_sync: K = 3) whose loop raises after acc.backward;
    the loop catches it and closes the window with step(force=True)."""
    run = Run("ddp")
    rec = {"params": [], "loss": []}
    for w in range(len(EXC)):
        micro = td.window_data(EXC, w)[rank]
        for x, y in micro:
            try:
                with run.acc.accumulate(run.shown):
                    run.acc.backward(td.mean_loss(run.model, x, y))
                    if w == 1:
                        raise KeyError("the loop's own bookkeeping failed")
            except KeyError:
                pass
        res = run.acc.step(run.opt, force=len(micro) < K)
        rec["params"].append(run.weights())
        rec["loss"].append(float(res.loss))
    return rec


def scenario_mix_ddp_sync_mismatch(rank, world, original):
    """Not supported (docs/data-parallel.md): rank 0's last micro-batch synchronises inside DDP,
    rank 1 closes a short window under no_sync() with step(force=True) alone."""
    return _uneven(rank, "ddp", sync_short=False)


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_ws_")}
td.SCENARIOS.update(SCENARIOS)
td.SCENARIOS["mix_ddp_sync_mismatch"] = scenario_mix_ddp_sync_mismatch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    names = list(SCENARIOS)
    ranks = td.launch(tmp_path_factory.mktemp("window_state"), "torch", names, timeout=120, script=__file__)
    return {name: [r.get(name, {"error": "not run (an earlier scenario failed)"}) for r in ranks] for name in names}


def assert_matches_reference(records, plan, make_model=td.make_model):
    r0, r1 = td.ok(records)
    ref_params, ref_losses = reference(plan, make_model)
    init = [p.detach().double() for p in make_model().parameters()]
    for w, (a, b, ref) in enumerate(zip(r0["params"], r1["params"], ref_params)):
        assert all(td.same_bits(p, q) for p, q in zip(a, b)), f"the replicas differ after window {w}"
        assert td.max_diff(a, ref) <= TOL, f"window {w}: {td.max_diff(a, ref)} from the large batch"
    assert td.max_diff(ref_params[-1], init) > 100 * TOL  # it trained
    for rec in (r0, r1):
        assert rec["loss"] == pytest.approx(ref_losses, abs=LOSS_TOL)


@pytest.mark.parametrize("name", ["group_uneven", "ddp_uneven"])
def test_ranks_closing_a_window_differently_divide_by_the_global_count(runs, name):
    """Rank 0 step() on a full window of 3, rank 1 step(force=True) on 2 (under DDP with
    sync=True on its last micro-batch): every rank divides by the global 5 micro-batches;
    before, rank 0 divided by its own 3 (replicas apart by ~1e-2)."""
    assert_matches_reference(runs[f"ws_{name}"], UNEVEN)


@pytest.mark.parametrize("name", ["group_resume", "ddp_resume", "fsdp2_resume"])
def test_resume_mid_window_keeps_weights_and_loss(runs, name):
    """Save/load after the first micro-batch, again right after that load, after the second;
    under DDP also right before step(force=True) of a window whose micro-batches ran under
    no_sync() (the step must still all-reduce them). Weights and StepResult.loss are the large
    batch's: before, the loss lost the micro-batches before the checkpoint (all of them after a
    second save), and DDP's forced step after a load skipped its all-reduce."""
    make_model = _fsdp_model if "fsdp2" in name else td.make_model
    assert_matches_reference(runs[f"ws_{name}"], RESUME, make_model)
    saved = runs[f"ws_{name}"][0]["saved"]
    assert [s["micro_batches"] for s in saved] == [1, 1, 2, 2]
    assert all(s["version"] == 3 for s in saved)
    # Under DDP each saved window ran under no_sync() only: its sums are nobody's yet.
    assert [s["unsynced"] for s in saved] == [name == "ddp_resume"] * 4


def test_ddp_exception_after_backward_then_force(runs):
    """An exception after acc.backward inside accumulate() (no_sync), caught, then
    step(force=True): the window's sums are still unreduced, so the step all-reduces them."""
    assert_matches_reference(runs["ws_ddp_exception"], EXC)


def test_ddp_sync_mismatch_fails_loudly_and_does_not_hang(tmp_path):
    """The unsupported DDP mix (one rank synchronising inside DDP's backward, the other closing
    an unreduced short window) cannot be detected by the accumulator before DDP's collective;
    it must at least not finish as if nothing happened, nor hang: gloo aborts a rank (measured:
    "collective mismatch", exit -6), or the 30 s collective timeout raises on both."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    codes, logs = mp.run_procs(__file__, tmp_path, 2, ["mix_ddp_sync_mismatch"], timeout=100)
    recorded = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) if (tmp_path / f"rank{r}.pt").exists()
                else {} for r in range(2)]
    finished = [code == 0 and "error" not in rec.get("mix_ddp_sync_mismatch", {"error": ""})
                for code, rec in zip(codes, recorded)]
    assert not all(finished), logs


# ---------------------------------------------------------------- one process

def test_every_window_field_is_saved_or_transient():
    """A field added to Window must say whether a checkpoint holds it: nothing is forgotten."""
    from fusedaccum.parallel import window

    names = {f.name for f in dataclasses.fields(window.Window)}
    assert set(window.SAVED) | window.TRANSIENT == names
    assert not set(window.SAVED) & window.TRANSIENT


def _one_process(model, k=K):
    from fusedaccum import GradAccumulator

    return GradAccumulator(model, k), td.make_opt("sgd", model.parameters())


def test_one_process_save_after_load_keeps_the_loss():
    """One process, save/load cycles inside a window: the window's loss counts every
    micro-batch (before: a second save right after a load dropped those before the first)."""
    plan = [[FULL, []]]
    micro = td.window_data(plan, 0)[0]
    model = td.make_model()
    acc, opt = _one_process(model)
    acc.backward(td.mean_loss(model, *micro[0]))
    for _ in range(3):
        state = roundtrip(acc.state_dict())
        acc.release()
        acc, opt = _one_process(model)
        acc.load_state_dict(state)
    for x, y in micro[1:]:
        acc.backward(td.mean_loss(model, x, y))
    res = acc.step(opt)
    ref_params, ref_losses = reference(plan)
    assert float(res.loss) == pytest.approx(ref_losses[0], abs=LOSS_TOL)
    assert td.max_diff(list(model.parameters()), ref_params[0]) <= TOL


class FakeWrapper(nn.Module):
    """A model with a no_sync() that is no DDP: the accumulator cannot reduce behind it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)

    def no_sync(self):
        return nullcontext()


def test_exception_after_backward_keeps_the_unsynced_flag():
    """The micro-batch's backward ran under no_sync() and the loop raised after it: the window
    is unreduced whether or not the context exited cleanly, so step(force=True) refuses it as
    it refuses a clean one (before: it stepped on one rank's own sum without a word)."""
    model = td.make_model()
    wrapped = FakeWrapper(model)
    acc, opt = _one_process(model)
    x, y = td.window_data([[FULL, []]], 0)[0][0]
    with pytest.raises(KeyError):
        with acc.accumulate(wrapped):
            acc.backward(td.mean_loss(wrapped, x, y))
            raise KeyError("after the backward")
    assert acc._win.unsynced
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="no_sync"):
        acc.step(opt, force=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # An exception before the backward leaves the window as it was.
    acc.discard_window()
    with pytest.raises(KeyError):
        with acc.accumulate(wrapped):
            raise KeyError("in the forward")
    assert acc.micro_batches == 0 and not acc._win.unsynced


@pytest.mark.parametrize("version", [1, 2])
def test_older_state_dicts_still_load(version):
    """Version 1 (no param_shapes, no signals) and 2 (no unsynced) load into version 3."""
    plan = [[FULL, []]]
    micro = td.window_data(plan, 0)[0]
    model = td.make_model()
    acc, opt = _one_process(model)
    acc.backward(td.mean_loss(model, *micro[0]))
    state = roundtrip(acc.state_dict())
    assert state["version"] == 3 and state["unsynced"] is False
    state["version"] = version
    del state["unsynced"]
    if version == 1:
        del state["param_shapes"], state["signals"]
    acc.release()
    acc, opt = _one_process(model)
    acc.load_state_dict(state)
    for x, y in micro[1:]:
        acc.backward(td.mean_loss(model, x, y))
    res = acc.step(opt)
    ref_params, ref_losses = reference(plan)
    assert td.max_diff(list(model.parameters()), ref_params[0]) <= TOL
    if version == 2:
        assert float(res.loss) == pytest.approx(ref_losses[0], abs=LOSS_TOL)


def test_bad_unsynced_value_is_refused_before_anything_changes():
    model = td.make_model()
    acc, _ = _one_process(model)
    acc.backward(td.mean_loss(model, *td.window_data([[FULL, []]], 0)[0][0]))
    state = acc.state_dict()
    state["unsynced"] = "yes"
    acc.backward(td.mean_loss(model, *td.window_data([[FULL, []]], 0)[0][1]))
    sums = [b.accum.clone() for b in acc.buckets]
    with pytest.raises(ValueError, match="unsynced"):
        acc.load_state_dict(state)
    assert acc.micro_batches == 2 and all(torch.equal(s, b.accum) for s, b in zip(sums, acc.buckets))


if __name__ == "__main__":
    rank, world, rdzv, out_dir, names = sys.argv[1:6]
    td.worker(int(rank), int(world), rdzv, out_dir, names.split(","))
