"""The Numba conv kernels' offset-addressed paths, each reached on purpose.

conv2d_forward and conv_transpose2d_forward read a zero-padded input copy through per-pixel
bases and per-tap offsets (_simd_conv): NCHW outputs with unit input steps along a row and few
vector lanes past the row's end take channel rows and pixel vectors (row segments of ``lanes``
pixels, several output rows per tile), everything else pixel rows; conv2d_backward_weight reads
the padded input and an NHWC grad_pre in place when a group has at least ``lanes`` output
channels (a last vector moved back to end at the group's last channel). The shapes here are
chosen per path and per lane count (16 float32 / 8 float64 lanes with AVX-512, 8 / 4 with AVX),
against torch in float64, outputs NaN-poisoned, both formats.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit

from brainkern import activations as acts
from brainkern.kernels.numba import _conv_pad, _simd_conv
from brainkern.kernels.numba import conv as kern
from brainkern.kernels.numba._simd import gemm_tile
from helpers import assert_close, poisoned

DTYPES = [torch.float32, torch.float64]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
LAYOUT_IDS = ["nchw", "nhwc"]


def lanes_of(dtype):
    return gemm_tile(np.dtype(str(dtype).removeprefix("torch.")))[2]


def make(shape, dtype, layout=torch.contiguous_format):
    return torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)


def out_like(shape, dtype, layout):
    return poisoned(*shape, dtype=dtype).contiguous(memory_format=layout)


@njit
def _run_offsets(a, a_base, a_off, b, b_base, b_off, kc, dst, ld, load):
    _simd_conv.microkernel_offsets(a, a_base, a_off, b, b_base, b_off, kc, dst, 0, ld, load)


@njit
def _run_packed_a(a, a_base, a_off, b, b_base, b_off, kc, dst, ld, load):
    _simd_conv.microkernel_offsets_packed_a(a, a_base, a_off, b, b_base, b_off, kc, dst, 0, ld, load)


@njit
def _run_row(a, a_base, a_off, b, b_base, b_off, kc, dst, ld, load):
    _simd_conv.microkernel_offsets_row(a, a_base, a_off, b, b_base, b_off, kc, dst, 0, ld, load)


RUNNERS = {(True, False): _run_offsets, (False, False): _run_packed_a, (False, True): _run_row}


@pytest.mark.parametrize("rows_apart,single_row", list(RUNNERS),
                         ids=["rows_apart", "packed_a", "single_row"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("load", [False, True], ids=["zero", "load"])
@pytest.mark.parametrize("kc", [0, 1, 37])
def test_microkernel_offsets(kc, load, dtype, rows_apart, single_row):
    """Every tile element from the offsets it is documented to read, added to the tile's
    initial values (load) or to zeros; the destination's row stride is wider than the tile and
    its gaps stay untouched."""
    mr, nr, lanes = _simd_conv.offsets_tile(dtype, rows_apart, single_row)
    rng = np.random.default_rng(kc)
    a, b = rng.standard_normal(4000).astype(dtype), rng.standard_normal(6000).astype(dtype)
    a_off, b_off = rng.integers(0, 3000, kc), rng.integers(0, 5000, kc)
    a_base = rng.integers(0, 900, mr) if rows_apart else np.array([rng.integers(0, 900)])
    b_base = rng.integers(0, 900, nr // lanes)
    ld = nr + 3
    dst = np.full(mr * ld, np.nan, dtype)
    initial = rng.standard_normal((mr, nr)).astype(dtype)
    dst.reshape(mr, ld)[:, :nr] = initial
    RUNNERS[rows_apart, single_row](a, a_base, a_off, b, b_base, b_off, kc, dst, ld, load)
    rows = a_base[:, None] if rows_apart else a_base[0] + np.arange(mr)[:, None]
    big_a = a[rows + a_off[None, :]].astype(np.float64)
    big_b = np.concatenate([b[base + b_off[:, None] + np.arange(lanes)[None, :]]
                            for base in b_base], axis=1).astype(np.float64)
    tile = dst.reshape(mr, ld)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    ref = big_a @ big_b + (initial if load else 0.0)
    bound = tol * (np.abs(big_a) @ np.abs(big_b) + (np.abs(initial) if load else 0.0))
    assert (np.abs(tile[:, :nr] - ref) <= bound).all()
    assert np.isnan(tile[:, nr:]).all()


@pytest.mark.parametrize("nchw", [True, False], ids=["to_nchw", "to_nhwc"])
@pytest.mark.parametrize("source", ["nchw", "nhwc", "sliced"])
def test_padded_copy(source, nchw):
    """The padded copy equals F.pad for any source strides, in the format asked for."""
    x = make((3, 5, 7, 6), torch.float32)
    if source == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif source == "sliced":
        x = make((3, 9, 8, 13), torch.float32)[:, 1::2, 1:, ::2]
    xp = _conv_pad.padded(x, 2, 1, 0, 3, nchw)
    fmt = torch.contiguous_format if nchw else torch.channels_last
    assert xp.is_contiguous(memory_format=fmt)
    assert torch.equal(xp, F.pad(x, (0, 3, 2, 1)))
    same = _conv_pad.padded(x, 0, 0, 0, 0, nchw)
    assert torch.equal(same, x) and same.is_contiguous(memory_format=fmt)
    assert (same is x) == x.is_contiguous(memory_format=fmt)


def _reference(x, weight, bias, stride, padding, dilation, groups, transposed, output_padding):
    """torch's float64 result and the magnitude its rounding error is relative to."""
    op = F.conv_transpose2d if transposed else F.conv2d
    extra = {"output_padding": output_padding} if transposed else {}
    ref = op(x.double(), weight.double(), None if bias is None else bias.double(), stride,
             padding, dilation=dilation, groups=groups, **extra)
    scale = op(x.double().abs(), weight.double().abs(),
               None if bias is None else bias.double().abs(), stride, padding,
               dilation=dilation, groups=groups, **extra)
    return ref, scale


# (N, C_in, C_out, (H, W) as multiples of the lane count plus a remainder, kernel, stride,
# padding, dilation, groups): output widths of whole lanes (one and two segments per row, so a
# tile spans two output rows or one), widths just past them (a last segment partly valid),
# an odd count of row segments (the last tile has one valid vector), groups, dilation.
FORWARD = [
    (2, 3, 20, (1, 0), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 4, 13, (2, 0), (5, 5), (1, 1), (2, 2), (1, 1), 1),
    (2, 6, 8, (1, -2), (3, 1), (1, 1), (1, 0), (2, 1), 2),
    (1, 1, 32, (2, 0), (5, 5), (1, 1), (2, 2), (1, 1), 1),
    (3, 5, 7, (1, 0), (3, 3), (2, 1), (1, 1), (1, 2), 1),
    (2, 6, 20, (1, 0), (1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1: the input read as it is
]


def _forward_case(case, dtype):
    n, ci, co, (rows, extra), k, s, p, d, g = case
    lanes = lanes_of(dtype)
    return n, ci, co, (5 + rows, rows * lanes + extra), k, s, p, d, g


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(FORWARD)))
def test_conv2d_forward_paths(index, dtype, layout):
    n, ci, co, (h, w), k, s, p, d, g = _forward_case(FORWARD[index], dtype)
    x = make((n, ci, h, w), dtype, layout)
    weight, bias = make((co, ci // g, *k), dtype), make((co,), dtype)
    ref, scale = _reference(x, weight, bias, s, p, d, g, False, None)
    out, pre = out_like(ref.shape, dtype, layout), out_like(ref.shape, dtype, layout)
    kern.conv2d_forward(x, weight, bias, out, pre, s, p, d, g, acts.RELU, 0.0)
    assert_close(pre, ref, dtype, what="pre", scale=scale)
    assert_close(out, ref.relu(), dtype, what="out", scale=scale)


# Transposed: (N, C_x, C_out, (H, W), kernel, stride, padding, dilation, groups, output_padding).
TRANSPOSED = [
    (2, 12, 5, (8, 8), (4, 4), (2, 2), (1, 1), (1, 1), 1, (0, 0)),
    (1, 32, 1, (9, 16), (5, 5), (1, 1), (2, 2), (1, 1), 1, (0, 0)),  # a stem's input gradient
    (2, 8, 2, (7, 33), (3, 3), (1, 1), (1, 1), (1, 1), 1, (0, 0)),  # single-row tiles too
    (1, 6, 4, (6, 16), (3, 3), (1, 1), (1, 1), (1, 1), 2, (0, 0)),
    (2, 6, 9, (5, 17), (3, 2), (1, 2), (1, 0), (2, 1), 3, (0, 1)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TRANSPOSED, ids=str)
def test_conv_transpose2d_forward_paths(case, dtype, layout):
    n, cx, co, (h, w), k, s, p, d, g, op = case
    x = make((n, cx, h, w), dtype, layout)
    weight, bias = make((cx, co // g, *k), dtype), make((co,), dtype)
    ref, scale = _reference(x, weight, bias, s, p, d, g, True, op)
    out = out_like(ref.shape, dtype, layout)
    kern.conv_transpose2d_forward(x, weight, bias, out, None, s, p, d, g, acts.NONE, 0.0)
    assert_close(out, ref, dtype, scale=scale)


# Weight gradients: C_out per group of whole lanes, past them, and groups; strides, dilation,
# padding; x wider than the taps reach (a transposed conv's roles: nothing read past out's taps).
WEIGHT = [
    (2, 3, 2, (9, 10), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 5, 1, (12, 11), (5, 5), (2, 1), (2, 2), (1, 2), 1),
    (2, 4, 2, (10, 9), (3, 2), (1, 1), (0, 1), (2, 1), 2),
    (1, 2, 3, (13, 14), (2, 3), (3, 2), (0, 0), (1, 1), 2),
]


def _weight_grad(x, weight, grad, s, p, d, g):
    w64 = weight.double().requires_grad_()
    return torch.autograd.grad(F.conv2d(x.double(), w64, None, s, p, d, g), w64, grad.double())[0]


@pytest.mark.parametrize("grad_layout", LAYOUTS, ids=["grad_nchw", "grad_nhwc"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index", range(len(WEIGHT)))
@pytest.mark.parametrize("extra_channels", [0, 3], ids=["whole_lanes", "past_lanes"])
def test_backward_weight_direct(extra_channels, index, dtype, layout, grad_layout):
    n, ci, vectors, (h, w), k, s, p, d, g = WEIGHT[index]
    co = g * (vectors * lanes_of(dtype) + extra_channels)
    x = make((n, ci, h, w), dtype, layout)
    weight = make((co, ci // g, *k), dtype)
    out_hw = [(size + 2 * pad - dil * (kk - 1) - 1) // st + 1
              for size, pad, dil, kk, st in zip((h, w), p, d, k, s)]
    grad = make((n, co, *out_hw), dtype, grad_layout)
    ref, scale = (_weight_grad(x_, weight, grad_, s, p, d, g)
                  for x_, grad_ in ((x, grad), (x.abs(), grad.abs())))
    grad_w = poisoned(*weight.shape, dtype=dtype)
    kern.conv2d_backward_weight(grad, x, grad_w, s, p, d, g)
    assert_close(grad_w, ref, dtype, what="grad_weight", scale=scale)


def _with_threads(threads, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_paths_do_not_depend_on_thread_count(layout):
    """Forward, input gradient and weight gradient of a layer big enough for threads and for
    several partial weight gradients: bit-identical on 1 and 2 threads."""
    x = make((6, 8, 20, 16), torch.float32, layout)
    weight, bias = make((24, 8, 5, 5), torch.float32), make((24,), torch.float32)
    grad = make((6, 24, 20, 16), torch.float32, layout)
    args = ((1, 1), (2, 2), (1, 1), 1)

    def run():
        out = out_like((6, 24, 20, 16), torch.float32, layout)
        kern.conv2d_forward(x, weight, bias, out, None, *args, acts.RELU, 0.0)
        grad_x = out_like(x.shape, torch.float32, layout)
        kern.conv_transpose2d_forward(grad, weight, None, grad_x, None, *args, acts.NONE, 0.0)
        grad_w = poisoned(*weight.shape)
        kern.conv2d_backward_weight(grad, x, grad_w, *args)
        return out, grad_x, grad_w

    one, two = _with_threads(1, run), _with_threads(2, run)
    ref, scale = _reference(x, weight, bias, *args, False, None)
    assert_close(one[0], ref.relu(), torch.float32, scale=scale)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("act", [(acts.RELU, 0.0), (acts.LEAKY_RELU, 0.2), (acts.SIGMOID, 0.0)],
                         ids=["relu", "leaky_relu", "sigmoid"])
def test_activation_backward_runs(act, layout):
    """Contiguous runs (the vectorized relu/leaky_relu loops) against torch, and bit-identical
    to the general loop that a strided grad_out takes."""
    code, param = act
    z = make((3, 5, 7, 9), torch.float32, layout)
    saved = (torch.sigmoid(z) if code == acts.SIGMOID else torch.where(z > 0, z, z * param))
    grad_out = make(z.shape, torch.float32, layout)
    strided = make((3, 5, 7, 18), torch.float32)[..., ::2]
    strided.copy_(grad_out)
    results = []
    for g in (grad_out, strided):
        grad_pre, grad_bias = out_like(z.shape, torch.float32, layout), poisoned(5)
        kern.conv2d_activation_backward(g, saved, grad_pre, grad_bias, code, param, True)
        results.append((grad_pre, grad_bias))
    slope = {acts.RELU: (z > 0).double(), acts.LEAKY_RELU: torch.where(z > 0, 1.0, param).double(),
             acts.SIGMOID: saved.double() * (1 - saved.double())}[code]
    ref = grad_out.double() * slope
    assert_close(results[0][0], ref, torch.float32, what="grad_pre")
    assert_close(results[0][1], ref.sum((0, 2, 3)), torch.float32, what="grad_bias",
                 scale=ref.abs().sum((0, 2, 3)))
    assert torch.equal(results[0][0], results[1][0])
