"""The native conv family (brainkern/kernels/native/conv.py over csrc/conv*.inc) at the kernel
interface, against torch in float64.

The reference convolution pads x explicitly, so that an output larger than torch's own (the
contract's implied padding after the last row and column, asymmetric "same") is covered; the
transposed convolution's and the weight gradient's references are that convolution's adjoints,
taken by float64 autograd. Errors are relative norms against the magnitude rounding is relative
to (the same computation on |x| and |w|). Every kernel runs on each ISA this CPU has, on
NaN-poisoned outputs, in NCHW and channels_last, and each call first runs its check_ function.
What holds for every backend (each activation, zero sizes, float64, NaN inputs) is in
tests/test_kernel_contract_conv.py; this file keeps the ISAs, thread counts, the C++ paths
(thin NCHW, through NHWC, small batches, buffers) and the check_ functions.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from brainkern import activations as A
from brainkern.kernels import native
from brainkern.kernels.native import conv as native_conv
from brainkern.kernels.native.pool import codes_to_indices_2x2
from helpers import TOLERANCE, assert_close

ISAS = ["avx512", "avx2", "portable"]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
ACTIVATIONS = [(A.NONE, 0.0), (A.RELU, 0.0), (A.LEAKY_RELU, 0.01), (A.LEAKY_RELU, -0.2),
               (A.SIGMOID, 0.0), (A.TANH, 0.0), (A.GELU, 0.0), (A.GELU_TANH, 0.0), (A.SILU, 0.0)]
# (n, c_in, c_out, (h, w), (kh, kw), stride, padding, dilation, groups, extra output rows/cols)
CASES = [
    (2, 3, 8, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    (3, 4, 6, (7, 5), (1, 1), (1, 1), (0, 0), (1, 1), 1, (0, 0)),  # pointwise: a plain GEMM
    (2, 4, 6, (13, 8), (1, 1), (2, 1), (0, 0), (1, 1), 2, (0, 0)),  # strided 1x1, groups
    (2, 4, 6, (9, 10), (3, 2), (2, 3), (1, 0), (2, 1), 2, (1, 2)),
    (2, 5, 5, (8, 9), (3, 3), (1, 1), (1, 1), (1, 1), 5, (0, 0)),  # depthwise
    (1, 4, 8, (11, 7), (5, 3), (3, 2), (2, 1), (2, 3), 4, (0, 1)),  # depthwise, multiplier 2
    (2, 1, 32, (12, 12), (5, 5), (1, 1), (2, 2), (1, 1), 1, (0, 0)),  # stem
    (1, 3, 7, (10, 13), (7, 7), (2, 2), (3, 3), (1, 1), 1, (0, 0)),  # RGB stem
    (2, 6, 4, (9, 9), (2, 2), (2, 2), (0, 0), (3, 3), 1, (2, 0)),
    (1, 2, 3, (4, 4), (6, 6), (1, 1), (3, 3), (1, 1), 1, (1, 1)),  # kernel larger than x
    (3, 40, 24, (16, 16), (5, 5), (1, 1), (2, 2), (1, 1), 1, (0, 0)),  # K > 256, many chunks
    (2, 2, 11, (9, 37), (3, 4), (1, 1), (2, 1), (2, 3), 1, (1, 0)),  # direct: dilated, ragged
    # weight gradient as dW = dz^T cols (not its transpose): K a multiple of 256, or wide C_out
    (2, 16, 8, (6, 7), (4, 4), (1, 1), (1, 2), (1, 1), 1, (0, 0)),
    (1, 8, 72, (5, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    # depthwise NCHW with rows of 64+ outputs: the direct NCHW kernels (narrower ones go
    # through NHWC an image at a time)
    (1, 3, 6, (3, 66), (3, 3), (1, 1), (1, 1), (1, 1), 3, (0, 0)),
    (2, 2, 2, (4, 131), (3, 2), (2, 2), (1, 0), (1, 2), 2, (0, 0)),
    # 16+ input channels, 64+ output pixels, at most a fifth of the products on padding: the
    # implicit GEMM (forward and weight gradient; the transposed forward too when C_out >= 16,
    # stride 1 and its own padding qualifies): widths not a multiple of its pixel groups, C_out
    # not of its tile, dilation, output rows and columns past torch's or short of them, even
    # kernels
    (2, 16, 40, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    (1, 20, 24, (22, 23), (3, 3), (1, 1), (2, 2), (2, 2), 1, (1, 2)),
    (1, 20, 16, (14, 17), (3, 5), (1, 1), (2, 1), (2, 2), 1, (1, -6)),
    (3, 24, 33, (6, 5), (2, 2), (1, 1), (0, 0), (1, 1), 1, (0, 0)),
    (2, 18, 17, (16, 19), (3, 2), (1, 1), (2, 1), (2, 3), 1, (0, 1)),
    # strided: the implicit GEMM's rows a stride apart (forward and weight gradient)
    (2, 16, 24, (17, 20), (3, 3), (2, 2), (1, 1), (1, 1), 1, (0, 0)),
    (1, 20, 32, (18, 16), (3, 2), (2, 1), (1, 0), (1, 2), 1, (0, 1)),
    # NHWC outputs written in place by the implicit GEMM (output width a multiple of its pixel
    # groups, C_out of its tile), pixels not a multiple of the tile: the last tile's real rows
    # go through a scratch tile; one image (split between threads) and several
    (1, 16, 32, (10, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    (3, 16, 64, (11, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    # 3x3 stride 1, 16+ channels each way: Winograd F(2x2, 3x3) in NHWC (forward and the
    # stride-1 transposed forward), channels not a multiple of the vector, odd output sizes
    # (tiles cut at the edge), no padding and more of it, outputs past torch's and short of it
    (2, 20, 33, (9, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    (1, 17, 16, (6, 13), (3, 3), (1, 1), (0, 2), (1, 1), 1, (1, -1)),
    (2, 48, 24, (5, 4), (3, 3), (1, 1), (2, 1), (1, 1), 1, (0, 1)),
    # images of several runs of tile rows (each its own work item, padding its own input rows)
    (1, 40, 24, (12, 64), (5, 5), (1, 1), (2, 2), (1, 1), 1, (0, 0)),
    (1, 64, 64, (30, 62), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    # one input channel, strided (a DCGAN's last layer, transposed): NHWC bias + activation
    # over a single contiguous column
    (2, 1, 8, (10, 9), (4, 4), (2, 2), (1, 1), (1, 1), 1, (0, 0)),
    # one output pixel in NCHW: the same single column, its bias one per channel
    (3, 4, 6, (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    # down to 4 channels or fewer (a stem's input gradient): the direct kernel's row blocks,
    # the last one partial; dilated, ragged rows, 2 and 3 channels
    (2, 24, 1, (12, 19), (5, 5), (1, 1), (2, 2), (1, 1), 1, (0, 0)),
    (1, 9, 3, (7, 37), (3, 3), (1, 1), (1, 2), (2, 1), 1, (0, 0)),
    (2, 20, 2, (11, 17), (3, 5), (1, 1), (0, 2), (1, 2), 1, (1, 0)),
    (1, 6, 4, (9, 5), (2, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),
    (2, 12, 7, (10, 21), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),  # 5-8 channels: 8 wide
    # strided thin layers, on the GEMM path (a direct kernel on rows split into stride phases
    # measured 1.0-1.9x slower for 3->64 7x7 and 4x4 stride-2 stems)
    (1, 2, 9, (17, 23), (5, 4), (3, 2), (2, 1), (1, 2), 1, (0, 1)),
    (2, 16, 3, (15, 40), (3, 3), (2, 2), (1, 1), (1, 1), 1, (1, 1)),
    # thin groups (ResNeXt's), the direct kernel a group at a time: 2 and 4 channels a group,
    # 6 and 8 outputs a group (one 8-wide block), 20 (blocks of 8, 8 and 4), dilated
    (2, 8, 8, (9, 13), (3, 3), (1, 1), (1, 1), (1, 1), 4, (0, 0)),
    (1, 12, 18, (7, 19), (3, 5), (1, 1), (1, 2), (2, 1), 3, (0, 0)),
    (2, 32, 16, (6, 20), (3, 3), (1, 1), (1, 1), (1, 1), 2, (0, 0)),
    (1, 8, 40, (5, 9), (3, 3), (1, 1), (0, 1), (1, 1), 2, (0, 0)),
    # depthwise with a channel multiplier, stride 1: the direct kernels, a group at a time
    (2, 3, 9, (8, 21), (3, 3), (1, 1), (1, 1), (1, 1), 3, (0, 0)),
    (1, 4, 8, (6, 7), (5, 5), (1, 1), (2, 2), (2, 1), 4, (0, 0)),
    # 16-channel groups: the direct forward and input gradient, two blocks a group; dW on GEMMs
    (1, 32, 32, (6, 11), (3, 3), (1, 1), (1, 1), (1, 1), 2, (0, 0)),
    # the DCGAN's kernel 4, stride 2, padding 1, input twice the output, 16+ channels: by the
    # stride's phases on Winograd F(2x2, 2x2) (the forward stacks the four phases as channels,
    # the transposed forward runs one 2x2 convolution per phase): even and odd tile counts
    (2, 20, 17, (8, 10), (4, 4), (2, 2), (1, 1), (1, 1), 1, (0, 0)),
    (3, 16, 24, (6, 4), (4, 4), (2, 2), (1, 1), (1, 1), 1, (0, 0)),
]


def built():
    assert native.is_built(), f"brainkern._native is not built: {native.why_not_built()}"


def runs_here(isa):
    built()
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU does not run {isa} (it runs {', '.join(native.supported_isas())})")
    return isa


def call(name, *args, **kwargs):
    """A kernel after its argument check, as tests/conftest.py does for the linear family."""
    getattr(native_conv, f"check_{name}")(*args)
    getattr(native_conv, name)(*args, **kwargs)


def poisoned_like(shape, fmt):
    return torch.full(shape, float("nan")).contiguous(memory_format=fmt)


def reference_conv(x, w, stride, padding, dilation, groups, out_hw):
    """conv2d in the contract's terms: zero padding (top, left), output size out_hw."""
    (kh, kw), (sh, sw), (dh, dw) = w.shape[2:], stride, dilation
    need_h = (out_hw[0] - 1) * sh + (kh - 1) * dh + 1
    need_w = (out_hw[1] - 1) * sw + (kw - 1) * dw + 1
    pad_bottom = max(0, need_h - padding[0] - x.shape[2])
    pad_right = max(0, need_w - padding[1] - x.shape[3])
    xp = F.pad(x, (padding[1], pad_right, padding[0], pad_bottom))
    return F.conv2d(xp, w, None, stride, 0, dilation, groups)[:, :, :out_hw[0], :out_hw[1]]


def out_size(case):
    _, _, _, (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), _, (eh, ew) = case
    return (max(0, (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) + eh,
            max(0, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1) + ew)


def activation_reference(z, code, param):
    if code == A.GELU:  # the erfc form: torch's erf form cancels for z << 0 (test_kernels_native)
        return 0.5 * z * torch.special.erfc(-z * 0.7071067811865476)
    return A.Activation("", code, param).forward(z)


def inputs(case, n=None):
    batch, c_in, c_out, (h, w), k, stride, padding, dilation, groups, _ = case
    x = torch.randn(batch if n is None else n, c_in, h, w)
    weight = torch.randn(c_out, c_in // groups, *k)
    return x, weight, torch.randn(c_out), (stride, padding, dilation, groups)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_conv2d_forward(isa, fmt, case):
    runs_here(isa)
    x, w, b, params = inputs(case)
    for bias, code, param in ((b, A.RELU, 0.0), (None, A.NONE, 0.0)):
        shape = (x.shape[0], w.shape[0], *out_size(case))
        out, pre = poisoned_like(shape, fmt), poisoned_like(shape, fmt)
        call("conv2d_forward", x.contiguous(memory_format=fmt), w, bias, out, pre, *params,
             code, param, isa=isa)
        z = reference_conv(x.double(), w.double(), *params, shape[2:])
        scale = reference_conv(x.double().abs(), w.double().abs(), *params, shape[2:])
        if bias is not None:
            z, scale = z + bias.double()[:, None, None], scale + bias.double().abs()[:, None, None]
        assert out.is_contiguous(memory_format=fmt)
        assert_close(pre, z, torch.float32, what="pre", scale=scale)
        assert_close(out, activation_reference(z, code, param), torch.float32, what="out",
                     scale=scale)


WINOGRAD_CASES = [CASES[10], CASES[16], CASES[25], CASES[26], CASES[27], CASES[28],
                  CASES[29]]  # 3x3 and 5x5


def forward_with_specials(isa, fmt, case, where):
    """conv2d_forward with an inf, a -inf and a NaN in x or the weight (``where``): NaN and
    infinities exactly where torch's float64 sum has them. Returns the inputs and both outputs."""
    x, w, b, params = inputs(case)
    special = x if where == "x" else w
    special.view(-1)[torch.randperm(special.numel())[:3]] = torch.tensor(
        [float("inf"), float("-inf"), float("nan")])
    shape = (x.shape[0], w.shape[0], *out_size(case))
    out = poisoned_like(shape, fmt)
    call("conv2d_forward", x.contiguous(memory_format=fmt), w, b, out, None, *params, A.NONE,
         0.0, isa=isa)
    z = reference_conv(x.double(), w.double(), *params, shape[2:]) + b.double()[:, None, None]
    assert torch.equal(out.isnan(), z.isnan()) and torch.equal(out.isinf(), z.isinf())
    assert torch.equal(out[out.isinf()], z[z.isinf()].float())
    return x, w, b, params, shape, out, z


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("where", ["x", "weight"])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=[str(i) for i in range(len(WINOGRAD_CASES))])
def test_winograd_layers_keep_torchs_infinities(isa, fmt, where, case):
    """Winograd's transforms mix a tile's inputs (an infinity there would make the tile's
    outputs NaN where torch's sum keeps the infinity): with an inf or NaN in x or the weight,
    the forward (and, with them in dz, the stride-1 input gradient) falls back to the direct
    sum, NaN and infinities exactly where torch's are, the finite outputs as accurate."""
    runs_here(isa)
    x, w, b, params, shape, out, z = forward_with_specials(isa, fmt, case, where)
    scale = reference_conv(x.double().abs().nan_to_num(0, 0, 0), w.double().abs().nan_to_num(
        0, 0, 0), *params, shape[2:]) + b.double().abs()[:, None, None]
    assert_close(out, z, torch.float32, what="out", scale=scale)
    if where == "x" and params[1][0] <= 2 * (w.shape[2] // 2):  # the adjoint runs Winograd
        g = torch.randn(shape)  # the adjoint's input is dz: the specials go there
        g.view(-1)[torch.randperm(g.numel())[:2]] = torch.tensor([float("inf"), float("nan")])
        gx = poisoned_like(x.shape, fmt)
        call("conv_transpose2d_forward", g.contiguous(memory_format=fmt), w, None, gx, None,
             *params, A.NONE, 0.0, isa=isa)
        ref = transpose_reference(g, w, *params, x.shape)
        assert torch.equal(gx.isnan(), ref.isnan()) and torch.equal(gx.isinf(), ref.isinf())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("where", ["x", "dz", "dz-overflow"])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=[str(i) for i in range(len(WINOGRAD_CASES))])
def test_winograd_weight_gradient_keeps_torchs_infinities(isa, fmt, where, case):
    """The weight gradient's Winograd transforms mix a tile's x and dz values: with an inf or
    NaN in either (or a finite dz so large that its transform would overflow: 1e38, over
    FLT_MAX / 9), it falls back to the implicit GEMM, NaN and infinities exactly where torch's
    float64 sum has them, the finite values as accurate. With the large dz, |x| <= 1 keeps every
    float32 partial sum finite in any order (two such dz add to at most 2e38): with 3e38 and
    randn x, whether a partial sum overflows before the other sign's term cancels it depends on
    the summation order, which differs by ISA (it failed on AVX-512 only)."""
    runs_here(isa)
    x, w, _, params = inputs(case)
    grad = torch.randn(x.shape[0], w.shape[0], *out_size(case))
    if where == "dz-overflow":
        x = x.clamp(-1.0, 1.0)
    special = x if where == "x" else grad
    values = [1e38, -1e38] if where == "dz-overflow" else [float("inf"), float("nan")]
    special.view(-1)[torch.randperm(special.numel())[:2]] = torch.tensor(values)
    grad_w = torch.full(w.shape, float("nan"))
    call("conv2d_backward_weight", grad.contiguous(memory_format=fmt),
         x.contiguous(memory_format=fmt), grad_w, *params, isa=isa)
    ref = weight_grad_reference(grad, x, w.shape, *params)
    assert torch.equal(grad_w.isnan(), ref.isnan())
    assert torch.equal(grad_w.isinf() | (ref.abs() > 3e38), ref.isinf() | (ref.abs() > 3e38))
    finite = ref.isfinite() & (ref.abs() < 1e38)
    scale = weight_grad_reference(grad.abs().nan_to_num(0, 0, 0), x.abs().nan_to_num(0, 0, 0),
                                  w.shape, *params)
    assert_close(grad_w[finite], ref[finite], torch.float32, scale=scale[finite])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [CASES[10], CASES[28]], ids=["5x5", "5x5-row-runs"])
def test_winograd_5x5(monkeypatch, isa, fmt, case):
    """The 5x5 layers' forward and stride-1 input gradient through F(2x2, 5x5), and the fused
    block's with BRAINKERN_WINOGRAD=all, as accurate as the contract asks (the other tests run
    the first two too; these name them)."""
    test_conv2d_forward(isa, fmt, case)
    test_conv_transpose2d_forward(isa, fmt, case)
    monkeypatch.setenv("BRAINKERN_WINOGRAD", "all")
    for code, param in BLOCK_ACTIVATIONS:
        test_conv2d_maxpool2d_forward(isa, fmt, case, code, param)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_fused_block_runs_5x5_winograd_where_it_settles_winners(monkeypatch, fmt):
    """The fused conv + max pooling decides the pooling's winners from the conv's last bits:
    with relu (whose near-ties it settles by exact sums) its 5x5 forward runs Winograd, other
    bits than BRAINKERN_WINOGRAD=3x3's direct sums; with gelu (not settled) it stays on the
    direct sums, the same bits as =3x3, other bits than =all."""
    built()
    x, w, b, params = inputs(CASES[10])
    x = x.contiguous(memory_format=fmt)
    h, w_out = out_size(CASES[10])
    for code, settled in ((A.RELU, True), (A.GELU, False)):
        outs = []
        for env in (None, "3x3", "all"):
            if env is None:
                monkeypatch.delenv("BRAINKERN_WINOGRAD", raising=False)
            else:
                monkeypatch.setenv("BRAINKERN_WINOGRAD", env)
            out = poisoned_like((x.shape[0], w.shape[0], h // 2, w_out // 2), fmt)
            codes = torch.empty(out.shape, dtype=torch.uint8).contiguous(memory_format=fmt)
            pre = torch.empty_like(out) if code == A.GELU else None
            call("conv2d_maxpool2d_forward", x, w, b, out, codes, pre, (h, w_out), *params,
                 code, 0.0)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]) != settled
        assert torch.equal(outs[0], outs[2]) == settled


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("code, param", [(A.NONE, 0.0), (A.RELU, 0.0), (A.LEAKY_RELU, 0.25)])
def test_fused_block_winograd_winners_are_the_exact_sums(isa, fmt, code, param):
    """Small integers in x, w and b: every float64 sum is exact, and many windows tie exactly
    (relu's zeros, equal sums). F(2x2, 5x5)'s float32 sums are off in the last bits (its
    transforms have thirds and fifteenths; F(2x2, 3x3)'s halves keep such integers exact),
    which breaks such ties at random (~60 of 16k windows here without the settling); the block
    settles each window in doubt by double sums, so its winners are exactly torch's float64
    max_pool2d's (the first of equal maxima) and its out as accurate as the sums'."""
    runs_here(isa)
    k = 5
    gen = torch.Generator().manual_seed(k * 10 + code)
    x = torch.randint(-3, 4, (4, 32, 16, 15), generator=gen).float()
    w = torch.randint(-2, 3, (64, 32, k, k), generator=gen).float()
    b = torch.randint(-2, 3, (64,), generator=gen).float()
    params = ((1, 1), (k // 2, k // 2), (1, 1), 1)
    conv_hw = (16, 15)
    out, indices, _ = run_block(x, w, b, params, conv_hw, fmt, code, param, isa)
    z = F.conv2d(x.double(), w.double(), b.double(), padding=k // 2)
    y = activation_reference(z, code, param)
    ref, ref_indices = F.max_pool2d(y, 2, return_indices=True)
    assert torch.equal(indices, ref_indices)
    scale = F.max_pool2d(F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(),
                                  padding=k // 2), 2)
    assert_close(out, ref, torch.float32, what="out", scale=scale)
    assert not torch.equal(out.double(), ref)  # Winograd ran: not the exact sums everywhere


@pytest.mark.parametrize("mode, case, differs", [
    ("0", CASES[16], True), ("0", CASES[10], True), ("3x3", CASES[16], False),
    ("3x3", CASES[10], True), ("all", CASES[10], False)], ids=["off-3x3", "off-5x5",
    "3x3-3x3", "3x3-5x5", "all-5x5"])
def test_winograd_switch(monkeypatch, mode, case, differs):
    """BRAINKERN_WINOGRAD (read at every call) picks the path: a layer's sums differ in their
    last bits between Winograd and the implicit GEMM, and each is accurate. The default runs
    3x3 and 5x5 through Winograd; 3x3 keeps 5x5 on the direct sums, 0 turns it off."""
    built()
    x, w, b, params = inputs(case)
    x = x.contiguous(memory_format=torch.channels_last)
    shape = (x.shape[0], w.shape[0], *out_size(case))
    outs = []
    for env in (None, mode):
        if env is None:
            monkeypatch.delenv("BRAINKERN_WINOGRAD", raising=False)
        else:
            monkeypatch.setenv("BRAINKERN_WINOGRAD", env)
        out = poisoned_like(shape, torch.channels_last)
        call("conv2d_forward", x, w, b, out, None, *params, A.NONE, 0.0)
        outs.append(out)
    z = reference_conv(x.double(), w.double(), *params, shape[2:]) + b.double()[:, None, None]
    for out in outs:
        assert_close(out, z, torch.float32, what="out")
    assert torch.equal(outs[0], outs[1]) != differs


def transpose_reference(x, w, stride, padding, dilation, groups, out_shape):
    """The adjoint of reference_conv from out_shape to x's shape, by float64 autograd."""
    target = torch.zeros(out_shape, dtype=torch.float64, requires_grad=True)
    z = reference_conv(target, w.double(), stride, padding, dilation, groups, x.shape[2:])
    (grad,) = torch.autograd.grad(z, target, x.double())
    return grad


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_conv_transpose2d_forward(isa, fmt, case):
    """Run on a convolution's output-shaped x back to its input's shape: conv2d's input
    gradient (no bias or activation) and nn.ConvTranspose2d's forward (with them)."""
    runs_here(isa)
    _, w, _, params = inputs(case)
    batch, c_in, c_out, (h, wd) = case[:4]
    x = torch.randn(batch, c_out, *out_size(case))
    bias = torch.randn(c_in)
    out_shape = (batch, c_in, h, wd)
    for b, code, param in ((None, A.NONE, 0.0), (bias, A.TANH, 0.0)):
        out, pre = poisoned_like(out_shape, fmt), poisoned_like(out_shape, fmt)
        call("conv_transpose2d_forward", x.contiguous(memory_format=fmt), w, b, out, pre,
             *params, code, param, isa=isa)
        z = transpose_reference(x, w, *params, out_shape)
        scale = transpose_reference(x.abs(), w.abs(), *params, out_shape)
        if b is not None:
            z, scale = z + b.double()[:, None, None], scale + b.double().abs()[:, None, None]
        assert_close(pre, z, torch.float32, what="pre", scale=scale)
        assert_close(out, activation_reference(z, code, param), torch.float32, what="out",
                     scale=scale)


def weight_grad_reference(grad, x, w_shape, stride, padding, dilation, groups):
    weight = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
    z = reference_conv(x.double(), weight, stride, padding, dilation, groups, grad.shape[2:])
    (dw,) = torch.autograd.grad(z, weight, grad.double())
    return dw


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_conv2d_backward_weight(isa, fmt, case):
    runs_here(isa)
    check_weight_grad(isa, fmt, case)


def check_weight_grad(isa, fmt, case, n=None):
    x, w, _, params = inputs(case, n)
    grad = torch.randn(x.shape[0], w.shape[0], *out_size(case))
    grad_w = torch.full(w.shape, float("nan"))
    call("conv2d_backward_weight", grad.contiguous(memory_format=fmt),
         x.contiguous(memory_format=fmt), grad_w, *params, isa=isa)
    ref = weight_grad_reference(grad, x, w.shape, *params)
    scale = weight_grad_reference(grad.abs(), x.abs(), w.shape, *params)
    assert_close(grad_w, ref, torch.float32, scale=scale)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [10, 17, 21], ids=["5x5", "dilated", "strided"])
def test_implicit_gemm_keeps_torchs_nans_on_the_padding(isa, fmt, case):
    """The implicit GEMM skips the products with the padding's zeros (whole kernel rows in the
    forward, rows and columns of pixels in the weight gradient), unless the other factor has an
    inf or NaN: torch's sums keep 0 * inf = NaN there. With specials in the weight (forward)
    or in dz (weight gradient), NaN and infinities exactly where torch's are, and the finite
    values as accurate."""
    runs_here(isa)
    x, _, _, params, shape, _, _ = forward_with_specials(isa, fmt, CASES[case], "weight")
    _, w, _, _ = inputs(CASES[case])
    grad = torch.randn(shape)
    grad.view(-1)[torch.randperm(grad.numel())[:2]] = torch.tensor([float("inf"), float("nan")])
    grad_w = torch.full(w.shape, float("nan"))
    call("conv2d_backward_weight", grad.contiguous(memory_format=fmt),
         x.contiguous(memory_format=fmt), grad_w, *params, isa=isa)
    ref = weight_grad_reference(grad, x, w.shape, *params)
    assert torch.equal(grad_w.isnan(), ref.isnan()) and torch.equal(grad_w.isinf(), ref.isinf())
    finite = ref.isfinite()
    scale = weight_grad_reference(grad.abs().nan_to_num(0, 0, 0), x.abs(), w.shape, *params)
    assert_close(grad_w[finite], ref[finite], torch.float32, scale=scale[finite])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [6, 11, 16, 17, 23],
                         ids=["stem", "dilated", "winograd", "implicit", "inplace"])
def test_weight_gradient_sums_images_within_a_part(isa, fmt, case):
    """More images than the weight gradient's parts (8): each part adds several images'
    products (the stems' direct kernel, Winograd, the implicit GEMM, the GEMM path)."""
    runs_here(isa)
    check_weight_grad(isa, fmt, CASES[case], n=19)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_weight_gradient_is_the_same_on_any_thread_count(fmt):
    built()
    x, w, _, params = inputs(CASES[10], n=5)  # several chunks, several parts of the sum
    grad = torch.randn(5, w.shape[0], *out_size(CASES[10])).contiguous(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    results = []
    for threads in (1, 2, 3):
        grad_w = torch.full(w.shape, float("nan"))
        call("conv2d_backward_weight", grad, x, grad_w, *params, num_threads=threads)
        results.append(grad_w)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def saved_and_reference(z, code, param):
    """(saved, d act / d z) for pre-activations z (float64)."""
    zz = z.clone().requires_grad_(True)
    y = activation_reference(zz, code, param)
    (d,) = torch.autograd.grad(y.sum(), zz)
    return (y if A.saves_output(code, param) else z).float(), d


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("code, param", ACTIVATIONS[1:])
def test_conv2d_activation_backward(isa, fmt, code, param):
    runs_here(isa)
    for shape in ((3, 5, 7, 9), (2, 33, 4, 17), (1, 1, 1, 1)):
        z = torch.randn(shape, dtype=torch.float64) * 3
        saved, d = saved_and_reference(z, code, param)
        saved = saved.contiguous(memory_format=fmt)
        # grad_out as a strided view (any strides are allowed) and contiguous in saved's format
        # (what the op passes; small NCHW planes take an image-at-a-time path)
        strided = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3])[..., ::2]
        for grad_out, grad_bias in itertools.product(
                (strided, strided.contiguous(memory_format=fmt)),
                (torch.full((shape[1],), float("nan")), None)):
            grad_pre = poisoned_like(shape, fmt)
            call("conv2d_activation_backward", grad_out, saved, grad_pre, grad_bias, code, param,
                 A.saves_output(code, param), isa=isa)
            ref = grad_out.double() * d
            scale = grad_out.double().abs() * d.abs()
            assert_close(grad_pre, ref, torch.float32, what="grad_pre", scale=scale)
            if grad_bias is not None:
                assert_close(grad_bias, ref.sum((0, 2, 3)), torch.float32, what="grad_bias",
                             scale=scale.sum((0, 2, 3)))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_bias_gradient_is_the_same_on_any_thread_count(fmt):
    built()
    shape = (8, 16, 32, 32)
    saved = torch.randn(shape).relu().contiguous(memory_format=fmt)
    grad_out = torch.randn(shape).contiguous(memory_format=fmt)
    sums = []
    for threads in (1, 2, 3):
        grad_bias, grad_pre = torch.empty(16), torch.empty_like(saved)
        call("conv2d_activation_backward", grad_out, saved, grad_pre, grad_bias, A.RELU, 0.0,
             True, num_threads=threads)
        sums.append(grad_bias)
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [6, 11, 0, 7], ids=["stem", "dilated", "rgb", "strided"])
@pytest.mark.parametrize("code, param", [(A.RELU, 0.0), (A.LEAKY_RELU, -0.2), (A.SILU, 0.0)])
def test_conv2d_activation_backward_weight(isa, fmt, case, code, param):
    """The activation backward fused into the weight gradient (stride-1 thin layers: dz made
    an image at a time; the strided RGB stem: the two kernels composed) against float64, and
    the weight gradient bit for bit the composed kernels' (the same dz into the same direct
    kernel), on 19 images (several in each part of the sum) and any thread count."""
    runs_here(isa)
    x, w, _, params = inputs(CASES[case], n=19)
    x = x.contiguous(memory_format=fmt)
    z = torch.randn(19, w.shape[0], *out_size(CASES[case]), dtype=torch.float64) * 3
    saved, d = saved_and_reference(z, code, param)
    saved = saved.contiguous(memory_format=fmt)
    grad_out = torch.randn(z.shape).contiguous(memory_format=fmt)
    saves = A.saves_output(code, param)
    runs = []
    for threads in (1, 2, 3):
        grad_w, grad_b = torch.full(w.shape, float("nan")), torch.full((w.shape[0],), float("nan"))
        call("conv2d_activation_backward_weight", grad_out, saved, x, grad_w, grad_b, *params,
             code, param, saves, isa=isa, num_threads=threads)
        runs.append((grad_w, grad_b))
    for grad_w, grad_b in runs[1:]:
        assert torch.equal(grad_w, runs[0][0]) and torch.equal(grad_b, runs[0][1])
    grad_w, grad_b = runs[0]
    dz = grad_out.double() * d
    scale = grad_out.double().abs() * d.abs()
    assert_close(grad_w, weight_grad_reference(dz, x.double(), w.shape, *params), torch.float32,
                 what="grad_w", scale=weight_grad_reference(scale, x.double().abs(), w.shape,
                                                            *params))
    assert_close(grad_b, dz.sum((0, 2, 3)), torch.float32, what="grad_b",
                 scale=scale.sum((0, 2, 3)))
    grad_pre, composed = poisoned_like(z.shape, fmt), torch.full(w.shape, float("nan"))
    call("conv2d_activation_backward", grad_out, saved, grad_pre, None, code, param, saves,
         isa=isa)
    call("conv2d_backward_weight", grad_pre, x, composed, *params, isa=isa)
    assert torch.equal(grad_w, composed)


BLOCK_ACTIVATIONS = [(A.NONE, 0.0), (A.RELU, 0.0), (A.LEAKY_RELU, -0.2), (A.GELU, 0.0)]


def run_block(x, w, b, params, conv_hw, fmt, code, param, isa=None, codes=False):
    """The fused block on NaN-poisoned outputs: (out, indices (uint8 window codes when codes),
    pre or None)."""
    shape = (x.shape[0], w.shape[0], conv_hw[0] // 2, conv_hw[1] // 2)
    out = poisoned_like(shape, fmt).to(x.dtype)
    indices = torch.full(shape, 255 if codes else -1,
                         dtype=torch.uint8 if codes else torch.int64).contiguous(memory_format=fmt)
    pre = torch.full_like(out, float("nan")) if code in (A.GELU, A.SILU) else None  # needs z
    call("conv2d_maxpool2d_forward", x.contiguous(memory_format=fmt), w, b, out, indices, pre,
         conv_hw, *params, code, param, isa=isa)
    assert out.is_contiguous(memory_format=fmt) and indices.is_contiguous(memory_format=fmt)
    return out, indices, pre


def at(t, indices):
    """t (N, C, H, W) at flat per-plane indices (N, C, h, w)."""
    return t.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [c for c in CASES if min(out_size(c)) >= 2],
                         ids=[str(i) for i, c in enumerate(CASES) if min(out_size(c)) >= 2])
@pytest.mark.parametrize("code, param", BLOCK_ACTIVATIONS)
def test_conv2d_maxpool2d_forward(isa, fmt, case, code, param):
    """The pooled maximum of act(z) as torch's float64 max_pool2d gives it; each index names a
    tap of its own window holding that maximum (near-ties may pick another tap than float64),
    and pre is z there. Odd conv sizes leave the last row / column out, as floor mode does."""
    runs_here(isa)
    x, w, b, params = inputs(case)
    conv_hw = out_size(case)
    out, indices, pre = run_block(x, w, b, params, conv_hw, fmt, code, param, isa)
    z = reference_conv(x.double(), w.double(), *params, conv_hw) + b.double()[:, None, None]
    scale = (reference_conv(x.double().abs(), w.double().abs(), *params, conv_hw)
             + b.double().abs()[:, None, None])
    y = activation_reference(z, code, param)
    pooled_scale = F.max_pool2d(scale, 2)
    assert_close(out, F.max_pool2d(y, 2), torch.float32, what="out", scale=pooled_scale)
    rows = torch.arange(out.shape[2])[:, None]
    cols = torch.arange(out.shape[3])
    assert torch.equal(indices // conv_hw[1] // 2, rows.expand(out.shape))
    assert torch.equal(indices % conv_hw[1] // 2, cols.expand(out.shape))
    assert_close(out, at(y, indices), torch.float32, what="out at indices", scale=pooled_scale)
    if pre is not None:
        assert_close(pre, at(z, indices), torch.float32, what="pre", scale=pooled_scale)
    # Window codes instead: the same winners, named by their place in the window.
    out_c, codes, pre_c = run_block(x, w, b, params, conv_hw, fmt, code, param, isa, codes=True)
    assert torch.equal(out_c, out) and codes.is_contiguous(memory_format=fmt)
    assert torch.equal(codes_to_indices_2x2(codes, conv_hw[1]), indices)
    assert pre is None or torch.equal(pre_c, pre)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [CASES[6], CASES[10], CASES[28]], ids=["stem", "5x5", "5x5-b"])
@pytest.mark.parametrize("code, param", [(A.RELU, 0.0), (A.GELU, 0.0)])
def test_conv2d_maxpool2d_forward_without_winners(isa, fmt, case, code, param):
    """indices None (inference): out alone, as accurate as with winners (a 5x5 layer on
    Winograd for every activation, nothing settled); the same as with winners where those
    run the same sums (the stem's direct sums)."""
    runs_here(isa)
    x, w, b, params = inputs(case)
    conv_hw = out_size(case)
    out = poisoned_like((x.shape[0], w.shape[0], conv_hw[0] // 2, conv_hw[1] // 2), fmt)
    xf = x.contiguous(memory_format=fmt)
    native_conv.check_conv2d_maxpool2d_forward(xf, w, b, out, None, None, conv_hw, *params, code,
                                               param)
    native_conv.conv2d_maxpool2d_forward(xf, w, b, out, None, None, conv_hw, *params, code,
                                         param, isa=isa)
    z = reference_conv(x.double(), w.double(), *params, conv_hw) + b.double()[:, None, None]
    scale = F.max_pool2d(reference_conv(x.double().abs(), w.double().abs(), *params, conv_hw)
                         + b.double().abs()[:, None, None], 2)
    assert_close(out, F.max_pool2d(activation_reference(z, code, param), 2), torch.float32,
                 what="out", scale=scale)
    if case is CASES[6]:
        assert torch.equal(out, run_block(x, w, b, params, conv_hw, fmt, code, param, isa)[0])


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6], CASES[10]],
                         ids=["rgb", "depthwise", "stem", "wide"])
def test_conv2d_maxpool2d_forward_nan_wins_as_in_torch(fmt, case):
    """NaN inputs: the NaN windows and their indices (the last NaN tap wins) exactly torch's."""
    built()
    x, w, b, params = inputs(case)
    x.view(-1)[torch.randint(x.numel(), (3,))] = float("nan")
    conv_hw = out_size(case)
    out, indices, _ = run_block(x, w, b, params, conv_hw, fmt, A.RELU, 0.0)
    z = reference_conv(x.double(), w.double(), *params, conv_hw) + b.double()[:, None, None]
    ref, ref_indices = F.max_pool2d(z.relu(), 2, return_indices=True)
    nan = ref.isnan()
    assert nan.any() and torch.equal(out.isnan(), nan)
    assert torch.equal(indices[nan], ref_indices[nan])


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_conv2d_maxpool2d_forward_threads_and_float64(fmt):
    """The same bits on 1 and 2 threads; float64 composes Numba's conv and pool."""
    built()
    case = CASES[10]
    x, w, b, params = inputs(case)
    conv_hw = out_size(case)
    one = run_block(x, w, b, params, conv_hw, fmt, A.GELU, 0.0)
    shape = one[0].shape
    two = [poisoned_like(shape, fmt), torch.empty(shape, dtype=torch.int64), poisoned_like(
        shape, fmt)]
    two[1] = two[1].contiguous(memory_format=fmt)
    native_conv.conv2d_maxpool2d_forward(x.contiguous(memory_format=fmt), w, b, *two, conv_hw,
                                         *params, A.GELU, 0.0, num_threads=1)
    assert all(torch.equal(a, c) for a, c in zip(one, two))
    x, w, b = x.double(), w.double(), b.double()
    out, indices, pre = run_block(x, w, b, params, conv_hw, fmt, A.SILU, 0.0)
    z = reference_conv(x, w, *params, conv_hw) + b[:, None, None]
    ref, ref_indices = F.max_pool2d(F.silu(z), 2, return_indices=True)
    assert_close(out, ref, torch.float64)
    assert torch.equal(indices, ref_indices)
    assert_close(pre, at(z, indices), torch.float64)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_conv2d_maxpool2d_forward_batch_0(fmt):
    built()
    case = CASES[3]
    x, w, b, params = inputs(case, n=0)
    out, indices, _ = run_block(x, w, b, params, out_size(case), fmt, A.RELU, 0.0)
    assert out.shape[0] == indices.shape[0] == 0


def pooled_backward_inputs(case, fmt, n=None):
    """x, w, params, conv_hw, a pooled dz with a quarter of it zero (a ReLU's), random window
    codes, all in fmt."""
    x, w, _, params = inputs(case, n)
    conv_hw = out_size(case)
    shape = (x.shape[0], w.shape[0], conv_hw[0] // 2, conv_hw[1] // 2)
    grad = torch.randn(shape)
    grad[torch.rand(shape) < 0.25] = 0.0
    codes = torch.randint(0, 4, shape, dtype=torch.uint8)
    return (x.contiguous(memory_format=fmt), w, params, conv_hw,
            grad.contiguous(memory_format=fmt), codes.contiguous(memory_format=fmt))


def run_pooled_backward(x, w, params, conv_hw, grad, codes, fmt, isa=None, num_threads=None,
                        need=(True, True)):
    """conv2d_maxpool2d_backward into NaN-poisoned (grad_x, grad_w) (None where not needed)
    and what it returned."""
    gx = poisoned_like(x.shape, fmt) if need[0] else None
    gw = torch.full_like(w, float("nan")) if need[1] else None
    native_conv.check_conv2d_maxpool2d_backward(grad, codes, x, w, gx, gw, conv_hw, *params)
    ran = native_conv.conv2d_maxpool2d_backward(grad, codes, x, w, gx, gw, conv_hw, *params,
                                                isa=isa, num_threads=num_threads)
    return ran, gx, gw


def pooled_backward_reference(x, w, params, conv_hw, grad, codes):
    """(dx, dW) in float64 through the dense dz, with the magnitudes their rounding is
    relative to (the same on |x|, |w|, |dz|)."""
    dz = torch.zeros(*grad.shape[:2], *conv_hw, dtype=torch.float64)
    taps = codes_to_indices_2x2(codes, conv_hw[1]).flatten(2)
    dz.flatten(2).scatter_(2, taps, grad.double().flatten(2))

    def grads(x, w, dz):
        x, w = x.double().requires_grad_(), w.double().requires_grad_()
        z = reference_conv(x, w, *params, conv_hw)
        return torch.autograd.grad(z, (x, w), dz)

    return grads(x, w, dz), grads(x.abs(), w.abs(), dz.abs())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [c for c in CASES if min(out_size(c)) >= 2],
                         ids=[str(i) for i, c in enumerate(CASES) if min(out_size(c)) >= 2])
def test_conv2d_maxpool2d_backward(isa, fmt, case):
    """The block's dx and dW from the pooled dz and window codes, the winners' products alone,
    as the dense float64 gradients of dz scattered to the winners (strides, dilation, groups,
    depthwise, odd conv sizes whose last row / column no window reads, outputs past torch's)."""
    runs_here(isa)
    x, w, params, conv_hw, grad, codes = pooled_backward_inputs(case, fmt)
    ran, gx, gw = run_pooled_backward(x, w, params, conv_hw, grad, codes, fmt, isa)
    (rx, rw), (sx, sw) = pooled_backward_reference(x, w, params, conv_hw, grad, codes)
    assert ran and gx.is_contiguous(memory_format=fmt)
    assert_close(gx, rx, torch.float32, what="grad_x", scale=sx)
    assert_close(gw, rw, torch.float32, what="grad_w", scale=sw)
    # Each alone: the other stays untouched (None).
    for need in ((True, False), (False, True)):
        ran, gx1, gw1 = run_pooled_backward(x, w, params, conv_hw, grad, codes, fmt, isa,
                                            need=need)
        assert ran and torch.equal(gx1 if need[0] else gw1, gx if need[0] else gw)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_conv2d_maxpool2d_backward_threads_and_batch_0(fmt):
    """The same bits on 1, 2 and 3 threads (images split for dx, and for dW in fixed chunks
    whose partial sums are added in order: 3 images, and 11 in 8 chunks); batch 0 writes a
    zero dW."""
    built()
    case = CASES[10]
    for n in (None, 11):
        args = pooled_backward_inputs(case, fmt, n=n)
        runs = [run_pooled_backward(*args, fmt, num_threads=t) for t in (1, 2, 3)]
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run[1:], runs[0][1:]))
    ran, gx, gw = run_pooled_backward(*pooled_backward_inputs(case, fmt, n=0), fmt)
    assert ran and gx.shape[0] == 0 and torch.equal(gw, torch.zeros_like(gw))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("where", ["grad", "x", "weight"])
def test_conv2d_maxpool2d_backward_declines_non_finite(fmt, where):
    """An inf or NaN where torch's dense sums would keep a zero's 0 * inf = NaN: it returns
    False and writes nothing (the ops layer runs the dense backward); an x or weight with one
    that the wanted gradient does not read runs."""
    built()
    x, w, params, conv_hw, grad, codes = pooled_backward_inputs(CASES[0], fmt)
    t = {"grad": grad, "x": x, "weight": w}[where]
    t[1, 1, 1, 1] = float("inf") if where != "x" else float("nan")
    ran, gx, gw = run_pooled_backward(x, w, params, conv_hw, grad, codes, fmt)
    assert not ran and gx.isnan().all() and gw.isnan().all()
    if where == "grad":  # dW's pass finds it as it reads grad, dx alone before it runs
        for need in ((True, False), (False, True)):
            ran, gx, gw = run_pooled_backward(x, w, params, conv_hw, grad, codes, fmt, need=need)
            assert not ran and (gx if need[0] else gw).isnan().all()
    else:  # x only feeds dW, the weight only dx
        need = (where == "x", where == "weight")
        ran, gx, gw = run_pooled_backward(x, w, params, conv_hw, grad, codes, fmt, need=need)
        (rx, rw), (sx, sw) = pooled_backward_reference(x, w, params, conv_hw, grad, codes)
        assert ran
        if need[0]:
            assert_close(gx, rx, torch.float32, what="grad_x", scale=sx)
        else:
            assert_close(gw, rw, torch.float32, what="grad_w", scale=sw)


def test_conv2d_maxpool2d_backward_declines_what_it_does_not_take():
    """float64 and int64 indices: False, nothing written; bad shapes: a named error."""
    built()
    x, w, params, conv_hw, grad, codes = pooled_backward_inputs(CASES[0], torch.contiguous_format)
    taps = codes_to_indices_2x2(codes, conv_hw[1])
    assert not run_pooled_backward(x, w, params, conv_hw, grad, taps,
                                   torch.contiguous_format)[0]
    assert not run_pooled_backward(x.double(), w.double(), params, conv_hw, grad.double(),
                                   codes, torch.contiguous_format)[0]
    with pytest.raises(ValueError, match="grad_pooled must be"):
        run_pooled_backward(x, w, params, conv_hw, grad[:, :, 1:].contiguous(),
                            codes[:, :, 1:].contiguous(),
                            torch.contiguous_format)
    with pytest.raises(ValueError, match="conv_hw"):
        run_pooled_backward(x, w, params, (1, 5), grad, codes, torch.contiguous_format)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [CASES[6], CASES[10], CASES[3]], ids=["stem", "wide", "groups"])
@pytest.mark.parametrize("code, param", [(A.RELU, 0.0), (A.LEAKY_RELU, 0.1)])
def test_conv2d_maxpool2d_backward_applies_the_activation(isa, fmt, case, code, param):
    """With act_code, grad_pooled is g and saved the pooled output: dx and dW the same bits as
    conv2d_activation_backward's dz fed to the kernel, and db dz's per-channel sums."""
    runs_here(isa)
    x, w, params, conv_hw, grad, codes = pooled_backward_inputs(case, fmt)
    out = torch.randn(grad.shape).contiguous(memory_format=fmt)
    out[torch.rand(out.shape) < 0.3] = 0.0  # relu's zeros, where act' is 0 (or the slope)
    saved = out.relu() if code == A.RELU else torch.where(out > 0, out, out * param)
    dz = torch.empty_like(grad)
    call("conv2d_activation_backward", grad, saved, dz, None, code, param, True, isa=isa)
    ran, gx, gw = run_pooled_backward(x, w, params, conv_hw, dz, codes, fmt, isa)
    gx1, gw1, gb = poisoned_like(x.shape, fmt), torch.full_like(w, float("nan")), torch.empty(
        w.shape[0])
    native_conv.check_conv2d_maxpool2d_backward(grad, codes, x, w, gx1, gw1, conv_hw, *params,
                                                saved=saved, act_code=code, act_param=param,
                                                grad_bias=gb)
    assert ran and native_conv.conv2d_maxpool2d_backward(
        grad, codes, x, w, gx1, gw1, conv_hw, *params, saved=saved, act_code=code,
        act_param=param, grad_bias=gb, isa=isa)
    assert torch.equal(gx1, gx) and torch.equal(gw1, gw)
    ref = dz.double().sum((0, 2, 3))
    assert_close(gb, ref, torch.float32, what="grad_bias", scale=dz.double().abs().sum((0, 2, 3)))


def test_conv2d_maxpool2d_backward_activation_arguments():
    """Activations it does not derive: False, nothing written; act without saved, or db without
    dW: a named error."""
    built()
    fmt = torch.contiguous_format
    x, w, params, conv_hw, grad, codes = pooled_backward_inputs(CASES[6], fmt)
    gw = torch.full_like(w, float("nan"))
    for code, param in ((A.SIGMOID, 0.0), (A.GELU, 0.0), (A.LEAKY_RELU, -0.2)):
        assert not native_conv.conv2d_maxpool2d_backward(
            grad, codes, x, w, None, gw, conv_hw, *params, saved=grad, act_code=code,
            act_param=param)
        assert gw.isnan().all()
    with pytest.raises(ValueError, match="needs saved"):
        native_conv.check_conv2d_maxpool2d_backward(grad, codes, x, w, None, gw, conv_hw,
                                                    *params, act_code=A.RELU)
    with pytest.raises(ValueError, match="grad_bias needs grad_weight"):
        native_conv.check_conv2d_maxpool2d_backward(grad, codes, x, w, None, None, conv_hw,
                                                    *params, saved=grad, act_code=A.RELU,
                                                    grad_bias=torch.empty(w.shape[0]))


@pytest.mark.parametrize("n", [1, 2])
def test_nchw_batch_smaller_than_the_team(n):
    """Fewer images than threads: the NCHW forward runs the whole batch through NHWC, pixels
    shared out; the same as torch and as one thread."""
    built()
    case = CASES[10]
    x, w, b, params = inputs(case, n=n)
    shape = (n, w.shape[0], *out_size(case))
    outs = []
    for threads in (1, 2, 3):
        out, pre = (poisoned_like(shape, torch.contiguous_format) for _ in range(2))
        call("conv2d_forward", x, w, b, out, pre, *params, A.SILU, 0.0, num_threads=threads)
        outs.append((out, pre))
    z = reference_conv(x.double(), w.double(), *params, shape[2:]) + b.double()[:, None, None]
    assert_close(outs[2][1], z, torch.float32, what="pre")
    assert_close(outs[2][0], F.silu(z), torch.float32, what="out")
    assert all(torch.equal(a, c) for pair in outs[1:] for a, c in zip(pair, outs[0]))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("hw", [1, 4])
def test_generator_layers_on_small_images(fmt, hw):
    """A DCGAN generator's upsampling (1x1 and 4x4 inputs, many images): the transposed forward
    takes several images per GEMM (NCHW through an NHWC copy of the batch), its weight gradient
    one GEMM shared by the team; the same as torch and on any thread count."""
    built()
    n, c_x, c_out = 7, 24, 12
    stride, padding = ((1, 1), (0, 0)) if hw == 1 else ((2, 2), (1, 1))
    x = torch.randn(n, c_x, hw, hw).contiguous(memory_format=fmt)
    w = torch.randn(c_x, c_out, 4, 4)
    b = torch.randn(c_out)
    params = (stride, padding, (1, 1), 1)
    ref = F.conv_transpose2d(x.double(), w.double(), b.double(), stride, padding)
    grad = torch.randn(ref.shape).contiguous(memory_format=fmt)
    weight = w.double().requires_grad_(True)
    y = F.conv_transpose2d(x.double(), weight, None, stride, padding)
    (ref_w,) = torch.autograd.grad(y, weight, grad.double())
    outs = []
    for threads in (1, 2, 3):
        out = poisoned_like(ref.shape, fmt)
        pre = poisoned_like(ref.shape, fmt)
        call("conv_transpose2d_forward", x, w, b, out, pre, *params, A.RELU, 0.0,
             num_threads=threads)
        grad_w = torch.full(w.shape, float("nan"))
        call("conv2d_backward_weight", x, grad, grad_w, *params, num_threads=threads)
        outs.append((out, pre, grad_w))
    assert_close(outs[0][1], ref, torch.float32, what="pre")
    assert_close(outs[0][0], ref.relu(), torch.float32, what="out")
    assert_close(outs[0][2], ref_w, torch.float32, what="grad_w")
    assert all(torch.equal(a, c) for run in outs[1:] for a, c in zip(run, outs[0]))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_weight_too_large_to_pack_once(fmt):
    """A weight of over a million floats is packed by each chunk instead of once per call (its
    copy would be page-faulted in on every call): forward, transposed and the fused block."""
    built()
    x = torch.randn(2, 128, 5, 4).contiguous(memory_format=fmt)
    w = torch.randn(1040, 128, 3, 3)  # 1040 x 1152 floats
    b = torch.randn(1040)
    params = ((1, 1), (1, 1), (1, 1), 1)
    out = poisoned_like((2, 1040, 5, 4), fmt)
    call("conv2d_forward", x, w, b, out, None, *params, A.NONE, 0.0)
    z = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert_close(out, z, torch.float32, scale=F.conv2d(x.double().abs(), w.double().abs(),
                                                       b.double().abs(), padding=1))
    grad = torch.randn(2, 1040, 5, 4).contiguous(memory_format=fmt)
    dx = poisoned_like(x.shape, fmt)
    call("conv_transpose2d_forward", grad, w, None, dx, None, *params, A.NONE, 0.0)
    ref = F.conv_transpose2d(grad.double(), w.double(), padding=1)
    assert_close(dx, ref, torch.float32, scale=F.conv_transpose2d(
        grad.double().abs(), w.double().abs(), padding=1))
    pooled = poisoned_like((2, 1040, 2, 2), fmt)
    indices = torch.empty(pooled.shape, dtype=torch.int64).contiguous(memory_format=fmt)
    call("conv2d_maxpool2d_forward", x, w, b, pooled, indices, None, (5, 4), *params, A.RELU,
         0.0)
    assert_close(pooled, F.max_pool2d(z.relu(), 2), torch.float32)


def test_large_conv_buffers_are_released():
    """A layer whose weight-gradient parts (8 x 256 x 2304 floats, 18 MB) exceed the 4 MB a
    buffer may keep leaves this thread holding no more than a small layer would."""
    built()
    x = torch.randn(1, 256, 6, 6)
    grad = torch.randn(1, 256, 6, 6)
    grad_w = torch.empty(256, 256, 3, 3)
    call("conv2d_backward_weight", grad, x, grad_w, (1, 1), (1, 1), (1, 1), 1, num_threads=1)
    held = native.core().conv_scratch_bytes()
    assert 0 < held <= 9 * 4 * 2**20
    assert held < 8 * grad_w.numel() * 4
    assert_close(grad_w, weight_grad_reference(grad, x, grad_w.shape, (1, 1), (1, 1), (1, 1), 1),
                 torch.float32, scale=weight_grad_reference(grad.abs(), x.abs(), grad_w.shape,
                                                           (1, 1), (1, 1), (1, 1), 1))


def test_checks_name_what_the_core_cannot_run():
    built()
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 2, 3, 3)
    out = torch.empty(2, 6, 6, 6)
    params = ((1, 1), (0, 0), (1, 1), 2)
    native_conv.check_conv2d_forward(x, w, None, out, None, *params, A.NONE, 0.0)
    with pytest.raises(TypeError, match="float32"):
        native_conv.check_conv2d_forward(x.half(), w, None, out, None, *params, A.NONE, 0.0)
    with pytest.raises(ValueError, match="weight"):
        native_conv.check_conv2d_forward(x, w[:, :1], None, out, None, *params, A.NONE, 0.0)
    with pytest.raises(ValueError, match="contiguous NCHW or all channels_last"):
        native_conv.check_conv2d_forward(x, w, None, out.contiguous(
            memory_format=torch.channels_last), None, *params, A.NONE, 0.0)
    with pytest.raises(ValueError, match="out"):
        native_conv.check_conv2d_forward(x, w, None, out[:, :3].contiguous(), None, *params,
                                         A.NONE, 0.0)
    with pytest.raises(ValueError, match="padding"):
        native_conv.check_conv2d_forward(x, w, None, out, None, (1, 1), (-1, 0), (1, 1), 2,
                                         A.NONE, 0.0)
    pooled = torch.empty(2, 6, 3, 3)
    block = (x, w, None, pooled, torch.empty(2, 6, 3, 3, dtype=torch.int64), None, (6, 6))
    native_conv.check_conv2d_maxpool2d_forward(*block, *params, A.NONE, 0.0)
    with pytest.raises(TypeError, match="int64"):
        native_conv.check_conv2d_maxpool2d_forward(*block[:4], pooled, None, (6, 6), *params,
                                                   A.NONE, 0.0)
    with pytest.raises(ValueError, match="conv_hw"):
        native_conv.check_conv2d_maxpool2d_forward(*block[:6], (1, 6), *params, A.NONE, 0.0)
    with pytest.raises(ValueError, match="out must be"):
        native_conv.check_conv2d_maxpool2d_forward(*block[:6], (8, 8), *params, A.NONE, 0.0)
    with pytest.raises(ValueError, match="saves the output"):
        native_conv.check_conv2d_activation_backward(out, out, out, None, A.RELU, 0.0, False)
    with pytest.raises(ValueError, match="grad_bias"):
        native_conv.check_conv2d_activation_backward(out, out, out, torch.empty(5), A.RELU, 0.0,
                                                     True)


def test_family_declares_what_it_serves():
    assert native_conv.DEVICES == ("cpu",)
    assert native_conv.DTYPES == (torch.float32, torch.float64)
    assert TOLERANCE[torch.float32] == 1e-5
