"""Every script in examples/ runs on the CPU as written and ends with its OK line.

Each example declares how it is launched in a comment near its top: ``# launch: python`` (one
process) or ``# launch: torchrun N`` (N processes, run here as ``python -m torch.distributed.run
--standalone --nproc_per_node N``, which is what the ``torchrun`` command runs; ``--standalone``
picks a free port, so parallel test runs do not collide). All get ``--cpu``, so a machine with a
GPU tests the CPU/gloo path too. examples/trainer.py has its own test
(tests/test_integration_transformers.py)."""

import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name != "trainer.py")
# The documents that have a loop, and the example each links (docs show the essential lines).
LINKED = [("docs/guide.md", "guide_loop.py"), ("docs/data-parallel.md", "data_parallel.py"),
          ("docs/data-parallel.md", "ddp.py"), ("docs/fsdp2.md", "fsdp2.py"),
          ("docs/integrations.md", "lightning_plugin.py"), ("docs/integrations.md", "accelerate_recipe.py"),
          ("docs/signals.md", "signals_adaptive_k.py")]


def launch_command(script: Path) -> list:
    found = re.findall(r"^# launch: (python|torchrun (\d+))\s*$", script.read_text(), re.M)
    assert len(found) == 1, f"{script.name}: declare how it is launched, '# launch: python' or '# launch: torchrun N'"
    kind, nproc = found[0]
    if kind == "python":
        return [sys.executable, str(script.relative_to(ROOT)), "--cpu"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script.relative_to(ROOT)), "--cpu"]


def test_every_document_with_a_loop_links_its_example():
    assert {p.name for p in EXAMPLES} >= {name for _, name in LINKED}
    for doc, name in LINKED:
        assert f"(../examples/{name})" in (ROOT / doc).read_text(), f"{doc} does not link examples/{name}"


# torch's gloo can abort a process during interpreter exit, after the script has finished and
# printed OK, when a worker thread drops a tensor then (pytorch#190489; "terminate called without
# an active exception"). The examples close their groups to avoid it (barrier, then
# destroy_process_group); should it still happen, the run is repeated once and must then pass.
EXIT_ABORT = "terminate called without an active exception"


def run_example(script):
    # The user's environment, not the test suite's: no forced backend.
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDACCUM_BACKEND", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"
    # A session of its own: torchrun's workers are killed with it on a timeout.
    proc = subprocess.Popen(launch_command(script), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script.name} did not finish in 180 s\n{out}\n{err[-3000:]}")
    return proc.returncode, out, err


def said_ok(script, out: str) -> bool:
    lines = [line for line in out.splitlines() if line.strip()]
    return bool(lines) and lines[-1].startswith(f"OK {script.stem}")


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_and_says_ok(script):
    code, out, err = run_example(script)
    if code != 0 and said_ok(script, out) and EXIT_ABORT in err:
        warnings.warn(f"{script.name} finished and said OK, then a process aborted at exit in gloo's "
                      f"teardown: run again", RuntimeWarning)
        code, out, err = run_example(script)
    assert code == 0, f"{script.name} exited {code}\n{out}\n{err[-3000:]}"
    assert said_ok(script, out), f"{script.name}: no final OK line\n{out}"
