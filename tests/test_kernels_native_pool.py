"""The native pool family's C++ kernels (csrc/pool.inc: float32 2x2 windows of stride 2) on
each ISA this CPU has, against torch, exactly.

Max pooling's values, indices and gradient, and average pooling's forward and backward, are
compared bit for bit with torch's float32 results (each is one comparison or a sum in torch's
order per element). Shapes cover rows shorter than a vector, a whole vector, and longer with a
masked tail (NCHW's pooled pixels; NHWC's channels), odd heights and widths (a last row and
column no window reads, whose gradient must be zero), NaN, infinities and ties; outputs start
poisoned. What every backend does (other windows, float64, batch 0) is in
tests/test_kernel_contract_pool.py.
"""

import pytest
import torch
import torch.nn.functional as F

from brainkern.kernels import native
from brainkern.kernels.native import pool as native_pool

ISAS = ["avx512", "avx2", "portable"]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
WINDOW = ((2, 2), (2, 2), (0, 0), (1, 1))
# (n, c, h, w): pooled rows of 3, 16, 21 and 22 pixels; 1, 3, 12, 16, 21 and 40 channels (the
# streamed backward's rows: 32 and 44 wide, 12, 16 and 40 channels)
SHAPES = [(2, 3, 7, 6), (1, 16, 32, 32), (2, 21, 9, 43), (1, 40, 5, 7), (3, 1, 4, 35),
          (2, 5, 2, 2), (2, 3, 9, 44), (1, 12, 6, 10)]


def runs_here(isa):
    assert native.is_built(), f"brainkern._native is not built: {native.why_not_built()}"
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU does not run {isa} (it runs {', '.join(native.supported_isas())})")


def values(shape, kind):
    x = torch.randn(shape)
    if kind == "ties":
        x = torch.randint(0, 3, shape).float()
    elif kind == "specials":
        pick = torch.rand(shape)
        x[pick < 0.15] = float("nan")
        x[(pick > 0.5) & (pick < 0.8)] = float("-inf")
        x[pick > 0.95] = float("inf")
    return x


def window_codes(indices, width):
    """torch's flat indices of 2x2 windows of stride 2 as codes: 2 * row + column."""
    return (indices // width % 2 * 2 + indices % width % 2).to(torch.uint8)


def poisoned(shape, fmt, dtype=torch.float32, offset=0):
    """A poisoned (NaN, int64: -1, uint8: 255) output dense in fmt, ``offset`` elements into a
    poisoned buffer (a start off the 64-byte lines that streamed stores write whole) and
    followed in memory by a poisoned guard of a vector's length or more, which ``guard_intact``
    checks with the elements before it: a masked or streamed store must not write outside the
    tensor."""
    fill = {torch.int64: -1, torch.uint8: 255}.get(dtype, float("nan"))
    n, c, h, w = shape
    buffer = torch.full((offset + n * c * h * w + _GUARD,), fill, dtype=dtype)
    body = buffer[offset:offset + n * c * h * w]
    if fmt == torch.channels_last:
        return body.view(n, h, w, c).permute(0, 3, 1, 2)
    return body.view(shape)


_GUARD = 40


def guard_intact(t):
    start = t.storage_offset() + t.numel()
    tail = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), start, (_GUARD,))
    head = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (t.storage_offset(),))
    guard = torch.cat([head, tail])
    return bool((guard.isnan() if t.is_floating_point() else guard == (fill_of(t.dtype))).all())


@pytest.fixture(params=["0", "1"], ids=["stores", "streamed"])
def stream(request, monkeypatch):
    """Both ways a backward writes grad_x: ordinary stores, and whole lines staged and streamed
    (BRAINKERN_POOL_STREAM; by default only for a grad_x above 8 MB)."""
    monkeypatch.setenv("BRAINKERN_POOL_STREAM", request.param)
    return request.param == "1"


def fill_of(dtype):
    return {torch.int64: -1, torch.uint8: 255}[dtype]


def same(a, b):
    return torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) if a.is_floating_point() \
        else torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind", ["normal", "ties", "specials"])
def test_max_pool_2x2(isa, fmt, kind, stream):
    runs_here(isa)
    for shape in SHAPES:
        x = values(shape, kind).contiguous(memory_format=fmt)
        ref, ref_indices = F.max_pool2d(x, 2, return_indices=True)
        out = poisoned(ref.shape, fmt)
        indices = poisoned(ref.shape, fmt, torch.int64)
        native_pool.max_pool2d_forward(x, out, indices, *WINDOW, isa=isa)
        assert same(out, ref) and same(indices, ref_indices), shape
        assert guard_intact(out) and guard_intact(indices)
        alone = poisoned(ref.shape, fmt)
        native_pool.max_pool2d_forward(x, alone, None, *WINDOW, isa=isa)
        assert same(alone, ref), shape
        grad_out = torch.randn(ref.shape).contiguous(memory_format=fmt)
        grad_x = poisoned(shape, fmt)
        native_pool.max_pool2d_backward(grad_out, indices, grad_x, *WINDOW, isa=isa)
        expected = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out, x, [2, 2], [2, 2], [0, 0], [1, 1], False, ref_indices)
        assert same(grad_x, expected) and guard_intact(grad_x), shape
        codes = poisoned(ref.shape, fmt, torch.uint8)
        native_pool.max_pool2d_forward(x, alone, codes, *WINDOW, isa=isa)
        assert torch.equal(codes, window_codes(ref_indices, shape[-1])) and guard_intact(codes)
        grad_x = poisoned(shape, fmt, offset=5)
        native_pool.max_pool2d_backward(grad_out, codes, grad_x, *WINDOW, isa=isa)
        assert same(grad_x, expected) and guard_intact(grad_x), shape


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("divisor", [0, 4, 3])
def test_avg_pool_2x2(isa, fmt, divisor, stream):
    """Sums in torch's order; 1/divisor equals torch's division exactly for 4 (divisor 0 means
    the window's 4 taps), and within one rounding for divisor_override=3."""
    runs_here(isa)
    for shape in SHAPES:
        x = torch.randn(shape).contiguous(memory_format=fmt)
        ref = F.avg_pool2d(x, 2, divisor_override=divisor or None)
        out = poisoned(ref.shape, fmt)
        native_pool.avg_pool2d_forward(x, out, *WINDOW[:3], True, divisor, isa=isa)
        grad_out = torch.randn(ref.shape).contiguous(memory_format=fmt)
        grad_x = poisoned(shape, fmt, offset=3 * divisor)
        native_pool.avg_pool2d_backward(grad_out, grad_x, *WINDOW[:3], True, divisor, isa=isa)
        expected = torch.ops.aten.avg_pool2d_backward(grad_out, x, [2, 2], [2, 2], [0, 0], False,
                                                      True, divisor or None)
        if divisor == 3:
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(grad_x, expected, rtol=1e-6, atol=1e-7)
        else:
            assert same(out, ref) and same(grad_x, expected), shape
        assert guard_intact(out) and guard_intact(grad_x)


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_thread_counts_agree(fmt, stream):
    """Row tasks split the tensors without overlap: the same bits on 1, 2 and 3 threads (and
    streamed, each thread's partial lines at either end of its rows written with ordinary
    stores)."""
    runs_here(native.supported_isas()[0])
    x = torch.randn(4, 24, 30, 31).contiguous(memory_format=fmt)
    results = []
    for threads in (1, 2, 3):
        out = poisoned((4, 24, 15, 15), fmt)
        indices = poisoned(out.shape, fmt, torch.int64)
        native_pool.max_pool2d_forward(x, out, indices, *WINDOW, num_threads=threads)
        codes = poisoned(out.shape, fmt, torch.uint8)
        native_pool.max_pool2d_forward(x, out, codes, *WINDOW, num_threads=threads)
        grad_x = poisoned(x.shape, fmt, offset=threads)
        native_pool.max_pool2d_backward(out, codes, grad_x, *WINDOW, num_threads=threads)
        avg = poisoned(out.shape, fmt)
        native_pool.avg_pool2d_forward(x, avg, *WINDOW[:3], True, 0, num_threads=threads)
        avg_grad = poisoned(x.shape, fmt)
        native_pool.avg_pool2d_backward(avg, avg_grad, *WINDOW[:3], True, 0,
                                        num_threads=threads)
        results.append((out, indices, codes, grad_x, avg, avg_grad))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("fmt", LAYOUTS, ids=["nchw", "nhwc"])
def test_large_grad_streamed_or_not(fmt, monkeypatch):
    """A large grad_x (9.5 MB, odd sides; NHWC with 16 channels: whole lines) written with
    non-temporal stores (BRAINKERN_POOL_STREAM=1), with ordinary ones (=0) and as this machine
    decides by default (streams only past a last-level cache of at most 16 MiB): the same bits,
    and torch's."""
    runs_here(native.supported_isas()[0])
    x = torch.randn(2, 16, 271, 273).contiguous(memory_format=fmt)  # 9.5 MB, odd sides
    pooled = (2, 16, 135, 136)
    out, codes = poisoned(pooled, fmt), poisoned(pooled, fmt, torch.uint8)
    native_pool.max_pool2d_forward(x, out, codes, *WINDOW)
    grad_out = torch.randn(out.shape).contiguous(memory_format=fmt)
    grads = {}
    for mode in (None, "0", "1"):
        if mode is None:
            monkeypatch.delenv("BRAINKERN_POOL_STREAM", raising=False)
        else:
            monkeypatch.setenv("BRAINKERN_POOL_STREAM", mode)
        grads[mode] = (poisoned(x.shape, fmt), poisoned(x.shape, fmt))
        native_pool.max_pool2d_backward(grad_out, codes, grads[mode][0], *WINDOW)
        native_pool.avg_pool2d_backward(grad_out, grads[mode][1], *WINDOW[:3], True, 0)
    ref = x.detach().requires_grad_()
    F.max_pool2d(ref, 2).backward(grad_out)
    assert all(same(grads[m][0], ref.grad) for m in grads)
    assert all(torch.equal(grads[m][1], grads["0"][1]) for m in grads)
    assert all(guard_intact(g) for m in grads for g in grads[m])


def test_other_windows_and_float64_run_in_numba(monkeypatch):
    """Only float32 2x2/stride-2 windows reach the C++ core; the rest go to Numba's kernels."""
    calls = []
    core = native_pool._native()
    monkeypatch.setattr(native_pool, "_native", lambda: calls.append(1) or core)
    for dtype, window in [(torch.float64, WINDOW), (torch.float32, ((3, 3), (2, 2), (1, 1), (1, 1))),
                          (torch.float32, ((2, 2), (1, 1), (0, 0), (1, 1)))]:
        x = torch.randn(2, 3, 8, 8, dtype=dtype)
        ref, ref_indices = F.max_pool2d(x, *window[:3], dilation=window[3], return_indices=True)
        out, indices = poisoned(ref.shape, None, dtype), poisoned(ref.shape, None, torch.int64)
        native_pool.max_pool2d_forward(x, out, indices, *window)
        assert same(out, ref) and same(indices, ref_indices)
    assert not calls
    x = torch.randn(2, 3, 8, 8)
    native_pool.max_pool2d_forward(x, poisoned((2, 3, 4, 4), None), None, *WINDOW)
    assert calls
