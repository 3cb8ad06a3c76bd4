"""The fused ops' phases as torch.library custom ops (fusedaccum._library): opcheck on each
registered op in both CPU backends (the reference, the Triton interpreter), and
torch.compile(fullgraph=True) of a function calling accumulate_ and unscale_clip_ on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedaccum
from fusedaccum import _backend, _library, ops


def _opcheck(op, args):
    # All of opcheck's tests: schema (declared mutations), autograd registration, fake kernel, aot dispatch.
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", [torch.device("cpu")])
@pytest.mark.parametrize("scale", [0.5, "tensor"])
def test_opcheck_accumulate(backend, device, scale):
    torch.manual_seed(0)
    acc, grad = torch.randn(37), torch.randn(37).bfloat16()
    s = torch.tensor(0.5) if scale == "tensor" else None
    _opcheck(_library.accumulate, (acc, grad, s, 0.5, True, False, None, None, 1.0))
    sq = torch.zeros(ops.sq_slots(acc))
    _opcheck(_library.accumulate, (acc, grad, s, 0.5, False, True, sq, torch.tensor(2.0), 0.0))


@pytest.mark.parametrize("device", [torch.device("cpu")])
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.5])
def test_opcheck_unscale_clip_phases(backend, device, norm_type):
    torch.manual_seed(0)
    buckets = [torch.randn(50), torch.randn(20).bfloat16(), torch.randn(0)]
    out = [torch.empty(50).bfloat16(), torch.empty(20).bfloat16(), torch.empty(0)]
    inv = torch.tensor(0.25)
    _opcheck(_library.norm_partials, (buckets, inv, 0.0, norm_type, []))
    _opcheck(_library.norm_partials, (buckets, None, 0.25, norm_type, out))
    partials = _library.norm_partials(buckets, inv, 0.0, norm_type, [])
    # The fake kernel's slot count is the backend's (one slot per program).
    assert partials.shape == _library.norm_partials._abstract_fn(buckets, inv, 0.0, norm_type, []).shape
    _opcheck(_library.finalize, (partials, inv, 0.0, 1.0, norm_type, 1e-6))
    _opcheck(_library.finalize, (partials, None, 0.25, None, norm_type, 0.0))
    stats = _library.finalize(partials, inv, 0.0, 1.0, norm_type, 1e-6)
    _opcheck(_library.apply, (buckets, stats, [], True))
    _opcheck(_library.apply, (buckets, stats, out, False))


@pytest.mark.parametrize("device", [torch.device("cpu")])
def test_ops_match_the_module_they_wrap(backend, device):
    """Operators (what ops.py calls while tracing) gives the bits of the backend module itself."""
    torch.manual_seed(1)
    impl = _backend.implementation(device)
    wrapped = _library.operators(False, impl)
    acc, grad = torch.randn(300), torch.randn(300).half()
    a1, a2 = acc.clone(), acc.clone()
    impl.accumulate_(a1, grad, torch.tensor(0.3), zero_grad=False, overwrite=False)
    assert wrapped.accumulate_(a2, grad, torch.tensor(0.3), zero_grad=False, overwrite=False) is a2
    assert torch.equal(a1, a2)
    b1 = [torch.randn(100) * 1e3, torch.randn(30).bfloat16()]
    b2 = [b.clone() for b in b1]
    s1 = impl.finalize(impl.norm_partials(b1, 0.5, 2.0), 0.5, 1.0, 2.0, 1e-6)
    s2 = wrapped.finalize(wrapped.norm_partials(b2, 0.5, 2.0), 0.5, 1.0, 2.0, 1e-6)
    impl.apply(b1, s1, None, True)
    wrapped.apply(b2, s2, None, True)
    assert torch.equal(s1, s2) and all(torch.equal(x, y) for x, y in zip(b1, b2))


@pytest.mark.parametrize("device", [torch.device("cpu")])
def test_eager_calls_the_module_and_make_fx_records_the_op(backend, device):
    """Eagerly ops.py calls the backend module (no operator dispatch); under make_fx (a dispatch
    mode, no torch.compile) it calls the registered op, which runs the same kernel."""
    from torch.fx.experimental.proxy_tensor import make_fx

    assert _backend.operators(device) is _backend.implementation(device)
    acc, grad = torch.randn(40), torch.randn(40).bfloat16()
    want = acc + grad.float() * 0.5
    gm = make_fx(lambda a, g: fusedaccum.accumulate_(a, g, 0.5))(acc.clone(), grad)
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert [c for c in calls if not c.startswith("aten.view")] == ["fusedaccum.accumulate.default"]
    gm(acc, grad)
    assert torch.equal(acc, want)


def _step(acc, grad, landing, extra, scale):
    """A window's last micro-batch and its step, as a user's compiled function would call them:
    a Python number and a 0-d tensor as scales."""
    fusedaccum.accumulate_(acc, grad, 0.5, zero_grad=True)
    fusedaccum.accumulate_(extra, landing, scale)
    return fusedaccum.unscale_clip_([acc, extra], 0.5, max_norm=1.0)


def _inputs(n=300):
    torch.manual_seed(2)
    return [torch.randn(n), torch.randn(n).bfloat16(), torch.randn(70).half(), torch.randn(70), torch.tensor(0.25)]


@pytest.mark.parametrize("device", [torch.device("cpu")])
def test_compile_graph_holds_one_op_per_phase(backend, device):
    """fullgraph: no graph break; each call is one registered op (the interpreter's too)."""
    torch._dynamo.reset()
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    step = torch.compile(_step, fullgraph=True, backend=record)
    for size in (300, 9001):  # the second size recompiles with symbolic sizes (fake kernels on SymInts)
        compiled, eager = _inputs(size), _inputs(size)
        got, want = step(*compiled), _step(*eager)
        fused = [t for t in targets if t.startswith("fusedaccum.")]
        assert fused == ["fusedaccum.accumulate.default"] * 2 + [
            "fusedaccum.norm_partials.default", "fusedaccum.finalize.default", "fusedaccum.apply.default"]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
        targets.clear()


def test_compile_inductor_cpu_matches_eager():
    """Inductor on the CPU (the reference as the ops' kernel): the same bits as eager, the
    inputs mutated as eagerly, and a second call reuses the compiled graph."""
    torch._dynamo.reset()
    step = torch.compile(_step, fullgraph=True, backend="inductor", dynamic=False)
    for scale in (1.0, 1e30):  # the second window overflows: found_inf, buckets kept
        compiled, eager = _inputs(), _inputs()
        for x, y in zip(compiled, eager):
            x.mul_(scale), y.mul_(scale)
        got, want = step(*compiled), _step(*eager)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), (got, want)
        assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
    assert float(want[1]) == 1.0  # the overflow case was reached
    assert not compiled[1].any()  # zero_grad was applied through the compiled op


def test_triton_ops_trace_into_their_kernels():
    """The triton_op registrations (the CUDA path) decompose into their Triton launches under
    aot_autograd, on fake tensors: see trace_triton_ops.py (a process without the interpreter)."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("trace_triton_ops.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.rstrip().endswith("traced")
