"""Hugging Face Trainer with fusedaccum: one base class added (docs/integrations.md).

A tiny Llama built from a config (no download), synthetic token data with masked labels, windows of
4 micro-batches of 2 sequences with a short last window, AdamW and gradient clipping. Runs on a CPU:

    python examples/trainer.py

Under torchrun (DDP; on CPUs with gloo thanks to use_cpu=True) the same script runs unchanged:

    torchrun --nproc_per_node 2 examples/trainer.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from fusedaccum.integrations.transformers import FusedAccumTrainer


class MyTrainer(FusedAccumTrainer, Trainer):  # the one change: FusedAccumTrainer first
    pass


def synthetic_data(n: int, vocab: int, seq: int) -> list:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, seq // 2, (1,), generator=g))] = -100  # e.g. a prompt not trained on
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(
        output_dir="/tmp/fusedaccum-trainer-example", per_device_train_batch_size=2,
        gradient_accumulation_steps=4, max_grad_norm=1.0, learning_rate=1e-3, num_train_epochs=2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, ddp_timeout=120)
    trainer = MyTrainer(model=model, args=args, train_dataset=synthetic_data(20, 64, 16))
    trainer.train()
    acc = trainer.accumulator
    result = trainer.last_result
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logs) == trainer.state.global_step == 6, trainer.state.global_step  # 3 windows (4, 4, 2) x 2
    assert result.micro_batches == 2 and all(torch.isfinite(torch.tensor(h["grad_norm"])) for h in logs)
    print(f"OK {trainer.state.global_step} steps, K={acc.accumulation_steps}, last window "
          f"{result.micro_batches} micro-batches / {int(result.num_items)} tokens, "
          f"loss {logs[-1]['loss']:.4f}, grad_norm {logs[-1]['grad_norm']:.4f} (before clipping)")


if __name__ == "__main__":
    main()
