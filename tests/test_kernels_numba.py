"""What only the Numba linear kernels have: the split into thread tasks, the k blocks, and how
they share threads with torch.

Everything every backend must do (activations, bias and pre combinations on full and edge
register tiles, strides, NaN and inf, zero sizes, float64, forked children) is in
tests/test_kernel_contract.py. Sizes here pass the parallel thresholds (2^18 multiply-adds,
2^15 backward elements) and the k block (256), which the contract's small shapes stay below.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from contract import ACTIVATIONS, check_linear_forward, saved_for

from brainkern.kernels.numba import linear as kern
from helpers import assert_close, poisoned


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_on_every_task_grid(dtype):
    """Tasks split rows, columns or both (on 2+ threads); k in one, two and three blocks."""
    for m, k, n in [(257, 40, 129), (37, 600, 45), (130, 257, 127), (6, 300, 700)]:
        a, weight = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for act in (ACTIVATIONS[0], ACTIVATIONS[7]):
            for bias in (torch.randn(n, dtype=dtype), None):
                check_linear_forward(kern, a, weight, bias, act, with_pre=bias is not None)


def check_backward(act, m, n, dtype):
    saved = saved_for(act, 2 * torch.randn(m, n, dtype=torch.float64)).to(dtype)
    grad_out = torch.randn(n, m, dtype=dtype).t()
    grad_pre, grad_bias = poisoned(m, n, dtype=dtype), poisoned(n, dtype=dtype)
    kern.activation_backward(grad_out, saved, grad_pre, grad_bias, act.code, act.param,
                             act.saves_output)
    ref = grad_out.double() * act.derivative(saved.double())
    assert_close(grad_pre, ref, dtype, what="grad_pre", scale=grad_out.double().abs())
    assert_close(grad_bias, ref.sum(0), dtype, what="grad_bias", scale=grad_out.double().abs().sum(0))
    return grad_pre, grad_bias


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
