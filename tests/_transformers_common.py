"""Shared by tests/test_integration_transformers.py and its DDP worker: tiny models built from a
config (no downloads), synthetic token data, a Trainer subclass that records the micro-batches
Trainer actually ran, and the hand-written large-batch reference that replays them."""

import copy
import importlib
import inspect
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_hf_kernels() -> None:
    """Run from the repository root (``python -m pytest``), the repository's top-level
    ``kernels/`` folder (installed as ``fusedaccum.kernels``) shadows Hugging Face's ``kernels``
    package, which transformers 5.x imports: import the installed one first, past the root."""
    if "kernels" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: transformers then sees the repository's folder as a versionless package
    finally:
        sys.path[:] = saved


_import_hf_kernels()

import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from fusedaccum import GradAccumulator  # noqa: E402,F401
from fusedaccum.integrations.transformers import FusedAccumTrainer  # noqa: E402

VOCAB, SEQ = 24, 7
LR, EPS, MAX_NORM = 1e-3, 1e-5, 0.5


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg)


class MeanLossLM(torch.nn.Module):
    """A custom causal LM that returns the micro-batch's MEAN token loss (labels shifted), and
    takes no loss kwargs: Trainer divides it by the window's number of micro-batches."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, 12)
        self.mix = torch.nn.Linear(12, 12)
        self.head = torch.nn.Linear(12, VOCAB)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.mix(self.emb(input_ids))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                          ignore_index=-100)
        return out


def token_data(n: int, seed: int = 1) -> list:
    """n sequences with a varying number of ignored (-100) label positions."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, SEQ - 2, (1,), generator=g))] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def args(out, k: int, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=k,
                learning_rate=LR, adam_epsilon=EPS, weight_decay=0.0, max_grad_norm=MAX_NORM, num_train_epochs=1,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, lr_scheduler_type="linear",
                train_sampling_strategy="sequential", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


class _Recording:
    """Records (global_step, inputs) for every micro-batch Trainer runs: the windows to replay."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.recorded.append((self.state.global_step, {k: v.detach().clone() for k, v in inputs.items()}))
        return super().training_step(model, inputs, num_items_in_batch)


class FusedTrainer(_Recording, FusedAccumTrainer, Trainer):
    recorded: list


class StockTrainer(_Recording, Trainer):
    recorded: list


def make(cls, model, out, k, data, **kw):
    tr = cls(model=model, args=args(out, k, **kw), train_dataset=data)
    tr.recorded = []
    return tr


def windows(recorded: list) -> list:
    """The recorded micro-batches grouped by the optimizer step they belong to."""
    out: dict = {}
    for step, inputs in recorded:
        out.setdefault(step, []).append(inputs)
    return [out[s] for s in sorted(out)]


def grad_norms(trainer) -> list:
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


def losses(trainer) -> list:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]


def _summed_loss(model, mb):
    logits = model(input_ids=mb["input_ids"])["logits"] if isinstance(model, MeanLossLM) else \
        model(input_ids=mb["input_ids"]).logits
    labels = mb["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")
    return loss, int((labels != -100).sum())


def reference(model0, wins, *, total_steps, optimizer_like=None, skip=(), lr=LR, max_norm=MAX_NORM):
    """Large-batch training over the replayed windows: each window's gradient is the gradient of
    its summed token loss over its token count (fp32 sums, also for bf16 weights, rounded to
    the parameter dtype once), clipped to ``max_norm``; AdamW (the class and settings of
    ``optimizer_like`` when given) with Trainer's linear schedule; the windows in ``skip``
    change nothing (and do not step the schedule). Returns (model, [pre-clip norms], [window losses])."""
    model = copy.deepcopy(model0)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_like is not None:
        keys = inspect.signature(type(optimizer_like)).parameters
        opt = type(optimizer_like)(params, **{k: v for k, v in optimizer_like.defaults.items() if k in keys})
    else:
        opt = torch.optim.AdamW(params, lr=lr, eps=EPS, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (total_steps - s) / total_steps))
    norms, losses = [], []
    for w, mbs in enumerate(wins):
        sums = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
        tokens, total = 0, 0.0
        for mb in mbs:
            loss, n = _summed_loss(model, mb)
            tokens += n
            total += float(loss.detach())
            grads = torch.autograd.grad(loss, params)
            for s, g in zip(sums, grads):
                s += g.float()
        g = [s / tokens for s in sums]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g]))
        norms.append(float(norm))
        losses.append(total / tokens)
        if w in skip:
            continue
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for p, x in zip(params, g):
            p.grad = (x * coef).to(p.dtype)
        opt.step()
        sched.step()
    return model, norms, losses


def max_diff(a, b) -> float:
    return max(float((p.detach().double() - q.detach().double()).abs().max())
               for p, q in zip(a.parameters(), b.parameters()))


__all__ = ["FusedTrainer", "StockTrainer", "MeanLossLM", "tiny_llama", "token_data", "make", "windows",
           "reference", "max_diff", "grad_norms", "losses", "transformers", "Trainer", "TrainingArguments"]
