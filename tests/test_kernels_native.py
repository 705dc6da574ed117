"""brainkern._native and its adapter, brainkern/kernels/native/linear.py, at the kernel interface.

Oracle: torch in float64 (DESIGN.md section 4), error as a relative norm (see
assert_gemm_close for the norm). The float32 tolerance is helpers.TOLERANCE (1e-5) unscaled:
the kernel sums k in float32 in blocks of 256, so the error grows ~sqrt(k) * 6e-8, 2e-6 at the
largest k here.

What every backend must do (activations, bias and pre combinations, strides, NaN and inf, zero
sizes, float64 through Numba, forked children) is in tests/test_kernel_contract.py; this file
keeps what is native's own. Every test that computes runs on each ISA this CPU supports:
"portable" has the AVX-512 kernels' exact geometry (16 lanes, 12 x 32 tile), so their tiling is
tested even on a machine without AVX-512; "avx512" itself runs only where the CPU has it.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from brainkern import activations as A
from brainkern.kernels import native
from brainkern.kernels.native import linear as native_linear
from helpers import assert_close, matmul_magnitude, poisoned

ISAS = ["avx512", "avx2", "portable"]
ACTIVATIONS = [(A.NONE, 0.0), (A.RELU, 0.0), (A.LEAKY_RELU, 0.01), (A.LEAKY_RELU, -0.2),
               (A.SIGMOID, 0.0), (A.TANH, 0.0), (A.GELU, 0.0), (A.GELU_TANH, 0.0), (A.SILU, 0.0)]
SHAPES = [(1, 1, 1), (7, 5, 13), (127, 33, 17), (257, 129, 40), (13, 300, 7)]  # (M, K, N)


def built():
    """The tests need the extension: fail, never skip, when it is missing."""
    assert native.is_built(), f"brainkern._native is not built: {native.why_not_built()}"
    return native


def runs_here(isa):
    if isa not in built().supported_isas():
        pytest.skip(f"this CPU does not run {isa} (it runs {', '.join(native.supported_isas())})")
    return isa


def reference(a, b, bias, code, param):
    """(pre, out) in float64 torch."""
    z = a.double() @ b.double()
    if bias is not None:
        z = z + bias.double()
    return z, activation_reference(z, code, param)


def activation_reference(z, code, param):
    """act(z) in float64. GELU as 0.5 z erfc(-z / sqrt 2), the same function: torch's
    0.5 z (1 + erf(z / sqrt 2)) cancels for z << 0 even in float64 (-7 is 1e-5 off, -8 2%,
    from -9 on it gives 0), which fails an accurate kernel on a 1 x 1 output."""
    if code == A.GELU:
        return 0.5 * z * torch.special.erfc(-z * 0.7071067811865476)
    return A.Activation("", code, param).forward(z)


def run(a, b, bias, code=A.NONE, param=0.0, pre=True, **kwargs):
    """Calls the kernel on NaN-poisoned outputs, so an element it skips fails the check."""
    m, n = a.shape[0], b.shape[1]
    out = poisoned(m, n)
    pre_out = poisoned(m, n) if pre else None
    native_linear.linear_forward(a, b.t(), bias, out, pre_out, code, param, **kwargs)
    return pre_out, out


def assert_gemm_close(out, ref, a, b, bias, what):
    """float32 error relative to |a| @ |b| + |bias| (see helpers.matmul_magnitude)."""
    assert_close(out, ref, torch.float32, what=what, scale=matmul_magnitude(a, b, bias))


def check(a, b, bias, code=A.NONE, param=0.0, **kwargs):
    pre, out = run(a, b, bias, code, param, **kwargs)
    ref_pre, ref_out = reference(a, b, bias, code, param)
    if pre is not None:
        assert_gemm_close(pre, ref_pre, a, b, bias, "pre")
    assert_gemm_close(out, ref_out, a, b, bias, f"out (activation {code}, {param})")
    return out


def test_built_with_the_isas_this_cpu_has():
    isas = built().supported_isas()
    assert isas[-1] == "portable" and native.isa() in isas
    assert native.why_not_built() is None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])
        if flags:
            avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"} <= set(flags)
            assert ("avx512" in isas) == avx512
            assert ("avx2" in isas) == ({"avx2", "fma"} <= set(flags))
            assert native.isa() == isas[0] or "BRAINKERN_NATIVE_ISA" in os.environ


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("code,param", ACTIVATIONS)
def test_every_activation(isa, code, param):
    runs_here(isa)
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        check(a, b, torch.randn(n), code, param, isa=isa)
        check(a, b, None, code, param, isa=isa, pre=False)


@pytest.mark.parametrize("isa", ISAS)
def test_every_cache_block_edge(isa):
    """M > mc, K > 2 kc and N > nc (largest blocks: 144, 256, 4096), none a multiple of a tile."""
    runs_here(isa)
    a, b = torch.randn(150, 520), torch.randn(520, 4103)
    check(a, b, torch.randn(4103), A.SILU, isa=isa)
    check(a, torch.randn(4103, 520).t(), None, A.RELU, isa=isa)  # nn.Linear's weight layout


@pytest.mark.parametrize("isa", ISAS)
def test_a_read_in_place(isa):
    """A block of C a few micro-panels wide reads A in place, unpacked (gemm.inc), for A
    row-major and transposed: M past a cache block and ending in a partial row tile (packed),
    K past a k block, on 1 and 2 threads."""
    runs_here(isa)
    m, k, n = 157, 300, 21  # wider than the dot-product path takes (test_narrow_outputs)
    for a in (torch.randn(m, k), torch.randn(k, m).t()):
        for threads in (1, 2):
            check(a, torch.randn(n, k).t(), torch.randn(n), A.RELU, isa=isa, num_threads=threads)
            check(a, torch.randn(k, 70), None, A.NONE, isa=isa, num_threads=threads, pre=False)


@pytest.mark.parametrize("isa", ISAS)
def test_narrow_outputs(isa):
    """Few output columns, with A's rows and B's columns contiguous in k (nn.Linear's input and
    weight): for k >= 400 dot products straight from A and B (gemm.inc), else the packed
    kernel's edge tiles. Row and column counts around the dot kernel's 4 x 3 tile, k around
    the vector width past 400 (the lane sums, and the k tail summed apart), every activation
    with and without bias and pre, 1 and 2 threads, and a row-sliced out."""
    runs_here(isa)
    for m, k, n in [(1, 1, 1), (4, 8, 3), (5, 9, 2), (13, 7, 5), (64, 128, 10), (3, 300, 1),
                    (70, 33, 20), (9, 0, 4), (600, 64, 7), (1, 400, 1), (4, 408, 3),
                    (5, 409, 2), (13, 407, 5), (64, 784, 10), (70, 433, 20), (600, 464, 7)]:
        a, w = torch.randn(m, k), torch.randn(n, k)
        for code, param in ACTIVATIONS:
            check(a, w.t(), torch.randn(n), code, param, isa=isa)
        check(a, w.t(), None, A.GELU, isa=isa, pre=False, num_threads=2)
        bias = torch.randn(n)
        one = check(a, w.t(), bias, A.NONE, isa=isa, num_threads=1)
        _, two = run(a, w.t(), bias, A.NONE, isa=isa, num_threads=2)
        assert torch.equal(one, two), f"2 threads differ from 1 at {(m, k, n)}"
    a, w, bias = torch.randn(11, 40), torch.randn(3, 40), torch.randn(3)
    out_buffer = poisoned(11, 8)
    native_linear.linear_forward(a, w, bias, out_buffer[:, 2:5], None, A.SIGMOID, 0.0, isa=isa)
    assert_close(out_buffer[:, 2:5], reference(a, w.t(), bias, A.SIGMOID, 0.0)[1])
    assert out_buffer[:, :2].isnan().all() and out_buffer[:, 5:].isnan().all()


@pytest.mark.parametrize("isa", ISAS)
def test_strided_views(isa):
    runs_here(isa)
    m, k, n = 37, 70, 45
    base_a, base_b = torch.randn(k, 2 * m), torch.randn(3 * n, k + 5)
    views_a = [base_a.t()[:, :],  # transposed: unit stride down the columns
               base_a.t()[::2],  # transposed and every other row
               torch.randn(m, 2 * k)[:, 1::2]]  # row-major, every other column
    views_b = [base_b[::3, 2:k + 2].t(),  # transposed, sliced
               torch.randn(k, 1).expand(k, n),  # a zero stride
               torch.randn(2 * k, n)[::2]]  # every other row
    for a in views_a:
        for b in views_b:
            check(a, b, torch.randn(n), A.GELU, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_row_sliced_outputs(isa):
    """out and pre may be row slices of wider buffers: only their own columns are written."""
    runs_here(isa)
    a, b, bias = torch.randn(19, 23), torch.randn(23, 21), torch.randn(21)
    out_buffer, pre_buffer = poisoned(19, 30), poisoned(19, 30)
    out, pre = out_buffer[:, 4:25], pre_buffer[:, 4:25]
    native_linear.linear_forward(a, b.t(), bias, out, pre, A.TANH, 0.0, isa=isa)
    ref_pre, ref_out = reference(a, b, bias, A.TANH, 0.0)
    assert_close(out, ref_out)
    assert_close(pre, ref_pre)
    assert out_buffer[:, :4].isnan().all() and out_buffer[:, 25:].isnan().all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,n", [(0, 5, 7), (5, 7, 0), (0, 0, 0), (6, 0, 9), (1, 0, 1)])
def test_empty_dimensions(isa, m, k, n):
    """K = 0 gives act(bias), or act(0) without bias; M or N = 0 writes nothing."""
    runs_here(isa)
    a, b = torch.randn(m, k), torch.randn(k, n)
    for bias in (torch.randn(n), None):
        for code, param in ACTIVATIONS:
            check(a, b, bias, code, param, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_threads_give_identical_results(isa):
    """Threads split C, never k, so every element is summed in the same order."""
    runs_here(isa)
    for m, k, n in [(257, 300, 129), (5, 64, 2000), (3000, 16, 5)]:
        a, b, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
        one = check(a, b, bias, A.RELU, isa=isa, num_threads=1)
        for threads in (2, 3):
            _, many = run(a, b, bias, A.RELU, isa=isa, num_threads=threads)
            assert torch.equal(one, many), f"{threads} threads differ from 1 at {(m, k, n)}"


def test_concurrent_callers():
    """The GIL is released, so Python threads may call at once: while one uses the pool, the
    others run on their own thread, with the same results."""
    a, b, bias = torch.randn(200, 300), torch.randn(300, 250), torch.randn(250)
    expected = run(a, b, bias, A.SILU, num_threads=2)[1]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run(a, b, bias, A.SILU, num_threads=2)[1], range(16)))
    assert all(torch.equal(r, expected) for r in results)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("code,param", ACTIVATIONS)
def test_activation_values_and_nan(isa, code, param):
    """Each activation, element by element, over its whole float32 range: z = a @ [[1]].

    NaN in, NaN out (as torch); no overflow to NaN or to a wrong finite value at the extremes.
    Tolerance: a few float32 ulps relative, plus an absolute 4e-7 |z| for gelu's left tail,
    where 1 + erf(z / sqrt 2) cancels (float32 erf is -1 to within an ulp, 6e-8, there).
    """
    runs_here(isa)
    z = torch.cat([torch.linspace(-12, 12, 2001), torch.linspace(-100, 100, 401),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 88.5, -88.5, 89.0, -89.0,
                                 1e4, -1e4, 1e30, -1e30, 3e38, -3e38, float("nan")])])
    _, out = run(z[:, None], torch.ones(1, 1), None, code, param, pre=False, isa=isa)
    ref = activation_reference(z.double(), code, param)
    out = out[:, 0].double()
    assert torch.equal(out.isnan(), ref.isnan())
    z, out, ref = z[~ref.isnan()].double(), out[~ref.isnan()], ref[~ref.isnan()]
    excess = (out - ref).abs() / (1e-6 * ref.abs() + 4e-7 * z.abs().clamp(min=1.0))
    i = excess.argmax()
    assert excess[i] <= 1.0, f"z = {z[i].item()}: {out[i].item()} != {ref[i].item()}"


@pytest.mark.parametrize("isa", ISAS)
def test_nan_inputs_propagate(isa):
    runs_here(isa)
    a, b = torch.randn(20, 30), torch.randn(30, 40)
    a[3, 7] = float("nan")
    b[11, 25] = float("nan")
    for code, param in ACTIVATIONS:
        check(a, b, torch.randn(40), code, param, isa=isa)


BACKWARD_ACTIVATIONS = [act for act in ACTIVATIONS if act[0] != A.NONE]


def backward_inputs(m, n, code, param, grad=None):
    """(grad_out, saved): saved as the kernel gets it, the output or the pre-activation."""
    act = A.Activation("", code, param)
    z = 3 * torch.randn(m, n)
    return torch.randn(m, n) if grad is None else grad, act.forward(z) if act.saves_output else z


def check_backward(grad, saved, code, param, with_bias=True, **kwargs):
    """The kernel on NaN-poisoned outputs against act'(saved) in float64; returns them."""
    act = A.Activation("", code, param)
    m, n = saved.shape
    grad_pre, grad_bias = poisoned(m, n), poisoned(n) if with_bias else None
    native_linear.activation_backward(grad, saved, grad_pre, grad_bias, code, param, act.saves_output,
                               **kwargs)
    ref = grad.double() * act.derivative(saved.double())
    assert_close(grad_pre, ref, torch.float32, what=f"grad_pre (activation {code}, {param})")
    if with_bias:  # rounding is relative to the sum of magnitudes, not to a cancelled sum
        assert_close(grad_bias, ref.sum(0), torch.float32, what="grad_bias",
                     scale=ref.abs().sum(0))
    return grad_pre, grad_bias


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("code,param", BACKWARD_ACTIVATIONS)
def test_activation_backward(isa, code, param):
    """Every grad_out layout: contiguous, transposed, every other column, and stride 0 along
    rows or columns (an expanded gradient, as sum()'s backward gives)."""
    runs_here(isa)
    for m, n in [(1, 1), (7, 7), (127, 127), (257, 257), (7, 257), (257, 1)]:
        layouts = [torch.randn(m, n), torch.randn(n, m).t(), torch.randn(m, 2 * n)[:, ::2],
                   torch.randn(1, n).expand(m, n), torch.randn(m, 1).expand(m, n)]
        for grad in layouts:
            _, saved = backward_inputs(m, n, code, param)
            for with_bias in (True, False):
                check_backward(grad, saved, code, param, with_bias, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_activation_backward_empty(isa):
    """M = 0: grad_bias is a sum of nothing, zeros; N = 0 writes nothing."""
    runs_here(isa)
    for m, n in [(0, 5), (0, 0), (4, 0)]:
        grad_pre, grad_bias = check_backward(*backward_inputs(m, n, A.RELU, 0.0), A.RELU, 0.0,
                                             isa=isa)
        assert grad_pre.shape == (m, n) and torch.equal(grad_bias, torch.zeros(n))


@pytest.mark.parametrize("isa", ISAS)
def test_activation_backward_threads_give_identical_results(isa):
    """grad_bias is summed in fixed row blocks added in block order, whatever the threads."""
    runs_here(isa)
    for m, n in [(700, 300), (5000, 17), (70, 3001)]:
        grad, saved = backward_inputs(m, n, A.GELU, 0.0, torch.randn(n, m).t())
        one = check_backward(grad, saved, A.GELU, 0.0, isa=isa, num_threads=1)
        for threads in (2, 3):
            many = check_backward(grad, saved, A.GELU, 0.0, isa=isa, num_threads=threads)
            assert all(torch.equal(x, y) for x, y in zip(one, many)), f"{threads} at {(m, n)}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("code,param", BACKWARD_ACTIVATIONS)
def test_activation_backward_values(isa, code, param):
    """act'(z) element by element over the float32 range, NaN as the torch table gives it."""
    runs_here(isa)
    z = torch.cat([torch.linspace(-12, 12, 2001), torch.linspace(-100, 100, 401),
                   torch.tensor([0.0, -0.0, 1e-30, 88.5, -88.5, 1e4, -1e4, 1e30, -1e30, 3e38,
                                 -3e38, float("nan")])])
    act = A.Activation("", code, param)
    saved = act.forward(z) if act.saves_output else z
    out = check_backward(torch.ones(1, z.numel()), saved[None], code, param, False, isa=isa)[0]
    out, ref = out[0].double(), act.derivative(saved.double())
    assert torch.equal(out.isnan(), ref.isnan())
    out, ref = out[~ref.isnan()], ref[~ref.isnan()]
    excess = (out - ref).abs() / (2e-6 * ref.abs() + 1e-7)
    i = excess.argmax()
    assert excess[i] <= 1.0, f"saved = {saved[~ref.isnan()][i].item()}: {out[i]} != {ref[i]}"


def test_activation_backward_bad_arguments():
    lib = built().core()
    x = torch.randn(4, 4)
    p = x.data_ptr()
    good = dict(grad_out=p, grad_out_stride_m=4, grad_out_stride_n=1, saved=p, grad_pre=p,
                grad_bias=0, m=4, n=4, act_code=A.RELU, act_param=0.0, num_threads=1)
    for bad in (dict(m=-1), dict(n=-1), dict(grad_out_stride_n=-1), dict(act_code=A.NONE),
                dict(act_code=8), dict(num_threads=0), dict(saved=0), dict(isa="sse9")):
        with pytest.raises(ValueError):
            lib.activation_backward(**{**good, **bad})
    grad_pre = torch.empty(4, 4)
    with pytest.raises(ValueError, match="saved_is_output"):
        native_linear.check_activation_backward(x, x, grad_pre, None, A.GELU, 0.0, True)
    with pytest.raises(ValueError, match="contiguous"):
        native_linear.check_activation_backward(x, x.t(), grad_pre, None, A.RELU, 0.0, True)
    with pytest.raises(ValueError, match="grad_bias"):
        native_linear.check_activation_backward(x, x, grad_pre, torch.empty(5), A.RELU, 0.0, True)
    with pytest.raises(TypeError):
        native_linear.check_activation_backward(x.half(), x, grad_pre, None, A.RELU, 0.0, True)


def test_bad_arguments_raise_instead_of_crashing():
    """The C++ core rejects bad sizes, strides, codes and null addresses itself; what it cannot
    see (dtypes, shapes, output strides) check_linear_forward names. The kernels trust their
    callers, so conftest runs the checks before every native call in the whole suite."""
    lib = built().core()
    a = torch.randn(4, 4)
    p = a.data_ptr()
    good = dict(a=p, a_stride_m=4, a_stride_k=1, b=p, b_stride_k=4, b_stride_n=1, bias=0,
                out=p, out_stride_m=4, pre=0, pre_stride_m=0, m=4, n=4, k=4, act_code=0,
                act_param=0.0, num_threads=1)
    for bad in (dict(m=-1), dict(a_stride_k=-1), dict(act_code=8), dict(num_threads=0),
                dict(a=0), dict(out=0), dict(out_stride_m=3), dict(isa="sse9")):
        with pytest.raises(ValueError):
            lib.matmul_forward(**{**good, **bad})
    with pytest.raises(ValueError, match="unit column stride"):
        native_linear.check_linear_forward(a, a, None, a.t(), None, A.NONE, 0.0)
    with pytest.raises(ValueError, match="bias"):
        native_linear.check_linear_forward(a, a, torch.randn(5), torch.empty(4, 4), None, A.NONE, 0.0)
    with pytest.raises(TypeError):
        native_linear.check_linear_forward(a.half(), a.half(), None, a.half(), None, A.NONE, 0.0)


def check_linear_backward(x, w, grad, code, param, wants=(True, True, True), **kwargs):
    """native_linear.linear_backward on NaN-poisoned outputs against float64 autograd of the layer."""
    act = A.Activation("", code, param)
    m, k = x.shape
    n = w.shape[0]
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    bd = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)  # fixed: reruns see the same saved
    z = xd @ wd.t() + bd
    saved = (act.forward(z) if act.saves_output else z).detach().float() if code else None
    grad_x = poisoned(m, k) if wants[0] else None
    grad_w = poisoned(n, k) if wants[1] else None
    grad_b = poisoned(n) if wants[2] else None
    native_linear.linear_backward(grad, x, w, saved, grad_x, grad_w, grad_b, code, param,
                           act.saves_output, **kwargs)
    # The float64 oracle starts from the float32 saved tensor the kernel saw.
    dz = grad.double() * act.derivative(saved.double()) if code else grad.double()
    g_abs = dz.abs()
    refs = (dz @ wd.detach(), dz.t() @ xd.detach(), dz.sum(0))
    scales = (g_abs @ w.double().abs(), g_abs.t() @ x.double().abs(), g_abs.sum(0))
    for name, out, ref, scale in zip(("grad_x", "grad_w", "grad_bias"), (grad_x, grad_w, grad_b),
                                     refs, scales):
        if out is not None:
            assert_close(out, ref, torch.float32, what=f"{name} (activation {code})", scale=scale)
    return grad_x, grad_w, grad_b


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("code,param", ACTIVATIONS)
def test_linear_backward(isa, code, param):
    """The one-call backward: every activation, odd shapes, strided x, w and grad_out."""
    runs_here(isa)
    for m, k, n in [(1, 1, 1), (7, 13, 5), (64, 128, 10), (127, 33, 17), (257, 129, 40)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        grads = [torch.randn(m, n), torch.randn(n, m).t(), torch.randn(1, n).expand(m, n)]
        for grad in grads:
            check_linear_backward(x, w, grad, code, param, isa=isa)
        check_linear_backward(torch.randn(k, m).t(), torch.randn(k, 2 * n)[:, ::2].t(), grads[0],
                              code, param, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
def test_linear_backward_partial_and_empty(isa):
    """Only some gradients wanted (the others stay untouched); zero-size M, N, K; 1 or 2
    threads give the same bits (the two GEMMs side by side, or one after the other)."""
    runs_here(isa)
    x, w, grad = torch.randn(33, 20), torch.randn(9, 20), torch.randn(33, 9)
    for wants in [(True, False, False), (False, True, False), (False, False, True),
                  (False, False, False)]:
        check_linear_backward(x, w, grad, A.TANH, 0.0, wants, isa=isa)
        check_linear_backward(x, w, grad, A.NONE, 0.0, wants, isa=isa)
    for m, k, n in [(0, 5, 7), (5, 0, 7), (5, 7, 0), (0, 0, 0)]:
        gx, gw, gb = check_linear_backward(torch.randn(m, k), torch.randn(n, k),
                                           torch.randn(m, n), A.RELU, 0.0, isa=isa)
        if m == 0:  # sums over no rows
            assert torch.equal(gw, torch.zeros(n, k)) and torch.equal(gb, torch.zeros(n))
    for m, k, n in [(64, 128, 10), (300, 200, 100)]:
        x, w, grad = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
        one = check_linear_backward(x, w, grad, A.SILU, 0.0, isa=isa, num_threads=1)
        two = check_linear_backward(x, w, grad, A.SILU, 0.0, isa=isa, num_threads=2)
        for a, b in zip(one, two):
            assert torch.equal(a, b)


def test_linear_backward_bad_arguments():
    lib = built().core()
    x = torch.randn(4, 4)
    p = x.data_ptr()
    good = dict(grad_out=p, grad_out_stride_m=4, grad_out_stride_n=1, saved=p, grad_pre=p, x=p,
                x_stride_m=4, x_stride_k=1, w=p, w_stride_n=4, w_stride_k=1, grad_x=0, grad_w=0,
                grad_bias=0, m=4, n=4, k=4, act_code=A.RELU, act_param=0.0, num_threads=1)
    for bad in (dict(m=-1), dict(k=-1), dict(x_stride_k=-1), dict(act_code=8),
                dict(num_threads=0), dict(saved=0), dict(grad_out=0), dict(isa="sse9"),
                dict(grad_x=p, w=0), dict(grad_w=p, x=0)):
        with pytest.raises(ValueError):
            lib.linear_backward(**{**good, **bad})
    out = torch.empty(4, 4)
    with pytest.raises(ValueError, match="saved_is_output"):
        native_linear.check_linear_backward(x, x, x, x, out, None, None, A.GELU, 0.0, True)
    with pytest.raises(ValueError, match="contiguous"):
        native_linear.check_linear_backward(x, x, x, x, out.t(), None, None, A.RELU, 0.0, True)
    with pytest.raises(ValueError, match=r"\(M, K\)"):
        native_linear.check_linear_backward(x, x, torch.randn(4, 5), x, None, None, None, A.RELU, 0.0,
                                     True)
    with pytest.raises(TypeError):
        native_linear.check_linear_backward(x, x.half(), x, x, None, None, None, A.RELU, 0.0, True)


@pytest.mark.parametrize("isa", ISAS)
def test_fma_peak_is_positive(isa):
    runs_here(isa)
    assert native.fma_peak_gflops(1, 0.02, isa=isa) > 0.1


def test_isa_override_from_the_environment():
    """BRAINKERN_NATIVE_ISA picks the ISA at import; one this CPU lacks fails the import.

    The child loads the extension file alone: the package would import torch, seconds each.
    """
    script = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("brainkern._native", {built().core().__file__!r})
try:
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(module.isa())
except ImportError as error:
    print("ERROR", error)
"""

    def isa_with(value):
        env = {**os.environ, "BRAINKERN_NATIVE_ISA": value}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=60, check=True)
        return done.stdout.strip()

    assert isa_with("portable") == "portable"
    unsupported = next((i for i in ISAS if i not in built().supported_isas()), "sse9")
    message = isa_with(unsupported)
    assert message.startswith("ERROR") and "BRAINKERN_NATIVE_ISA" in message


def test_bias_sum_space_is_bounded_and_released():
    """The per-thread partial sums for grad_bias took one row of N doubles per row block, one
    block per row once N > 8192 (M x N doubles: 1 GB at 4096 x 32768), kept for the thread's
    life. Now at most 64 rows, and freed after a large call; small calls keep theirs."""
    core = built().core()
    m, n = 256, 8193
    grad, saved = torch.randn(m, n), torch.randn(m, n).relu()
    check_backward(grad, saved, A.RELU, 0.0)
    held, last_call = core.backward_scratch_bytes()
    assert last_call <= 64 * n * 8 < m * n * 8 and held == 0
    check_backward(torch.randn(64, 10), torch.randn(64, 10).relu(), A.RELU, 0.0)
    held, last_call = core.backward_scratch_bytes()
    assert 0 < last_call <= held <= 1 << 19  # small: kept for the next call
