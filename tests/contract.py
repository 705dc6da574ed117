"""What the kernel-contract suites (tests/test_kernel_contract*.py) run every backend's kernels
with: which backends serve a family here and on which device, the activations, the float64
oracles, and the comparisons.

A backend's family module is tested once it exists (``importlib.util.find_spec``): conv and
pool kernels join the suite as they land, with no change here.
"""

import importlib.util
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from brainkern import activations as A
from brainkern import backends
from brainkern.activations import NONE
from helpers import assert_close, poisoned

HAS_CUDA = torch.cuda.is_available()
INF, NAN = float("inf"), float("nan")

# Every code, and leaky_relu with both signs of slope (a negative slope saves the pre-activation).
ACTIVATIONS = [A.Activation("none", A.NONE), A.Activation("relu", A.RELU),
               A.Activation("leaky_relu", A.LEAKY_RELU, 0.01),
               A.Activation("leaky_relu", A.LEAKY_RELU, -0.2),
               A.Activation("sigmoid", A.SIGMOID), A.Activation("tanh", A.TANH),
               A.Activation("gelu", A.GELU), A.Activation("gelu_tanh", A.GELU_TANH),
               A.Activation("silu", A.SILU)]
ACT_IDS = [f"{a.name}{a.param:g}" if a.param else a.name for a in ACTIVATIONS]
BACKWARD_ACTIVATIONS, BACKWARD_ACT_IDS = ACTIVATIONS[1:], ACT_IDS[1:]
GELU_TANH = ACTIVATIONS[7]


def device_of(backend: str) -> str:
    """The device a backend's kernels take tensors on here: Triton's is the GPU when there is
    one (else the CPU, through its interpreter); the others run on the CPU."""
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def interpreted(backend: str) -> bool:
    """Whether the backend's kernels run through Triton's interpreter here (slow: sample)."""
    return backend == "triton" and not HAS_CUDA


def backends_for(family: str):
    """pytest params: every backend available here, skipped only when it has no module for
    ``family`` yet."""
    params = []
    for name in backends.available_backends():
        package = f"{backends.BACKENDS[name].package}.{family}"
        missing = importlib.util.find_spec(package) is None
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(
            missing, reason=f"{package} does not exist yet")))
    return params


def backend_dtypes_for(family: str, wanted, uses_dot=True):
    """pytest params (backend, dtype): each dtype of ``wanted`` that the backend's family module
    declares (the ops layer sends it no other). Triton 3.9's interpreter multiplies bf16 tl.dot
    operands as raw int16 bits, so without a GPU Triton's bf16 is left to the GPU tests of
    tests/test_kernels_triton*.py for families whose kernels ``uses_dot``."""
    params = []
    for name in backends.available_backends():
        if importlib.util.find_spec(f"{backends.BACKENDS[name].package}.{family}") is None:
            continue
        for dtype in wanted:
            interpreted_bf16 = (uses_dot and name == "triton" and not HAS_CUDA
                                and dtype == torch.bfloat16)
            if dtype in kernels(name, family).DTYPES and not interpreted_bf16:
                params.append(pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}"))
    return params


def kernels(backend: str, family: str):
    return backends.kernels(backend, family)


def randn(*shape, backend, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=device_of(backend))


def act_forward(act, z):
    """act(z) in float64; GELU as 0.5 z erfc(-z / sqrt 2), the same function without
    torch's cancellation in 1 + erf for z << 0, which fails an accurate kernel."""
    if act.code == A.GELU:
        return 0.5 * z * torch.special.erfc(-z * 0.7071067811865476)
    return act.forward(z)


def saved_for(act, z):
    """What the forward saves for ``act``: its output or the pre-activation z."""
    return act.forward(z) if act.saves_output else z


def finite_magnitude(t):
    """|t| in float64 on the CPU with NaN and infinities as 0: rounding-error scales for the
    elements that stay finite."""
    t = t.detach().double().cpu()
    return torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=torch.float64))


def check(out, ref, dtype, what, scale=None, tol=None):
    """``out`` against the float64 ``ref``: special values equal, the rest within the dtype's
    tolerance relative to ``scale`` (default ``|ref|``)."""
    assert_close(out, ref, dtype, tol=tol, what=what, scale=scale)


# Linear ---------------------------------------------------------------------------------------

def linear_reference(a, weight, bias, act):
    """(z, act(z)) in float64 on the CPU for ``z = a @ weight^T + bias``."""
    z = a.detach().double().cpu() @ weight.detach().double().cpu().t()
    if bias is not None:
        z = z + bias.detach().double().cpu()
    return z, act_forward(act, z)


def linear_scale(a, weight, bias):
    """|a| @ |weight|^T + |bias| over the finite inputs: what the GEMM's rounding scales with."""
    scale = finite_magnitude(a) @ finite_magnitude(weight).t()
    return scale if bias is None else scale + finite_magnitude(bias)


def run_linear_forward(kern, a, weight, bias, act, with_pre=True):
    """The kernel on NaN-poisoned outputs; returns (out, pre)."""
    m, n = a.shape[0], weight.shape[0]
    out = poisoned(m, n, dtype=a.dtype, device=a.device)
    pre = poisoned(m, n, dtype=a.dtype, device=a.device) if with_pre else None
    kern.linear_forward(a, weight, bias, out, pre, act.code, act.param)
    return out, pre


def derivative_scale(act, grad_out, saved):
    """What ``grad_out * act'(saved)``'s error scales with: |grad_out| times the size of the
    derivative's terms, which are O(1) for every activation (1 - y^2 for tanh, or
    Phi(z) + z phi(z) for gelu, cancel to far less than their rounding error near the tails)."""
    deriv = finite_magnitude(act.derivative(saved.double().cpu()))
    return finite_magnitude(grad_out) * torch.clamp(deriv, min=1.0)


def output_scale(act, z, ref, z_scale):
    """What act(z)'s error scales with: its own rounding, |act(z)|, plus z's error carried
    through act, |act'(z)| z_scale (sigmoid(1e-5) is 0.5, but its error is that of z)."""
    return finite_magnitude(ref) + finite_magnitude(act.derivative(saved_for(act, z))) * z_scale


def check_linear_forward(kern, a, weight, bias, act, with_pre=True, tol=None):
    out, pre = run_linear_forward(kern, a, weight, bias, act, with_pre)
    z, ref = linear_reference(a, weight, bias, act)
    scale = linear_scale(a, weight, bias)
    check(out, ref, a.dtype, f"out ({act.name} {act.param})", output_scale(act, z, ref, scale),
          tol)
    if with_pre:
        check(pre, z, a.dtype, "pre", scale, tol)


def linear_backward_of(kern):
    """The backend's fused linear_backward, or compose_linear_backward over its kernels."""
    from brainkern.kernels import compose_linear_backward

    fused = getattr(kern, "linear_backward", None)
    if fused is not None:
        return fused
    return lambda *args: compose_linear_backward(kern, *args)


# Conv and pool: 4-D tensors in one of two memory formats ----------------------------------------

FORMATS = [pytest.param(torch.contiguous_format, id="nchw"),
           pytest.param(torch.channels_last, id="nhwc")]


def randn_in(shape, backend, dtype, fmt=torch.contiguous_format):
    """Fresh normal values of ``dtype`` on the backend's device, dense in format ``fmt``."""
    x = torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device_of(backend))
    return x.contiguous(memory_format=fmt)


def poisoned_in(shape, like, fmt=torch.contiguous_format, dtype=None):
    """A NaN-poisoned output (int64: -1, uint8: 255) on like's device, of like's dtype unless
    given, dense in ``fmt``."""
    dtype = dtype or like.dtype
    fill = {torch.int64: -1, torch.uint8: 255}.get(dtype, float("nan"))
    return torch.full(shape, fill, dtype=dtype, device=like.device).contiguous(memory_format=fmt)


def conv2d_reference(x, weight, out_hw, stride, padding, dilation, groups):
    """conv2d_forward's sum (no bias) in float64 on the CPU, differentiable: x zero-padded by
    ``padding`` before and by whatever ``out_hw`` needs after (cropped when it needs less)."""
    x, weight = x.double().cpu(), weight.double().cpu()
    if x.shape[1] == 0:  # torch's conv2d rejects an empty reduction; its sum is 0
        return torch.zeros(x.shape[0], weight.shape[0], *out_hw, dtype=torch.float64)
    (h, w), (kh, kw) = x.shape[-2:], weight.shape[-2:]
    bottom = (out_hw[0] - 1) * stride[0] + dilation[0] * (kh - 1) + 1 - h - padding[0]
    right = (out_hw[1] - 1) * stride[1] + dilation[1] * (kw - 1) + 1 - w - padding[1]
    padded = F.pad(x, (padding[1], right, padding[0], bottom))
    return F.conv2d(padded, weight, None, stride, 0, dilation, groups)


def _conv2d_adjoint(wrt, x, weight, out_hw, cotangent, params):
    """d(sum(cotangent * conv2d_reference(x, weight))) / d x or weight, in float64."""
    x, weight = x.detach().double().cpu(), weight.detach().double().cpu()
    leaf = (x if wrt == "x" else weight).requires_grad_()
    (grad,) = torch.autograd.grad(conv2d_reference(x, weight, out_hw, *params), leaf,
                                  cotangent.detach().double().cpu())
    return grad


def conv_transpose2d_reference(x, weight, out_hw, stride, padding, dilation, groups):
    """conv_transpose2d_forward's sum (no bias): the adjoint of conv2d_reference from an input
    of out's size to an output of x's size, so any output size is covered."""
    groups_out = weight.shape[1] * groups
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], groups_out, *out_hw, dtype=torch.float64)
    zeros = torch.zeros(x.shape[0], groups_out, *out_hw, dtype=torch.float64)
    return _conv2d_adjoint("x", zeros, weight, x.shape[-2:], x,
                           (stride, padding, dilation, groups))


def conv2d_weight_reference(grad_pre, x, weight_shape, stride, padding, dilation, groups):
    """conv2d_backward_weight's sum in float64: the adjoint of conv2d_reference in weight."""
    zeros = torch.zeros(weight_shape, dtype=torch.float64)
    return _conv2d_adjoint("weight", x, zeros, grad_pre.shape[-2:], grad_pre,
                           (stride, padding, dilation, groups))


def with_bias(z, bias):
    return z if bias is None else z + bias.detach().double().cpu().view(1, -1, 1, 1)


def randn_from(shape, backend, dtype, fmt, fill=None):
    """``fill(shape)`` (float64 values; default normal) as ``dtype`` on the backend's device,
    dense in ``fmt``."""
    x = torch.randn(shape, dtype=torch.float64) if fill is None else fill(shape)
    return x.to(dtype=dtype, device=device_of(backend)).contiguous(memory_format=fmt)


def format_of(t):
    return torch.contiguous_format if t.is_contiguous() else torch.channels_last


def grad_of(fn, x, grad_out):
    """d(sum(fn(x) * grad_out))/dx in float64 on the CPU, by torch.autograd."""
    xd = x.detach().double().cpu().requires_grad_()
    (grad,) = torch.autograd.grad(fn(xd), xd, grad_out.detach().double().cpu())
    return grad


def window_cases(dilations=(1,)):
    """(kernel, stride, padding, dilation, ceil_mode): square kernels 1..4, strides 1..3, every
    padding up to k // 2, plus rectangular ones with each axis different."""
    cases = [((k, k), (s, s), (p, p), (d, d), ceil)
             for k in range(1, 5) for s in range(1, 4) for p in range(k // 2 + 1)
             for d in dilations for ceil in (False, True)]
    cases += [((3, 2), (2, 1), (1, 0), (dilations[-1], 1), True),
              ((1, 4), (3, 2), (0, 2), (1, dilations[-1]), False),
              ((4, 1), (1, 3), (2, 0), (1, 1), True)]
    return cases


def check_max_pool(kern, x, case):
    """max_pool2d_forward (values and indices exactly torch's) and max_pool2d_backward on
    poisoned outputs."""
    kernel, stride, padding, dilation, ceil = case

    def pool(t):
        return F.max_pool2d(t, kernel, stride, padding, dilation, ceil, return_indices=True)

    ref, ref_indices = pool(x.detach().double().cpu())
    fmt = format_of(x)
    out = poisoned_in(ref.shape, x, fmt)
    indices = poisoned_in(ref.shape, x, fmt, torch.int64)
    kern.max_pool2d_forward(x, out, indices, kernel, stride, padding, dilation)
    assert torch.equal(out.double().cpu().nan_to_num(7.0), ref.nan_to_num(7.0)), case
    assert torch.equal(indices.cpu(), ref_indices), case
    grad_out = randn_from(ref.shape, "cpu", x.dtype, fmt).to(x.device)
    grad_x = poisoned_in(x.shape, x, fmt)
    kern.max_pool2d_backward(grad_out, indices, grad_x, kernel, stride, padding, dilation)
    expected = grad_of(lambda t: pool(t)[0], x, grad_out)
    check(grad_x, expected, x.dtype, f"grad_x {case}")
    if getattr(kern, "WINDOW_CODES", False):  # uint8 window codes, and the backward from them
        codes = poisoned_in(ref.shape, x, fmt, torch.uint8)
        kern.max_pool2d_forward(x, out, codes, kernel, stride, padding, dilation)
        assert torch.equal(codes.cpu(), window_codes(ref_indices, x.shape[-1], case)), case
        grad_x = poisoned_in(x.shape, x, fmt)
        kern.max_pool2d_backward(grad_out, codes, grad_x, kernel, stride, padding, dilation)
        check(grad_x, expected, x.dtype, f"grad_x from codes {case}")
    return out, indices


def window_codes(indices, width, case):
    """torch's flat indices as window codes: the tap's place ``i * kW + j`` in its window."""
    kernel, stride, padding, dilation, _ = case
    oh = torch.arange(indices.shape[-2]).view(-1, 1)
    ow = torch.arange(indices.shape[-1])
    i = (indices // width - (oh * stride[0] - padding[0])) // dilation[0]
    j = (indices % width - (ow * stride[1] - padding[1])) // dilation[1]
    return (i * kernel[1] + j).to(torch.uint8)


def avg_reference(kernel, stride, padding, ceil, include_pad, divisor):
    return lambda t: F.avg_pool2d(t, kernel, stride, padding, ceil, include_pad, divisor or None)


def check_avg_like(x, pool, forward, backward, what):
    """A forward (x, out) and backward (grad_out, grad_x) pair against torch's ``pool``."""
    ref = pool(x.detach().double().cpu())
    fmt = format_of(x)
    out = poisoned_in(ref.shape, x, fmt)
    forward(x, out)
    check(out, ref, x.dtype, f"out {what}")
    grad_out = randn_from(ref.shape, "cpu", x.dtype, fmt).to(x.device)
    grad_x = poisoned_in(x.shape, x, fmt)
    backward(grad_out, grad_x)
    check(grad_x, grad_of(pool, x, grad_out), x.dtype, f"grad_x {what}")


def check_avg_pool(kern, x, case):
    kernel, stride, padding, ceil, include_pad, divisor = case
    args = (kernel, stride, padding, include_pad, divisor)
    check_avg_like(x, avg_reference(*case),
                   lambda t, out: kern.avg_pool2d_forward(t, out, *args),
                   lambda g, grad_x: kern.avg_pool2d_backward(g, grad_x, *args), case)


def check_adaptive_avg_pool(kern, x, size):
    check_avg_like(x, lambda t: F.adaptive_avg_pool2d(t, size), kern.adaptive_avg_pool2d_forward,
                   kern.adaptive_avg_pool2d_backward, f"adaptive {size}")


# Conv layers and the checks the conv contract and the per-backend conv files share -------------

class Layer(NamedTuple):
    """``c_x`` channels in x, ``c_out`` in out (for a transposed conv, x has a conv output's
    shape); ``extra`` rows and columns of out past the natural size (negative: fewer)."""

    n: int
    c_x: int
    c_out: int
    hw: tuple
    k: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    extra: tuple = (0, 0)

    def params(self):
        return self.stride, self.padding, self.dilation, self.groups

    def weight_shape(self, transposed):
        if transposed:
            return (self.c_x, self.c_out // self.groups, *self.k)
        return (self.c_out, self.c_x // self.groups, *self.k)

    def out_hw(self, transposed):
        sizes = []
        for i in (0, 1):
            reach = self.dilation[i] * (self.k[i] - 1) + 1
            if transposed:
                size = (self.hw[i] - 1) * self.stride[i] - 2 * self.padding[i] + reach
            else:
                size = (self.hw[i] + 2 * self.padding[i] - reach) // self.stride[i] + 1
            sizes.append(size + self.extra[i])
        return tuple(sizes)


def layer_id(layer):
    return (f"{layer.n}x{layer.c_x}-{layer.c_out}@{layer.hw[0]}x{layer.hw[1]}k{layer.k[0]}"
            f"{layer.k[1]}s{layer.stride[0]}{layer.stride[1]}p{layer.padding[0]}"
            f"{layer.padding[1]}d{layer.dilation[0]}{layer.dilation[1]}g{layer.groups}"
            f"+{layer.extra[0]}{layer.extra[1]}")


def conv_kernel(kern, transposed):
    return kern.conv_transpose2d_forward if transposed else kern.conv2d_forward


def conv_reference(transposed, x, weight, out_hw, params):
    reference = conv_transpose2d_reference if transposed else conv2d_reference
    return reference(x, weight, out_hw, *params)


def conv_operands(backend, layer, transposed, dtype, fmt, bias=True):
    x = randn_in((layer.n, layer.c_x, *layer.hw), backend, dtype, fmt)
    weight = randn_in(layer.weight_shape(transposed), backend, dtype)
    return x, weight, randn_in((layer.c_out,), backend, dtype) if bias else None


def check_conv_forward(backend, layer, transposed, act, dtype, fmt, bias=True, with_pre=True,
                       operands=None, tol=None):
    """The forward kernel on poisoned outputs against act(z), z = the float64 sum + bias."""
    kern = kernels(backend, "conv")
    x, weight, b = operands or conv_operands(backend, layer, transposed, dtype, fmt, bias)
    shape = (layer.n, layer.c_out, *layer.out_hw(transposed))
    out = poisoned_in(shape, x, fmt)
    pre = poisoned_in(shape, x, fmt) if with_pre else None
    conv_kernel(kern, transposed)(x, weight, b, out, pre, *layer.params(), act.code, act.param)
    z = with_bias(conv_reference(transposed, x, weight, shape[2:], layer.params()), b)
    scale = conv_reference(transposed, finite_magnitude(x), finite_magnitude(weight), shape[2:],
                           layer.params())
    scale = scale if b is None else scale + finite_magnitude(b).view(1, -1, 1, 1)
    ref = act_forward(act, z)
    if backend == "torch" and not torch.isfinite(z).all():
        # torch's float32 gelu(inf) is NaN on its vector path, inf on its scalar tail: as torch
        # computes it in dtype and out's format
        ref = act.forward(z.to(dtype).contiguous(memory_format=fmt)).double()
    what = f"{'transposed ' if transposed else ''}{layer_id(layer)}"
    assert out.is_contiguous(memory_format=fmt)
    check(out, ref, dtype, f"out {what} ({act.name} {act.param})",
          output_scale(act, z, ref, scale), tol)
    if with_pre:
        check(pre, z, dtype, f"pre {what}", scale, tol)


def check_backward_weight(backend, layer, dtype, fmt, specials=False, tol=None):
    kern = kernels(backend, "conv")
    x = randn_in((layer.n, layer.c_x, *layer.hw), backend, dtype, fmt)
    grad_pre = randn_in((layer.n, layer.c_out, *layer.out_hw(False)), backend, dtype, fmt)
    if specials:  # only in x: a tap in the padding meets grad_pre (0 * inf is NaN or skipped)
        x[0, 0, 0, 0], x[-1, -1, -1, -1], x[0, -1, 0, -1] = NAN, INF, -INF
    shape = layer.weight_shape(False)
    grad_weight = poisoned_in(shape, x)
    kern.conv2d_backward_weight(grad_pre, x, grad_weight, *layer.params())
    ref = conv2d_weight_reference(grad_pre, x, shape, *layer.params())
    scale = conv2d_weight_reference(finite_magnitude(grad_pre), finite_magnitude(x), shape,
                                    *layer.params())
    check(grad_weight, ref, dtype, f"grad_weight {layer_id(layer)}", scale, tol)


def check_input_gradient(backend, layer, dtype, fmt):
    """conv2d's input gradient: conv_transpose2d_forward from grad_pre to x's size."""
    kern = kernels(backend, "conv")
    weight = randn_in(layer.weight_shape(False), backend, dtype)
    grad_pre = randn_in((layer.n, layer.c_out, *layer.out_hw(False)), backend, dtype, fmt)
    shape = (layer.n, layer.c_x, *layer.hw)
    grad_x = poisoned_in(shape, grad_pre, fmt)
    kern.conv_transpose2d_forward(grad_pre, weight, None, grad_x, None, *layer.params(), NONE,
                                  0.0)
    ref = conv_transpose2d_reference(grad_pre, weight, layer.hw, *layer.params())
    scale = conv_transpose2d_reference(finite_magnitude(grad_pre), finite_magnitude(weight),
                                       layer.hw, *layer.params())
    check(grad_x, ref, dtype, f"grad_x {layer_id(layer)}", scale)
