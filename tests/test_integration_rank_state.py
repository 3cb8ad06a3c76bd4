"""fusedaccum.integrations._rank_state: the per-rank accumulator states of a data-parallel
checkpoint, picked per rank at load (the 2-process save/resume runs are in
test_integration_lightning.py and test_integration_accelerate.py). No framework imported."""

import pytest
import torch

import fusedaccum
from fusedaccum.integrations import _rank_state
from helpers import same_bits


def window_state(micro: int, seed: int = 0) -> "tuple[dict, fusedaccum.GradAccumulator]":
    """A GradAccumulator over a tiny net with ``micro`` micro-batches in its window, and its state."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    acc = fusedaccum.GradAccumulator(net, 4)
    for _ in range(micro):
        acc.backward(net(torch.randn(2, 3)).square().mean())
    return acc.state_dict(), acc


def test_one_process_round_trip():
    state, acc = window_state(2)
    saved = _rank_state.gather(state)
    assert saved["world_size"] == 1 and saved["ranks"][0] is state
    assert _rank_state.select(saved, "test") is state
    acc.release()


def test_each_rank_takes_its_own_window():
    states = [window_state(2, seed=r)[0] for r in range(3)]
    saved = {"format": _rank_state.FORMAT, "world_size": 3, "ranks": states}
    for rank in range(3):
        assert _rank_state.select(saved, "test", rank=rank, world=3) is states[rank]


@pytest.mark.parametrize("saved_world, world", [(2, 1), (2, 3), (1, 2)])
def test_open_window_on_another_world_size_refused(saved_world, world):
    """A partial window's sums are per rank: no split onto another number of ranks is right."""
    saved = _rank_state.gather(window_state(1)[0])
    saved = dict(saved, world_size=saved_world, ranks=saved["ranks"] * saved_world)
    with pytest.raises(ValueError, match=f"saved by {saved_world} rank.*this run has {world}"):
        _rank_state.select(saved, "FusedAccumulation", rank=0, world=world)


@pytest.mark.parametrize("saved_world, world", [(2, 1), (1, 2), (2, 3)])
def test_empty_window_loads_on_any_world_size(saved_world, world):
    state, acc = window_state(0)
    saved = {"format": _rank_state.FORMAT, "world_size": saved_world, "ranks": [state] * saved_world}
    for rank in range(world):
        assert _rank_state.select(saved, "test", rank=rank, world=world) is state
    acc.release()


def test_single_state_from_one_rank_refused_mid_window():
    """A plain GradAccumulator.state_dict() (an older checkpoint, written by one rank) holds one
    rank's window: accepted on one rank, or between windows; refused mid-window on several."""
    mid, acc = window_state(2)
    empty, acc0 = window_state(0)
    assert _rank_state.select(mid, "test", rank=0, world=1) is mid
    assert _rank_state.select(empty, "test", rank=1, world=2) is empty
    with pytest.raises(ValueError, match="saved by one rank only"):
        _rank_state.select(mid, "FusedAccumPrecision", rank=1, world=2)
    acc.release()
    acc0.release()


def test_refused_load_changes_nothing():
    """Through the Accelerate integration's load_state_dict: the window of a 2-process checkpoint
    refused in one process, this accumulator's own window kept bit for bit."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from fusedaccum.integrations.accelerate import FusedAccumulation

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        fused = FusedAccumulation(Accelerator(gradient_accumulation_steps=4, cpu=True), net)
        fused.backward(net(torch.randn(2, 3)).sum())
        before = fused.accumulator.state_dict()
        other = window_state(3)[0]
        saved = {"format": _rank_state.FORMAT, "world_size": 2, "ranks": [other, other]}
        with pytest.raises(ValueError, match="FusedAccumulation.*2 rank"):
            fused.load_state_dict(saved)
        after = fused.accumulator.state_dict()
        assert after["micro_batches"] == 1 and same_bits(after["buckets"][0], before["buckets"][0])
        fused.release()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_host_copy_of_a_window_resumes_bit_identical(device):
    """gather sends host copies (another rank would unpickle a CUDA tensor onto its own device):
    an accumulator on ``device`` resumed from the host copy of its window ends bit-identical."""
    def build():
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2).to(device)
        return net, fusedaccum.GradAccumulator(net, 4, max_norm=0.5), torch.optim.SGD(net.parameters(), lr=0.1)

    torch.manual_seed(1)
    data = [torch.randn(2, 3, device=device) for _ in range(4)]
    whole, acc, opt = build()
    for x in data:
        acc.backward(whole(x).square().mean())
    acc.step(opt)
    acc.release()

    cut, acc, _ = build()
    for x in data[:2]:
        acc.backward(cut(x).square().mean())
    host = _rank_state._to_cpu(acc.state_dict())
    assert all(t.device.type == "cpu" for t in host["buckets"])
    acc.release()
    resumed, acc, opt = build()
    acc.load_state_dict(host)
    for x in data[2:]:
        acc.backward(resumed(x).square().mean())
    acc.step(opt)
    acc.release()
    assert all(same_bits(p.detach(), q.detach()) for p, q in zip(resumed.parameters(), whole.parameters()))
