"""FSDP2 after tensor parallel on a (2, 2) ("dp", "tp") gloo mesh, 4 ranks on CPU (one launch).

The model (tests/_mesh2d_worker.py): LayerNorm(5) -> Colwise Linear(5, 6) -> relu -> Rowwise
Linear(6, 5) (+ residual) -> Linear(5, 1); every FSDP2 shard uneven, the head's weight empty on
one dp rank, the norm, the Rowwise bias and the head replicated over tp (plain parameters in
the micro_batch run, replicated DTensors in the window run and in the clip). Token-weighted
windows with 1 to 3 items per micro-batch and dp rank, clipping active in every window, SGD,
against one float64 process on all the data: the weights, and StepResult's total_norm, loss
and num_items (with clipping active a constant normalization error leaves the weights as they
are; these catch it). Before this change: the mesh was refused; with the check lifted, the tp
ranks double-counted the items and the replicated pieces entered the norm twice.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _mesh2d_worker as W  # noqa: E402
import _multiproc as mp  # noqa: E402

WORLD = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    ranks = mp.launch(W.__file__, tmp_path_factory.mktemp("mesh2d"), WORLD, timeout=150, require_exit_0=False)
    return {name: [r.get(name, {"error": "not run (an earlier scenario failed)"}) for r in ranks] for name in W.NAMES}


def ok(records):
    for rank, rec in enumerate(records):
        if "error" in rec:
            pytest.fail(f"rank {rank} failed:\n{rec['error']}")
    return records


def reference():
    """float64, one process, all the data: per window the sum of every dp rank's micro-batch
    losses over the window's items, torch's clip, SGD."""
    model = W.make_model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=W.LR)
    steps = []
    for w in range(W.WINDOWS):
        opt.zero_grad()
        data = [W.micro_data(w, k, dp) for dp in range(2) for k in range(W.K)]
        items = sum(x.shape[0] for x, _ in data)
        loss = sum(W.sum_loss(model(x), y) for x, y in data) / items
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), W.MAX_NORM))
        opt.step()
        steps.append((norm, loss.item(), float(items)))
    return [p.detach() for p in model.parameters()], steps


@pytest.mark.parametrize("mode", ["micro_batch", "window"])
def test_fsdp2_tp_matches_one_process_large_batch(runs, mode):
    ref, ref_steps = reference()
    for rank, r in enumerate(ok(runs[mode])):
        scale = max(p.abs().max().item() for p in ref)
        err = max((p.double() - q).abs().max().item() for p, q in zip(r["params"], ref))
        assert err <= 1e-5 * scale, (mode, rank, err)
        for (norm, loss, items, skipped), (rnorm, rloss, ritems) in zip(r["steps"], ref_steps):
            assert not skipped
            assert items == ritems  # the dp ranks' items only: the tp ranks see the same data
            assert norm == pytest.approx(rnorm, rel=1e-5)  # replicated pieces counted once
            assert loss == pytest.approx(rloss, rel=1e-5)
            assert rnorm > 10 * W.MAX_NORM  # clipping active in every window
        # The norm, the Rowwise bias and the head (replicated over tp) in their own bucket.
        assert r["buckets"] == (3 if mode == "micro_batch" else 2)


@pytest.mark.parametrize("mode", ["micro_batch", "window"])
def test_fsdp2_tp_inf_on_one_rank_skips_on_every_rank(runs, mode):
    for r in ok(runs[mode]):
        assert r["inf_skipped"] and r["inf_unchanged"]


def test_clip_grad_norm_on_2d_dtensor_grads_matches_torch(runs):
    """fusedaccum.clip_grad_norm_ on (dp, tp) DTensor gradients: torch's norm and clipped grads
    (2, 1), the float64 ones (2, 1, inf), with one all-gather per mesh dimension (2) on every
    rank, whatever its shards' sizes."""
    for rank, out in enumerate(ok(runs["clip"])):
        for norm_type, r in out.items():
            assert r["calls"] == ["all_gather_single"] * 2 or r["calls"] == ["all_gather_into_tensor"] * 2, r["calls"]
            full = torch.cat([g.double().reshape(-1) for g in r["unclipped"]])
            norm = torch.linalg.vector_norm(full, norm_type)
            coef = min(1.0, W.MAX_NORM / (norm.item() + 1e-6))
            torch.testing.assert_close(r["norm"].double(), norm, rtol=1e-6, atol=0)
            for a, g in zip(r["ours"], r["unclipped"]):
                torch.testing.assert_close(a.double(), g.double() * coef, rtol=1e-6, atol=1e-9)
            assert coef < 0.5
            if "torch" in r:
                torch.testing.assert_close(r["norm"], r["ref"], rtol=1e-6, atol=0)
                for a, b in zip(r["ours"], r["torch"]):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case, words", [
    ("no_tp_submesh", ["covers ranks", "tensor parallel"]),
    ("context_parallel", ["context parallel", "'cp'"]),
    ("hsdp_tp", ["HSDP", "tensor parallel"]),
    ("noise_scale", ["noise_scale"]),
])
def test_unsupported_layouts_are_refused_by_name_before_anything_changes(runs, case, words):
    for r in ok(runs["refusals"]):
        rec = r[case]
        assert rec["message"] is not None, case
        for word in words:
            assert word in rec["message"], (case, rec["message"])
        assert rec["untouched"]


class _OneRankMesh:
    """A 1-D mesh of one rank standing at coordinate 1 of a dimension: no gather, and a buffer
    replicated along it is masked (counted by coordinate 0, elsewhere)."""
    ndim = 1

    def get_coordinate(self):
        return (1,)

    def size(self, dim):
        return 1


def test_mesh_norm_hook_masks_exactly_the_replicated_buffers_slots(backend, device):
    """The mask covers the slots each backend's norm pass gives a buffer (the Triton kernels:
    one per program, so a buffer of several tiles fills several): the norm with the hook is
    that of the sharded buffers alone, bit for bit, around masked buffers of 0 to 5 tiles."""
    from fusedaccum._dtensor import mesh_norm_hook
    from fusedaccum.kernels._launch import BLOCK
    from fusedaccum.ops import _unscale_clip_stats

    g = torch.Generator().manual_seed(0)
    sizes = [3, 5 * BLOCK + 7, 0, 2 * BLOCK, 1]
    bufs = [torch.randn(n, generator=g).to(device) * (i + 1) for i, n in enumerate(sizes)]
    replicated = [False, True, True, False, True]
    keys = [(r,) for r in replicated]
    hook = mesh_norm_hook(_OneRankMesh(), keys, bufs)
    masked = _unscale_clip_stats(bufs, 1.0, None, 2.0, 0.0, reduce_partials=hook)[0]
    alone = _unscale_clip_stats([b for b, r in zip(bufs, replicated) if not r], 1.0, None, 2.0, 0.0,
                                reduce_partials=lambda p: p)[0]
    assert torch.equal(masked, alone), (masked, alone)
    whole = _unscale_clip_stats(bufs, 1.0, None, 2.0, 0.0)[0]
    assert whole > 1.2 * alone  # the masked buffers would change it
