"""Run by tests/test_integration_accelerate.py::test_ddp_two_cpu_processes under
``python -m torch.distributed.run --standalone --nproc_per_node 2``: Accelerate on 2 CPU
processes (MULTI_CPU, gloo), the FusedAccumulation recipe, token-weighted losses. Each rank
saves its final weights and its window results to <out>/rank<r>.pt."""

import os
import sys

N, SEED, EPOCHS, K, BATCH, CLIP = 80, 13, 2, 4, 4, 0.5


def main(out: str) -> None:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator

    from _lightning_common import IGNORE, make_data, make_net
    from fusedaccum.integrations.accelerate import FusedAccumulation

    torch.set_num_threads(1)
    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    x, y = make_data(N, seed=SEED, ignore_frac=0.3)
    # Accelerate shards by batch: rank r gets batches r, r+2, ... of this loader.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    net = make_net()
    model, optimizer, data = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9),
                                                 loader)
    fused = FusedAccumulation(accelerator, model, max_norm=CLIP)
    windows = []
    for _ in range(EPOCHS):
        for xb, yb in data:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(xb), yb, ignore_index=IGNORE, reduction="sum")
                fused.backward(loss, num_items=(yb != IGNORE).sum())
                result = fused.step(optimizer)
                if result is not None:
                    windows.append((result.micro_batches, float(result.num_items)))
    os.makedirs(out, exist_ok=True)
    torch.save({"weights": {k: v.detach().clone() for k, v in net.state_dict().items()}, "windows": windows},
               os.path.join(out, f"rank{accelerator.process_index}.pt"))
    fused.release()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
