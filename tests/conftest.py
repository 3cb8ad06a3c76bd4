import os

import pytest
import torch

# The Triton kernels run on CPU tensors only under the interpreter, and TRITON_INTERPRET is
# read when the kernels are decorated: set it before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fusedaccum import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _triton_usable(device: str) -> "str | None":
    """None if the Triton backend can run on device, else why not."""
    try:
        kernels = _backend._load_kernels()
    except RuntimeError as exc:
        return str(exc)
    if device == "cpu" and not _backend._interpreted(kernels):
        return "TRITON_INTERPRET=1 was not set before triton was imported"
    return None


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=["torch", "triton"])
def backend(request, device, monkeypatch):
    """Forces FUSEDACCUM_BACKEND for the test; yields the backend name."""
    if request.param == "triton":
        why = _triton_usable(device.type)
        if why:
            pytest.skip(f"triton backend unavailable on {device.type}: {why}")
    monkeypatch.setenv(_backend.ENV_VAR, request.param)
    return request.param
