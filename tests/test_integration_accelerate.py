"""FusedAccumulation against the real Hugging Face Accelerate on CPU (one process, and two
processes for DDP)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import fusedaccum
from fusedaccum.integrations.accelerate import FusedAccumulation
from _lightning_common import IGNORE, large_batch_run, make_data, make_net, micro_batches, windows
from helpers import same_bits

K, BATCH, CLIP = 4, 4, 0.5
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test builds its own Accelerator."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def loader(x, y):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def sgd(net):
    return torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)


def fused_run(x, y, *, epochs=2, token=False, mixed_precision="no", clip=CLIP):
    """The recipe of fusedaccum/integrations/accelerate.py's docstring."""
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True, mixed_precision=mixed_precision)
    net = make_net()
    model, optimizer, data = accelerator.prepare(net, sgd(net), loader(x, y))
    fused = FusedAccumulation(accelerator, model, max_norm=clip)
    results = []
    for _ in range(epochs):
        for xb, yb in data:
            with accelerator.accumulate(model):
                logits = model(xb)
                if token:
                    fused.backward(F.cross_entropy(logits, yb, ignore_index=IGNORE, reduction="sum"),
                                   num_items=(yb != IGNORE).sum())
                else:
                    fused.backward(F.cross_entropy(logits, yb))
                result = fused.step(optimizer)
                if result is not None:
                    results.append(result)
    fused.release()
    return net, results


def stock_run(x, y, *, epochs=2, token=False):
    """Accelerate's documented loop: accelerator.backward divides by K, clip_grad_norm_ on sync."""
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    net = make_net()
    model, optimizer, data = accelerator.prepare(net, sgd(net), loader(x, y))
    for _ in range(epochs):
        for xb, yb in data:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(xb), yb, ignore_index=IGNORE))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), CLIP)
                optimizer.step()
                optimizer.zero_grad()
    return net


def max_diff(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_fp32_equals_large_batch_where_stock_accelerate_differs():
    """40 samples, micro-batches of 4, K=4: windows of 4, 4, 2 (sync_gradients closes the last at
    the dataloader's end). FusedAccumulation equals one large-batch step per window; stock
    Accelerate divides the short window by 4 instead of 2."""
    x, y = make_data(40)
    ref = make_net()
    large_batch_run(ref, sgd(ref), windows(micro_batches(x, y, BATCH), K), epochs=2, clip=CLIP)
    ours, results = fused_run(x, y)
    assert [r.micro_batches for r in results] == [4, 4, 2] * 2
    assert max_diff(ours, ref) <= 1e-5
    assert max_diff(stock_run(x, y), ref) > 1e-3


def test_token_weighted_equals_large_batch_where_stock_differs():
    """Labels -100 ignored (uneven valid counts) and a last micro-batch of 2 samples: the loss SUM
    with num_items gives each window's per-token mean; Accelerate's per-micro-batch mean / K does not."""
    x, y = make_data(38, seed=3, ignore_frac=0.3)
    batches = micro_batches(x, y, BATCH)
    ref = make_net()
    large_batch_run(ref, sgd(ref), windows(batches, K), epochs=2, clip=CLIP)
    ours, results = fused_run(x, y, token=True)
    assert max_diff(ours, ref) <= 1e-5
    assert int(results[-1].num_items) == sum(int((b[1] != IGNORE).sum()) for b in windows(batches, K)[-1])
    assert max_diff(stock_run(x, y), ref) > 1e-3


def test_bf16_mixed_precision_matches_the_hand_written_loop():
    """Accelerate's bf16 autocast on CPU (its forward wrapper, outputs converted to fp32):
    bit-identical to a hand-written GradAccumulator loop under the same autocast."""
    x, y = make_data(40, seed=5)
    ours, _ = fused_run(x, y, mixed_precision="bf16")
    net = make_net()
    opt = sgd(net)
    acc = fusedaccum.GradAccumulator(net, K, max_norm=CLIP)
    batches = micro_batches(x, y, BATCH)
    for _ in range(2):
        for i, (xb, yb) in enumerate(batches):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = net(xb)
            acc.backward(F.cross_entropy(logits.float(), yb))
            if (i + 1) % K == 0 or i == len(batches) - 1:
                acc.step(opt, force=True)
    acc.release()
    assert all(same_bits(p.detach(), q.detach()) for p, q in zip(ours.parameters(), net.parameters()))


def test_save_state_mid_window_resumes_bit_identical(tmp_path):
    """accelerator.register_for_checkpointing(fused): save_state after micro-batch 6 of 10 (the
    window holds 2 of 4), a fresh Accelerator load_state()s and skips the batches seen: the run
    ends bit-identical to the uninterrupted one."""
    x, y = make_data(40, seed=11)
    whole, _ = fused_run(x, y)

    def setup():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
        net = make_net()
        model, optimizer, data = accelerator.prepare(net, sgd(net), loader(x, y))
        fused = FusedAccumulation(accelerator, model, max_norm=CLIP)
        accelerator.register_for_checkpointing(fused)
        return accelerator, net, model, optimizer, data, fused

    def train(accelerator, model, optimizer, data, fused, stop_after=None):
        for i, (xb, yb) in enumerate(data):
            with accelerator.accumulate(model):
                fused.backward(F.cross_entropy(model(xb), yb))
                fused.step(optimizer)
            if i + 1 == stop_after:
                return

    accelerator, _, model, optimizer, data, fused = setup()
    train(accelerator, model, optimizer, data, fused, stop_after=6)
    assert fused.micro_batches == 2
    accelerator.save_state(str(tmp_path / "state"))
    fused.release()

    accelerator, resumed, model, optimizer, data, fused = setup()
    resumed[0].weight.data.add_(1.0)  # load_state replaces it
    accelerator.load_state(str(tmp_path / "state"))
    assert fused.micro_batches == 2
    train(accelerator, model, optimizer, accelerator.skip_first_batches(data, 6), fused)
    train(accelerator, model, optimizer, data, fused)  # epoch 2
    fused.release()
    assert all(same_bits(p.detach(), q.detach()) for p, q in zip(resumed.parameters(), whole.parameters()))


def test_step_outside_accumulate_refused():
    """Without accelerator.accumulate(model), sync_gradients stays True: every micro-batch would
    be its own window. Refused, the window kept."""
    x, y = make_data(8)
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    net = make_net()
    model, optimizer, data = accelerator.prepare(net, sgd(net), loader(x, y))
    fused = FusedAccumulation(accelerator, model)
    xb, yb = next(iter(data))
    fused.backward(F.cross_entropy(model(xb), yb))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match="accelerator.accumulate"):
        fused.step(optimizer)
    assert fused.micro_batches == 1
    assert all(same_bits(a, p.detach()) for a, p in zip(before, net.parameters()))
    fused.release()


def test_fp16_scaler_replaces_accelerates():
    """Where Accelerate builds a GradScaler (fp16 on an accelerator; on CPU it runs fp32 and makes
    none), FusedAccumulation takes a LossScaler with its settings instead. Checked with a stand-in."""
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    net = make_net()
    fused = FusedAccumulation(accelerator, net)
    scaler = fused.accumulator.scaler
    assert isinstance(scaler, fusedaccum.LossScaler)
    assert scaler.get_scale() == 1024.0 and scaler.state_dict()["growth_interval"] == 7
    fused.release()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One launch of 2 processes: the uninterrupted run (saving mid-window on its way) and the run
    resumed from that state; shared by the DDP tests."""
    out = tmp_path_factory.mktemp("accelerate_ddp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(HERE, "_accelerate_ddp_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_ddp_two_cpu_processes(ddp_runs):
    """Accelerate on 2 CPU processes (torch.distributed.run, gloo; the model DDP-wrapped by prepare),
    token-weighted losses, windows of 4, 4, 2 micro-batches per rank: both ranks end with the same
    weights, equal to the large-batch run over both ranks' windows (Accelerate shards by batch: rank r
    takes batches r, r+2, ...); each window is divided by the item count of both ranks."""
    _, ranks = ddp_runs
    ranks = [r["whole"] for r in ranks]
    for name in ranks[0]["weights"]:
        assert same_bits(ranks[0]["weights"][name], ranks[1]["weights"][name])

    import _accelerate_ddp_worker as worker

    x, y = make_data(worker.N, seed=worker.SEED, ignore_frac=0.3)
    batches = micro_batches(x, y, BATCH)
    per_rank = [batches[r::2] for r in range(2)]
    global_windows = [[b for rank in per_rank for b in rank[i:i + K]] for i in range(0, len(per_rank[0]), K)]
    items = [sum(int((b[1] != IGNORE).sum()) for b in w) for w in global_windows]
    for rank in ranks:
        assert [w[:2] for w in rank["windows"]] == [(m, float(n)) for m, n in zip([4, 4, 2], items)] * 2
    ref = make_net()
    ref_loss = large_batch_run(ref, sgd(ref), global_windows, epochs=worker.EPOCHS, clip=CLIP)
    got = make_net()
    got.load_state_dict(ranks[0]["weights"])
    assert max_diff(got, ref) <= 1e-5
    torch.testing.assert_close(ranks[0]["windows"][-1][2], ref_loss, rtol=1e-5, atol=1e-6, check_dtype=False)


def test_ddp_save_state_mid_window_resumes_bit_identical(ddp_runs):
    """2 processes: save_state after micro-batch 6 of 10 per rank (each rank's window holds 2
    micro-batches of its own, not yet all-reduced). The file, written by the main process, holds
    both ranks' windows; a fresh Accelerator's load_state gives each rank its own, and the run ends
    bit-identical to the uninterrupted one, window losses too. (With the main process's window on
    both ranks: weights 1.8e-2 off.)"""
    out, ranks = ddp_runs
    state = torch.load(out / "state" / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["world_size"] == 2 and [s["micro_batches"] for s in state["ranks"]] == [2, 2]
    assert not same_bits(state["ranks"][0]["buckets"][0], state["ranks"][1]["buckets"][0])
    for rank, run in enumerate(ranks):
        whole, resumed = run["whole"], run["resumed"]
        for name, value in whole["weights"].items():
            assert same_bits(resumed["weights"][name], value), (rank, name)
        want = whole["windows"][1:]  # the resumed run closes epoch 0's window 2 first
        assert [w[:2] for w in resumed["windows"]] == [w[:2] for w in want]
        for got, expected in zip(resumed["windows"], want):
            assert same_bits(got[2], expected[2]), (rank, got, expected)
