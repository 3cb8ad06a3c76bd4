"""FusedAccumTrainer against the real transformers.Trainer (5.x): a tiny LlamaForCausalLM built
from a config and a custom module returning a per-micro-batch mean loss, on CPU. Each case is
compared with a hand-written large-batch reference that replays the micro-batches Trainer
actually ran (recorded per window), and with stock Trainer where it differs. AdamW at lr 1e-3,
eps 1e-5: weights within 1e-5, the logged grad_norm per step within 1e-4 relative."""

import hashlib
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _transformers_common as c  # noqa: E402  (imports transformers past the repo's kernels/ folder)


K = 3
DATA = c.token_data(16)  # 8 batches of 2: windows of 3, 3 and a short 2


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """One fused run over the tiny Llama, saving a checkpoint after every optimizer step."""
    out = tmp_path_factory.mktemp("llama")
    m0, model = c.tiny_llama(), c.tiny_llama()
    tr = c.make(c.FusedTrainer, model, out, K, DATA, save_strategy="steps", save_steps=1)
    tr.train()
    return m0, model, tr, out


def test_llama_equals_large_batch(llama_run):
    """HF model (num_items_in_batch path): weights, logged grad_norm (the window's pre-clip norm)
    and logged loss (the window's token mean) equal the large-batch run; the short last window
    is exact. Stock Trainer 5.x is exact here too (it divides by the window's token count): the
    gain in this case is fp32 sums, the sync-free step and the skip (tests below)."""
    m0, model, tr, _ = llama_run
    wins = c.windows(tr.recorded)
    assert [len(w) for w in wins] == [3, 3, 2]
    ref, norms, losses = c.reference(m0, wins, total_steps=tr.state.max_steps)
    assert c.max_diff(model, ref) <= 1e-5
    assert _rel(c.grad_norms(tr), norms) <= 1e-4
    assert _rel(c.losses(tr), losses) <= 1e-5
    assert isinstance(tr.accumulator, c.GradAccumulator)
    assert tr.last_result.micro_batches == 2


def test_resume_bit_identical(llama_run, tmp_path):
    """Trainer saves at optimizer steps only, so a checkpoint never holds a partial window (the
    accumulator state in optimizer.pt has 0 micro-batches); resuming from checkpoint-1 ends with
    the uninterrupted run's weights, bit for bit."""
    _, model, _, out = llama_run
    for step in (1, 2):
        sd = torch.load(out / f"checkpoint-{step}" / "optimizer.pt", weights_only=True)
        assert sd["fusedaccum"]["micro_batches"] == 0
    resumed = c.tiny_llama(seed=7)  # other initial weights: the checkpoint must replace them
    tr = c.make(c.FusedTrainer, resumed, tmp_path, K, DATA)
    tr.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert tr.state.global_step == 3
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_mean_loss_module_token_weighted(tmp_path):
    """A custom model returning a per-micro-batch mean (no loss kwargs): each mean is weighted by
    its label-token count (labels[..., 1:], label_shift=True), so the window is the large batch's
    token mean. Stock Trainer averages the means: weights and logged grad_norm off."""
    m0, fused_model, stock_model = c.MeanLossLM(), c.MeanLossLM(), c.MeanLossLM()
    fused = c.make(c.FusedTrainer, fused_model, tmp_path / "f", K, DATA)
    fused.label_shift = True
    fused.train()
    stock = c.make(c.StockTrainer, stock_model, tmp_path / "s", K, DATA)
    stock.train()
    ref, norms, losses = c.reference(m0, c.windows(fused.recorded), total_steps=fused.state.max_steps)
    assert c.max_diff(fused_model, ref) <= 1e-5
    assert _rel(c.grad_norms(fused), norms) <= 1e-4
    assert _rel(c.losses(fused), losses) <= 1e-5
    assert c.max_diff(stock_model, ref) > 1e-3
    assert _rel(c.grad_norms(stock), norms) > 1e-2


def test_bf16_weights_accumulate_in_fp32(tmp_path):
    """bf16 weights: the window's bf16 micro-batch gradients are summed in fp32 and rounded to
    bf16 once, as in the reference (same optimizer class and settings). Stock Trainer sums in
    bf16: further from the fp32-accumulating reference, relative to how far training moved."""
    m0 = c.tiny_llama().to(torch.bfloat16)
    fused_model, stock_model = c.tiny_llama().to(torch.bfloat16), c.tiny_llama().to(torch.bfloat16)
    data = c.token_data(24, seed=3)  # windows of 6 micro-batches
    fused = c.make(c.FusedTrainer, fused_model, tmp_path / "f", 6, data)
    fused.train()
    stock = c.make(c.StockTrainer, stock_model, tmp_path / "s", 6, data)
    stock.train()
    real = fused._fused_window_optimizer().optimizer
    ref, norms, _ = c.reference(m0, c.windows(fused.recorded), total_steps=fused.state.max_steps,
                                optimizer_like=real)
    # bf16 arithmetic is not the reference's bit for bit (fused vs foreach AdamW, one rounding of
    # the clip multiplier): a weight may land one bf16 ulp away, never more.
    assert _ulps(fused_model, ref) <= 1
    assert _rel(c.grad_norms(fused), norms) <= 1e-4
    assert _ulps(stock_model, ref) >= 4


def _ulps(a, b) -> float:
    """The largest distance between matching bf16 weights, in ulps of the reference weight."""
    return max(float(((p.double() - q.double()).abs() / (q.double().abs() * 2.0 ** -7).clamp_min(2.0 ** -133)).max())
               for p, q in zip(a.parameters(), b.parameters()))


def test_injected_inf_skips_the_window(tmp_path):
    """An inf gradient in the second window: that window is skipped (weights and AdamW state as
    the reference that leaves it out), the scheduler does not step, global_step still counts it and
    its logged grad_norm is inf/NaN. Stock Trainer (fp32, no scaler) steps it: NaN weights."""
    def inject(trainer, model):
        def hook(g):
            return g * math.inf if trainer.state.global_step == 1 else g
        model.lm_head.weight.register_hook(hook)

    m0, fused_model, stock_model = c.tiny_llama(), c.tiny_llama(), c.tiny_llama()
    fused = c.make(c.FusedTrainer, fused_model, tmp_path / "f", K, DATA)
    inject(fused, fused_model)
    fused.train()
    stock = c.make(c.StockTrainer, stock_model, tmp_path / "s", K, DATA)
    inject(stock, stock_model)
    stock.train()
    assert fused.state.global_step == 3
    gn = c.grad_norms(fused)
    assert not math.isfinite(gn[1])
    lrs = [h["learning_rate"] for h in fused.state.log_history if "grad_norm" in h]
    assert lrs[0] > lrs[1] == lrs[2]  # the skipped second window did not advance the linear schedule
    ref, norms, _ = c.reference(m0, c.windows(fused.recorded), total_steps=fused.state.max_steps, skip={1})
    assert c.max_diff(fused_model, ref) <= 1e-5
    assert _rel([gn[0], gn[2]], [norms[0], norms[2]]) <= 1e-4
    assert not all(torch.isfinite(p).all() for p in stock_model.parameters())


def test_ddp_two_cpu_processes(tmp_path):
    """2 processes under torch.distributed.run (use_cpu=True: gloo DDP, Trainer's own no_sync):
    both ranks end with the same weights, equal to the large-batch run over both ranks' windows
    (3, 3 and a short 1 micro-batches each), for the HF Llama and the mean-loss module; stock
    Trainer over the mean-loss module is off."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(HERE, "_transformers_ddp_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, mk in (("fused_llama", c.tiny_llama), ("fused_mean", c.MeanLossLM), ("stock_mean", c.MeanLossLM)):
        r0, r1 = ranks[0][name], ranks[1][name]
        for key in r0["weights"]:
            assert torch.equal(r0["weights"][key], r1["weights"][key]), (name, key)
        w0, w1 = c.windows(r0["recorded"]), c.windows(r1["recorded"])
        assert [len(w) for w in w0] == [len(w) for w in w1] == [3, 3, 1]
        ref, norms, losses = c.reference(mk(), [a + b for a, b in zip(w0, w1)], total_steps=r0["max_steps"])
        got = mk()
        got.load_state_dict(r0["weights"])
        if name.startswith("fused"):
            assert c.max_diff(got, ref) <= 1e-5, name
            assert _rel(r0["grad_norms"], norms) <= 1e-4, name
            assert _rel(r0["losses"], losses) <= 1e-5, name
        else:
            assert c.max_diff(got, ref) > 1e-3
            assert _rel(r0["grad_norms"], norms) > 1e-2


# What FusedAccumTrainer overrides or relies on, as of transformers 5.25.0 (sha256 of the source,
# first 16 hex digits). A release that changes one fails here: re-read it against
# fusedaccum/integrations/transformers.py, then update the hash and SUPPORTED_TRANSFORMERS.
PINNED = {
    "_run_epoch": "357d1a21e7a0d4ab",  # no_sync on all but the last, clip hook, optimizer.step, _tr_loss
    "_clip_grad_norm": "ebfa9dc91d3088ab",  # overridden: the window's step
    "_get_grad_norm": "913ba6f52f074d10",  # overridden: the step when max_grad_norm <= 0
    "training_step": "e9760c8ee10308d5",  # overridden: what it did besides backward is kept
    "compute_loss": "160dea726d2f28bd",  # num_items_in_batch division and the x num_processes
}


def test_pinned_trainer_internals():
    changed = {name: hashlib.sha256(inspect.getsource(getattr(c.Trainer, name)).encode()).hexdigest()[:16]
               for name in PINNED}
    changed = {k: v for k, v in changed.items() if v != PINNED[k]}
    assert not changed, (f"transformers {c.transformers.__version__} changed Trainer.{sorted(changed)} "
                         f"(new hashes {changed}): FusedAccumTrainer overrides or relies on them; re-check it")


def test_refuses_deepspeed_and_fsdp_in_constructor(monkeypatch, tmp_path):
    original = c.Trainer.create_accelerator_and_postprocess
    for flag, word in (("is_deepspeed_enabled", "DeepSpeed"), ("is_fsdp_enabled", "FSDP")):
        def patched(self, flag=flag):
            original(self)
            setattr(self, flag, True)

        monkeypatch.setattr(c.Trainer, "create_accelerator_and_postprocess", patched)
        model = c.tiny_llama()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=word):
            c.make(c.FusedTrainer, model, tmp_path, K, DATA)
        assert all(p.grad is None and torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_example_script_runs():
    """examples/trainer.py, as a user runs it on a CPU."""
    root = os.path.dirname(HERE)
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "trainer.py")], capture_output=True,
                          text=True, timeout=240, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK"), proc.stdout[-2000:]

