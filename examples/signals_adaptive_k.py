"""The signals of docs/signals.md, complete: the window's loss and the gradient noise scale logged
per optimizer step without a host sync, and an ``AdaptiveSteps`` policy that sets K from the noise
scale every few windows (its one host read per decision).

    python examples/signals_adaptive_k.py          # CUDA when present, else the CPU
    python examples/signals_adaptive_k.py --cpu
"""
# launch: python

import argparse

import torch

import fusedaccum

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
args = parser.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")

# Noisy linear regression: per-item gradients scatter around the mean gradient, so the noise
# scale (the batch size beyond which larger batches stop paying off) is finite and grows as the
# fit improves.
torch.manual_seed(0)
true_w = torch.randn(16, 1)
x_all = torch.randn(4096, 16)
y_all = x_all @ true_w + 0.5 * torch.randn(4096, 1)
micro = 8                                         # items per micro-batch

model = torch.nn.Linear(16, 1).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
policy = fusedaccum.AdaptiveSteps(min_steps=2, max_steps=32, every=5,
                                  on_change=lambda c: print(f"  after window {c.window}: K {c.old} -> {c.new} "
                                                            f"(b_simple {c.b_simple:.0f} items)"))
acc = fusedaccum.GradAccumulator(model, 4, max_norm=10.0,
                                 noise_scale=fusedaccum.NoiseScaleSettings(beta=0.9, adaptive=policy))

losses, b_simple = [], []                         # 0-d device tensors: no sync until read
for i in range(0, len(x_all), micro):
    x, y = x_all[i:i + micro].to(device), y_all[i:i + micro].to(device)
    with acc.accumulate(model):
        loss_sum = (model(x) - y).square().sum()  # summed over the items ...
        acc.backward(loss_sum, num_items=len(x))  # ... with their count: b_simple is in items
    result = acc.step(optimizer)
    if result is not None:
        losses.append(result.loss)                # Σ summed losses / Σ items of the window
        b_simple.append(result.noise_scale.b_simple)
if acc.micro_batches:
    acc.step(optimizer, force=True)

losses = torch.stack(losses).tolist()             # one host sync, when we choose
b = torch.stack(b_simple).tolist()
ks = [c.new for c in acc.accumulation_steps_changes]
print(f"{len(losses)} optimizer steps; window loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
      f"b_simple {b[1]:.0f} -> {b[-1]:.0f} items; K used: 4, then {ks}")
assert losses[-1] < 0.5 * losses[0], "the loss did not go down"
assert ks and acc.accumulation_steps != 4, "the policy never changed K"
print(f"OK signals_adaptive_k: {len(losses)} optimizer steps, K now {acc.accumulation_steps}, on {device}")
