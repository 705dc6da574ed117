"""The Numba backend's linear kernels, called directly with the plain kernel arguments.

Oracle: torch in float64 (DESIGN.md section 4), relative-norm error within the per-dtype table.
Forward errors are taken relative to |a| @ |b| + |bias| (helpers.matmul_magnitude), the
magnitude GEMM rounding scales with, so a product that cancels to ~0 does not fail a correct kernel.
Outputs start as NaN so an element a kernel forgets to write fails. Sizes straddle the register
tile (6 x 16 / 12 x 32), the k block (256) and the parallel thresholds.
"""

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from brainkern import activations as acts
from brainkern.activations import Activation
from brainkern.kernels.numba import _runtime
from brainkern.kernels.numba import linear as kern
from helpers import assert_close, matmul_magnitude, poisoned

ACTIVATIONS = [
    Activation("none", acts.NONE),
    Activation("relu", acts.RELU),
    Activation("leaky_relu", acts.LEAKY_RELU, 0.01),
    Activation("leaky_relu", acts.LEAKY_RELU, -0.2),  # negative slope: backward keeps z
    Activation("sigmoid", acts.SIGMOID),
    Activation("tanh", acts.TANH),
    Activation("gelu", acts.GELU),
    Activation("gelu_tanh", acts.GELU_TANH),
    Activation("silu", acts.SILU),
]
SHAPES = [(1, 1, 1), (7, 13, 5), (127, 33, 17), (257, 40, 129), (37, 600, 45), (130, 257, 127)]
DTYPES = [torch.float32, torch.float64]


def act_id(act):
    return f"{act.name}({act.param})" if act.code == acts.LEAKY_RELU else act.name


def forward(a, b, bias, act, with_pre=True):
    """Run the kernel into NaN-filled outputs; returns (out, pre)."""
    m, n = a.shape[0], b.shape[1]
    out = poisoned(m, n, dtype=a.dtype)
    pre = poisoned(m, n, dtype=a.dtype) if with_pre else None
    kern.linear_forward(a, b.t(), bias, out, pre, act.code, act.param)
    return out, pre


def check_forward(a, b, bias, act, with_pre=True):
    out, pre = forward(a, b, bias, act, with_pre)
    z = a.double() @ b.double()
    if bias is not None:
        z = z + bias.double()
    scale = matmul_magnitude(a, b, bias)
    assert_close(out, act.forward(z), a.dtype, what=f"out {act_id(act)}", scale=scale)
    if with_pre:
        assert_close(pre, z, a.dtype, what="pre", scale=scale)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=act_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_every_activation(act, dtype):
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        check_forward(a, b, torch.randn(n, dtype=dtype), act)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_without_bias_or_pre(dtype):
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        check_forward(a, b, None, ACTIVATIONS[1], with_pre=False)
        check_forward(a, b, None, ACTIVATIONS[0], with_pre=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_any_strides(dtype):
    m, k, n = 127, 300, 33
    a_t = torch.randn(k, m, dtype=dtype).t()  # transposed: strides (1, m)
    b_t = torch.randn(n, k, dtype=dtype).t()  # a Linear weight as stored: strides (1, k)
    a_sliced = torch.randn(2 * m, 3 * k + 1, dtype=dtype)[::2, 1::3]  # gaps in both dims
    b_sliced = torch.randn(k + 5, 2 * n, dtype=dtype)[5:, ::2]
    b_broadcast = torch.randn(k, 1, dtype=dtype).expand(k, n)  # stride 0
    bias = torch.randn(n, dtype=dtype)
    gelu = ACTIVATIONS[6]
    for a in (a_t, a_sliced, torch.randn(m, k, dtype=dtype)):
        for b in (b_t, b_sliced, b_broadcast):
            check_forward(a, b, bias, gelu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_zero_sizes(dtype):
    sigmoid = ACTIVATIONS[4]
    for m, k, n in [(0, 5, 3), (4, 5, 0), (0, 0, 0)]:
        out, pre = forward(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype),
                           torch.randn(n, dtype=dtype), sigmoid)
        assert out.shape == pre.shape == (m, n)
    m, n = 9, 20  # K = 0: an empty sum, so act(bias) in every row, or act(0) without bias
    a, b = torch.randn(m, 0, dtype=dtype), torch.randn(0, n, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    out, pre = forward(a, b, bias, sigmoid)
    assert torch.equal(pre, bias.expand(m, n))
    assert_close(out, torch.sigmoid(bias.double()).expand(m, n), dtype)
    out, pre = forward(a, b, None, sigmoid)
    assert torch.equal(pre, torch.zeros(m, n, dtype=dtype))
    assert torch.equal(out, torch.full((m, n), 0.5, dtype=dtype))


def derivative(act, saved):
    """act' in float64. Activation.derivative's leaky_relu builds its slope as a float32 scalar
    (torch.where with Python floats), 3e-10 off in float64; so that one is computed here."""
    if act.code == acts.LEAKY_RELU:
        return torch.where(saved > 0, 1.0, torch.tensor(act.param, dtype=torch.float64))
    return act.derivative(saved)


def check_backward(act, m, n, dtype, with_bias=True):
    z = 2 * torch.randn(m, n, dtype=torch.float64)
    saved = (act.forward(z) if act.saves_output else z).to(dtype).contiguous()
    grad_out = torch.randn(n, m, dtype=dtype).t()  # any strides
    grad_pre = poisoned(m, n, dtype=dtype)
    grad_bias = poisoned(n, dtype=dtype) if with_bias else None
    kern.activation_backward(grad_out, saved, grad_pre, grad_bias, act.code, act.param,
                             act.saves_output)
    ref = grad_out.double() * derivative(act, saved.double())
    assert_close(grad_pre, ref, dtype, what=f"grad_pre {act_id(act)}")
    if with_bias:
        assert_close(grad_bias, ref.sum(0), dtype, what="grad_bias")
    return grad_pre, grad_bias


@pytest.mark.parametrize("act", ACTIVATIONS[1:], ids=act_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_backward(act, dtype):
    for m, n in [(1, 1), (7, 5), (127, 17), (257, 129), (1000, 40)]:
        check_backward(act, m, n, dtype)
    check_backward(act, 300, 130, dtype, with_bias=False)


def test_activation_backward_zero_rows():
    grad_bias = poisoned(4)
    relu = ACTIVATIONS[1]
    kern.activation_backward(torch.randn(0, 4), torch.randn(0, 4), torch.empty(0, 4), grad_bias,
                             relu.code, relu.param, True)
    assert torch.equal(grad_bias, torch.zeros(4))


def test_bias_gradient_does_not_depend_on_thread_count():
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            results.append(check_backward(ACTIVATIONS[7], 1000, 300, torch.float32))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_torch_thread_count_is_left_alone():
    """numba#9387: starting Numba's pool must not change torch's thread count. A fresh process,
    so the pool really starts here."""
    script = textwrap.dedent("""
        import torch
        from brainkern.kernels.numba import linear as kern
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            out = torch.empty(256, 256)
            kern.linear_forward(a, b.t(), None, out, None, 0, 0.0)
            assert torch.get_num_threads() == threads, (threads, torch.get_num_threads())
            assert torch.allclose(out, a @ b, atol=1e-4)
        print("ok")
    """)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=repo, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def _fork_child(a, b, bias, expected, queue):
    """In the forked child: matmul and backward must run (serially) and be right.

    Only numpy makes and checks data here: torch's own parallel ops (even ones_like on 45k
    elements) hang in a child forked after the parent used its OpenMP pool; DataLoader workers
    avoid that by running torch on one thread.
    """
    try:
        out = torch.empty(expected.shape)
        kern.linear_forward(a, b.t(), bias, out, None, acts.TANH, 0.0)
        diff = out.numpy().astype("float64") - expected.numpy()
        err = float(np.linalg.norm(diff) / np.linalg.norm(expected.numpy()))
        grad_pre = torch.empty(expected.shape)
        grad_out = torch.from_numpy(np.ones(tuple(expected.shape), dtype=np.float32))
        kern.activation_backward(grad_out, out, grad_pre, torch.empty(b.shape[1]), acts.TANH, 0.0,
                                 True)
        ok = bool(np.isfinite(grad_pre.numpy()).all())
        queue.put((err, _runtime.threads(), torch.get_num_threads(), ok))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(repr(exc))


def test_forked_child_runs_kernels():
    """The omp layer kills a forked child at its first parallel region once the parent's pool
    has started (DataLoader workers fork). brainkern's kernels must run there, serially."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b, bias = torch.randn(300, 200), torch.randn(200, 150), torch.randn(150)
        expected = torch.tanh(a.double() @ b.double() + bias.double())
        forward(a, b, bias, ACTIVATIONS[5])  # the parent goes parallel first
        from numba.np.ufunc import parallel

        assert parallel._is_initialized, "the parent should have started Numba's pool"
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_fork_child, args=(a, b, bias, expected, queue))
        child.start()
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0, f"forked child died with exit code {child.exitcode}"
        result = queue.get(timeout=10)
    finally:
        torch.set_num_threads(threads_before)
    assert isinstance(result, tuple), result
    err, kernel_threads, torch_threads, finite = result
    assert err < 1e-5 and finite
    assert kernel_threads == 1 and torch_threads == 2  # serial because forked, not because told
