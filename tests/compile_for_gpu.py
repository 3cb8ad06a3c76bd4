"""Compile every kernel variant for Hopper (sm_90) without a GPU; run as a script.

The interpreter runs the kernels' Python, not Triton's compiler: code it accepts can still
fail to compile (types that do not unify, an op with no lowering). This builds each variant
to a cubin with the ptxas that ships in the triton wheel. It must run in a process without
TRITON_INTERPRET=1: under the interpreter even triton's own @jit helpers (tl.zeros, tl.sum)
are interpreted functions and cannot be compiled. Prints one line per variant and exits 1
if any failed.
"""

import multiprocessing
import os
import re
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fusedaccum.kernels import accumulate as acc_mod  # noqa: E402
from fusedaccum.kernels import unscale_clip as uc  # noqa: E402
from fusedaccum.kernels._launch import BLOCK, NUM_WARPS  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
KINDS = [uc.NORM_INF, uc.NORM_L1, uc.NORM_L2, uc.NORM_P]


def accumulate_variant(g, n, from_ptr, overwrite, zero, sq, sq_from_ptr, norm=None):
    """accumulate_kernel's signature and constants; ``norm``: (NORM_KIND, INV_FROM_PTR), or None (no norm)."""
    kind, inv_from_ptr = norm or (uc.NORM_L2, False)
    return (acc_mod.accumulate_kernel,
            {"acc_ptr": "*fp32", "grad_ptr": PTR[g], "scale_ptr": "*fp32", "scale_value": "fp32",
             "n": n, "tiles_per_program": "i32", "sq_ptr": "*fp32", "sq_weight_ptr": "*fp32",
             "sq_weight_value": "fp32", "norm_ptr": "*fp32", "norm_slot": "i32", "norm_stride": "i32",
             "inv_ptr": "*fp32", "inv_value": "fp32", "p": "fp32", "limit": "fp32"},
            {"SCALE_FROM_PTR": from_ptr, "OVERWRITE": overwrite, "ZERO_GRAD": zero, "BLOCK": BLOCK, "SQ": sq,
             "SQ_WEIGHT_FROM_PTR": sq_from_ptr, "NORM": norm is not None, "INV_FROM_PTR": inv_from_ptr,
             "NORM_KIND": kind},
            NUM_WARPS)


def variants():
    for g in PTR:
        for from_ptr in (False, True):
            for overwrite, zero in ((False, False), (True, True), (False, True)):
                for n in ("i32", "i64"):
                    # Σ grad² partials (signals): off, on with a float weight, on with a tensor weight.
                    for sq, sq_from_ptr in ((False, False),) + (((True, False), (True, True))
                                                                 if n == "i64" and not from_ptr else ()):
                        yield accumulate_variant(g, n, from_ptr, overwrite, zero, sq, sq_from_ptr)
    # The norm partials of the sum in the window's last pass (landing buckets: bf16/fp16 grads,
    # zero_grad; overwrite when K = 1): every norm kind, the inverse scale from a pointer and as a
    # value, with the Σ grad² partials too (each choice once: the compile time adds up).
    for overwrite in (False, True):
        for kind in KINDS:
            yield accumulate_variant("bf16", "i64", False, overwrite, True, False, False, (kind, overwrite))
    yield accumulate_variant("fp16", "i64", False, False, True, True, True, (uc.NORM_L2, True))
    for x in PTR:
        for kind in KINDS:
            for from_ptr in (False, True):
                yield (uc.norm_partials_kernel,
                       {"x_ptr": PTR[x], "inv_ptr": "*fp32", "inv_value": "fp32", "partials_ptr": "*fp32",
                        "slot_base": "i32", "num_slots": "i32", "n": "i64", "tiles_per_program": "i32", "p": "fp32",
                        "limit": "fp32"},
                       {"INV_FROM_PTR": from_ptr, "NORM_KIND": kind, "BLOCK": BLOCK}, NUM_WARPS)
    for kind in KINDS:
        for has_max_norm in (False, True):
            for from_ptr in (False, True):
                yield (uc.finalize_kernel,
                       {"partials_ptr": "*fp32", "num_slots": "i32", "stats_ptr": "*fp32", "inv_ptr": "*fp32",
                        "inv_value": "fp32", "max_norm": "fp32", "eps": "fp32", "p": "fp32"},
                       {"INV_FROM_PTR": from_ptr, "NORM_KIND": kind, "HAS_MAX_NORM": has_max_norm,
                        "BLOCK": uc.FINALIZE_BLOCK}, 4)
    for src, dst in (("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16"), ("fp16", "fp16")):
        for skip in (False, True):
            for n in ("i32", "i64"):
                yield (uc.apply_kernel,
                       {"src_ptr": PTR[src], "dst_ptr": PTR[dst], "stats_ptr": "*fp32", "n": n, "tiles_per_program": "i32"},
                       {"SKIP_IF_NONFINITE": skip, "BLOCK": BLOCK}, NUM_WARPS)


def compile_variant(index: int) -> "tuple[bool, str]":
    """Compile the index-th variant: (whether it compiled as required, its line of output)."""
    kernel, signature, constexprs, num_warps = list(variants())[index]
    label = f"{kernel.__name__} {signature} {constexprs}"
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    # Pointers from the caching allocator are 16-byte aligned, and the launcher tells
    # Triton so; say the same here so the PTX shows what a real launch gets.
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=aligned),
                                  target=HOPPER, options={"num_warps": num_warps})
        assert len(compiled.asm["cubin"]) > 0, "empty cubin"
        if kernel is not uc.finalize_kernel:
            # The bandwidth claim rests on 16-byte accesses over the bucket's full tiles.
            assert re.search(r"ld\.global(\.\w+)*\.v4\.", compiled.asm["ptx"]), "no 16-byte vector loads"
        return True, f"ok     {label}"
    except Exception:
        return False, f"FAILED {label}\n{traceback.format_exc()}"


def main() -> int:
    total = len(list(variants()))
    # One process per core: each compile is single-threaded Python and LLVM (CI has 2 cores).
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        results = pool.map(compile_variant, range(total), chunksize=1)
    for _, line in results:
        print(line)
    failed = sum(not ok for ok, _ in results)
    print(f"compiled {total - failed} of {total} kernel variants for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
