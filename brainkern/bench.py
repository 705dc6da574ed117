"""The benchmark engine behind ``brainkern bench`` and benchmarks/.

Counts first (FLOPs of each case), times each implementation in the same run, and reports
GFLOP/s, the fraction of the machine's measured FMA peak and the ratio to torch.mm (MKL).
On AMD CPUs MKL's fp32 GEMM takes a slow non-Intel path, so oneDNN's fp32 matmul is shown beside
it as the stronger vendor baseline.
"""

from __future__ import annotations

import datetime
import functools
import platform
import statistics
import time
from dataclasses import dataclass

import torch

import brainkern.functional as BF
import brainkern.nn as bnn
from brainkern import backends


@dataclass
class Result:
    case: str
    impl: str
    flops: float
    seconds: float

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9


def time_call(fn, min_seconds: float = 0.25, rounds: int = 5) -> float:
    """Median seconds per call over ``rounds`` rounds, each long enough to time reliably."""
    fn()  # warm-up: first-call compilation, allocator, caches
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(min_seconds / rounds / once))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def cpu_backends() -> list[str]:
    return [b for b in ("native", "numba") if b in backends.available_backends()]


def machine_peak_gflops(threads: int) -> float | None:
    """fp32 FMA peak measured by the native core's FMA loop, or None if it is not built."""
    from brainkern.kernels import native

    if not native.is_built():
        return None
    # Best of a few: a peak is what the cores can do, and one short probe on a shared VM can land
    # on a moment when a vCPU is taken away (seen here: half the peak, once).
    return max(native.fma_peak_gflops(threads, 0.2) for _ in range(3))


def _onednn_linear(x, weight, bias=None):
    """oneDNN's fp32 matmul, on oneDNN's own tensor layout, as a baseline callable."""
    xm, wm = x.to_mkldnn(), weight.to_mkldnn()
    bm = bias.to_mkldnn() if bias is not None else None
    return lambda: torch._C._nn.mkldnn_linear(xm, wm, bm)


def _identity(t):
    return t


def _right_mul(mul, b, a):
    return mul(a, b)


def _on_backend(name, fn, *args):
    with backends.use_backend(name):
        return fn(*args)


def _train_step(layer, x, post, mode):
    """One forward (``fwd``, no autograd) or forward+backward (``fwd+bwd``) of ``layer``."""
    if mode == "fwd":
        with torch.no_grad():
            return post(layer(x))
    y = post(layer(x))
    y.backward(torch.ones_like(y))


def bench_square(sizes, results: list[Result]) -> None:
    """C = A @ B for square n x n float32 matrices: forward, and forward+backward (dA, dB)."""
    for n in sizes:
        a = torch.randn(n, n, requires_grad=True)
        b = torch.randn(n, n, requires_grad=True)
        for mode, flops in (("fwd", 2.0 * n**3), ("fwd+bwd", 6.0 * n**3)):
            ours = functools.partial(_train_step, functools.partial(_right_mul, BF.matmul, b), a,
                                     _identity, mode)
            impls = {name: functools.partial(_on_backend, name, ours) for name in cpu_backends()}
            impls["torch.mm (MKL)"] = functools.partial(
                _train_step, functools.partial(_right_mul, torch.mm, b), a, _identity, mode)
            if mode == "fwd" and torch.backends.mkldnn.is_available():
                impls["oneDNN"] = _onednn_linear(a.detach(), b.detach().t().contiguous())
            case = f"gemm {n}^3 {mode}"
            results.extend(Result(case, impl, flops, time_call(fn)) for impl, fn in impls.items())


def bench_mlp(batches, results: list[Result], layers=((784, 128, "relu"), (128, 10, None))) -> None:
    """The MLP's layers (Linear + bias + activation), forward and forward+backward."""
    for batch in batches:
        for k, n, act in layers:
            x = torch.randn(batch, k, requires_grad=True)
            torch_layer = torch.nn.Linear(k, n)
            ours = bnn.Linear(k, n, activation=act)
            ours.load_state_dict(torch_layer.state_dict())
            torch_act = torch.relu if act == "relu" else _identity
            label = f"linear {batch}x{k}->{n}" + (f"+{act}" if act else "")
            fwd_flops = 2.0 * batch * k * n
            # forward+backward: dX and dW are two more GEMMs of the same size.
            for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3 * fwd_flops)):
                impls = {}
                for name in cpu_backends():
                    impls[name] = lambda name=name, mode=mode, x=x, ours=ours: _on_backend(
                        name, _train_step, ours, x, _identity, mode)
                impls["torch eager"] = lambda mode=mode, x=x, layer=torch_layer, post=torch_act: (
                    _train_step(layer, x, post, mode))
                if mode == "fwd" and torch.backends.mkldnn.is_available():
                    impls["oneDNN"] = _onednn_linear(
                        x.detach(), torch_layer.weight.detach(), torch_layer.bias.detach())
                case = f"{label} {mode}"
                results.extend(Result(case, impl, flops, time_call(fn)) for impl, fn in impls.items())


def format_table(results: list[Result], peak: float | None) -> str:
    """A markdown table: one row per case and implementation, ratio to the torch baseline."""
    baseline = {}
    for r in results:
        if r.impl in ("torch.mm (MKL)", "torch eager"):
            baseline[r.case] = r.seconds
    head = "| case | impl | ms | GFLOP/s | % peak | speed vs torch |\n|---|---|---:|---:|---:|---:|"
    rows = []
    for r in results:
        frac = f"{100 * r.gflops / peak:.0f}%" if peak else "n/a"
        ratio = f"{baseline[r.case] / r.seconds:.2f}x" if r.case in baseline else ""
        rows.append(f"| {r.case} | {r.impl} | {1e3 * r.seconds:.3f} | {r.gflops:.1f} | {frac} | {ratio} |")
    return "\n".join([head, *rows])


def header(threads: int, peak: float | None, command: str) -> str:
    from brainkern.kernels import native

    isa = native.isa() if native.is_built() else "not built"
    lines = [
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {platform.processor() or platform.machine()}, {_cpu_model()}, {threads} threads",
        f"- torch {torch.__version__}; native ISA: {isa}",
        f"- measured fp32 FMA peak: {peak:.0f} GFLOP/s" if peak else "- peak: native core not built",
        f"- command: `{command}`",
    ]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def run_linear(sizes=(256, 512, 1024, 2048), batches=(64, 512), threads: int = 2,
               command: str = "brainkern bench linear") -> str:
    """Run the linear benchmark on the CPU and return it as markdown."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        peak = machine_peak_gflops(threads)
        results: list[Result] = []
        bench_square(sizes, results)
        bench_mlp(batches, results)
        return header(threads, peak, command) + "\n\n" + format_table(results, peak)
    finally:
        torch.set_num_threads(previous)
