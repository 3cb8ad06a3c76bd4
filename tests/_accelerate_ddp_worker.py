"""Run by tests/test_integration_accelerate.py::test_ddp_two_cpu_processes under
``python -m torch.distributed.run --standalone --nproc_per_node 2``: Accelerate on 2 CPU
processes (MULTI_CPU, gloo), the FusedAccumulation recipe, token-weighted losses.

Two runs in one launch: the uninterrupted one, which ``save_state``s after micro-batch 6 of
epoch 0 (each rank's window 2 holds 2 of its 4 micro-batches); then a fresh Accelerator, model
and FusedAccumulation that ``load_state`` it, skip the batches seen and train to the end. Each
rank saves both runs' final weights and window results to <out>/rank<r>.pt."""

import datetime
import os
import sys

N, SEED, EPOCHS, K, BATCH, CLIP = 80, 13, 2, 4, 4, 0.5
SAVE_AFTER = 6  # micro-batches of epoch 0 (per rank): mid-window


def main(out: str) -> None:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    from _lightning_common import IGNORE, make_data, make_net
    from fusedaccum.integrations.accelerate import FusedAccumulation

    torch.set_num_threads(1)
    x, y = make_data(N, seed=SEED, ignore_frac=0.3)
    state_dir = os.path.join(out, "state")

    def setup():
        AcceleratorState._reset_state(True)  # the process group stays; the second Accelerator reuses it
        GradientState._reset_state()
        accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True, kwargs_handlers=[
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))])  # a mismatch fails, not hangs
        assert accelerator.num_processes == 2, accelerator.state
        # Accelerate shards by batch: rank r gets batches r, r+2, ... of this loader.
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
        net = make_net()
        model, optimizer, data = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9),
                                                     loader)
        fused = FusedAccumulation(accelerator, model, max_norm=CLIP)
        accelerator.register_for_checkpointing(fused)
        return accelerator, net, model, optimizer, data, fused

    def train(accelerator, model, optimizer, batches, fused, windows, save_after=None):
        for i, (xb, yb) in enumerate(batches):
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(xb), yb, ignore_index=IGNORE, reduction="sum")
                fused.backward(loss, num_items=(yb != IGNORE).sum())
                result = fused.step(optimizer)
                if result is not None:
                    windows.append((result.micro_batches, float(result.num_items), result.loss.clone()))
            if i + 1 == save_after:
                accelerator.save_state(state_dir)  # every rank: state_dict() gathers the windows

    runs = {}
    accelerator, net, model, optimizer, data, fused = setup()
    windows = []
    for epoch in range(EPOCHS):
        train(accelerator, model, optimizer, data, fused, windows, save_after=SAVE_AFTER if epoch == 0 else None)
    runs["whole"] = {"weights": {k: v.detach().clone() for k, v in net.state_dict().items()}, "windows": windows}
    fused.release()
    accelerator.wait_for_everyone()  # the state is written before anyone reads it

    accelerator, net, model, optimizer, data, fused = setup()
    net[0].weight.data.add_(1.0)  # load_state replaces it
    accelerator.load_state(state_dir)
    assert fused.micro_batches == SAVE_AFTER % K
    windows = []
    train(accelerator, model, optimizer, accelerator.skip_first_batches(data, SAVE_AFTER), fused, windows)
    for _ in range(EPOCHS - 1):
        train(accelerator, model, optimizer, data, fused, windows)
    runs["resumed"] = {"weights": {k: v.detach().clone() for k, v in net.state_dict().items()}, "windows": windows}
    fused.release()

    os.makedirs(out, exist_ok=True)
    torch.save(runs, os.path.join(out, f"rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()  # every rank is done with its collectives before the group goes
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
