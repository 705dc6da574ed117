"""Every Triton conv kernel and autotune config compiles ahead of time for sm_80 and sm_90.

As tests/test_triton_aot.py does for linear (see there, and brainkern/kernels/triton/aot.py):
each case is compiled to a cubin in child processes started without TRITON_INTERPRET, then
checked for errors, shared memory within the target's limit and register spills.
``python tests/test_triton_aot_conv.py`` prints the resource table.

The matrix:
- conv_gemm_kernel and conv_weight_grad_kernel: every autotune config x {fp16, fp32 tf32}, and
  every fp32 ieee config (CUDA-core dot), x {sm_80, sm_90}, in NHWC with the heaviest epilogue
  (gelu_tanh + bias + pre) for the forward, whose both reduction loops (CHANNEL_BLOCKS, and the
  flattened one of stems) are compiled; the transposed forward, every config in fp16 and tf32
  on both archs; bf16 (lowers as fp16) on one config and fp64 on its config, per arch and direction.
- NCHW and the any-strides variant (nothing specialised or aligned) on one config per arch.
- every activation on one config, fp16 and fp64, sm_90 (the epilogue's math differs by type).
- conv_direct_kernel: every dtype x both directions x both archs.
- conv_activation_backward_kernel: every activation in fp32, the other dtypes on both archs.
"""

import aot_matrix
import pytest

ARCHS = aot_matrix.ARCHS
GELU = 5
GELU_TANH = 6
DTYPES = ("fp16", "bf16", "fp32", "fp64")

CONV_POINTERS = ["x_ptr", "w_ptr", "bias_ptr", "out_ptr", "pre_ptr"]
CONV_INTS = [
    "H", "W", "C_group", "QH", "QW", "H_out", "W_out", "C_out_group", "M", "KH", "KW",
    "stride_xn", "stride_xc", "stride_xh", "stride_xw",
    "stride_wg", "stride_wc", "stride_wn", "stride_wh", "stride_ww",
    "stride_on", "stride_oc", "stride_oh", "stride_ow",
    "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
    "k_step_h", "k_step_w", "inverse_h", "inverse_w",
]
GEMM_KEYS = ["M_BUCKET", "N_BUCKET", "K_BUCKET", "CHANNELS_LAST"]
# What a launch on contiguous tensors with channel counts that are multiples of 16 specialises:
# unit strides become constexpr 1, the rest are known multiples of 16 (aligned, vectorisable).
NHWC_UNIT = {"stride_xc": 1, "stride_oc": 1, "stride_ww": 1}
NCHW_UNIT = {"stride_xw": 1, "stride_ow": 1, "stride_ww": 1}
CONV_ALIGNED = {
    "nhwc": ["C_group", "C_out_group", "stride_xn", "stride_xh", "stride_xw", "stride_on",
             "stride_oh", "stride_ow", "stride_wg"],
    "nchw": ["C_group", "C_out_group", "stride_xn", "stride_on", "stride_wg"],
}
WEIGHT_GRAD_INTS = [
    "H", "W", "C_group", "H_out", "W_out", "C_out_group", "P", "KH", "KW", "splits",
    "stride_gn", "stride_gc", "stride_gh", "stride_gw",
    "stride_xn", "stride_xc", "stride_xh", "stride_xw",
    "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
]


def _accumulator(dtype):
    return "fp64" if dtype == "fp64" else "fp32"


def _specialisation(layout, names):
    if layout == "any":
        return {}, []
    unit = NHWC_UNIT if layout == "nhwc" else NCHW_UNIT
    return ({k: 1 for k in unit if k in names},
            [a for a in CONV_ALIGNED[layout] if a in names])


def _conv_case(kernel, dtype, arch, config, transposed=False, act=GELU_TANH, precision="ieee",
               layout="nhwc", channel_blocks=True):
    direct = kernel == "conv_direct_kernel"
    ints = CONV_INTS[:8] + (["C_out"] if direct else []) + CONV_INTS[8:]
    unit, aligned = _specialisation(layout, ints)
    constexprs = {"TRANSPOSED": transposed, "ACT": act, "HAS_BIAS": True, "STORE_PRE": True,
                  **config["kwargs"], **unit}
    variant = ""
    if not direct:
        constexprs.update(INPUT_PRECISION=precision, CHANNEL_BLOCKS=channel_blocks)
        ints += GEMM_KEYS
        variant = f"{precision}-{'blocks' if channel_blocks else 'flat'}-"
        if not channel_blocks:  # stem-like: a group's channels are no multiple of 16
            aligned = [a for a in aligned if a not in ("C_group", "stride_xh", "stride_xw")]
    return {
        "module": "_conv_forward", "kernel": kernel,
        "id": f"{kernel.removesuffix('_kernel')}{'-T' if transposed else ''}-{dtype}-{variant}"
              f"sm{arch}-{config['name']}-act{act}-{layout}",
        "arch": arch,
        "types": {**{p: f"*{dtype}" for p in CONV_POINTERS},
                  **{i: "i32" for i in ints if i not in constexprs}},
        "constexprs": constexprs,
        "num_warps": config["num_warps"], "num_stages": config["num_stages"],
        "divisible_by_16": (CONV_POINTERS if layout != "any" else []) + aligned,
    }


def _weight_grad_case(dtype, arch, config, precision="ieee", layout="nhwc"):
    unit = {"nhwc": {"stride_gc": 1, "stride_xc": 1}, "nchw": {"stride_gw": 1, "stride_xw": 1},
            "any": {}}[layout]
    aligned = {"nhwc": ["C_group", "C_out_group", "stride_gn", "stride_gh", "stride_gw",
                        "stride_xn", "stride_xh", "stride_xw"],
               "nchw": ["C_group", "C_out_group", "stride_gn", "stride_xn"], "any": []}[layout]
    pointers = ["grad_ptr", "x_ptr", "partial_ptr"]
    return {
        "module": "_conv_backward", "kernel": "conv_weight_grad_kernel",
        "id": f"weight_grad-{dtype}-{precision}-sm{arch}-{config['name']}-{layout}",
        "arch": arch,
        "types": {"grad_ptr": f"*{dtype}", "x_ptr": f"*{dtype}",
                  "partial_ptr": f"*{_accumulator(dtype)}",
                  **{i: "i32" for i in WEIGHT_GRAD_INTS + GEMM_KEYS if i not in unit}},
        "constexprs": {"INPUT_PRECISION": precision, **config["kwargs"], **unit},
        "num_warps": config["num_warps"], "num_stages": config["num_stages"],
        "divisible_by_16": (pointers if layout != "any" else []) + aligned,
    }


def _activation_backward_case(dtype, arch, act):
    from brainkern.kernels.triton import conv, linear

    pointers = ["grad_out_ptr", "saved_ptr", "grad_pre_ptr", "partial_ptr"]
    ints = ["M", "C", "HW", "W", "stride_gn", "stride_gh", "stride_gw", "stride_sn",
            "stride_sh", "stride_sw", "rows_per_program"]
    return {
        "module": "_conv_backward", "kernel": "conv_activation_backward_kernel",
        "id": f"activation_backward-{dtype}-sm{arch}-act{act}-nhwc",
        "arch": arch,
        "types": {**{p: f"*{dtype}" for p in pointers[:3]},
                  "partial_ptr": f"*{_accumulator(dtype)}", **{i: "i32" for i in ints}},
        "constexprs": {"ACT": act, "HAS_BIAS": True, "stride_gc": 1, "stride_sc": 1,
                       "BLOCK_M": linear.ACTIVATION_BACKWARD_BLOCK_M,
                       "BLOCK_C": conv.ACTIVATION_BACKWARD_BLOCK_C},
        "num_warps": linear.ACTIVATION_BACKWARD_NUM_WARPS, "num_stages": 1,
        "divisible_by_16": pointers + ["C", "stride_gn", "stride_gh", "stride_gw", "stride_sn",
                                       "stride_sh", "stride_sw", "rows_per_program"],
    }


def cases():
    """The compile matrix (see the module docstring); only names and config values are read."""
    from brainkern.kernels.triton import _conv_forward as fwd

    def described(config, name):
        return {"name": name, "kwargs": config.kwargs, "num_warps": config.num_warps,
                "num_stages": config.num_stages}

    def name(c):
        return "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**c.kwargs)

    configs = [described(c, name(c)) for c in fwd.CONV_CONFIGS]
    ieee_configs = [described(c, name(c)) for c in fwd.FP32_IEEE_CONFIGS]
    fp64 = described(fwd.FP64_CONFIG, "fp64")
    def direct(dtype):
        block_c = fwd.DIRECT_BLOCK_C_FP64 if dtype == "fp64" else fwd.DIRECT_BLOCK_C
        # No sizes in the name: the parent (interpreting) and the children see different ones.
        return {"name": "direct",
                "kwargs": {"BLOCK_M": fwd.DIRECT_BLOCK_M, "BLOCK_C": block_c},
                "num_warps": fwd.DIRECT_NUM_WARPS, "num_stages": 1}
    gemm = "conv_gemm_kernel"
    out = []
    for arch in ARCHS:
        for dtype, precision, config_list in (("fp16", "ieee", configs),
                                              ("fp32", "tf32", configs),
                                              ("fp32", "ieee", ieee_configs)):
            for config in config_list:
                for channel_blocks in (True, False):
                    out.append(_conv_case(gemm, dtype, arch, config, precision=precision,
                                          channel_blocks=channel_blocks))
                out.append(_weight_grad_case(dtype, arch, config, precision))
        for config in configs:
            out.append(_conv_case(gemm, "fp16", arch, config, transposed=True))
            out.append(_conv_case(gemm, "fp32", arch, config, transposed=True, precision="tf32"))
        out.append(_conv_case(gemm, "fp32", arch, ieee_configs[0], transposed=True))
        out.append(_conv_case(gemm, "fp16", arch, configs[0], transposed=True,
                              channel_blocks=False))
        for transposed in (False, True):
            out.append(_conv_case(gemm, "bf16", arch, configs[0], transposed))
            for channel_blocks in (True, False):
                out.append(_conv_case(gemm, "fp64", arch, fp64, transposed,
                                      channel_blocks=channel_blocks))
            for dtype in DTYPES:
                out.append(_conv_case("conv_direct_kernel", dtype, arch, direct(dtype), transposed))
        out.append(_weight_grad_case("bf16", arch, configs[0]))
        out.append(_weight_grad_case("fp64", arch, fp64))
        for dtype, config in (("fp16", configs[-1]), ("fp32", ieee_configs[-1])):
            out.append(_conv_case(gemm, dtype, arch, config, layout="nchw"))
            out.append(_weight_grad_case(dtype, arch, config, layout="nchw"))
            out.append(_conv_case(gemm, dtype, arch, config, layout="any", channel_blocks=False))
            out.append(_weight_grad_case(dtype, arch, config, layout="any"))
        for dtype in ("fp16", "bf16", "fp64"):
            out.append(_activation_backward_case(dtype, arch, GELU))
    for act in range(8):
        if act != GELU_TANH:
            out.append(_conv_case(gemm, "fp16", 90, configs[-1], act=act))
            out.append(_conv_case(gemm, "fp64", 90, fp64, act=act))
    for act in range(1, 8):
        out.append(_activation_backward_case("fp32", 90, act))
    return out


MATRIX = cases()


@pytest.fixture(scope="module")
def compiled():
    return aot_matrix.compile_in_children(__file__)


@pytest.mark.parametrize("case", MATRIX, ids=[case["id"] for case in MATRIX])
def test_compiles(compiled, case):
    aot_matrix.check(case, compiled[case["id"]])


if __name__ == "__main__":
    aot_matrix.main(MATRIX)
