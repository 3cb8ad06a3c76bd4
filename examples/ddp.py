"""The DistributedDataParallel loop of docs/data-parallel.md, complete: DDP all-reduces once per
window (``acc.accumulate(ddp_model)`` enters ``no_sync()`` on all but the window's last
micro-batch), the accumulator normalizes, clips and steps; a partial last window per epoch.

    torchrun --nproc_per_node=2 examples/ddp.py          # NCCL on GPUs, else gloo on the CPU
    torchrun --nproc_per_node=2 examples/ddp.py --cpu    # gloo on the CPU
"""
# launch: torchrun 2

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fusedaccum

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="gloo on the CPU even when CUDA is present")
args = parser.parse_args()
use_cuda = torch.cuda.is_available() and not args.cpu

# torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...; the timeout turns a hang into an error.
dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
if use_cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
device = torch.device("cuda" if use_cuda else "cpu")

gen = torch.Generator().manual_seed(0)            # the same data on every rank; each takes its share
x_all = torch.randn(400, 16, generator=gen)
y_all = x_all[:, :4].argmax(1)
mine = torch.arange(rank, 400, world)             # what a DistributedSampler would give this rank
loader = [(x_all[i].to(device), y_all[i].to(device)) for i in mine.split(20)]   # 10 micro-batches of 20

model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
# fp32 parameters and gradient_as_bucket_view=False (the default): what the accumulator supports under DDP.
ddp_model = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
acc = fusedaccum.GradAccumulator(ddp_model, accumulation_steps=4, max_norm=1.0)   # DDP reduces, not the accumulator
optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=1e-2, fused=use_cuda)

window_losses = []
for epoch in range(4):
    for x, y in loader:
        with acc.accumulate(ddp_model):           # no_sync() on all but the window's last micro-batch
            acc.backward(F.cross_entropy(ddp_model(x), y))   # the micro-batch's mean loss
        result = acc.step(optimizer)
        if result is not None:
            window_losses.append(result.loss)
    if acc.micro_batches:                         # 10 = 2 x 4 + 2; its last micro-batch ran under no_sync(),
        window_losses.append(acc.step(optimizer, force=True).loss)   # so the step all-reduces the buckets

flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
assert all(torch.equal(g, flat) for g in gathered), "the ranks' weights differ"
losses = torch.stack(window_losses).tolist()
assert losses[-1] < 0.8 * losses[0], "the loss did not go down"
if rank == 0:
    print(f"{len(losses)} optimizer steps on {world} ranks; window loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"OK ddp: {world} ranks ({dist.get_backend()}), weights identical on every rank")
acc.release()
dist.barrier()                                    # every rank is done with its collectives,
del ddp_model                                     # and DDP's reducer lets go of the group, before it goes
dist.destroy_process_group()
