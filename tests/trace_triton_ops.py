"""Trace the triton_op registrations (fusedaccum._library) on the CPU, without a GPU; run as
a script, without TRITON_INTERPRET=1 (under the interpreter wrap_triton cannot capture the
kernels). Fake tensors stand in for CUDA ones: aot_function functionalizes each op into its
Triton kernels (what inductor compiles), and the graph runs on fake tensors. Without a GPU,
torch cannot build the kernels' IR to see which pointers they write, so it assumes all (a
warning per kernel); on a GPU it reads them. Prints the launches; exits 1 on a failure."""

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"

import torch  # noqa: E402
from functorch.compile import aot_function  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from fusedaccum import _library  # noqa: E402

ops = _library._triton_ops()


def step(acc, grad, bucket, out, scale):
    ops["accumulate"](acc, grad, scale, 0.0, True, False, None, None, 1.0)
    partials = ops["norm_partials"]([acc, bucket], None, 0.5, 2.0, [])
    stats = ops["finalize"](partials, None, 0.5, 1.0, 2.0, 1e-6)
    ops["apply"]([acc, bucket], stats, [], True)
    p2 = ops["norm_partials"]([acc], scale, 0.0, float("inf"), [out])
    s2 = ops["finalize"](p2, scale, 0.0, None, float("inf"), 0.0)
    ops["apply"]([acc], s2, [out], False)
    return stats, s2


graphs = []


def record(gm, _):
    graphs.append(gm)
    return gm


with FakeTensorMode(allow_non_fake_inputs=False) as mode:
    args = (torch.empty(10000), torch.empty(10000, dtype=torch.bfloat16), torch.empty(5000, dtype=torch.float16),
            torch.empty(10000, dtype=torch.bfloat16), torch.empty(()))
    stats, s2 = aot_function(step, fw_compiler=record)(*args)
assert stats.shape == (4,) and s2.shape == (4,), (stats.shape, s2.shape)
code = graphs[0].code
kernels = [line.split("kernel_idx = ")[1].split(",")[0] for line in code.splitlines() if "kernel_idx = " in line]
names = [torch._higher_order_ops.triton_kernel_wrap.kernel_side_table.get_kernel(int(k)).fn.__name__ for k in kernels]
print("launches:", " ".join(names))
# accumulate; norm_partials x2 buckets, finalize, apply x2; norm_partials, finalize, apply
expected = (["accumulate_kernel"] + ["norm_partials_kernel"] * 2 + ["finalize_kernel"] + ["apply_kernel"] * 2
            + ["norm_partials_kernel", "finalize_kernel", "apply_kernel"])
if names != expected or "fusedaccum." in code:
    print(code)
    sys.exit(1)
print("traced")
