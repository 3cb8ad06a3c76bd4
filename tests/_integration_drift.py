"""How far Lightning's and Accelerate's own accumulation drift from large-batch training where the
integrations do not (the figures in docs/integrations.md): ./dev python tests/_integration_drift.py

Max |w - w_large| over the weights after 2 epochs: 40 samples in micro-batches of 4, K=4 (windows
of 4, 4 and 2 micro-batches), SGD(momentum), clip 0.5; and a token-weighted variant (38 samples,
30% of the labels ignored, a last micro-batch of 2)."""

import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")
logging.disable(logging.INFO)

import test_integration_accelerate as A  # noqa: E402
import test_integration_lightning as L  # noqa: E402
from _lightning_common import large_batch_run, make_data, make_net, micro_batches, windows  # noqa: E402

CASES = [("mean loss, windows of 4/4/2 micro-batches", 40, 0, 0.0, False),
         ("token-weighted (30% ignored, a last micro-batch of 2)", 38, 3, 0.3, True)]


def accelerate_run(fn, *args, **kwargs):
    A.AcceleratorState._reset_state(True)
    A.GradientState._reset_state()
    return fn(*args, **kwargs)


def main() -> None:
    print("| case | Lightning + FusedAccumPrecision | Lightning stock | Accelerate + FusedAccumulation "
          "| Accelerate stock |\n|---|---|---|---|---|")
    for name, n, seed, ignore_frac, token in CASES:
        x, y = make_data(n, seed=seed, ignore_frac=ignore_frac)
        batches = micro_batches(x, y, L.BATCH)
        ref = make_net()
        large_batch_run(ref, L.make_optimizer(ref, "sgd"), windows(batches, L.K), epochs=2, clip=L.CLIP)
        ours, stock = L.Net(token=token), L.Net()
        L.fit(ours, batches, plugin=L.FusedAccumPrecision("32"))
        L.fit(stock, batches)
        fused, _ = accelerate_run(A.fused_run, x, y, token=token)
        plain = accelerate_run(A.stock_run, x, y)
        print(f"| {name} | {L.max_diff(ours.net, ref):.1e} | {L.max_diff(stock.net, ref):.1e} "
              f"| {A.max_diff(fused, ref):.1e} | {A.max_diff(plain, ref):.1e} |")


if __name__ == "__main__":
    main()
