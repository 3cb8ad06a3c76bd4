"""Run by tests/test_integration_lightning.py's DDP tests as a script: Lightning's strategy='ddp'
re-launches this same command for rank 1 (2 CPU processes, gloo).

``worker.py OUT whole``: trains 2 epochs, saving a checkpoint (OUT/mid.ckpt) on the way, after
micro-batch 6 of epoch 0, when each rank's window 2 holds 2 of its 4 micro-batches.
``worker.py OUT resume``: a fresh model resumed from that checkpoint (``ckpt_path=``) trains to the end.
Each rank saves its final weights and the logged window loss of every optimizer step to
OUT/<mode>_rank<r>.pt."""

import datetime
import os
import sys
import warnings

N, SEED, EPOCHS, K, BATCH, CLIP = 80, 13, 2, 4, 4, 0.5
SAVE_AT = (0, 5)  # (epoch, batch_idx): mid-window


def main(out: str, mode: str) -> None:
    import torch
    import torch.nn.functional as F
    import lightning.pytorch as pl

    from _lightning_common import IGNORE, Batches, make_data, make_net, micro_batches
    from fusedaccum.integrations.lightning import FusedAccumPrecision

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ckpt = os.path.join(out, "mid.ckpt")

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
            # Rank r takes samples r, r+2, ... in order (Lightning's own DistributedSampler would
            # shuffle), through a loader that resumes mid-epoch.
            x, y = make_data(N, seed=SEED, ignore_frac=0.3)
            rank, world = self.global_rank, self.trainer.world_size
            return Batches(micro_batches(x[rank::world], y[rank::world], BATCH))

    class Steps(pl.Callback):
        """The logged window loss after every optimizer step; the mid-window checkpoint."""

        def __init__(self):
            self.losses, self.global_step = [], 0

        def on_train_start(self, trainer, module):
            self.global_step = trainer.global_step  # a resumed run starts past 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if mode == "whole" and (trainer.current_epoch, batch_idx) == SAVE_AT:
                trainer.save_checkpoint(ckpt)  # on every rank (Lightning's contract); rank 0 writes
            if trainer.global_step != self.global_step:  # this batch closed a window
                self.global_step = trainer.global_step
                self.losses.append(trainer.callback_metrics["fusedaccum/loss"].clone())

    steps = Steps()
    model = TokenNet()
    if mode == "resume":
        model.net[0].weight.data.add_(1.0)  # the checkpoint's weights replace these
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=EPOCHS, accumulate_grad_batches=K,
                         strategy=pl.strategies.DDPStrategy(timeout=datetime.timedelta(seconds=60)),
                         gradient_clip_val=CLIP, plugins=[FusedAccumPrecision("32")], logger=False,
                         use_distributed_sampler=False, callbacks=[steps],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, ckpt_path=ckpt if mode == "resume" else None)
    os.makedirs(out, exist_ok=True)
    torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "logged_losses": steps.losses},
               os.path.join(out, f"{mode}_rank{trainer.global_rank}.pt"))
    _close_group()


def _close_group():
    # Lightning leaves the group open; torch's gloo then tears it down during interpreter exit,
    # where a worker thread that still drops a tensor aborts the process (pytorch#190489).
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
