"""Shared plumbing of the multi-process gloo tests: the pytest side starts one process per rank
(``launch``, ``run_procs``), each rank runs its scenarios inside one gloo group and saves what it
recorded to OUT_DIR/rank{r}.pt (``run_worker``). Worker scripts take
``RANK WORLD RDZV OUT_DIR [more args]`` on the command line.

The callers keep their own collective timeouts: a mismatch must fail within them, not hang."""

import datetime
import os
import subprocess
import sys
import traceback

import torch


def run_procs(script, tmp_path, world, argv_tail=(), timeout=90, env=None, label="distributed workers"):
    """Run ``script`` once per rank and wait; on ``timeout`` kill them all and fail the test.
    Returns (returncodes, logs), stdout and stderr together."""
    import pytest

    env = {**os.environ, "FUSEDACCUM_BACKEND": "torch", "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(tmp_path / "rdzv"),
                               str(tmp_path), *argv_tail], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"{label} did not finish in {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], logs


def launch(script, tmp_path, world, argv_tail=(), timeout=90, env=None, label="distributed workers",
           require_exit_0=True):
    """``run_procs``, then every rank's saved results. ``require_exit_0=False`` only asks that each
    rank saved something (workers that skip destroy_process_group after a timeout may exit badly)."""
    codes, logs = run_procs(script, tmp_path, world, argv_tail, timeout, env, label)
    ranks = []
    for rank, (code, log) in enumerate(zip(codes, logs)):
        path = tmp_path / f"rank{rank}.pt"
        if require_exit_0:
            assert code == 0, f"rank {rank} exited with {code}:\n{log}"
        else:
            assert path.exists(), f"rank {rank} exited with {code} and saved nothing:\n{log}"
        ranks.append(torch.load(path, weights_only=False))
    return ranks


def run_worker(rank, world, rdzv, out_dir, names, fn, timeout_s, destroy=True, record_errors=True):
    """One rank: join the gloo group (collective timeout ``timeout_s``), run ``fn(name)`` for each
    name with a barrier after each, and save {name: record} to OUT_DIR/rank{rank}.pt whatever
    happens. With ``record_errors`` a failing scenario is saved as {"error": traceback} and the
    rank stops (the ranks may now disagree). ``destroy=False``: after a timed-out collective
    destroy_process_group could wait on the peers."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = {}
    try:
        for name in names:
            try:
                results[name] = fn(name)
            except Exception:
                if not record_errors:
                    raise
                results[name] = {"error": traceback.format_exc()}
                break
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if destroy:
            dist.destroy_process_group()
