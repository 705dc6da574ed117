"""Every backend's kernels through one contract (the interface of brainkern/kernels/__init__.py).

Each backend available here runs on its own device (Triton: the GPU when there is one, else the
CPU through its interpreter). Oracle: torch in float64, relative-norm error within the per-dtype
table (helpers.TOLERANCE), relative to the magnitude rounding scales with. Outputs start as NaN,
so an element a kernel forgets fails; NaN and infinities in the inputs must come out where
torch's come out. Sizes straddle the tiles: numba/native 6 x 16 and 12 x 32 register tiles,
Triton's 64 x 64 x 32 interpreter tile, the CPU k block (256). Shapes stay small, for the
interpreter. What only one backend has (ISAs, thread splits, autotune configs, ahead-of-time
compilation) stays in its own test file.

This module holds the linear family; tests/test_kernel_contract_conv.py and
tests/test_kernel_contract_pool.py hold conv and pooling, on the same tools (tests/contract.py):
``backends_for(family)`` lists every backend and skips one only while it has no module for
that family, so a new backend's kernels join every contract as its modules land.
"""

import ast
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from contract import (
    ACT_IDS,
    ACTIVATIONS,
    BACKWARD_ACT_IDS,
    BACKWARD_ACTIVATIONS,
    GELU_TANH,
    backend_dtypes_for,
    backends_for,
    check,
    check_linear_forward,
    derivative_scale,
    kernels,
    linear_backward_of,
    linear_reference,
    linear_scale,
    output_scale,
    randn,
    run_linear_forward,
    saved_for,
)

from brainkern.activations import NONE
from helpers import poisoned

LINEAR = backends_for("linear")
OTHER_DTYPES = backend_dtypes_for("linear", (torch.float64, torch.float16, torch.bfloat16))
# (M, K, N): one element; odd; numba/native full register tiles (12 x 32 and 6 x 16: bias
# without activation or pre then skips the scratch tile); one past them; Triton's full 64-wide
# tile and one past (2 x 2 programs, a K tail); K past the CPU k block (257 = 129 + 128).
LINEAR_SHAPES = [(1, 1, 1), (7, 13, 5), (24, 20, 64), (25, 31, 65), (64, 40, 64), (65, 33, 66),
                 (13, 257, 20)]
INF, NAN = float("inf"), float("nan")


def linear_operands(backend, m, k, n, dtype=torch.float32, bias=True):
    return (randn(m, k, backend=backend, dtype=dtype), randn(n, k, backend=backend, dtype=dtype),
            randn(n, backend=backend, dtype=dtype) if bias else None)


@pytest.mark.parametrize("with_pre", [True, False], ids=["pre", "no_pre"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", LINEAR)
def test_linear_forward(backend, act, with_bias, with_pre):
    kern = kernels(backend, "linear")
    for m, k, n in LINEAR_SHAPES:
        check_linear_forward(kern, *linear_operands(backend, m, k, n, bias=with_bias), act,
                             with_pre)


@pytest.mark.parametrize("backend,dtype", OTHER_DTYPES)
def test_linear_forward_dtypes(backend, dtype):
    kern = kernels(backend, "linear")
    for m, k, n in [(7, 13, 5), (25, 31, 65)]:
        check_linear_forward(kern, *linear_operands(backend, m, k, n, dtype), GELU_TANH)


@pytest.mark.parametrize("backend", LINEAR)
def test_linear_forward_any_strides(backend):
    """Transposed, sliced (gaps in both dimensions) and broadcast (stride 0) a and weight."""
    kern = kernels(backend, "linear")
    m, k, n = 37, 45, 29
    r = lambda *s: randn(*s, backend=backend)  # noqa: E731
    a_views = [r(k, m).t(), r(2 * m, 3 * k + 1)[::2, 1::3], r(1, k).expand(m, k)]
    w_views = [r(k, n).t(), r(n + 3, 2 * k)[3:, ::2], r(n, 1).expand(n, k)]
    for a in a_views:
        for weight in w_views:
            check_linear_forward(kern, a, weight, r(n), ACTIVATIONS[6])
    check_linear_forward(kern, r(m, k), r(n, k), r(2 * n)[::2].contiguous(), ACTIVATIONS[4])


@pytest.mark.parametrize("backend", LINEAR)
def test_linear_forward_zero_sizes(backend):
    """M or N = 0 writes nothing; K = 0 gives act(bias), or act(0) without bias."""
    kern = kernels(backend, "linear")
    sigmoid = ACTIVATIONS[4]
    for m, k, n in [(0, 5, 3), (4, 5, 0), (0, 0, 0), (9, 0, 20), (1, 0, 1)]:
        for bias in (True, False):
            a, weight, b = linear_operands(backend, m, k, n, bias=bias)
            out, pre = run_linear_forward(kern, a, weight, b, sigmoid)
            assert out.shape == pre.shape == (m, n)
            z, ref = linear_reference(a, weight, b, sigmoid)
            check(out, ref, a.dtype, "out")
            check(pre, z, a.dtype, "pre")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", LINEAR)
def test_linear_forward_nan_and_inf_inputs(backend, act, dtype):
    """NaN and +-inf in a, weight and bias reach out and pre where torch's reach them (torch's
    relu keeps NaN; gelu and silu of -inf are NaN). The torch backend is compared with torch
    in its own dtype: its float32 gelu(+inf) is NaN, torch's float64 gelu(+inf) is inf."""
    kern = kernels(backend, "linear")
    m, k, n = 25, 31, 65
    a, weight, bias = linear_operands(backend, m, k, n, dtype)
    a[3, 7], a[5, 2], a[6, 0] = NAN, INF, -INF
    weight[11, 25], weight[40, 3] = NAN, -INF
    bias[17], bias[30] = INF, NAN
    out, pre = run_linear_forward(kern, a, weight, bias, act)
    z, ref = linear_reference(a, weight, bias, act)
    if backend == "torch":
        ref = act.forward(z.to(dtype)).double()
    scale = linear_scale(a, weight, bias)
    check(pre, z, dtype, "pre", scale)
    check(out, ref, dtype, f"out ({act.name})", output_scale(act, z, ref, scale))


def check_activation_backward(kern, grad_out, saved, act, with_bias=True):
    """The kernel on poisoned outputs against ``grad_out * act'(saved)`` in float64."""
    m, n = saved.shape
    grad_pre = poisoned(m, n, dtype=saved.dtype, device=saved.device)
    grad_bias = poisoned(n, dtype=saved.dtype, device=saved.device) if with_bias else None
    kern.activation_backward(grad_out, saved, grad_pre, grad_bias, act.code, act.param,
                             act.saves_output)
    ref = grad_out.double().cpu() * act.derivative(saved.double().cpu())
    scale = derivative_scale(act, grad_out, saved)
    check(grad_pre, ref, saved.dtype, f"grad_pre ({act.name} {act.param})", scale)
    if with_bias:  # rounding is relative to the sum of magnitudes, not to a cancelled sum
        check(grad_bias, ref.sum(0), saved.dtype, "grad_bias", scale.sum(0))
    return grad_pre, grad_bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("act", BACKWARD_ACTIVATIONS, ids=BACKWARD_ACT_IDS)
@pytest.mark.parametrize("backend", LINEAR)
def test_activation_backward(backend, act, with_bias):
    """grad_out contiguous, transposed, every other column, and broadcast along either axis
    (an expanded gradient, as sum()'s backward gives); shapes around 32 x 64 blocks."""
    kern = kernels(backend, "linear")
    for m, n in [(1, 1), (7, 5), (33, 70), (100, 129)]:
        r = lambda *s: randn(*s, backend=backend)  # noqa: E731
        saved = saved_for(act, 2 * r(m, n))
        for grad in (r(m, n), r(n, m).t(), r(m, 2 * n)[:, ::2], r(1, n).expand(m, n),
                     r(m, 1).expand(m, n)):
            check_activation_backward(kern, grad, saved, act, with_bias)


@pytest.mark.parametrize("backend,dtype", OTHER_DTYPES)
def test_activation_backward_dtypes(backend, dtype):
    kern = kernels(backend, "linear")
    for act in (ACTIVATIONS[3], ACTIVATIONS[6]):
        saved = saved_for(act, 2 * randn(50, 70, backend=backend, dtype=dtype))
        check_activation_backward(kern, randn(70, 50, backend=backend, dtype=dtype).t(), saved,
                                  act)


@pytest.mark.parametrize("act", BACKWARD_ACTIVATIONS, ids=BACKWARD_ACT_IDS)
@pytest.mark.parametrize("backend", LINEAR)
def test_activation_backward_nan_and_inf(backend, act):
    """NaN in grad_out or saved, and +-inf in grad_out, give what grad_out * act'(saved) gives
    in float64 (a NaN times relu's 0 is NaN)."""
    kern = kernels(backend, "linear")
    m, n = 33, 70
    saved = saved_for(act, 2 * randn(m, n, backend=backend))
    grad = randn(m, n, backend=backend)
    grad[1, 3], grad[2, 5], grad[4, 6] = NAN, INF, -INF
    saved[7, 8] = NAN
    check_activation_backward(kern, grad, saved, act)


@pytest.mark.parametrize("backend", LINEAR)
def test_activation_backward_empty(backend):
    """M = 0: grad_bias is a sum of nothing, zeros; N = 0 writes nothing."""
    kern = kernels(backend, "linear")
    relu = ACTIVATIONS[1]
    for m, n in [(0, 6), (0, 0), (4, 0)]:
        grad_pre, grad_bias = check_activation_backward(
            kern, randn(m, n, backend=backend), randn(m, n, backend=backend).relu(), relu)
        assert grad_pre.shape == (m, n) and torch.equal(grad_bias.cpu(), torch.zeros(n))


def check_linear_backward(kern, grad_out, x, weight, act, wants=(True, True, True)):
    """linear_backward (fused, or composed from the two required kernels) on poisoned outputs
    against float64 torch, from the saved tensor the kernel saw."""
    (m, k), n = x.shape, weight.shape[0]
    bias = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    z = x.double().cpu() @ weight.double().cpu().t() + bias
    saved = None if act.code == NONE else saved_for(act, z).to(x.dtype).to(x.device)
    outs = [poisoned(*shape, dtype=x.dtype, device=x.device) if want else None
            for want, shape in zip(wants, ((m, k), (n, k), (n,)))]
    linear_backward_of(kern)(grad_out, x, weight, saved, *outs, act.code, act.param,
                             act.saves_output)
    g = grad_out.double().cpu()
    dz = g if saved is None else g * act.derivative(saved.double().cpu())
    dz_abs = g.abs() if saved is None else derivative_scale(act, g, saved)
    x64, w64 = x.double().cpu(), weight.double().cpu()
    refs = (dz @ w64, dz.t() @ x64, dz.sum(0))
    scales = (dz_abs @ w64.abs(), dz_abs.t() @ x64.abs(), dz_abs.sum(0))
    for name, out, ref, scale in zip(("grad_x", "grad_w", "grad_bias"), outs, refs, scales):
        if out is not None:
            check(out, ref, x.dtype, f"{name} ({act.name} {act.param})", scale)
    return outs


@pytest.mark.parametrize("act", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("backend", LINEAR)
def test_linear_backward(backend, act):
    """Odd shapes; grad_out contiguous, transposed and broadcast; strided x and weight."""
    kern = kernels(backend, "linear")
    r = lambda *s: randn(*s, backend=backend)  # noqa: E731
    for m, k, n in [(1, 1, 1), (7, 13, 5), (25, 33, 65)]:
        x, weight = r(m, k), r(n, k)
        for grad in (r(m, n), r(n, m).t(), r(1, n).expand(m, n)):
            check_linear_backward(kern, grad, x, weight, act)
        check_linear_backward(kern, r(m, n), r(k, m).t(), r(k, 2 * n)[:, ::2].t(), act)


@pytest.mark.parametrize("backend", LINEAR)
def test_linear_backward_partial_and_empty(backend):
    """Only some gradients wanted (the others untouched: None); zero-size M, N, K."""
    kern = kernels(backend, "linear")
    r = lambda *s: randn(*s, backend=backend)  # noqa: E731
    x, weight, grad = r(33, 20), r(9, 20), r(33, 9)
    for wants in [(True, False, False), (False, True, False), (False, False, True),
                  (False, False, False)]:
        for act in (ACTIVATIONS[0], ACTIVATIONS[5]):
            check_linear_backward(kern, grad, x, weight, act, wants)
    for m, k, n in [(0, 5, 7), (5, 0, 7), (5, 7, 0), (0, 0, 0)]:
        _, grad_w, grad_b = check_linear_backward(kern, r(m, n), r(m, k), r(n, k), ACTIVATIONS[1])
        if m == 0:  # sums over no rows
            assert not grad_w.cpu().any() and not grad_b.cpu().any()


# Contract checks survive python -O -------------------------------------------------------------

def test_no_assert_statements_in_the_package():
    """An ``assert`` vanishes under python -O; a check a kernel or op relies on must raise."""
    package = Path(__file__).resolve().parents[1] / "brainkern"
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not found, f"assert statements: {found}"


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_mismatched_saved_tensor_raises(backend):
    """The backends that check which tensor was saved raise ValueError, under -O too."""
    kern = kernels(backend, "linear")
    grad = torch.randn(4, 5)
    with pytest.raises(ValueError, match="saved_is_output"):
        kern.activation_backward(grad, grad, torch.empty(4, 5), None, ACTIVATIONS[6].code, 0.0,
                                 True)


# Forked children --------------------------------------------------------------------------------

CPU_OPENMP_BACKENDS = [b for b in ("native", "numba") if b in
                       [p.values[0] for p in LINEAR]]
_FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing, sys
    import numpy as np
    import torch
    from brainkern import backends
    parent_user, children = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(2)
    a, w = torch.randn(300, 200), torch.randn(250, 200)
    expected = (a.double() @ w.double().t()).numpy()
    # Loaded, as in any process that ran a brainkern layer, but only parent_user runs a team:
    # (a fork before brainkern's CPU kernels are first imported is not seen, see _openmp.py).
    for name in children:
        backends.kernels(name, "linear")
    if parent_user == "torch":
        torch.randn(1000, 1000).exp_().sum()  # torch's own OpenMP team
    else:
        backends.kernels(parent_user, "linear").linear_forward(a, w, None, torch.empty(300, 250),
                                                               None, 0, 0.0)

    def child(name):
        # Only brainkern kernels and numpy here: torch's own parallel ops hang in such a child.
        kern = backends.kernels(name, "linear")
        out, grad_pre = torch.empty(300, 250), torch.empty(300, 250)
        kern.linear_forward(a, w, None, out, None, 1, 0.0)
        kern.activation_backward(out, out, grad_pre, torch.empty(250), 1, 0.0, True)
        ok = np.allclose(out.numpy(), np.maximum(expected, 0), rtol=1e-4, atol=1e-3)
        sys.exit(0 if ok else 3)

    ctx = multiprocessing.get_context("fork")
    for name in children:
        process = ctx.Process(target=child, args=(name,))
        process.start()
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            sys.exit(f"the child running {name} after the parent ran {parent_user} hung")
        if process.exitcode != 0:
            sys.exit(f"the child running {name} exited with {process.exitcode}")
    print("ok")
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
@pytest.mark.parametrize("parent_user", ["torch", *CPU_OPENMP_BACKENDS])
def test_forked_child_runs_after_any_openmp_user(parent_user):
    """All OpenMP users share torch's libgomp, whose workers do not survive fork: after the
    parent ran a team of any of them, a forked child must run every CPU backend's kernels
    (serially), not hang. A fresh parent process per case, so the history is exactly that."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, parent_user,
                           *CPU_OPENMP_BACKENDS], capture_output=True, text=True, timeout=300,
                          cwd=repo, env=env)
    assert done.returncode == 0 and "ok" in done.stdout, (done.stdout + done.stderr)[-3000:]


def test_forked_child_thread_decision():
    """A child of a multi-threaded parent runs serially, and so do its own children."""
    from brainkern.kernels import _openmp

    torch.randn(1000, 1000).exp_()  # the parent has OpenMP workers now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_report_serial, args=(queue, 2))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=10) == [True, True]
    assert not _openmp.forked_serial()


def _report_serial(queue, depth, seen=()):
    from brainkern.kernels import _openmp

    seen = [*seen, _openmp.forked_serial()]
    if depth == 1:
        queue.put(seen)
        return
    grandchild = multiprocessing.get_context("fork").Process(target=_report_serial,
                                                             args=(queue, depth - 1, seen))
    grandchild.start()
    grandchild.join(timeout=60)
