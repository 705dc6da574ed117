"""Ahead-of-time compilation of brainkern's Triton kernels for a given GPU, with no GPU present.

``triton.compile`` lowers a kernel through PTX to a cubin for any CUDA target on a CPU-only
machine. This is how tests prove that every kernel and autotune config builds for sm_80 and
sm_90 (the interpreter accepts programs the compiler rejects), and how resource use is read.
Shared memory comes from Triton's metadata; registers and spills are only filled in by the
driver when a cubin is loaded, so they are read here from the cubin with ``cuobjdump``.

Needs the real compiler: under TRITON_INTERPRET=1 the kernels are interpreter functions, so run
this in a process started without it.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# Shared memory one block may use (opt-in maximum), in bytes: A100 (sm_80) and H100 (sm_90).
MAX_SHARED_MEMORY = {80: 166912, 90: 232448}

_RESOURCE_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass(frozen=True)
class CompiledKernelInfo:
    """What one ahead-of-time compile produced.

    ``registers`` is per thread; ``stack_bytes`` and ``local_bytes`` are per-thread local memory,
    where register spills go (both 0 means nothing spilled). They are None when cuobjdump
    could not be run.
    """

    name: str
    arch: int
    shared_bytes: int
    num_warps: int
    num_stages: int
    registers: int | None
    stack_bytes: int | None
    local_bytes: int | None

    @property
    def fits_shared_memory(self) -> bool:
        return self.shared_bytes <= MAX_SHARED_MEMORY[self.arch]


def jit_function(kernel) -> JITFunction:
    """The JITFunction under an autotuned (or plain) kernel."""
    while isinstance(kernel, Autotuner):
        kernel = kernel.fn
    if not isinstance(kernel, JITFunction):
        raise TypeError(
            f"{getattr(kernel, '__name__', kernel)} is not a compilable @triton.jit function "
            "(TRITON_INTERPRET=1 replaces them with interpreter functions): compile in a process "
            "started without TRITON_INTERPRET"
        )
    return kernel


def signature(kernel, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """The full ASTSource signature: ``types`` for the runtime arguments ("*fp16", "i32", ...)
    and "constexpr" for those in ``constexprs``. A parameter annotated with a type (e.g.
    ``slope: tl.float64``) takes it from the annotation when not in ``types``."""
    fn = jit_function(kernel)
    sig = {}
    for param in fn.params:
        if param.name in constexprs:
            sig[param.name] = "constexpr"
        elif param.name in types:
            sig[param.name] = types[param.name]
        elif param.annotation_type:
            sig[param.name] = param.annotation_type
        else:
            raise KeyError(f"{fn.__name__}: no type given for argument {param.name!r}")
    return sig


def compile_kernel(kernel, types, constexprs, arch, num_warps=4, num_stages=3,
                   divisible_by_16=()):
    """Compile ``kernel`` for ``sm_{arch}`` and return a :class:`CompiledKernelInfo`.

    ``kernel`` is a @triton.jit function or an autotuned one (its config is then given through
    ``constexprs``, ``num_warps`` and ``num_stages``). ``divisible_by_16`` names the arguments
    (pointers: 16-byte aligned; integers: multiples of 16) to specialise on, as the launcher
    does at run time when it sees such values; an integer argument that is 1 at run time is
    specialised by passing it in ``constexprs``. Without these the compile describes the
    worst case: unaligned, unvectorised loads that no real launch of aligned tensors takes.
    Raises on any compile error.
    """
    fn = jit_function(kernel)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    source = ASTSource(fn, signature(fn, types, constexprs), constexprs, attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    registers, stack, local = _resource_usage(compiled.asm["cubin"])
    return CompiledKernelInfo(
        name=fn.__name__,
        arch=arch,
        shared_bytes=compiled.metadata.shared,
        num_warps=num_warps,
        num_stages=num_stages,
        registers=registers,
        stack_bytes=stack,
        local_bytes=local,
    )


def _resource_usage(cubin: bytes):
    """(registers, stack bytes, local bytes) per thread, from ``cuobjdump -res-usage``."""
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        try:
            report = subprocess.run(
                [tool, "-res-usage", str(path)], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None, None, None
    match = _RESOURCE_USAGE.search(report)
    if match is None:
        return None, None, None
    registers, stack, _, local = (int(g) for g in match.groups())
    return registers, stack, local
