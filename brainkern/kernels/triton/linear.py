"""Triton kernels for the linear op family: a GEMM with a fused bias + activation epilogue, and
the activation's backward with the bias gradient reduced in the same pass.

The launchers take the plain arguments documented in brainkern/kernels/__init__.py. Without a
GPU the same kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 set
before this module is imported); the interpreter tunes nothing, so it gets one config.
"""

import os

import torch
import triton
import triton.language as tl

from brainkern.kernels.triton._activations import activation_derivative, activation_forward

# CPU tensors only through Triton's interpreter (brainkern.backends checks TRITON_INTERPRET).
DEVICES = ("cuda", "cpu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(block_m, block_n, block_k, num_warps, num_stages):
    kwargs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# Five tile shapes for fp16/bf16/fp32. All fit sm_80's shared memory and none spills a register
# on sm_80 or sm_90 with the heaviest epilogue (gelu_tanh + bias + pre), as compiled by
# tests/test_triton_aot.py. 128 x 128 needs 8 warps: with 4, its 128 fp32 accumulators per thread
# plus the epilogue spill.
MATMUL_CONFIGS = [
    _config(128, 128, 32, num_warps=8, num_stages=4),  # large problems
    _config(128, 64, 32, num_warps=4, num_stages=4),  # tall outputs
    _config(64, 128, 32, num_warps=4, num_stages=4),  # wide outputs
    _config(64, 64, 32, num_warps=4, num_stages=4),  # mid-sized problems: more programs per SM
    _config(32, 128, 32, num_warps=4, num_stages=4),  # small batch (M <= 32): linear inference
]
# In fp64 every tile above spills (hundreds of bytes per thread; 128 x 128, kilobytes). fp64 is
# here for gradcheck, not speed: one small tile that neither spills nor needs tuning.
FP64_CONFIG = _config(32, 32, 16, num_warps=4, num_stages=2)
# Under the interpreter: one config, with tiles small enough that odd test shapes (7, 127) still
# span several programs, a partial edge tile and several K steps.
INTERPRETER_CONFIG = MATMUL_CONFIGS[3]


def _prune_configs(configs, named_args, **kwargs):
    if named_args["a_ptr"].dtype == torch.float64:
        return [FP64_CONFIG]
    return [config for config in configs if config is not FP64_CONFIG]


ACTIVATION_BACKWARD_BLOCK_M = 32
ACTIVATION_BACKWARD_BLOCK_N = 64
# 8 warps: 8 elements per thread per step, so fp64 gelu's long erf evaluation does not spill.
ACTIVATION_BACKWARD_NUM_WARPS = 8
PROGRAMS_PER_SM = 4


@triton.autotune(
    configs=[INTERPRETER_CONFIG] if _interpreting() else [*MATMUL_CONFIGS, FP64_CONFIG],
    # Power-of-two buckets, not exact sizes: a new batch size reuses the tuned config.
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)
@triton.jit(do_not_specialize=["M_BUCKET", "N_BUCKET", "K_BUCKET"])
def matmul_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, pre_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_om, stride_on,
    slope: tl.float64,
    M_BUCKET, N_BUCKET, K_BUCKET,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Compute ``out = act(a @ b + bias)`` and, if STORE_PRE, ``pre = a @ b + bias``.

    Args:
        a_ptr: Pointer to the left operand, shape [M, K], strides [stride_am, stride_ak].
        b_ptr: Pointer to the right operand, shape [K, N], strides [stride_bk, stride_bn].
        bias_ptr: Pointer to the bias, shape [N], contiguous; not read unless HAS_BIAS.
        out_ptr: Pointer to the output, shape [M, N], strides [stride_om, stride_on].
        pre_ptr: Pointer to the pre-activation output, shape [M, N], strides
            [stride_om, stride_on] (same layout as out); not written unless STORE_PRE.
        M, N, K: The problem size.
        slope: leaky_relu's negative slope; read only when ACT is LEAKY_RELU.
        M_BUCKET, N_BUCKET, K_BUCKET: M, N, K rounded up to powers of two: the autotuner's key.
        ACT: Activation code from brainkern.activations.
        HAS_BIAS: Whether to add the bias.
        STORE_PRE: Whether to write the pre-activation as well.
        INPUT_PRECISION: tl.dot's precision for fp32 inputs, "tf32" or "ieee".
        BLOCK_M, BLOCK_N, BLOCK_K: The tile sizes; each program computes one BLOCK_M x BLOCK_N
            tile of the output, stepping through K by BLOCK_K.
        GROUP_M: How many tile rows are visited together (see below).
    """
    # Grouped ordering: consecutive programs walk down a column of GROUP_M tiles before moving
    # right, so the A rows and B columns they share are still in L2 when the neighbours need
    # them (the row-major order would stream all of B once per row of tiles).
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Rows and columns past the edge wrap around (% M, % N) instead of being masked: the loads
    # stay unmasked along M and N, and the wrapped values land in rows/columns the store skips.
    # Offsets in int64 (set up once per program, so nearly free): an LM head's output, 16k tokens
    # x 128k vocabulary, passes 2^31 elements, as does its gradient, the A of dx = dz @ W; an
    # int32 row offset would wrap.
    offs_am = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    offs_bn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn

    # fp32 accumulation for every input type except fp64, which keeps its own precision (the
    # float64 gradcheck runs through this kernel).
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k in range(tl.cdiv(K, BLOCK_K)):
        # The K edge must be masked with zeros: a wrapped or stray value here would be summed.
        # This is also what lets a 16-wide tl.dot serve K = 1..15.
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue on the fp32 (fp64) accumulator: one rounding to the output type, at the store.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(acc_dtype)[None, :]
    out_offsets = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PRE:
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    acc = activation_forward(acc, slope, ACT)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def activation_backward_kernel(
    grad_out_ptr, saved_ptr, grad_pre_ptr, partial_ptr,
    M, N,
    stride_gm, stride_gn,
    slope: tl.float64,
    rows_per_program,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Compute ``grad_pre = grad_out * act'(saved)`` and, if HAS_BIAS, the partial column sums
    of grad_pre over each program's rows.

    Program (pid_n, pid_r) owns columns [pid_n * BLOCK_N, +BLOCK_N) of rows
    [pid_r * rows_per_program, +rows_per_program) and writes its column sums to row pid_r of
    the partial sums; the launcher adds those rows up. Every sum runs in a fixed order, so the
    bias gradient is deterministic, with no atomics and one pass over the data.

    Args:
        grad_out_ptr: Pointer to the incoming gradient, shape [M, N],
            strides [stride_gm, stride_gn].
        saved_ptr: Pointer to what the forward saved (the activation's output, or its input for
            gelu/silu/leaky_relu with a negative slope), shape [M, N], contiguous.
        grad_pre_ptr: Pointer to the gradient w.r.t. the pre-activation, shape [M, N],
            contiguous.
        partial_ptr: Pointer to the partial bias gradients, shape [cdiv(M, rows_per_program), N],
            contiguous, fp32 (fp64 for fp64 inputs); not written unless HAS_BIAS.
        M, N: The shape.
        slope: leaky_relu's negative slope; read only when ACT is LEAKY_RELU.
        rows_per_program: How many rows each program walks, a multiple of BLOCK_M.
        ACT: Activation code from brainkern.activations (not NONE).
        HAS_BIAS: Whether to reduce and write the partial bias gradients.
        BLOCK_M, BLOCK_N: The tile each loop step loads.
    """
    pid_n = tl.program_id(axis=0)
    pid_r = tl.program_id(axis=1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc_dtype = tl.float64 if saved_ptr.dtype.element_ty == tl.float64 else tl.float32
    # The column sums stay fp32 (fp64) across all M rows: summing a large batch in fp16/bf16
    # would lose the small contributions.
    bias_acc = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    row_start = pid_r * rows_per_program
    row_end = min(row_start + rows_per_program, M)
    for row in range(row_start, row_end, BLOCK_M):
        # int64: M x N may pass 2^31 elements (see matmul_kernel).
        offs_m = (row + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (offs_m[:, None] < row_end) & mask_n[None, :]
        offsets = offs_m[:, None] * N + offs_n[None, :]
        grad_out = tl.load(
            grad_out_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
            mask=mask,
            other=0.0,
        ).to(acc_dtype)
        saved = tl.load(saved_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        grad_pre = grad_out * activation_derivative(saved, slope, ACT)
        # Masked lanes hold 0 * act'(0), which is 0 for every activation: no extra where needed.
        tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            bias_acc += tl.sum(grad_pre, axis=0)
    if HAS_BIAS:
        tl.store(partial_ptr + pid_r * N + offs_n, bias_acc, mask=mask_n)


def _program_target(device: torch.device) -> int:
    """How many programs a memory-bound kernel should launch to fill the device."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter: a few programs, so that tests cover several row splits.
    return 4


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def linear_forward(a, weight, bias, out, pre, act_code, act_param):
    """``out = act(a @ weight^T + bias)``; ``pre`` the same before act. See kernels/__init__.py."""
    M, K = a.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    # Absent tensors are not read or written (HAS_BIAS / STORE_PRE are False); any valid
    # pointer of the right dtype stands in for them.
    matmul_kernel[grid](
        a, weight, out if bias is None else bias, out, out if pre is None else pre,
        M, N, K,
        a.stride(0), a.stride(1),
        weight.stride(1), weight.stride(0),  # B = weight^T
        out.stride(0), out.stride(1),
        float(act_param),
        triton.next_power_of_2(M), triton.next_power_of_2(N), triton.next_power_of_2(K),
        ACT=act_code,
        HAS_BIAS=bias is not None,
        STORE_PRE=pre is not None,
        INPUT_PRECISION=_input_precision(a.dtype),
    )


def activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                        saved_is_output):
    """``grad_pre = grad_out * act'(saved)``; ``grad_bias = grad_pre.sum(0)`` when given.

    ``saved_is_output`` needs no flag in the kernel: each activation's derivative reads the one
    kind of saved tensor brainkern.activations prescribes for it (see activation_derivative).
    """
    M, N = grad_out.shape
    if N == 0:
        return
    if M == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return
    block_m, block_n = ACTIVATION_BACKWARD_BLOCK_M, ACTIVATION_BACKWARD_BLOCK_N
    # Split the rows so that about PROGRAMS_PER_SM programs per SM run: one program per column
    # block walking all M rows would leave most SMs idle whenever N is small next to M.
    column_blocks = triton.cdiv(N, block_n)
    row_blocks = triton.cdiv(M, block_m)
    wanted_splits = triton.cdiv(_program_target(grad_out.device), column_blocks)
    rows_per_program = triton.cdiv(row_blocks, min(row_blocks, wanted_splits)) * block_m
    row_splits = triton.cdiv(M, rows_per_program)
    partials = None
    if grad_bias is not None:
        acc_dtype = torch.float64 if saved.dtype == torch.float64 else torch.float32
        partials = torch.empty((row_splits, N), dtype=acc_dtype, device=saved.device)
    grid = (column_blocks, row_splits)
    activation_backward_kernel[grid](
        grad_out, saved, grad_pre, grad_pre if partials is None else partials,
        M, N,
        grad_out.stride(0), grad_out.stride(1),
        float(act_param),
        rows_per_program,
        ACT=act_code,
        HAS_BIAS=grad_bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=ACTIVATION_BACKWARD_NUM_WARPS,
    )
    if grad_bias is not None:
        # row_splits x N, a few hundred rows at most: torch's reduction is deterministic too.
        grad_bias.copy_(partials.sum(0))
