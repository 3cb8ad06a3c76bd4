"""The FSDP2 loop of docs/fsdp2.md, complete: every block and the root wrapped with ``fully_shard``
(bf16 compute, fp32 reduce-scatter), the accumulator's fp32 buckets holding this rank's shards,
one global norm and clip per window, and a token-weighted loss.

    torchrun --nproc_per_node=2 examples/fsdp2.py          # NCCL on GPUs, else gloo on the CPU
    torchrun --nproc_per_node=2 examples/fsdp2.py --cpu    # gloo on the CPU
"""
# launch: torchrun 2

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import fusedaccum

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="gloo on the CPU even when CUDA is present")
args = parser.parse_args()
use_cuda = torch.cuda.is_available() and not args.cpu

# torchrun sets RANK, WORLD_SIZE, ...; the timeout turns a hang into an error.
dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
if use_cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
device = torch.device("cuda" if use_cuda else "cpu")


class Model(torch.nn.Module):
    def __init__(self, vocab=32, dim=32, depth=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU()) for _ in range(depth))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.flatten(0, 1))           # [tokens, vocab]; a 2-D input: not a view


IGNORE = -100
gen = torch.Generator().manual_seed(0)            # the same data on every rank; each takes its share
tokens = torch.randint(0, 32, (96, 9), generator=gen)
labels = (tokens[:, :-1] * 3 + 1) % 32            # a learnable next-token rule
labels[torch.rand(labels.shape, generator=gen) < 0.2] = IGNORE   # padding the loss ignores
mine = torch.arange(rank, 96, world)
loader = [(tokens[i, :-1].to(device), labels[i].to(device)) for i in mine.split(8)]   # 6 micro-batches

torch.manual_seed(0)                              # fully_shard keeps each rank's own shard: same init everywhere
model = Model().to(device)
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for block in model.blocks:
    fully_shard(block, mp_policy=mp)
fully_shard(model, mp_policy=mp)                  # the root too: it takes the remaining parameters
acc = fusedaccum.GradAccumulator(model, accumulation_steps=3, max_norm=1.0)   # fsdp_sync="micro_batch"
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)   # over the sharded (DTensor) parameters

window_losses = []
for epoch in range(5):
    for x, y in loader:
        with acc.accumulate(model):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
            acc.backward(loss, num_items=(y != IGNORE).sum())
        result = acc.step(optimizer)
        if result is not None:
            window_losses.append(result.loss)     # the same global value on every rank

full = torch.cat([p.full_tensor().detach().flatten() for p in model.parameters()])   # all-gathers the shards
losses = torch.stack(window_losses).tolist()
assert losses[-1] < 0.8 * losses[0], "the loss did not go down"
assert torch.isfinite(full).all()
if rank == 0:
    print(f"{len(losses)} optimizer steps on {world} ranks; window loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"OK fsdp2: {world} ranks ({dist.get_backend()}), {full.numel()} parameters sharded")
acc.release()
dist.barrier()                                    # every rank is done with its collectives first
dist.destroy_process_group()
