"""Shared by tests/test_integration_lightning.py and its DDP worker script: a tiny model, data
and the float64-free large-batch reference (plain torch, no Lightning, no fusedaccum)."""

import torch
import torch.nn.functional as F

IGNORE = -100


def make_data(n: int, seed: int = 0, ignore_frac: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    if ignore_frac:
        y[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    return x, y


def make_net(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def micro_batches(x, y, batch_size: int):
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def windows(batches, k: int):
    """Lightning's windows: K batches each, the epoch's last one partial."""
    return [batches[i:i + k] for i in range(0, len(batches), k)]


def large_batch_run(net, optimizer, epoch_windows, epochs: int, clip=None):
    """One optimizer step per window on the window's concatenated batch. Returns the last loss."""
    loss = None
    for _ in range(epochs):
        for window in epoch_windows:
            x = torch.cat([b[0] for b in window])
            y = torch.cat([b[1] for b in window])
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y, ignore_index=IGNORE)  # mean over the valid items
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            optimizer.step()
    return loss.detach()


class Batches:
    """Precomputed micro-batches as a resumable loader: Lightning saves ``state_dict()`` in its
    checkpoints and a resumed epoch continues from the next batch (what a mid-epoch resume needs)."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.position = 0
        self._resume_at = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        start, self._resume_at = self._resume_at, 0
        for i in range(start, len(self.batches)):
            self.position = i + 1
            yield self.batches[i]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self._resume_at = state["position"]
