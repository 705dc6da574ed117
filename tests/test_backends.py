"""Backend selection: the registry, defaults per device, use_backend and BRAINKERN_BACKEND."""

import pytest
import torch

import brainkern
import brainkern.functional as BF
from brainkern import backends


def test_available_backends_names_what_runs_here():
    names = brainkern.available_backends()
    # `make test` builds the native core, so a missing one is a failure here, not a skip.
    assert {"native", "numba", "torch"} <= set(names)
    assert set(names) <= set(backends.BACKENDS)


def test_default_cpu_backend_is_fastest_built():
    expected = "native" if "native" in brainkern.available_backends() else "numba"
    assert backends.select("linear", torch.device("cpu"), torch.float32) == expected
    # No CPU kernel serves the half types: the default falls back to torch's own ops.
    assert backends.select("linear", torch.device("cpu"), torch.bfloat16) == "torch"


def test_default_cuda_backend_is_triton():
    assert backends.select("linear", torch.device("cuda"), torch.float16) in ("triton", "torch")


def test_use_backend_nests_and_restores():
    assert backends.requested_backend() is None
    with brainkern.use_backend("numba"):
        assert backends.select("linear", torch.device("cpu"), torch.float32) == "numba"
        with brainkern.use_backend("torch"):
            assert backends.select("linear", torch.device("cpu"), torch.float32) == "torch"
        assert backends.requested_backend() == "numba"
    assert backends.requested_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("BRAINKERN_BACKEND", "torch")
    assert backends.select("linear", torch.device("cpu"), torch.float32) == "torch"
    with brainkern.use_backend("numba"):  # the context manager wins over the environment
        assert backends.select("linear", torch.device("cpu"), torch.float32) == "numba"
    monkeypatch.setenv("BRAINKERN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="BRAINKERN_BACKEND: unknown backend 'cudnn'"):
        BF.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"use_backend\(name\): unknown backend 'gpu'"):
        with brainkern.use_backend("gpu"):
            pass


def test_backend_that_cannot_serve_the_device_is_an_error(monkeypatch):
    from brainkern.kernels.numba import linear as numba_linear

    # As if numba's linear kernels ran on CUDA only; the memoised choices would hide that.
    monkeypatch.setattr(numba_linear, "DEVICES", ("cuda",))
    monkeypatch.setattr(backends, "_selected", {})
    with brainkern.use_backend("numba"), pytest.raises(RuntimeError, match="run on cuda tensors, not cpu"):
        BF.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_meta_tensors_need_no_backend():
    """No kernel runs on meta tensors (the registered op's fake implementation gives shapes),
    so any requested backend serves them, as torch.nn.Linear does."""
    x, w = torch.randn(2, 3, device="meta"), torch.randn(4, 3, device="meta")
    for name in ("numba", "native", "torch"):
        with brainkern.use_backend(name):
            assert BF.linear(x, w, activation="gelu").shape == (2, 4)


def test_backend_that_cannot_serve_the_dtype_is_an_error():
    x, w = torch.randn(2, 3, dtype=torch.float16), torch.randn(4, 3, dtype=torch.float16)
    with brainkern.use_backend("numba"), pytest.raises(RuntimeError, match="not float16"):
        BF.linear(x, w)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with brainkern.use_backend("triton"), pytest.raises(RuntimeError, match="interpreter"):
        BF.linear(torch.randn(2, 3), torch.randn(4, 3))


@pytest.mark.parametrize("backend", ["native", "numba"])
def test_kernels_leave_torch_thread_count_alone(backend):
    before = torch.get_num_threads()
    with brainkern.use_backend(backend):
        BF.linear(torch.randn(64, 64), torch.randn(32, 64), activation="relu").sum()
    assert torch.get_num_threads() == before


def test_choice_follows_each_call(monkeypatch):
    """The ops memoise the kernels chosen (backends.kernels_for), but each call still follows
    use_backend and BRAINKERN_BACKEND as they are at that moment."""
    from brainkern.kernels.numba import linear as numba_linear
    from brainkern.kernels.reference import linear as reference

    ran = []
    for name, module in (("numba", numba_linear), ("torch", reference)):
        original = module.linear_forward

        def spy(*args, _name=name, _original=original, **kwargs):
            ran.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "linear_forward", spy)
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    BF.linear(x, w)  # the default (native) is memoised
    with brainkern.use_backend("numba"):
        BF.linear(x, w)
    monkeypatch.setenv("BRAINKERN_BACKEND", "torch")
    BF.linear(x, w)
    monkeypatch.delenv("BRAINKERN_BACKEND")
    BF.linear(x, w)
    assert ran == ["numba", "torch"]
