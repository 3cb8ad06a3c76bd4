"""FusedAccumPrecision against the real Lightning (lightning.pytorch 2.x) on CPU.

Each Trainer.fit here takes well under a second (a 163-parameter MLP, 10 micro-batches an
epoch); the import of Lightning is most of this file's time.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import MixedPrecision

import fusedaccum
from fusedaccum.integrations.lightning import FusedAccumPrecision
from _lightning_common import IGNORE, Batches, large_batch_run, make_data, make_net, micro_batches, windows
from helpers import same_bits

HERE = os.path.dirname(os.path.abspath(__file__))
K, BATCH, CLIP = 4, 4, 0.5
# Lightning 2.6's own use of a torch API that torch 2.13 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")


class Net(pl.LightningModule):
    """training_step returns the micro-batch mean, or {"loss": sum, "num_items": n} (token=True)."""

    def __init__(self, optimizer: str = "sgd", token: bool = False):
        super().__init__()
        self.net = make_net()
        self.optimizer_kind = optimizer
        self.token = token

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        if self.token:
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
            return {"loss": loss, "num_items": (y != IGNORE).sum()}
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return make_optimizer(self.net, self.optimizer_kind)


def make_optimizer(net, kind):
    if kind == "sgd":
        return torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    return torch.optim.AdamW(net.parameters(), lr=0.02, fused=True)  # the AMP contract: skips on the device


def fit(module, batches, *, plugin=None, clip=CLIP, epochs=2, callbacks=(), ckpt_path=None, k=K):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, accumulate_grad_batches=k,
                         gradient_clip_val=clip, plugins=[plugin] if plugin is not None else None, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=list(callbacks))
    trainer.fit(module, Batches(batches), ckpt_path=ckpt_path)
    return trainer


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(same_bits(p.detach(), q.detach()) for p, q in zip(a.parameters(), b.parameters()))


class Record(pl.Callback):
    """After every optimizer step: the logged metrics, the StepResult and a copy of the weights and
    optimizer state."""

    def __init__(self):
        self.steps = []
        self._global_step = 0

    def on_train_start(self, trainer, module):
        self._global_step = trainer.global_step  # a resumed run starts past 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self._global_step:
            return  # an accumulating batch
        self._global_step = trainer.global_step
        plugin = trainer.precision_plugin
        opt = trainer.optimizers[0]
        self.steps.append(dict(
            epoch=trainer.current_epoch, batch_idx=batch_idx,
            metrics={k: v.clone() for k, v in trainer.callback_metrics.items()},
            result=getattr(plugin, "last_result", None),
            params=[p.detach().clone() for p in module.parameters()],
            opt_state=[{k: v.clone() for k, v in opt.state[p].items()} for p in module.parameters() if p in opt.state],
            scale=plugin.scaler.get_scale() if isinstance(plugin, FusedAccumPrecision) and plugin.scaler else None))


# ---------------------------------------------------------------------------------------------- fp32
def test_fp32_equals_large_batch_where_stock_lightning_differs():
    """40 samples, micro-batches of 4, K=4: windows of 4, 4 and 2 micro-batches an epoch. The
    plugin equals one large-batch step per window (clipping on); stock Lightning divides the
    short window by 4 instead of 2 and drifts."""
    x, y = make_data(40)
    batches = micro_batches(x, y, BATCH)
    ref = make_net()
    ref_loss = large_batch_run(ref, make_optimizer(ref, "sgd"), windows(batches, K), epochs=2, clip=CLIP)

    plugin = FusedAccumPrecision("32")
    ours, record = Net(), Record()
    fit(ours, batches, plugin=plugin, callbacks=[record])
    stock = Net()
    fit(stock, batches)

    assert len(record.steps) == 6  # 3 windows an epoch, the partial one stepped
    assert [s["result"].micro_batches for s in record.steps] == [4, 4, 2] * 2
    assert max_diff(ours.net, ref) <= 1e-5
    assert max_diff(stock.net, ref) > 1e-3
    # The logged loss is the last window's (its 2 micro-batches' mean), before its step.
    torch.testing.assert_close(record.steps[-1]["metrics"]["fusedaccum/loss"], ref_loss, rtol=1e-5, atol=1e-6, check_dtype=False)
    assert record.steps[-1]["metrics"]["fusedaccum/found_inf"] == 0
    assert plugin.accumulator is None  # released at teardown: the parameters are free again
    fusedaccum.GradAccumulator(ours.net.parameters(), 2).release()


def test_token_weighted_num_items_equals_large_batch():
    """training_step returns {"loss": SUM, "num_items": n}; micro-batches of uneven valid counts
    (labels -100 ignored) and a last micro-batch of 2 samples: each window is the per-token mean
    of its concatenated batch."""
    x, y = make_data(38, seed=3, ignore_frac=0.3)
    batches = micro_batches(x, y, BATCH)
    assert len(batches[-1][0]) == 2
    ref = make_net()
    ref_loss = large_batch_run(ref, make_optimizer(ref, "sgd"), windows(batches, K), epochs=2, clip=CLIP)
    ours, record = Net(token=True), Record()
    fit(ours, batches, plugin=FusedAccumPrecision("32"), callbacks=[record])
    assert max_diff(ours.net, ref) <= 1e-5
    last = record.steps[-1]
    assert int(last["result"].num_items) == sum(int((b[1] != IGNORE).sum()) for b in windows(batches, K)[-1])
    torch.testing.assert_close(last["metrics"]["fusedaccum/loss"], ref_loss, rtol=1e-5, atol=1e-6, check_dtype=False)


# ---------------------------------------------------------------------------------------------- AMP
def hand_written(precision, batches, epochs=2):
    """The same training as a hand-written GradAccumulator loop (README), under the same autocast."""
    net = make_net()
    opt = make_optimizer(net, "adamw")
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}[precision]
    acc = fusedaccum.GradAccumulator(net, K, max_norm=CLIP,
                                     scaler=fusedaccum.LossScaler() if precision == "16-mixed" else None)
    for _ in range(epochs):
        for i, (x, y) in enumerate(batches):
            with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
                loss = F.cross_entropy(net(x), y)
            acc.backward(loss)
            if (i + 1) % K == 0 or i == len(batches) - 1:
                acc.step(opt, force=True)
    acc.release()
    return net


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_fused_adamw_with_clipping(precision):
    """AMP on CPU (autocast fp16 and bf16 both run on CPU in torch 2.13), fused AdamW, clipping:
    bit-identical to the hand-written GradAccumulator loop. Stock Lightning refuses this under
    fp16: MixedPrecision.clip_gradients raises for an optimizer that unscales internally."""
    x, y = make_data(40, seed=5)
    batches = micro_batches(x, y, BATCH)
    ours = Net("adamw")
    trainer = fit(ours, batches, plugin=FusedAccumPrecision(precision))
    assert trainer.precision == precision
    assert same_state(ours.net, hand_written(precision, batches))
    if precision == "16-mixed":
        stock = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        with pytest.raises(RuntimeError, match="fused"):
            fit(Net("adamw"), batches, plugin=stock, epochs=1)


def test_overflow_skips_the_window_and_corrupts_nothing():
    """An inf input in micro-batch 5 (window 2) under fp16: that step is skipped on the device
    (fused AdamW: weights and optimizer state keep every bit), the loss scale halves, and the
    next window trains on."""
    x, y = make_data(40, seed=7)
    x[21, 0] = float("inf")  # micro-batch 5 of 10
    batches = micro_batches(x, y, BATCH)
    record = Record()
    ours = Net("adamw")
    fit(ours, batches, plugin=FusedAccumPrecision("16-mixed"), callbacks=[record], epochs=1)
    first, skipped, last = record.steps
    assert skipped["result"].found_inf.item() == 1 and first["result"].found_inf.item() == 0
    assert skipped["metrics"]["fusedaccum/found_inf"] == 1
    assert all(same_bits(a, b) for a, b in zip(first["params"], skipped["params"]))
    assert all(same_bits(a[k], b[k]) for a, b in zip(first["opt_state"], skipped["opt_state"]) for k in a)
    assert skipped["scale"] == first["scale"] / 2
    assert last["result"].found_inf.item() == 0 and last["result"].micro_batches == 2
    assert not all(same_bits(a, b) for a, b in zip(skipped["params"], last["params"]))
    assert all(torch.isfinite(p).all() for p in ours.parameters())


# ---------------------------------------------------------------------------------------------- checkpoints
class _Stop(Exception):
    pass


class SaveAndStop(pl.Callback):
    def __init__(self, path, epoch, batch_idx):
        self.path, self.at = path, (epoch, batch_idx)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            trainer.save_checkpoint(self.path)
            raise _Stop


def test_checkpoint_mid_window_resumes_bit_identical(tmp_path):
    """Saved after micro-batch 6 of 10 (window 2 holds 2 of 4), fp16 with loss scaling and fused
    AdamW: the resumed run ends bit-identical to the uninterrupted one, its logged window losses
    too. The checkpoint holds the accumulator's partial sums."""
    x, y = make_data(40, seed=11)
    batches = micro_batches(x, y, BATCH)
    whole, whole_record = Net("adamw"), Record()
    fit(whole, batches, plugin=FusedAccumPrecision("16-mixed"), callbacks=[whole_record])

    path = str(tmp_path / "mid.ckpt")
    with pytest.raises(_Stop):
        fit(Net("adamw"), batches, plugin=FusedAccumPrecision("16-mixed"), callbacks=[SaveAndStop(path, 0, 5)])
    state = torch.load(path, weights_only=False)["FusedAccumPrecision"]
    assert state["accumulator"]["world_size"] == 1  # one rank's window: see the DDP test for two
    state = state["accumulator"]["ranks"][0]
    assert state["micro_batches"] == 2 and state["scaler"]["scale"] == 2.0**16

    resumed, record = Net("adamw"), Record()
    resumed.net[0].weight.data.add_(1.0)  # the checkpoint's weights replace these
    fit(resumed, batches, plugin=FusedAccumPrecision("16-mixed"), callbacks=[record], ckpt_path=path)
    assert same_state(resumed, whole)
    assert len(record.steps) == 5  # window 2 of epoch 0 onwards
    for got, want in zip(record.steps, whole_record.steps[1:]):
        assert same_bits(got["metrics"]["fusedaccum/loss"], want["metrics"]["fusedaccum/loss"])
        assert got["scale"] == want["scale"]


def test_stock_16_mixed_checkpoint_loss_scale_taken_over():
    """A checkpoint written with precision="16-mixed" keeps GradScaler's state under MixedPrecision."""
    plugin = FusedAccumPrecision("16-mixed")
    stock = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=9)
    plugin.on_load_checkpoint({"MixedPrecision": stock.state_dict()})
    assert plugin.scaler.get_scale() == 512.0 and plugin.scaler.state_dict()["growth_interval"] == 9


# ---------------------------------------------------------------------------------------------- refusals
class ManualNet(Net):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class BackwardNet(Net):
    def backward(self, loss, *args, **kwargs):
        loss.backward()


class SkipClipNet(Net):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        pass  # clipping skipped: the accumulator would clip anyway


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true", "transformer-engine"])
def test_unsupported_precision_refused(precision):
    with pytest.raises(ValueError, match="precision"):
        FusedAccumPrecision(precision)


@pytest.mark.parametrize("module, match", [(ManualNet, "manual optimization"), (BackwardNet, "overrides"),
                                           (SkipClipNet, "did not call clip_gradients")])
def test_unsupported_module_refused(module, match):
    x, y = make_data(8)
    manual = module is ManualNet  # Lightning itself refuses accumulation and clipping with manual optimization
    with pytest.raises((ValueError, RuntimeError), match=match):
        fit(module(), micro_batches(x, y, BATCH), plugin=FusedAccumPrecision("32"), epochs=1,
            clip=None if manual else CLIP, k=1 if manual else K)


def test_accumulation_schedule_refused():
    """GradientAccumulationScheduler (with Trainer(accumulate_grad_batches=1), as it requires) sets K
    per epoch after set-up: refused at the first backward, before anything is accumulated."""
    x, y = make_data(8)
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    schedule = pl.callbacks.GradientAccumulationScheduler({0: K, 1: 2})
    with pytest.raises(RuntimeError, match="accumulate_grad_batches changed"):
        fit(net, micro_batches(x, y, BATCH), plugin=FusedAccumPrecision(), callbacks=[schedule], k=1)
    assert all(same_bits(a, p.detach()) for a, p in zip(before, net.parameters()))


def test_clip_by_value_refused():
    x, y = make_data(8)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, gradient_clip_val=1.0, gradient_clip_algorithm="value",
                         plugins=[FusedAccumPrecision()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="value"):
        trainer.fit(Net(), Batches(micro_batches(x, y, BATCH)))


# ---------------------------------------------------------------------------------------------- others
def test_pytorch_lightning_package_same_result():
    """The standalone pytorch_lightning package gets the same class, built over its own Precision."""
    ptl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is installed with lightning")
    from fusedaccum.integrations.pytorch_lightning import FusedAccumPrecision as PTLPrecision

    class PTLNet(ptl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        training_step = Net.training_step
        configure_optimizers = Net.configure_optimizers
        optimizer_kind, token = "sgd", False

    x, y = make_data(40)
    batches = micro_batches(x, y, BATCH)
    theirs = PTLNet()
    ptl.Trainer(accelerator="cpu", max_epochs=2, accumulate_grad_batches=K, gradient_clip_val=CLIP,
                plugins=[PTLPrecision("32")], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False).fit(theirs, Batches(batches))
    ours = Net()
    fit(ours, batches, plugin=FusedAccumPrecision("32"))
    assert same_state(theirs.net, ours.net)


def run_ddp_worker(out, mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_lightning_ddp_worker.py"), str(out), mode], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"{mode}_rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def ddp_whole_run(tmp_path_factory):
    """The uninterrupted DDP run (it writes the mid-window checkpoint on its way): shared by the DDP tests."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    return out, run_ddp_worker(out, "whole")


def test_ddp_two_cpu_processes(ddp_whole_run):
    """strategy='ddp', 2 CPU processes (gloo), token-weighted losses, windows of 4, 4, 2: both ranks
    end with the same weights, equal to the large-batch run over both ranks' data (in order:
    rank r takes samples r, r+2, ...); the logged loss is the global window's."""
    _, ranks = ddp_whole_run
    for name in ranks[0]["weights"]:
        assert same_bits(ranks[0]["weights"][name], ranks[1]["weights"][name])

    import _lightning_ddp_worker as worker

    x, y = make_data(worker.N, seed=worker.SEED, ignore_frac=0.3)
    per_rank = [micro_batches(x[r::2], y[r::2], BATCH) for r in range(2)]
    global_windows = [[b for rank in per_rank for b in rank[i:i + K]] for i in range(0, len(per_rank[0]), K)]
    assert [len(w) for w in global_windows] == [8, 8, 4]
    ref = make_net()
    ref_loss = large_batch_run(ref, make_optimizer(ref, "sgd"), global_windows, epochs=worker.EPOCHS, clip=CLIP)
    got = make_net()
    got.load_state_dict({k.removeprefix("net."): v for k, v in ranks[0]["weights"].items()})
    assert max_diff(got, ref) <= 1e-5
    assert len(ranks[0]["logged_losses"]) == 3 * worker.EPOCHS
    torch.testing.assert_close(ranks[0]["logged_losses"][-1], ref_loss, rtol=1e-5, atol=1e-6, check_dtype=False)


def test_ddp_checkpoint_mid_window_resumes_bit_identical(ddp_whole_run):
    """DDP, 2 ranks: the checkpoint written after micro-batch 6 of 10 (each rank's window 2 holds
    2 of 4 micro-batches of its own, not yet all-reduced) holds both ranks' windows; resumed with
    ckpt_path=, each rank takes its own back, and the run ends bit-identical to the uninterrupted
    one, its logged window losses too. (Saving rank 0's window only, both ranks resumed with it:
    weights 1e-2 off, the resumed window's loss about half.)"""
    out, whole = ddp_whole_run
    state = torch.load(out / "mid.ckpt", weights_only=False)["FusedAccumPrecision"]["accumulator"]
    assert state["world_size"] == 2 and [s["micro_batches"] for s in state["ranks"]] == [2, 2]
    assert not same_bits(state["ranks"][0]["buckets"][0], state["ranks"][1]["buckets"][0])
    resumed = run_ddp_worker(out, "resume")
    for rank in range(2):
        for name, value in whole[rank]["weights"].items():
            assert same_bits(resumed[rank]["weights"][name], value), (rank, name)
        # The resumed run logs from epoch 0's window 2 on; the first is the window cut by the checkpoint.
        want = whole[rank]["logged_losses"][1:]
        assert len(resumed[rank]["logged_losses"]) == len(want)
        for got, expected in zip(resumed[rank]["logged_losses"], want):
            assert same_bits(got, expected), (rank, got, expected)


def test_import_fusedaccum_imports_no_framework():
    code = ("import sys, fusedaccum, fusedaccum.integrations\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'accelerate', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
