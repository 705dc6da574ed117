"""The harness the ahead-of-time compile tests share (tests/test_triton_aot*.py).

Under TRITON_INTERPRET=1 brainkern's kernels are interpreter functions, so each test file's
matrix of cases is compiled in child processes started without it: the test file runs itself as
a script, one shard of its matrix per core, and prints the results as JSON. A case is a dict:
``id``, ``module`` (under brainkern.kernels.triton), ``kernel``, ``types``, ``constexprs``,
``arch``, ``num_warps``, ``num_stages``, ``divisible_by_16``.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)


def compile_all(matrix):
    """Compile every case in this process (which must not be interpreting): {id: result}."""
    from brainkern.kernels.triton import aot

    results = {}
    for case in matrix:
        module = importlib.import_module(f"brainkern.kernels.triton.{case['module']}")
        try:
            info = aot.compile_kernel(
                getattr(module, case["kernel"]), case["types"], case["constexprs"], case["arch"],
                case["num_warps"], case["num_stages"], case["divisible_by_16"],
            )
            results[case["id"]] = {
                "shared": info.shared_bytes, "fits": info.fits_shared_memory,
                "registers": info.registers, "stack": info.stack_bytes, "local": info.local_bytes,
            }
        except Exception as error:  # noqa: BLE001 - any compile failure, reported per case
            results[case["id"]] = {"error": f"{type(error).__name__}: {error}"}
    return results


def compile_in_children(test_file, timeout=3600):
    """Run ``test_file`` as a script in one child per core (up to 4), without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), tests, env.get("PYTHONPATH", "")])
    shards = max(1, min(4, os.cpu_count() or 1))
    children = [
        subprocess.Popen([sys.executable, test_file, "--json", f"{i}/{shards}"], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(shards)
    ]
    results = {}
    for child in children:
        stdout, stderr = child.communicate(timeout=timeout)
        assert child.returncode == 0, stderr[-4000:]
        results.update(json.loads(stdout.splitlines()[-1]))
    return results


def check(case, result, allowed_stack=0):
    """Compiled, within the arch's shared memory, and no spills. Never skipped: cuobjdump ships
    in Triton's wheel (triton/backends/nvidia/bin), so a missing figure means a broken install
    or an unreadable cubin, and spills would go unseen."""
    assert "error" not in result, result.get("error")
    assert result["fits"], f"{result['shared']} bytes of shared memory: over sm_{case['arch']}'s"
    assert result["registers"] is not None and result["stack"] is not None, (
        "no register/spill figures: cuobjdump did not run")
    assert result["stack"] <= allowed_stack and result["local"] == 0, f"register spills: {result}"


def table(results):
    lines = [f"{'case':72} {'shared':>8} {'regs':>5} {'stack':>6} {'local':>6}"]
    for case_id, r in results.items():
        if "error" in r:
            lines.append(f"{case_id:72} ERROR {r['error'][:200]}")
        else:
            lines.append(f"{case_id:72} {r['shared']:8} {r['registers']!s:>5} {r['stack']!s:>6} "
                         f"{r['local']!s:>6}")
    return "\n".join(lines)


def main(matrix):
    """A test file's ``__main__``: compile its shard (``--json i/n``) and print the results."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run without TRITON_INTERPRET: the kernels must be real @triton.jit functions")
    shard, shards = map(int, sys.argv[2].split("/")) if len(sys.argv) > 2 else (0, 1)
    results = compile_all(matrix[shard::shards])
    print(json.dumps(results) if "--json" in sys.argv else table(results))
