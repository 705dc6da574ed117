"""pytest-benchmark suite for the linear family on the CPU.

Run: .venv/bin/python -m pytest benchmarks --benchmark-enable --benchmark-group-by=param:case
The side-by-side table with GFLOP/s and fraction of peak comes from `brainkern bench linear`.
"""

import contextlib

import pytest
import torch

import brainkern.functional as BF
import brainkern.nn as bnn
from brainkern import backends, bench

IMPLS = bench.cpu_backends() + ["torch"]


@pytest.fixture(autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [256, 512, 1024, 2048])
def test_square_gemm(benchmark, impl, case):
    a, b = torch.randn(case, case), torch.randn(case, case)
    benchmark.extra_info["gflop"] = 2 * case**3 / 1e9
    with backends.use_backend(impl):
        benchmark(BF.matmul, a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [64, 512])
def test_mlp_linear_relu_forward_backward(benchmark, impl, case):
    layer = bnn.Linear(784, 128, activation="relu")
    x = torch.randn(case, 784, requires_grad=True)
    benchmark.extra_info["gflop"] = 3 * 2 * case * 784 * 128 / 1e9

    def step():
        y = layer(x)
        y.backward(torch.ones_like(y))

    with backends.use_backend(impl):
        benchmark(step)


@pytest.mark.parametrize("impl", IMPLS + ["torch.compile"])
@pytest.mark.parametrize("case", [64, 512])
def test_mlp_linear_relu_compiled_forward_backward(benchmark, impl, case):
    """The layer under torch.compile (Inductor): brainkern's on each backend, whose registered
    op keeps the backend it was traced with (the warm-up call, inside use_backend), and
    torch.nn's as the baseline (impl "torch.compile")."""
    torch._dynamo.reset()
    if impl == "torch.compile":
        layer = torch.compile(torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU()))
        backend = contextlib.nullcontext()
    else:
        layer = torch.compile(bnn.Linear(784, 128, activation="relu"))
        backend = backends.use_backend(impl)
    x = torch.randn(case, 784, requires_grad=True)
    benchmark.extra_info["gflop"] = 3 * 2 * case * 784 * 128 / 1e9

    def step():
        y = layer(x)
        y.backward(torch.ones_like(y))

    with backend:
        step()  # compiles
        benchmark(step)
