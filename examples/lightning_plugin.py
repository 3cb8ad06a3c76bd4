"""The Lightning recipe of docs/integrations.md, complete: ``FusedAccumPrecision`` in place of
``precision=``, ``accumulate_grad_batches`` and ``gradient_clip_val`` as usual, a token-weighted
``training_step`` (a summed loss and its item count), and an epoch whose last window is partial.

    python examples/lightning_plugin.py          # CUDA when present, else the CPU
    python examples/lightning_plugin.py --cpu

(Named lightning_plugin.py, not lightning.py: a script's folder comes first on sys.path, and a
lightning.py there would shadow the package.)
"""
# launch: python

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from fusedaccum.integrations.lightning import FusedAccumPrecision

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
args = parser.parse_args()
accelerator = "gpu" if torch.cuda.is_available() and not args.cpu else "cpu"

IGNORE = -100


class TinyLM(pl.LightningModule):
    def __init__(self, vocab=32, dim=32):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab))
        self.window_losses = []

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               reduction="sum")
        return {"loss": loss, "num_items": (labels != IGNORE).sum()}   # an int or a 0-d tensor

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step > len(self.window_losses):   # a window just stepped
            # The plugin's StepResult: its loss is the window's per-token mean, a 0-d device tensor.
            self.window_losses.append(self.trainer.precision_plugin.last_result.loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-2)


class Batches(torch.utils.data.Dataset):
    """22 micro-batches of 4 sequences, 3 to 9 tokens long, 20% of the labels ignored (padding)."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(22):
            tokens = torch.randint(0, 32, (4, int(torch.randint(4, 11, (), generator=gen))), generator=gen)
            labels = (tokens[:, :-1] * 5 + 3) % 32        # a learnable next-token rule
            labels[torch.rand(labels.shape, generator=gen) < 0.2] = IGNORE
            self.items.append({"input_ids": tokens[:, :-1], "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


torch.manual_seed(0)
module = TinyLM()
trainer = pl.Trainer(
    accelerator=accelerator, devices=1, max_epochs=4,
    accumulate_grad_batches=4, gradient_clip_val=1.0,         # 22 = 5 x 4 + 2: a partial last window
    plugins=[FusedAccumPrecision("bf16-mixed")],               # was: precision="bf16-mixed"
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
)
loader = torch.utils.data.DataLoader(Batches(), batch_size=None)   # the dataset yields whole micro-batches
trainer.fit(module, loader)

losses = torch.stack(module.window_losses).tolist()
print(f"{len(losses)} optimizer steps; window loss per token {losses[0]:.3f} -> {losses[-1]:.3f}")
assert len(losses) == 4 * 6, "one step per window, the partial one included"
assert losses[-1] < 0.8 * losses[0], "the loss did not go down"
print(f"OK lightning_plugin: {len(losses)} optimizer steps on {accelerator}")
