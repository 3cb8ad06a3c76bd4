"""./dev runs the user's commands in the caller's directory (relative paths mean what they say).

The venv ./dev uses is a stand-in whose python is this interpreter, marked installed, so the
test installs nothing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def stand_in_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    marker = venv / ".fusedaccum-installed"
    marker.touch()
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 10
    os.utime(marker, (newer, newer))
    return venv


def _dev(args, cwd, venv):
    env = dict(os.environ, FUSEDACCUM_VENV=str(venv))
    return subprocess.run([str(ROOT / "dev"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_python_runs_in_the_callers_directory(tmp_path, stand_in_venv):
    work = tmp_path / "work"
    work.mkdir()
    (work / "script.py").write_text("import os, sys; print(os.getcwd()); open(sys.argv[1], 'w').write('ok')\n")
    run = _dev(["python", "script.py", "written.txt"], work, stand_in_venv)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(work)
    assert (work / "written.txt").read_text() == "ok" and not (ROOT / "written.txt").exists()
    assert "installing" not in run.stderr  # a ready venv: no set-up step announced


def test_demo_plot_is_ignored_by_git():
    from fusedaccum import demo

    assert not Path(demo.DEFAULT_OUT).is_absolute()  # the caller's directory
    check = subprocess.run(["git", "check-ignore", "-q", demo.DEFAULT_OUT], cwd=ROOT)
    if check.returncode == 128:
        pytest.skip("not a git checkout")
    assert check.returncode == 0, f"{demo.DEFAULT_OUT} is not in .gitignore"
