"""Run by tests/test_integration_lightning.py::test_ddp_two_cpu_processes as a script:
Lightning's strategy='ddp' re-launches this same command for rank 1 (2 CPU processes, gloo).
Each rank saves its final weights and the last logged window loss to <out>/rank<r>.pt."""

import os
import sys
import warnings

N, SEED, EPOCHS, K, BATCH, CLIP = 80, 13, 2, 4, 4, 0.5


def main(out: str) -> None:
    import torch
    import torch.nn.functional as F
    import lightning.pytorch as pl

    from _lightning_common import IGNORE, make_data, make_net
    from fusedaccum.integrations.lightning import FusedAccumPrecision

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    class TokenNet(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y, ignore_index=IGNORE, reduction="sum")
            return {"loss": loss, "num_items": (y != IGNORE).sum()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.2, momentum=0.9)

        def train_dataloader(self):
            # Rank r takes samples r, r+2, ... in order (Lightning's own DistributedSampler would shuffle).
            x, y = make_data(N, seed=SEED, ignore_frac=0.3)
            rank, world = self.global_rank, self.trainer.world_size
            dataset = torch.utils.data.TensorDataset(x[rank::world], y[rank::world])
            return torch.utils.data.DataLoader(dataset, batch_size=BATCH)

    model = TokenNet()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS, accumulate_grad_batches=K,
                         gradient_clip_val=CLIP, plugins=[FusedAccumPrecision("32")], logger=False,
                         use_distributed_sampler=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model)
    os.makedirs(out, exist_ok=True)
    torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "logged_loss": trainer.callback_metrics["fusedaccum/loss"].clone()},
               os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
