"""The fused ops' phases as PyTorch custom operators (``torch.library``), so that
``torch.compile(fullgraph=True)`` records each call as one operator instead of tracing (and
breaking on) the Python and the host reads around the kernels.

Two registrations per phase, with one schema:

- ``fusedaccum::<phase>`` (``custom_op``, opaque to the compiler): its kernel runs what
  ``_backend.implementation`` picks when it runs: the pure-torch reference (the CPU kernel),
  or the Triton kernels under ``TRITON_INTERPRET=1``. The reference may read its own CPU
  values (docs/numerics.md), which a trace could not do, so compile calls it as it is.
- ``fusedaccum::<phase>_triton`` (``triton_op``): the compiled Triton kernels, launched through
  ``torch.library.wrap_triton``, so that inductor sees the kernels themselves (CUDA).

``_backend.operators`` picks which of the two a call uses while a trace runs (eagerly
``fusedaccum.ops`` calls the backend module itself). Host scalars: a schema needs one type
per argument, so each "float or one-element tensor" argument is a pair ``(Tensor?, float)``:
the tensor when given (read by the kernel on the device), else the number. Neither costs a
copy or a host read. An optional list of tensors (``out``) is a list, empty for none.
Mutating ops return nothing (a custom op may not return an alias of its input);
``fusedaccum.ops`` returns the tensor itself.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _backend

Scalar = "float | torch.Tensor"


def _split(value) -> "tuple[Tensor | None, float]":
    return (value, 0.0) if isinstance(value, Tensor) else (None, float(value))


def _join(tensor: "Tensor | None", value: float):
    return value if tensor is None else tensor


# --- the phases, written once against a backend module (the reference or the kernels) ---

def _accumulate(impl, acc, grad, scale, scale_value, zero_grad, overwrite, sq_out, sq_weight, sq_weight_value,
                norm_out=None, norm_slot=0, inv_scale=None, inv_scale_value=1.0, norm_type=2.0,
                norm_dtype=torch.float32):
    norm = {} if norm_out is None else dict(norm_out=norm_out, norm_slot=norm_slot, norm_type=norm_type,
                                            inv_scale=_join(inv_scale, inv_scale_value), norm_dtype=norm_dtype)
    impl.accumulate_(acc, grad, _join(scale, scale_value), zero_grad=zero_grad, overwrite=overwrite,
                     sq_out=sq_out, sq_weight=_join(sq_weight, sq_weight_value), **norm)


def _norm_partials(impl, buckets, inv_scale, inv_scale_value, norm_type, out):
    return impl.norm_partials(list(buckets), _join(inv_scale, inv_scale_value), norm_type,
                              out=list(out) or None)


def _finalize(impl, partials, inv_scale, inv_scale_value, max_norm, norm_type, eps):
    return impl.finalize(partials, _join(inv_scale, inv_scale_value), max_norm, norm_type, eps)


def _apply(impl, buckets, stats, out, skip_if_nonfinite):
    impl.apply(list(buckets), stats, list(out) or None, skip_if_nonfinite)


# --- fusedaccum::<phase>: the implementation _backend picks at run time, opaque to compile ---

def _impl(device: torch.device):
    return _backend.implementation(device)


@torch.library.custom_op("fusedaccum::accumulate", mutates_args=("acc", "grad", "sq_out", "norm_out"))
def accumulate(acc: Tensor, grad: Tensor, scale: Optional[Tensor], scale_value: float, zero_grad: bool,
               overwrite: bool, sq_out: Optional[Tensor], sq_weight: Optional[Tensor], sq_weight_value: float,
               norm_out: Optional[Tensor] = None, norm_slot: int = 0, inv_scale: Optional[Tensor] = None,
               inv_scale_value: float = 1.0, norm_type: float = 2.0, norm_dtype: torch.dtype = torch.float32) -> None:
    """``acc (+)= grad * scale``; ``grad`` is written only with ``zero_grad``, ``sq_out`` and ``norm_out`` only
    when given."""
    _accumulate(_impl(acc.device), acc, grad, scale, scale_value, zero_grad, overwrite, sq_out, sq_weight,
                sq_weight_value, norm_out, norm_slot, inv_scale, inv_scale_value, norm_type, norm_dtype)


@torch.library.custom_op("fusedaccum::norm_partials", mutates_args=())
def norm_partials(buckets: list[Tensor], inv_scale: Optional[Tensor], inv_scale_value: float, norm_type: float,
                  out: list[Tensor]) -> Tensor:
    """The fp32 partials ``[5, slots]``; ``out`` (empty: in place) only sets the store limits (its dtypes)."""
    return _norm_partials(_impl(buckets[0].device), buckets, inv_scale, inv_scale_value, norm_type, out)


@torch.library.custom_op("fusedaccum::finalize", mutates_args=())
def finalize(partials: Tensor, inv_scale: Optional[Tensor], inv_scale_value: float, max_norm: Optional[float],
             norm_type: float, eps: float) -> Tensor:
    """The fp32 stats ``[total_norm, found_inf, coef, store_overflow]``."""
    return _finalize(_impl(partials.device), partials, inv_scale, inv_scale_value, max_norm, norm_type, eps)


@torch.library.custom_op("fusedaccum::apply", mutates_args=("buckets", "out"))
def apply(buckets: list[Tensor], stats: Tensor, out: list[Tensor], skip_if_nonfinite: bool) -> None:
    """``dst = bucket * stats[2]`` (dst: ``out[i]``; ``out`` empty: the bucket), skipped when found_inf."""
    _apply(_impl(stats.device), buckets, stats, out, skip_if_nonfinite)


@accumulate.register_fake
def _(acc, grad, scale, scale_value, zero_grad, overwrite, sq_out, sq_weight, sq_weight_value, norm_out=None,
      norm_slot=0, inv_scale=None, inv_scale_value=1.0, norm_type=2.0, norm_dtype=torch.float32):
    return None


@norm_partials.register_fake
def _(buckets, inv_scale, inv_scale_value, norm_type, out):
    # Both backends give each bucket one slot per program: sq_slots(n) of them (1 for the reference).
    impl = _impl(buckets[0].device)
    slots = sum(impl.sq_slots(b.numel()) for b in buckets)
    return buckets[0].new_empty(5, slots, dtype=torch.float32)


@finalize.register_fake
def _(partials, inv_scale, inv_scale_value, max_norm, norm_type, eps):
    return partials.new_empty(4)


@apply.register_fake
def _(buckets, stats, out, skip_if_nonfinite):
    return None


# --- fusedaccum::<phase>_triton: the compiled kernels, visible to compile ---

_TRITON: dict = {}


def _triton_ops() -> dict:
    """The triton_op registrations, made on first use (they import triton): at import where CUDA
    is available (below), so that a first call inside torch.compile does not trace the registration."""
    if _TRITON:
        return _TRITON
    from torch.library import triton_op

    kernels = _backend._load_kernels()
    from .kernels._launch import traceable_launches

    # The bodies are traced under fake and functional tensors (triton_op registers them as the
    # fake kernel and decomposes them for inductor): inside traceable_launches() every launch
    # goes through wrap_triton; eagerly triton_op turns wrap_triton off, so the kernels launch directly.
    @triton_op("fusedaccum::accumulate_triton", mutates_args=("acc", "grad", "sq_out", "norm_out"))
    def accumulate_triton(acc: Tensor, grad: Tensor, scale: Optional[Tensor], scale_value: float, zero_grad: bool,
                          overwrite: bool, sq_out: Optional[Tensor], sq_weight: Optional[Tensor],
                          sq_weight_value: float, norm_out: Optional[Tensor] = None, norm_slot: int = 0,
                          inv_scale: Optional[Tensor] = None, inv_scale_value: float = 1.0, norm_type: float = 2.0,
                          norm_dtype: torch.dtype = torch.float32) -> None:
        with traceable_launches():
            _accumulate(kernels, acc, grad, scale, scale_value, zero_grad, overwrite, sq_out, sq_weight,
                        sq_weight_value, norm_out, norm_slot, inv_scale, inv_scale_value, norm_type, norm_dtype)

    @triton_op("fusedaccum::norm_partials_triton", mutates_args=())
    def norm_partials_triton(buckets: list[Tensor], inv_scale: Optional[Tensor], inv_scale_value: float,
                             norm_type: float, out: list[Tensor]) -> Tensor:
        with traceable_launches():
            return _norm_partials(kernels, buckets, inv_scale, inv_scale_value, norm_type, out)

    @triton_op("fusedaccum::finalize_triton", mutates_args=())
    def finalize_triton(partials: Tensor, inv_scale: Optional[Tensor], inv_scale_value: float,
                        max_norm: Optional[float], norm_type: float, eps: float) -> Tensor:
        with traceable_launches():
            return _finalize(kernels, partials, inv_scale, inv_scale_value, max_norm, norm_type, eps)

    @triton_op("fusedaccum::apply_triton", mutates_args=("buckets", "out"))
    def apply_triton(buckets: list[Tensor], stats: Tensor, out: list[Tensor],
                     skip_if_nonfinite: bool) -> None:
        with traceable_launches():
            _apply(kernels, buckets, stats, out, skip_if_nonfinite)

    _TRITON.update(accumulate=accumulate_triton, norm_partials=norm_partials_triton, finalize=finalize_triton,
                   apply=apply_triton)
    return _TRITON


class Operators:
    """One backend's registered operators behind the launch helpers' signatures (those of
    ``fusedaccum.reference``), so that ``fusedaccum.ops`` calls them as it calls a backend module."""

    def __init__(self, ops: dict, module):
        self._ops = ops
        self.module = module
        self.MAX_SLOTS_PER_BUCKET = module.MAX_SLOTS_PER_BUCKET
        self.sq_slots = module.sq_slots

    def accumulate_(self, acc, grad, scale: Scalar, *, zero_grad: bool, overwrite: bool, sq_out=None,
                    sq_weight: Scalar = 1.0, norm_out=None, norm_slot: int = 0, inv_scale: Scalar = 1.0,
                    norm_type: float = 2.0, norm_dtype: torch.dtype = torch.float32) -> Tensor:
        self._ops["accumulate"](acc, grad, *_split(scale), zero_grad, overwrite, sq_out, *_split(sq_weight),
                                norm_out, int(norm_slot), *_split(inv_scale), float(norm_type), norm_dtype)
        return acc

    def norm_partials(self, buckets, inv_scale: Scalar, norm_type: float, *, out=None) -> Tensor:
        return self._ops["norm_partials"](buckets, *_split(inv_scale), float(norm_type), out or [])

    def finalize(self, partials, inv_scale: Scalar, max_norm, norm_type: float, eps: float) -> Tensor:
        return self._ops["finalize"](partials, *_split(inv_scale), None if max_norm is None else float(max_norm),
                                     float(norm_type), float(eps))

    def apply(self, buckets, stats, out, skip_if_nonfinite: bool) -> None:
        self._ops["apply"](buckets, stats, out or [], bool(skip_if_nonfinite))


_EAGER = {"accumulate": accumulate, "norm_partials": norm_partials, "finalize": finalize, "apply": apply}


def operators(compiled_triton: bool, module) -> Operators:
    """The operators for ``module`` (what ``_backend.implementation`` returned):
    ``compiled_triton`` selects the ``triton_op`` registrations."""
    return Operators(_triton_ops() if compiled_triton else _EAGER, module)


if torch.cuda.is_available():
    try:
        _triton_ops()
    except RuntimeError:
        pass  # triton missing: the first call on CUDA raises _backend's message, which says what to do
