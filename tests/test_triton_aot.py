"""Every Triton kernel and autotune config compiles ahead of time for sm_80 and sm_90.

The interpreter accepts programs the compiler rejects, so a kernel that only ran there would be
broken on a GPU. ``triton.compile`` needs no GPU: this compiles each case to a cubin and reads
its shared memory (from Triton's metadata) and registers / local memory (spills) with
cuobjdump (see brainkern/kernels/triton/aot.py).

Under TRITON_INTERPRET=1 the kernels are interpreter functions, so the compiles run in child
processes started without it (one shard of the matrix per core); each case is then its own
test. ``python tests/test_triton_aot.py`` prints the resource table.

The matrix, and why it is not the full product (0.5-4 s per compile; on a 2-core machine about
70 s in all from a cold Triton cache, 5 s from a warm one):
- matmul, every autotune config x {fp16, fp32 ieee, fp32 tf32} x {sm_80, sm_90}, with the
  heaviest epilogue (gelu_tanh + bias + pre): tiles, pipelining and the MMA path depend on
  config, dtype, precision and arch, so this product is the one that matters.
- bf16: one config per arch; it lowers exactly like fp16 (same tile sizes, same MMA shapes).
- fp64: its one config (FP64_CONFIG) per arch.
- every activation code on one config, fp16 and fp64, sm_90: the activation changes only the
  epilogue, whose math (exp, erf) lowers differently in fp32 and fp64.
- the any-strides variant (nothing specialised or aligned) on one config per arch and dtype.
- activation_backward: every activation in fp32, and each other dtype, on both archs.
"""

import os
import subprocess
import sys

import aot_matrix
import pytest

ROOT, ARCHS = aot_matrix.ROOT, aot_matrix.ARCHS
GELU_TANH = 6
GELU = 5

MATMUL_INTS = ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
               "stride_om", "stride_on", "M_BUCKET", "N_BUCKET", "K_BUCKET"]
MATMUL_POINTERS = ["a_ptr", "b_ptr", "bias_ptr", "out_ptr", "pre_ptr"]
# Linear's forward layout, x (M, K) @ W^T: unit K strides for both operands and the output's
# unit column stride become constexpr 1, as the launcher specialises them at run time.
FORWARD_UNIT_STRIDES = {"stride_ak": 1, "stride_bk": 1, "stride_on": 1}
FORWARD_ALIGNED = MATMUL_POINTERS + ["N", "K", "stride_am", "stride_bn", "stride_om"]


def _matmul_case(dtype, arch, config, act=GELU_TANH, precision="ieee", specialised=True,
                 has_bias=True, store_pre=True):
    constexprs = {"ACT": act, "HAS_BIAS": has_bias, "STORE_PRE": store_pre,
                  "INPUT_PRECISION": precision, **config["kwargs"]}
    if specialised:
        constexprs.update(FORWARD_UNIT_STRIDES)
    return {
        "module": "linear", "kernel": "matmul_kernel",
        "id": f"matmul-{dtype}-{precision}-sm{arch}-{config['name']}-act{act}"
              f"{'' if specialised else '-anystrides'}{'' if has_bias else '-nobias'}"
              f"{'' if store_pre else '-nopre'}",
        "arch": arch,
        "types": {**{p: f"*{dtype}" for p in MATMUL_POINTERS},
                  **{i: "i32" for i in MATMUL_INTS if i not in constexprs}},
        "constexprs": constexprs,
        "num_warps": config["num_warps"],
        "num_stages": config["num_stages"],
        "divisible_by_16": FORWARD_ALIGNED if specialised else [],
    }


def _activation_backward_case(dtype, arch, act, has_bias=True):
    from brainkern.kernels.triton import linear

    pointers = ["grad_out_ptr", "saved_ptr", "grad_pre_ptr", "partial_ptr"]
    # The partial bias sums are fp32 (fp64 for fp64); without a bias grad_pre stands in.
    partial = ("fp64" if dtype == "fp64" else "fp32") if has_bias else dtype
    return {
        "module": "linear", "kernel": "activation_backward_kernel",
        "id": f"activation_backward-{dtype}-sm{arch}-act{act}{'' if has_bias else '-nobias'}",
        "arch": arch,
        "types": {**{p: f"*{dtype}" for p in pointers[:3]}, "partial_ptr": f"*{partial}",
                  **{i: "i32" for i in ["M", "N", "stride_gm", "rows_per_program"]}},
        "constexprs": {"ACT": act, "HAS_BIAS": has_bias, "stride_gn": 1,
                       "BLOCK_M": linear.ACTIVATION_BACKWARD_BLOCK_M,
                       "BLOCK_N": linear.ACTIVATION_BACKWARD_BLOCK_N},
        "num_warps": linear.ACTIVATION_BACKWARD_NUM_WARPS,
        "num_stages": 1,
        "divisible_by_16": pointers + ["N", "stride_gm", "rows_per_program"],
    }


def cases():
    """The compile matrix (see the module docstring). Importing brainkern here is fine in the
    parent: only names and config values are read, nothing is compiled."""
    from brainkern.kernels.triton import linear

    def described(config, name):
        return {"name": name, "kwargs": config.kwargs, "num_warps": config.num_warps,
                "num_stages": config.num_stages}

    configs = [described(c, "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**c.kwargs))
               for c in linear.MATMUL_CONFIGS]
    fp64 = described(linear.FP64_CONFIG, "fp64")
    out = []
    for arch in ARCHS:
        for config in configs:
            out.append(_matmul_case("fp16", arch, config))
            out.append(_matmul_case("fp32", arch, config))
            out.append(_matmul_case("fp32", arch, config, precision="tf32"))
        out.append(_matmul_case("bf16", arch, configs[0]))
        out.append(_matmul_case("fp64", arch, fp64))
        for dtype in ("fp16", "fp32"):
            out.append(_matmul_case(dtype, arch, configs[3], specialised=False))
        for dtype in ("fp16", "bf16", "fp64"):
            out.append(_activation_backward_case(dtype, arch, GELU))
    for act in range(8):
        if act != GELU_TANH:
            out.append(_matmul_case("fp16", 90, configs[3], act=act))
            out.append(_matmul_case("fp64", 90, fp64, act=act))
    out.append(_matmul_case("fp16", 90, configs[3], act=0, has_bias=False, store_pre=False))
    for act in range(1, 8):
        out.append(_activation_backward_case("fp32", 90, act))
    out.append(_activation_backward_case("fp32", 90, GELU, has_bias=False))
    return out


MATRIX = cases()


@pytest.fixture(scope="module")
def compiled():
    return aot_matrix.compile_in_children(__file__)


@pytest.mark.parametrize("case", MATRIX, ids=[case["id"] for case in MATRIX])
def test_compiles(compiled, case):
    aot_matrix.check(case, compiled[case["id"]])


def test_fp_fusion_default_is_pinned():
    """Triton 3.10 turns FMA contraction off by default; brainkern pins it on (where its Triton
    kernels are defined, before any compiles) so a Triton upgrade cannot change results. A
    value the user sets still wins."""
    script = ("import os, triton\n"
              "import brainkern.kernels.triton.linear\n"
              "print(os.environ.get('TRITON_DEFAULT_FP_FUSION'),"
              " triton.knobs.language.fp_fusion_enabled(None))")
    for given, expected in ((None, "1 True"), ("0", "0 False")):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if given is not None:
            env["TRITON_DEFAULT_FP_FUSION"] = given
        done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split()[-2:] == expected.split()


if __name__ == "__main__":
    aot_matrix.main(MATRIX)
