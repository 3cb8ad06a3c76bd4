"""The equivalence matrix: engine × what happens to the run, each against the large batch.

Engines: one process, a process group (the accumulator all-reduces), DDP and FSDP2 (2 ranks on
gloo). Cells (tests/_matrix_worker.py, ``plans``): a plain run; checkpoint-and-resume at every
micro-batch of a window, twice in a row, and inside a forced short window; an overflowing window
(inf on the last rank, skipped by every rank); an exception after a micro-batch's backward
followed by a short window; an exception in a forward, retried; an auxiliary head that gets no
gradient in some windows, on every rank or on one rank only. Every run is token-weighted with
uneven micro-batches and ends with a window closed short by ``step(force=True)``.

Each cell is compared with one float64 process that takes one AdamW step per window over all
ranks' rows: the weights, the AdamW state (step, both moments), and per window the logged loss,
the pre-clip norm, found_inf and the item count. Ranks must agree bit for bit. docs/guide.md
("What the test suite checks") names this coverage.

Tolerances: the weights and moments move by 1e-2 per step (AdamW's lr) over <= 4 fp32 steps;
measured differences are ~1e-7, a wrong normalization, clip or skip moves them by > 1e-3.
"""

import os

import pytest
import torch

import _matrix_worker as mw
import _multiproc as mp

WORLD = 2
TOL = 1e-5
RTOL = 1e-5
ENGINES = ["local", "group", "ddp", "fsdp2"]


def _launch(tmp_path, engine, timeout=240):
    script = os.path.join(os.path.dirname(__file__), "_matrix_worker.py")
    ranks = mp.launch(script, tmp_path, WORLD, [engine], timeout, label=f"{engine}: the workers")
    return [r[engine] for r in ranks]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{engine: [per-rank {cell: record}]}, each engine's runs made once (lazily)."""
    cache = {}

    def get(engine):
        if engine not in cache:
            if engine == "local":
                cache[engine] = [mw.run_engine("local", 0, 1)]
            else:
                import torch.distributed as dist

                if not dist.is_available() or not dist.is_gloo_available():
                    pytest.fail("the equivalence matrix needs torch.distributed with gloo")
                try:
                    cache[engine] = _launch(tmp_path_factory.mktemp(f"matrix_{engine}"), engine)
                except BaseException as exc:  # launch once: every cell of the engine reports it
                    cache[engine] = exc
        if isinstance(cache[engine], BaseException):
            raise cache[engine]
        return cache[engine]

    return get


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(cell, world):
        if (cell, world) not in cache:
            cache[cell, world] = mw.reference(mw.PLANS[cell], world)
        return cache[cell, world]

    return get


def _max_diff(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("engine, cell", [(e, c) for e in ENGINES for c in mw.cells_for(e)])
def test_matches_large_batch(engine, cell, runs, references):
    ranks = runs(engine)
    world = len(ranks)
    recs = []
    for rank, out in enumerate(ranks):
        rec = out.get(cell, {"error": "not run: an earlier cell failed on some rank"})
        if "error" in rec:
            pytest.fail(f"{engine}/{cell} rank {rank}:\n{rec['error']}")
        recs.append(rec)
    plan = mw.PLANS[cell]
    params, norms, losses, state = references(cell, world)
    rec = recs[0]
    for other in recs[1:]:  # replicas agree bit for bit
        assert all(torch.equal(a, b) for a, b in zip(rec["params"], other["params"])), "ranks' weights differ"
        for key in ("norms", "losses", "found_inf"):  # NaN in a skipped window: equal too
            torch.testing.assert_close(torch.tensor(rec[key]), torch.tensor(other[key]), rtol=0, atol=0,
                                       equal_nan=True, msg=f"ranks' {key} differ")

    skipped = plan.skipped()
    assert rec["found_inf"] == [1.0 if w in skipped else 0.0 for w in range(len(plan.micro))]
    for w, (norm, loss) in enumerate(zip(norms, losses)):
        if w in skipped:
            continue
        assert rec["norms"][w] == pytest.approx(norm, rel=RTOL), f"window {w}: pre-clip norm"
        assert rec["losses"][w] == pytest.approx(loss, rel=RTOL), f"window {w}: logged loss"
        items = sum(mw.rows(w, r, k) for r in range(world) for k in range(plan.micro[w]))
        assert rec["num_items"][w] == items, f"window {w}: item count"

    assert _max_diff(rec["params"], params) <= TOL, "weights"
    init = list(mw.make_net(torch.float64).parameters())
    assert _max_diff(init, params) > 100 * TOL  # the reference trained
    for i, (got, want) in enumerate(zip(rec["state"], state)):
        if want is None:
            assert got is None, f"parameter {i}: the optimizer stepped a parameter that had no gradient"
            continue
        assert got is not None, f"parameter {i}: no optimizer state"
        assert got["step"] == want["step"], f"parameter {i}: AdamW step count"
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=TOL, msg=f"parameter {i}: {key}")
