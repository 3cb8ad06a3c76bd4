"""FSDP2 with uneven shards (gloo, CPU, 2 and 3 ranks): ``fusedaccum.clip_grad_norm_`` after a
plain backward, and ``discard_window()`` under ``fsdp_sync="window"``.

The model's dims divide by neither 2 nor 3 (``Linear(13, 21) -> Linear(21, 7) -> Linear(7, 5)
-> Linear(5, 1)``): FSDP2 pads the shards, so after a plain backward one rank's local
gradients tile FSDP2's reduce-scatter buffer and another's hold gaps; the last layer leaves
an empty shard on every rank but the first. Before the fix, such ranks chose different clip
paths (a gather of partials on one, torch's all-reduce on the other) and hung: the workers'
collective timeout (10 s) turns that into a failure here instead of a hang.

Each launch runs this file as a script on every rank (rendezvous through a FileStore) and
saves what it saw; the tests compare it with torch's clip on the same gradients and with a
float64 large-batch reference computed here.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _multiproc as mp

DIMS = (13, 21, 7, 5, 1)
K = 3
MAX_NORM = 0.1
LR = 1.0


def make_model(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(DIMS, DIMS[1:])])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(dtype)


def micro_data(world, w, k, rank, rows=2):
    """Micro-batch k of window w on ``rank``: float64 (x, y)."""
    g = torch.Generator().manual_seed(1000 * w + 10 * k + rank)
    return torch.randn(rows, DIMS[0], generator=g, dtype=torch.float64), \
        torch.randn(rows, DIMS[-1], generator=g, dtype=torch.float64)


def fsdp_model(mp=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_model()
    for layer in model:
        fully_shard(layer, mp_policy=mp or MixedPrecisionPolicy())
    fully_shard(model, mp_policy=mp or MixedPrecisionPolicy())
    return model


# ---------------------------------------------------------------- scenarios (run on every rank)

def scenario_clip(rank, world):
    """A plain backward (no accumulator), then fusedaccum's clip vs torch's on the same grads."""
    import fusedaccum

    out = {}
    x, y = micro_data(world, 0, 0, rank)
    for norm_type in (2.0, 1.0, float("inf")):
        model = fsdp_model()
        F.mse_loss(model(x.float() * 3), y.float()).backward()
        saved = [p.grad.to_local().clone() for p in model.parameters()]
        unclipped = [p.grad.full_tensor() for p in model.parameters()]
        norm = fusedaccum.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type)
        ours = [p.grad.full_tensor() for p in model.parameters()]
        rec = {"norm": norm.full_tensor(), "ours": ours, "unclipped": unclipped,
               "local_numels": [p.grad.to_local().numel() for p in model.parameters()]}
        if norm_type != float("inf"):  # torch's inf-norm raises on an empty shard (_foreach_norm)
            for p, g in zip(model.parameters(), saved):
                p.grad.to_local().copy_(g)
            rec["ref"] = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type).full_tensor()
            rec["torch"] = [p.grad.full_tensor() for p in model.parameters()]
        out[norm_type] = rec
    return out


def _discard_run(rank, world, mp):
    from fusedaccum import GradAccumulator

    model = fsdp_model(mp)
    acc = GradAccumulator(model, K, max_norm=MAX_NORM, fsdp_sync="window")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for k in range(2):  # two no-sync micro-batches, then dropped
        x, y = micro_data(world, 0, k, rank)
        with acc.accumulate(model):
            acc.backward(F.mse_loss(model(x.float() * 5), y.float()))
    acc.discard_window()
    norms = []
    for w in (1, 2):
        for k in range(K):
            x, y = micro_data(world, w, k, rank)
            with acc.accumulate(model):
                acc.backward(F.mse_loss(model(x.float()), y.float()))
        norms.append(acc.step(opt).total_norm.item())
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()], "norms": norms}


def scenario_discard_window(rank, world):
    return _discard_run(rank, world, None)


def scenario_discard_window_bf16(rank, world):
    """bf16 compute, fp32 reduce: FSDP2 holds the window in an upcast buffer of its own."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return _discard_run(rank, world, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def worker(rank, world, rdzv, out_dir, names):
    # Short: a collective mismatch (the hang this file tests for) fails within seconds.
    # No destroy_process_group: after a timed-out collective it could wait on the peers.
    mp.run_worker(rank, world, rdzv, out_dir, names, lambda name: SCENARIOS[name](rank, world), 10, destroy=False)


# ---------------------------------------------------------------- launching (pytest side)

def launch(tmp_path, world, names, timeout=90):
    return mp.launch(__file__, tmp_path, world, [",".join(names)], timeout, require_exit_0=False)


NAMES = ["discard_window", "discard_window_bf16", "clip"]  # clip last: on a mismatch the ranks stop


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def runs(request, tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    world = request.param
    ranks = launch(tmp_path_factory.mktemp(f"fsdp2_uneven_{world}"), world, NAMES)
    return world, {name: [r.get(name, {"error": "not run (an earlier scenario failed)"}) for r in ranks]
                   for name in NAMES}


def ok(records):
    for rank, rec in enumerate(records):
        if "error" in rec:
            pytest.fail(f"rank {rank} failed:\n{rec['error']}")
    return records


def test_clip_grad_norm_with_uneven_shards_matches_torch_and_does_not_hang(runs):
    """Every rank takes the same path whatever its shards' layout: the float64 norm and clipped
    grads of the whole gradient (2-, 1-, inf-norm), and torch's (2, 1) on the same grads, on 2
    and 3 ranks, ranks holding empty shards."""
    world, rec = runs
    for rank, out in enumerate(ok(rec["clip"])):
        for norm_type, r in out.items():
            if rank > 0:
                assert 0 in r["local_numels"], r["local_numels"]  # the last layer's shard is empty here
            # float64 from the whole (unsharded) gradients
            full = torch.cat([g.double().reshape(-1) for g in r["unclipped"]])
            norm = torch.linalg.vector_norm(full, norm_type)
            coef = min(1.0, MAX_NORM / (norm.item() + 1e-6))
            torch.testing.assert_close(r["norm"].double(), norm, rtol=1e-6, atol=0)
            for a, g in zip(r["ours"], r["unclipped"]):
                torch.testing.assert_close(a.double(), g.double() * coef, rtol=1e-6, atol=1e-7)
            assert coef < 0.5  # it clipped
            if "torch" in r:
                torch.testing.assert_close(r["norm"], r["ref"], rtol=1e-6, atol=0)
                for a, b in zip(r["ours"], r["torch"]):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def reference(world):
    """float64, one process: the two kept windows (all ranks' micro-batches, means of means),
    torch's clip, SGD. The discarded micro-batches do not enter."""
    model = make_model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    norms = []
    for w in (1, 2):
        opt.zero_grad()
        loss = sum(F.mse_loss(model(x), y) for x, y in
                   (micro_data(world, w, k, r) for r in range(world) for k in range(K))) / (K * world)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
    return [p.detach() for p in model.parameters()], norms


@pytest.mark.parametrize("name, tol", [("discard_window", 1e-5), ("discard_window_bf16", 2e-3)])
def test_discard_window_under_fsdp_window_mode_drops_fsdp_unsharded_grads(runs, name, tol):
    """fsdp_sync="window": discard_window() after two no-sync micro-batches drops FSDP2's unsharded
    gradients too, so the next windows match the large batch of the kept micro-batches (before:
    the dropped ones were reduce-scattered into the next step, 4e-2 off)."""
    world, rec = runs
    ref, ref_norms = reference(world)
    for r in ok(rec[name]):
        scale = max(p.abs().max().item() for p in ref)
        err = max((p.double() - q).abs().max().item() for p, q in zip(r["params"], ref))
        assert err <= tol * scale, (name, err)
        assert r["norms"] == pytest.approx(ref_norms, rel=10 * tol)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].split(","))
