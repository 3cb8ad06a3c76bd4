"""The training loop of docs/guide.md, complete: one process, K = 8 micro-batches per optimizer
step, clipping, a warm-up schedule, and the epoch's partial last window.

    python examples/guide_loop.py          # CUDA when present, else the CPU
    python examples/guide_loop.py --cpu
"""
# launch: python

import argparse

import torch
import torch.nn.functional as F

import fusedaccum

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
args = parser.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")

torch.manual_seed(0)
# A synthetic classification task: 300 samples of 16 features, 4 classes.
x_all = torch.randn(300, 16)
y_all = (x_all[:, :4].argmax(1) + (x_all[:, 4] > 1).long()) % 4
# The loader yields micro-batches, of uneven size: 26 of 6 to 17 samples.
loader = []
for n in torch.randint(6, 18, (26,)).tolist():
    i = torch.randint(0, len(x_all), (n,))
    loader.append((x_all[i].to(device), y_all[i].to(device)))

model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).to(device)
# fused=True skips an overflowing step on the device: no host sync (CUDA; on the CPU either works).
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=device.type == "cuda")
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
acc = fusedaccum.GradAccumulator(model.parameters(), accumulation_steps=8, max_norm=1.0)

window_losses = []                           # 0-d device tensors: read once, at the end
for epoch in range(6):
    for x, y in loader:
        with acc.accumulate(model):          # DDP: no_sync() on all but a window's last micro-batch
            loss = F.cross_entropy(model(x), y)   # the micro-batch's mean loss
            acc.backward(loss)
        result = acc.step(optimizer)         # None until 8 micro-batches are in
        if result is not None:
            scheduler.step()                 # result.total_norm, result.found_inf: 0-d device tensors
            window_losses.append(result.loss)
    if acc.micro_batches:                    # the epoch's partial last window (26 = 3 x 8 + 2),
        result = acc.step(optimizer, force=True)   # normalized by its true size
        scheduler.step()
        window_losses.append(result.loss)

losses = torch.stack(window_losses).tolist()   # one host sync
print(f"{len(losses)} optimizer steps; window loss {losses[0]:.3f} -> {losses[-1]:.3f}")
assert losses[-1] < 0.8 * losses[0], "the loss did not go down"
print(f"OK guide_loop: {len(losses)} optimizer steps on {device}")
