"""The machine a run measures: device name and slug, versions, and the load other processes put
on a small CPU while it runs."""

from __future__ import annotations

import gc
import os
import platform
import re
import time

import torch

import fusedaccum

DISTURBED_PCT = 10.0  # CPU: a group during which other processes used more than this is timed again


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "cpu"


def slugify(name: str, device: torch.device) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", name.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"
    if device.type != "cuda" and not s.startswith("cpu"):
        s = "cpu-" + s
    return s


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed / not importable on this platform
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "fusedaccum": fusedaccum.__version__,
            "python": platform.python_version()}


def _loadavg():
    """1/5/15-minute load averages (other processes on a small CPU disturb the timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class OtherLoad:
    """CPU time used by other processes while a stretch of the bench ran, as a percentage of
    all cores (Linux /proc/stat; None elsewhere). Other work on a small machine slows the
    CPU rows, so every CPU row records it: a clean run shows a few percent at most."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        import resource

        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        me = resource.getrusage(resource.RUSAGE_SELF)
        return busy / os.sysconf("SC_CLK_TCK"), me.ru_utime + me.ru_stime, time.perf_counter()

    def percent(self) -> "float | None":
        end = self._sample()
        if end is None or self._start is None:
            return None
        busy, mine, wall = (e - s for e, s in zip(end, self._start))
        cores = os.cpu_count() or 1
        return round(max(0.0, 100.0 * (busy - mine) / (wall * cores)), 1) if wall > 0 else None


def wait_quiet(max_wait_s: float, window_s: float = 1.0) -> "float | None":
    """Wait (up to ``max_wait_s``) for a ``window_s`` stretch in which other processes use at
    most DISTURBED_PCT of the CPU; returns their last share (None where it cannot be read)."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        load = OtherLoad()
        time.sleep(window_s)
        others = load.percent()
        if others is None or others <= DISTURBED_PCT or time.perf_counter() >= deadline:
            return others


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

