"""Run by tests/test_integration_transformers.py::test_ddp_two_cpu_processes under
``python -m torch.distributed.run --standalone --nproc_per_node 2``: Trainer on 2 CPU processes
(``use_cpu=True``: Accelerate's MULTI_CPU, DDP over gloo, a collective timeout of 60 s), windows of
3, 3 and a short 1 micro-batches per rank. Three runs: FusedAccumTrainer over the tiny Llama (the
HF ``num_items_in_batch`` path) and over the mean-loss module, stock Trainer over the mean-loss
module. Each rank saves what it trained on, its logs and its final weights to <out>/rank<r>.pt."""

import os
import sys

N, K = 14, 3  # 7 batches of 2 per rank


def main(out: str) -> None:
    import torch

    import _transformers_common as c

    torch.set_num_threads(1)
    data = c.token_data(2 * N, seed=5)
    saved = {}
    for name, cls, mk in (("fused_llama", c.FusedTrainer, c.tiny_llama), ("fused_mean", c.FusedTrainer, c.MeanLossLM),
                          ("stock_mean", c.StockTrainer, c.MeanLossLM)):
        model = mk()
        tr = c.make(cls, model, os.path.join(out, name), K, data, ddp_timeout=60, ddp_backend="gloo")
        tr.label_shift = True
        assert tr.args.world_size == 2, tr.args
        tr.train()
        saved[name] = {"recorded": tr.recorded, "grad_norms": c.grad_norms(tr), "losses": c.losses(tr),
                       "max_steps": tr.state.max_steps,
                       "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    torch.save(saved, os.path.join(out, f"rank{int(os.environ['RANK'])}.pt"))
    # Trainer leaves the group open; torch's gloo then tears it down during interpreter exit,
    # where a worker thread that still drops a tensor aborts the process (pytorch#190489).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
