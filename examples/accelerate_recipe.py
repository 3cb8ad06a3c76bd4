"""The Accelerate recipe of docs/integrations.md, complete: ``FusedAccumulation`` replaces
``accelerator.backward`` and the clip/step/zero_grad lines; ``accelerator.accumulate`` marks the
windows (and enters DDP's ``no_sync``), a token-weighted loss, a partial last window per epoch.

    torchrun --nproc_per_node=2 examples/accelerate_recipe.py          # GPUs when present, else the CPU
    torchrun --nproc_per_node=2 examples/accelerate_recipe.py --cpu
    python examples/accelerate_recipe.py                               # one process

On a CPU, ``Accelerator(cpu=True)`` is what makes Accelerate join torchrun's processes (gloo):
without it each process trains alone on its own data, silently. This script checks it.
(Named accelerate_recipe.py: a script called accelerate.py would shadow the package.)
"""
# launch: torchrun 2

import argparse
import datetime
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs

from fusedaccum.integrations.accelerate import FusedAccumulation

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
args = parser.parse_args()
on_cpu = args.cpu or not torch.cuda.is_available()

accelerator = Accelerator(
    gradient_accumulation_steps=4, mixed_precision="bf16",
    cpu=on_cpu,                                   # on a CPU: needed to join torchrun's processes (gloo)
    # A collective timeout: a rank that never reaches a collective becomes an error instead of a hang.
    kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))],
)
launched = int(os.environ.get("WORLD_SIZE", "1"))
assert accelerator.num_processes == launched, (
    f"Accelerate sees {accelerator.num_processes} process(es) of the {launched} launched: each would train alone")

IGNORE = -100
gen = torch.Generator().manual_seed(0)            # the same data on every process; prepare() shards it
x = torch.randn(440, 16, generator=gen)
y = x[:, :4].argmax(1)
y[torch.rand(440, generator=gen) < 0.3] = IGNORE  # 30% of the labels ignored (padding)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20)   # 22 micro-batches

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
fused = FusedAccumulation(accelerator, model, max_norm=1.0)          # new

window_losses = []
for epoch in range(4):
    for xb, yb in loader:                                           # per process: 11 = 2 x 4 + 3 micro-batches
        with accelerator.accumulate(model):                         # unchanged
            loss = F.cross_entropy(model(xb).float(), yb, ignore_index=IGNORE, reduction="sum")
            fused.backward(loss, num_items=(yb != IGNORE).sum())    # was: accelerator.backward(loss)
            result = fused.step(optimizer)    # was: clip_grad_norm_(...) if sync_gradients; optimizer.step(); zero_grad()
            scheduler.step()                                        # unchanged
            if result is not None:                                  # a window closed (the last one partial)
                window_losses.append(result.loss)

losses = torch.stack(window_losses).tolist()
assert losses[-1] < 0.8 * losses[0], "the loss did not go down"
flat = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
assert (accelerator.gather(flat[None]) == flat).all(), "the processes' weights differ"
if accelerator.is_main_process:
    print(f"{len(losses)} optimizer steps; window loss per item {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"OK accelerate_recipe: {accelerator.num_processes} process(es), {accelerator.distributed_type}")
fused.release()
accelerator.wait_for_everyone()   # every process is done with its collectives before the group goes
accelerator.end_training()
