"""The data-parallel loop of docs/data-parallel.md, complete: the same script on every rank, no
DistributedDataParallel wrapper (the accumulator all-reduces its fp32 sums once per window),
a token-weighted loss whose items differ per rank, and the epoch's partial last window.

    torchrun --nproc_per_node=2 examples/data_parallel.py          # NCCL on GPUs, else gloo on the CPU
    torchrun --nproc_per_node=2 examples/data_parallel.py --cpu    # gloo on the CPU
"""
# launch: torchrun 2

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedaccum

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="gloo on the CPU even when CUDA is present")
args = parser.parse_args()
use_cuda = torch.cuda.is_available() and not args.cpu

# torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...; gloo is the CPU backend. The timeout turns a
# rank that never reaches a collective into an error instead of a hang.
dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
if use_cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
device = torch.device("cuda" if use_cuda else "cpu")

IGNORE = -100
gen = torch.Generator().manual_seed(0)            # the same data on every rank; each takes its share
x_all = torch.randn(400, 16, generator=gen)
y_all = x_all[:, :4].argmax(1)
y_all[torch.rand(400, generator=gen) < 0.3] = IGNORE     # 30% of the labels are ignored (padding)
mine = torch.arange(rank, 400, world)             # what a DistributedSampler would give this rank
loader = [(x_all[i].to(device), y_all[i].to(device)) for i in mine.split(20)]   # 10 micro-batches of 20

torch.manual_seed(rank)                           # different initial weights per rank, on purpose:
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
fusedaccum.broadcast_parameters(model)            # rank 0's initial weights everywhere (DDP would do this)
acc = fusedaccum.GradAccumulator(model, accumulation_steps=4, max_norm=1.0)   # process_group=None: the default group
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=use_cuda)

window_losses = []
for epoch in range(4):
    for x, y in loader:
        with acc.accumulate(model):
            loss = F.cross_entropy(model(x), y, ignore_index=IGNORE, reduction="sum")
            acc.backward(loss, num_items=(y != IGNORE).sum())   # the window: one batch of all ranks' items
        result = acc.step(optimizer)              # None until 4 micro-batches are in
        if result is not None:
            window_losses.append(result.loss)     # global: Σ losses / Σ items over both ranks
    if acc.micro_batches:                         # 10 = 2 x 4 + 2: a partial window, every rank calls it
        window_losses.append(acc.step(optimizer, force=True).loss)

# Every rank took the same steps: the weights agree bit for bit.
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
assert all(torch.equal(g, flat) for g in gathered), "the ranks' weights differ"
losses = torch.stack(window_losses).tolist()
assert losses[-1] < 0.8 * losses[0], "the loss did not go down"
if rank == 0:
    print(f"{len(losses)} optimizer steps on {world} ranks; window loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"OK data_parallel: {world} ranks ({dist.get_backend()}), weights identical on every rank")
dist.barrier()                                    # every rank is done with its collectives first
dist.destroy_process_group()
