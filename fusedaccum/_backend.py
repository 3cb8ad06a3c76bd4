"""The one place that picks the implementation of the fused ops.

CUDA tensors run the Triton kernels, every other device the pure-PyTorch reference.
``FUSEDACCUM_BACKEND=torch|triton`` forces one; with ``TRITON_INTERPRET=1`` set before
Triton is imported, the Triton kernels also run on CPU tensors (that is how CI tests them).
A forced backend that cannot run raises; nothing falls back silently.
``operators`` gives the same choice as registered ``torch.library`` operators (``_library``)
while a trace runs, so that ``torch.compile`` sees one operator per phase.
"""

import os
from types import ModuleType

import torch

ENV_VAR = "FUSEDACCUM_BACKEND"
BACKENDS = ("torch", "triton")


def _load_kernels() -> ModuleType:
    try:
        # An import statement, not importlib: torch.compile traces this (ops.py asks while tracing).
        from . import kernels

        return kernels
    except ImportError as exc:  # triton missing or broken
        raise RuntimeError(
            f"the Triton backend is unavailable ({exc}); install triton, or set {ENV_VAR}=torch "
            "to run the pure-PyTorch reference"
        ) from exc


def _interpreted(kernels: ModuleType) -> bool:
    # TRITON_INTERPRET is read when @triton.jit runs, i.e. when the kernels are imported, so
    # ask the kernel object rather than the environment.
    return type(kernels.accumulate.accumulate_kernel).__name__ == "InterpretedFunction"


def requested() -> str:
    """The backend named by the environment: 'auto', 'torch' or 'triton'."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in ("auto",) + BACKENDS:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of auto, torch, triton")
    return value


def name_for(device: torch.device) -> str:
    """'torch' or 'triton': the backend the fused ops use for tensors on ``device``."""
    choice = requested()
    if choice == "auto":
        choice = "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and not _interpreted(_load_kernels()):
        raise RuntimeError(
            f"{ENV_VAR}=triton with {device.type} tensors needs TRITON_INTERPRET=1 set before "
            "triton is imported (Triton kernels run on CUDA tensors, or on CPU tensors under "
            "the interpreter)"
        )
    return choice


def implementation(device: torch.device) -> ModuleType:
    """The module whose ``accumulate_`` / ``unscale_clip_`` run on ``device``."""
    if name_for(device) == "triton":
        return _load_kernels()
    from . import reference

    return reference


def _tracing() -> bool:
    # Dynamo folds is_compiling() to True; make_fx and non-strict export run under a dispatch mode.
    return torch.compiler.is_compiling() or torch.utils._python_dispatch._get_current_dispatch_mode() is not None


def operators(device: torch.device):
    """What ``fusedaccum.ops`` calls on ``device``: while torch.compile, make_fx or export trace,
    ``implementation(device)`` as registered operators (``fusedaccum._library.Operators``, same
    signatures): the ``triton_op`` ones for the compiled Triton kernels, the opaque
    ``custom_op`` ones (whose kernel calls ``implementation``) for the reference and the
    interpreted kernels. Eagerly, the module itself: the operator dispatch runs the same function
    and costs more than it on small buckets (docs/kernels.md, "Custom ops")."""
    impl = implementation(device)
    if not _tracing():
        return impl
    return _library.operators(name_for(device) == "triton" and not _interpreted(impl), impl)


# Registers the operators at import: a first registration inside a torch.compile trace would break it.
from . import _library  # noqa: E402,F401  (after the definitions above, which _library uses)
