"""The benchmark engine behind ``brainkern bench`` and benchmarks/.

Counts first (FLOPs of each case), times each implementation in the same run, and reports
GFLOP/s, the fraction of the machine's measured FMA peak and the ratio to torch.mm (MKL).
oneDNN's fp32 matmul is shown beside MKL: on AMD CPUs with AVX-512 MKL takes its AVX2 path (Zen 5:
~190 GFLOP/s against oneDNN's ~400 on 2 cores), so there oneDNN is the stronger vendor baseline;
on an AVX2-only Zen 3 MKL runs its best kernels and leads oneDNN by 10-25%.
"""

from __future__ import annotations

import contextlib
import copy
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
from brainkern.accelerate import accelerate


@dataclass
class Result:
    case: str
    impl: str
    flops: float
    seconds: float

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9


@dataclass(frozen=True)
class Impl:
    """A callable to time, and the backend it runs on (None: no brainkern backend chosen).

    The backend is chosen around the timing loop, as a user chooses it once, not per call.
    """

    fn: object
    backend: str | None = None


def _calibrate(impl: Impl, seconds: float) -> int:
    """Calls per round so that a round takes about ``seconds`` (after a warm-up call)."""
    with _backend_of(impl):
        impl.fn()  # warm-up: first-call compilation, allocator, caches
        start = time.perf_counter()
        impl.fn()
        once = max(time.perf_counter() - start, 1e-7)
    return max(1, int(seconds / once))


def _backend_of(impl: Impl):
    return backends.use_backend(impl.backend) if impl.backend else contextlib.nullcontext()


def time_impls(impls: dict[str, Impl], min_seconds: float = 0.3, rounds: int = 11) -> dict[str, float]:
    """Median seconds per call of each implementation.

    The implementations take turns, round by round (each round starting with a different one):
    on a shared VM the machine's speed drifts by 10-25% over seconds, and timing one
    implementation after another would put that drift into their ratio.
    """
    calls = {name: _calibrate(impl, min_seconds / rounds) for name, impl in impls.items()}
    samples: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            impl, n = impls[name], calls[name]
            with _backend_of(impl):
                start = time.perf_counter()
                for _ in range(n):
                    impl.fn()
                samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def _record(results: list, case: str, flops: float, impls: dict[str, Impl]) -> None:
    results.extend(Result(case, name, flops, seconds) for name, seconds in time_impls(impls).items())


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


def _train_step(layer, x, post, mode):
    """One forward (``fwd``, no autograd) or forward+backward (``fwd+bwd``) of ``layer``, as a
    training loop runs it: the gradients start at None (``optimizer.zero_grad()``'s default), so
    the backward hands its gradients over instead of adding them into the last step's, which
    would time a tensor addition that no training step does."""
    if mode == "fwd":
        with torch.no_grad():
            return post(layer(x))
    _clear_grads(layer, x)
    y = post(layer(x))
    y.backward(torch.ones_like(y))


def _clear_grads(layer, x) -> None:
    x.grad = None
    if isinstance(layer, torch.nn.Module):
        layer.zero_grad(set_to_none=True)
    elif isinstance(layer, functools.partial):  # a function of x and fixed operands
        for t in layer.args:
            if isinstance(t, torch.Tensor):
                t.grad = None


def bench_square(sizes, results: list[Result]) -> None:
    """C = A @ B for square n x n float32 matrices: forward, and forward+backward (dA, dB)."""
    for n in sizes:
        a = torch.randn(n, n, requires_grad=True)
        b = torch.randn(n, n, requires_grad=True)
        for mode, flops in (("fwd", 2.0 * n**3), ("fwd+bwd", 6.0 * n**3)):
            ours = functools.partial(_train_step, functools.partial(_right_mul, BF.matmul, b), a,
                                     _identity, mode)
            impls = {name: Impl(ours, name) for name in cpu_backends()}
            impls["torch.mm (MKL)"] = Impl(functools.partial(
                _train_step, functools.partial(_right_mul, torch.mm, b), a, _identity, mode))
            if mode == "fwd" and torch.backends.mkldnn.is_available():
                impls["oneDNN"] = Impl(_onednn_linear(a.detach(), b.detach().t().contiguous()))
            _record(results, f"gemm {n}^3 {mode}", flops, impls)


def _compiled_impls(ours, torch_model, x, mode) -> dict[str, Impl]:
    """torch.compile (Inductor) of torch's model, and of brainkern's on each CPU backend.

    A compiled brainkern model keeps the backend it was traced with (the first call, made in
    _calibrate inside the Impl's use_backend), so each backend compiles its own copy.
    """
    impls = {"torch.compile": Impl(functools.partial(
        _train_step, torch.compile(torch_model), x, _identity, mode))}
    for name in cpu_backends():
        compiled = torch.compile(copy.deepcopy(ours))
        impls[f"{name} compiled"] = Impl(
            functools.partial(_train_step, compiled, x, _identity, mode), name)
    return impls


def _record_with_compiled(results, case, flops, impls, ours, torch_model, x, mode) -> None:
    # Dynamo recompiles a code object at most 8 times, then runs it eagerly; every layer here
    # shares nn.Linear's forward, so each case starts from an empty cache.
    torch._dynamo.reset()
    _record(results, case, flops, {**impls, **_compiled_impls(ours, torch_model, x, mode)})


def bench_mlp(batches, results: list[Result], layers=((784, 128, "relu"), (128, 10, None))) -> None:
    """The MLP's layers (Linear + bias + activation), forward and forward+backward, eager and
    under torch.compile."""
    for batch in batches:
        for k, n, act in layers:
            x = torch.randn(batch, k, requires_grad=True)
            torch_layer = torch.nn.Linear(k, n)
            ours = bnn.Linear(k, n, activation=act)
            ours.load_state_dict(torch_layer.state_dict())
            torch_act = torch.relu if act == "relu" else _identity
            torch_model = torch.nn.Sequential(torch_layer, *([_TORCH_ACTIVATIONS[act]()] if act else []))
            label = f"linear {batch}x{k}->{n}" + (f"+{act}" if act else "")
            fwd_flops = 2.0 * batch * k * n
            # forward+backward: dX and dW are two more GEMMs of the same size.
            for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3 * fwd_flops)):
                step = functools.partial(_train_step, ours, x, _identity, mode)
                impls = {name: Impl(step, name) for name in cpu_backends()}
                impls["torch eager"] = Impl(
                    functools.partial(_train_step, torch_layer, x, torch_act, mode))
                if mode == "fwd" and torch.backends.mkldnn.is_available():
                    impls["oneDNN"] = Impl(_onednn_linear(
                        x.detach(), torch_layer.weight.detach(), torch_layer.bias.detach()))
                _record_with_compiled(results, f"{label} {mode}", flops, impls, ours, torch_model,
                                      x, mode)
        bench_mlp_model(batch, layers, results)


_TORCH_ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid,
                      "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}


def bench_mlp_model(batch, layers, results: list[Result]) -> None:
    """The whole MLP (the layers as one nn.Sequential), torch's against brainkern.accelerate's,
    eager and under torch.compile."""
    modules = []
    for k, n, act in layers:
        modules.append(torch.nn.Linear(k, n))
        if act is not None:
            modules.append(_TORCH_ACTIVATIONS[act]())
    torch_model = torch.nn.Sequential(*modules)
    ours = accelerate(copy.deepcopy(torch_model))
    x = torch.randn(batch, layers[0][0], requires_grad=True)
    fwd_flops = sum(2.0 * batch * k * n for k, n, _ in layers)
    label = f"mlp {batch}x" + "-".join([str(layers[0][0])] + [str(n) for _, n, _ in layers])
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3 * fwd_flops)):
        step = functools.partial(_train_step, ours, x, _identity, mode)
        impls = {name: Impl(step, name) for name in cpu_backends()}
        impls["torch eager"] = Impl(functools.partial(_train_step, torch_model, x, _identity, mode))
        _record_with_compiled(results, f"{label} {mode}", flops, impls, ours, torch_model, x, mode)


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
        peak_before = machine_peak_gflops(threads)
        results: list[Result] = []
        bench_square(sizes, results)
        bench_mlp(batches, results)
        # Probed again at the end: a short probe on a shared VM sometimes lands while a vCPU is
        # taken away (seen: half the peak), which would inflate every "% peak" above 100%.
        peak = None if peak_before is None else max(peak_before, machine_peak_gflops(threads))
        return header(threads, peak, command) + "\n\n" + format_table(results, peak)
    finally:
        torch.set_num_threads(previous)
