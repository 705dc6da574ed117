"""``brainkern bench conv`` and ``brainkern bench pool``: the CNN's and the GAN's layers on the CPU.

Every case is timed in one run beside torch eager in both layouts (NCHW, which is the ratio's
baseline, and channels_last: oneDNN on the CPU) and, with ``compile=True``, torch.compile of the
same torch layer. brainkern runs in both layouts too; its output keeps the input's layout, as
torch's does. Convolutions report GFLOP/s and the fraction of the measured FMA peak; pooling is
memory-bound, so it reports GB/s of the fewest bytes it must move and the fraction of the
measured copy bandwidth.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass

import torch

import brainkern.nn as bnn
from brainkern.accelerate import accelerate
from brainkern.bench import (
    Impl,
    Result,
    _identity,
    _train_step,
    cpu_backends,
    header,
    machine_peak_gflops,
    time_impls,
)

CL = torch.channels_last


@dataclass(frozen=True)
class ConvCase:
    label: str
    batch: int
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    hw: int
    groups: int = 1
    transposed: bool = False
    activation: str = "relu"
    input_grad: bool = True  # False for a network's first layer: its input needs no gradient

    def layers(self):
        """(torch layer + its activation module, brainkern layer with the activation fused)."""
        cls, twin = ((torch.nn.ConvTranspose2d, bnn.ConvTranspose2d) if self.transposed
                     else (torch.nn.Conv2d, bnn.Conv2d))
        args = (self.c_in, self.c_out, self.kernel, self.stride, self.padding)
        torch_layer = cls(*args, groups=self.groups)
        act = torch.nn.ReLU() if self.activation == "relu" else torch.nn.Tanh()
        ours = twin(*args, groups=self.groups, activation=self.activation)
        ours.load_state_dict(torch_layer.state_dict())
        return torch.nn.Sequential(torch_layer, act), ours

    def forward_flops(self) -> float:
        x = torch.empty(1, self.c_in, self.hw, self.hw, device="meta")
        out = self.layers()[0][0].to("meta")(x)
        taps = self.kernel * self.kernel * (self.c_out if self.transposed else self.c_in)
        # A transposed conv's multiply-adds: every input element meets every tap of its group.
        per_sample = (x.numel() if self.transposed else out.numel()) * taps / self.groups
        return 2.0 * self.batch * per_sample


CNN_CASES = [
    ConvCase("cnn stem 1->32 5x5 32x32", 64, 1, 32, 5, 1, 2, 32, input_grad=False),
    ConvCase("cnn 32->64 5x5 16x16", 64, 32, 64, 5, 1, 2, 16),
]
RESNET_CASES = [
    ConvCase("resnet 64->64 3x3 56x56", 32, 64, 64, 3, 1, 1, 56),
    ConvCase("resnet 128->128 3x3 28x28", 32, 128, 128, 3, 1, 1, 28),
    ConvCase("depthwise 128 3x3 28x28", 32, 128, 128, 3, 1, 1, 28, groups=128),
]
DCGAN_CASES = [
    ConvCase("dcgan z100->256 4x4", 64, 100, 256, 4, 1, 0, 1, transposed=True, input_grad=False),
    ConvCase("dcgan 256->128 8x8", 64, 256, 128, 4, 2, 1, 4, transposed=True),
    ConvCase("dcgan 128->64 16x16", 64, 128, 64, 4, 2, 1, 8, transposed=True),
    ConvCase("dcgan 64->1 32x32", 64, 64, 1, 4, 2, 1, 16, transposed=True, activation="tanh"),
]

# Layers off the models' path, where a kernel choice can fall off a cliff (`--groups
# coverage`): few or many channels, thin outputs, grouped (ResNeXt), depthwise with a channel
# multiplier, 1x1, strided layers, a discriminator's input layer.
COVERAGE_CASES = [
    ConvCase("thin out 32->1 5x5 32x32", 16, 32, 1, 5, 1, 2, 32),
    ConvCase("rgb out 64->3 3x3 32x32", 16, 64, 3, 3, 1, 1, 32),
    ConvCase("narrow 8->8 3x3 24x24", 16, 8, 8, 3, 1, 1, 24),
    ConvCase("squeeze 128->16 3x3 24x24", 16, 128, 16, 3, 1, 1, 24),
    ConvCase("pointwise 8->8 1x1 24x24", 16, 8, 8, 1, 1, 0, 24),
    ConvCase("pointwise 128->16 1x1 24x24", 16, 128, 16, 1, 1, 0, 24),
    ConvCase("stem 3->64 7x7 s2 64x64", 16, 3, 64, 7, 2, 3, 64, input_grad=False),
    ConvCase("gan disc 3->64 4x4 s2 32x32", 16, 3, 64, 4, 2, 1, 32),
    ConvCase("strided 64->128 3x3 s2 28x28", 16, 64, 128, 3, 2, 1, 28),
    ConvCase("grouped 64->64 g4 3x3 28x28", 8, 64, 64, 3, 1, 1, 28, groups=4),
    ConvCase("resnext 128->128 g32 3x3 28x28", 8, 128, 128, 3, 1, 1, 28, groups=32),
    ConvCase("depthwise x2 32->64 3x3 24x24", 16, 32, 64, 3, 1, 1, 24, groups=32),
]


def _step(model, x, mode):
    return _train_step(model, x, _identity, mode)


def conv_impls(case: ConvCase, mode: str, compile: bool) -> dict[str, Impl]:
    torch_model, ours = case.layers()
    x = torch.randn(case.batch, case.c_in, case.hw, case.hw)
    inputs = {"NCHW": x, "channels_last": x.contiguous(memory_format=CL)}
    for t in inputs.values():
        t.requires_grad_(case.input_grad and mode != "fwd")
    impls = {}
    for layout, t in inputs.items():
        name = "torch eager" if layout == "NCHW" else "torch eager channels_last"
        # Each layout gets its own copy of the layer: torch keeps a channels_last weight for
        # channels_last input, and that is part of what its faster layout costs.
        model = copy.deepcopy(torch_model)
        if layout == "channels_last":
            model = model.to(memory_format=CL)
        impls[name] = Impl(functools.partial(_step, model, t, mode))
        if compile:
            impls[f"torch.compile {layout}"] = Impl(
                functools.partial(_step, torch.compile(copy.deepcopy(model)), t, mode))
        for backend in cpu_backends():
            impls[f"{backend} {layout}"] = Impl(functools.partial(_step, ours, t, mode), backend)
    return impls


def bench_convs(cases, results: list[Result], compile: bool = False) -> None:
    for case in cases:
        fwd = case.forward_flops()
        # Backward: the weight gradient costs a forward's FLOPs, the input gradient another.
        bwd = fwd * (2 if case.input_grad else 1)
        for mode, flops in (("fwd", fwd), ("fwd+bwd", fwd + bwd)):
            impls = conv_impls(case, mode, compile)
            results.extend(Result(f"{case.label} b{case.batch} {mode}", name, flops, s)
                           for name, s in time_impls(impls, min_seconds=0.6, rounds=5).items())


def bench_models(results: list[Result]) -> None:
    """The summed time of the CNN's two conv layers and of the DCGAN generator's four, each
    layer on its own input, one implementation's layers timed back to back."""
    for label, cases in (("cnn conv layers", CNN_CASES), ("dcgan generator", DCGAN_CASES)):
        for mode in ("fwd", "fwd+bwd"):
            flops, impls = 0.0, {}
            steps = {"torch eager": [], "torch eager channels_last": []}
            steps.update({f"{b} {layout}": [] for b in cpu_backends()
                          for layout in ("NCHW", "channels_last")})
            for case in cases:
                flops += case.forward_flops() * (1 if mode == "fwd" else
                                                 (3 if case.input_grad else 2))
                for name, impl in conv_impls(case, mode, compile=False).items():
                    steps[name].append(impl)
            for name, parts in steps.items():
                impls[name] = Impl(functools.partial(_run_all, [p.fn for p in parts]),
                                   parts[0].backend)
            results.extend(Result(f"{label} (sum) {mode}", name, flops, s)
                           for name, s in time_impls(impls, min_seconds=1.0, rounds=5).items())


def bench_kernels(cases, results: list[Result]) -> None:
    """Each CPU backend's conv kernels timed alone, on tensors made once (no autograd, no
    allocation in the loop): the forward with bias and ReLU, the activation backward, the input
    gradient and the weight gradient, beside torch's ``aten.convolution`` and
    ``aten.convolution_backward`` (its three gradients in one call). Where a layer's
    forward+backward falls behind, this says which kernel it is."""
    from brainkern import activations, backends
    from brainkern.ops._conv_geometry import conv2d_geometry, conv_transpose2d_geometry

    relu = activations.resolve("relu")
    for case in cases:
        x = torch.randn(case.batch, case.c_in, case.hw, case.hw)
        shape = (case.c_in, case.c_out // case.groups) if case.transposed else (
            case.c_out, case.c_in // case.groups)
        w = torch.randn(*shape, case.kernel, case.kernel) * 0.05
        b = torch.randn(case.c_out)
        if case.transposed:
            geometry = conv_transpose2d_geometry(x, w, b, case.stride, case.padding, 0,
                                                 case.groups, 1)
        else:
            geometry = conv2d_geometry(x, w, b, case.stride, case.padding, 1, case.groups)
        flops = case.forward_flops()
        args = geometry.kernel_args
        for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", CL)):
            xf = x.contiguous(memory_format=fmt)
            wt = w.contiguous(memory_format=fmt) if layout == "channels_last" else w
            out = torch.empty((case.batch, case.c_out, *geometry.out_hw), memory_format=fmt)
            grad = torch.randn_like(out)
            stride, padding = [case.stride] * 2, [case.padding] * 2
            aten = (torch.ops.aten.convolution, torch.ops.aten.convolution_backward)
            impls = {"torch aten fwd": functools.partial(
                aten[0], xf, wt, b, stride, padding, [1, 1], case.transposed, [0, 0], case.groups)}
            impls["torch aten bwd (x, w, b)"] = functools.partial(
                aten[1], grad, xf, wt, [case.c_out], stride, padding, [1, 1], case.transposed,
                [0, 0], case.groups, [True, True, True])
            for backend in cpu_backends():
                kern = backends.kernels(backend, "conv")
                forward = (kern.conv_transpose2d_forward if case.transposed
                           else kern.conv2d_forward)
                adjoint = (kern.conv2d_forward if case.transposed
                           else kern.conv_transpose2d_forward)
                grad_pre, grad_b, grad_x = (torch.empty_like(out), torch.empty(case.c_out),
                                            torch.empty_like(xf))
                grad_w = torch.empty_like(w)
                forward(xf, w, b, out, None, *args, relu.code, relu.param)
                weight_grad = ((kern.conv2d_backward_weight, xf, grad_pre) if case.transposed
                               else (kern.conv2d_backward_weight, grad_pre, xf))
                impls[f"{backend} fwd"] = functools.partial(
                    forward, xf, w, b, out, None, *args, relu.code, relu.param)
                impls[f"{backend} act bwd (no FLOPs)"] = functools.partial(
                    kern.conv2d_activation_backward, grad, out, grad_pre, grad_b, relu.code,
                    relu.param, True)
                impls[f"{backend} dx"] = functools.partial(
                    adjoint, grad_pre, w, None, grad_x, None, *args, activations.NONE, 0.0)
                impls[f"{backend} dw"] = functools.partial(
                    weight_grad[0], *weight_grad[1:], grad_w, *args)
            timed = time_impls({k: Impl(v) for k, v in impls.items()}, min_seconds=0.3,
                               rounds=5)
            for name, seconds in timed.items():
                work = flops * (2 if name.startswith("torch aten bwd") else 1)
                if name.endswith("(no FLOPs)"):
                    work = 0.0
                results.append(Result(f"{case.label} b{case.batch} {layout} kernels",
                                      name, work, seconds))


def bench_blocks(results: list[Result]) -> None:
    """The CNN's blocks, Conv2d + ReLU + MaxPool2d(2): torch eager, brainkern's two layers
    (``unfused``) and the one op ``brainkern.accelerate`` makes of them (``fused``)."""
    for case in CNN_CASES:
        torch_block = torch.nn.Sequential(*case.layers()[0], torch.nn.MaxPool2d(2))
        unfused = torch.nn.Sequential(case.layers()[1], bnn.MaxPool2d(2))
        unfused[0].load_state_dict(torch_block[0].state_dict())
        fused = accelerate(copy.deepcopy(torch_block))
        if not fused[0].fuses_max_pool:
            raise RuntimeError("bench conv: accelerate did not fuse the conv block")
        fwd = case.forward_flops()
        for mode, flops in (("fwd", fwd), ("fwd+bwd", fwd * (3 if case.input_grad else 2))):
            x = torch.randn(case.batch, case.c_in, case.hw, case.hw)
            impls = {}
            for layout, t in (("NCHW", x), ("channels_last", x.contiguous(memory_format=CL))):
                t.requires_grad_(case.input_grad and mode != "fwd")
                model = copy.deepcopy(torch_block)
                if layout == "channels_last":
                    model = model.to(memory_format=CL)
                name = "torch eager" if layout == "NCHW" else "torch eager channels_last"
                impls[name] = Impl(functools.partial(_step, model, t, mode))
                for backend in cpu_backends():
                    for label, block in (("unfused", unfused), ("fused", fused)):
                        impls[f"{backend} {label} {layout}"] = Impl(
                            functools.partial(_step, block, t, mode), backend)
            label = case.label.replace("cnn", "cnn block", 1) + " +relu+maxpool2"
            # 15 rounds, not 5: the fused stem's step is mostly memory passes, which this VM
            # slows 2-5x for seconds at a time (README), and a median of 5 rounds moved its
            # ratio to the unfused layers by 0.5x from run to run.
            results.extend(Result(f"{label} b{case.batch} {mode}", name, flops, s)
                           for name, s in time_impls(impls, min_seconds=1.5, rounds=15).items())


def _run_all(fns):
    for fn in fns:
        fn()


def _baseline(results):
    return {r.case: r.seconds for r in results if r.impl == "torch eager"}


def format_table(results: list[Result], peak: float | None, unit: str = "GFLOP/s") -> str:
    """One row per case and implementation; ratio = torch eager NCHW's time / this one's."""
    baseline = _baseline(results)
    head = (f"| case | impl | ms | {unit} | % peak | speed vs torch NCHW |\n"
            "|---|---|---:|---:|---:|---:|")
    rows = []
    for r in results:
        rate = r.flops / r.seconds / 1e9
        frac = f"{100 * rate / peak:.0f}%" if peak else "n/a"
        ratio = f"{baseline[r.case] / r.seconds:.2f}x" if r.case in baseline else ""
        rows.append(f"| {r.case} | {r.impl} | {1e3 * r.seconds:.3f} | {rate:.1f} | {frac} | "
                    f"{ratio} |")
    return "\n".join([head, *rows])


def _with_threads(threads, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def run_conv(threads: int = 2, compile: bool = False, command: str = "brainkern bench conv",
             groups=("cnn", "resnet", "dcgan", "models", "block")) -> str:
    """The conv benchmark as markdown: the CNN's, ResNet-style and the DCGAN generator's layers,
    the models' summed layers and the CNN's fused conv blocks."""
    def run():
        peak = machine_peak_gflops(threads)
        results: list[Result] = []
        chosen = {"cnn": CNN_CASES, "resnet": RESNET_CASES, "dcgan": DCGAN_CASES,
                  "coverage": COVERAGE_CASES}
        for group in groups:
            if group == "models":
                bench_models(results)
            elif group == "block":
                bench_blocks(results)
            elif group == "kernels":
                bench_kernels([*CNN_CASES, *RESNET_CASES, *DCGAN_CASES], results)
            else:
                bench_convs(chosen[group], results, compile)
        table = header(threads, peak, command) + "\n\n" + format_table(results, peak)
        if "block" in groups:
            table += ("\n\nThe blocks' GFLOP/s count a dense convolution's multiply-adds. A fused "
                      "block's backward may run only the products of the max pooling's winners, "
                      "a quarter of them (native: conv2d_maxpool2d_backward), so its rate can pass "
                      "the peak.")
        return table
    return _with_threads(threads, run)


def copy_bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    """Measured copy bandwidth (bytes read + written per second, GB/s): a large tensor copy."""
    src = torch.randn(nbytes // 8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


POOL_CASES = [("max 2x2", (64, 64, 28, 28)), ("avg 2x2", (64, 64, 28, 28))]


def _pool_layers(kind):
    if kind.startswith("max"):
        return torch.nn.MaxPool2d(2), bnn.MaxPool2d(2)
    return torch.nn.AvgPool2d(2), bnn.AvgPool2d(2)


def bench_pools(results: list[Result]) -> None:
    for kind, shape in POOL_CASES:
        torch_pool, ours = _pool_layers(kind)
        n, c, h, w = shape
        x = torch.randn(shape)
        elem = 4
        out_elems = n * c * (h // 2) * (w // 2)
        # Fewest bytes: read x, write out (+ a 1-byte window code per output for max with a
        # backward: what the backward needs; torch saves 8-byte indices); backward reads
        # grad_out (+ the codes) and writes grad_x.
        fwd_bytes = elem * (x.numel() + out_elems)
        for mode in ("fwd", "fwd+bwd"):
            nbytes = fwd_bytes
            if mode == "fwd+bwd":
                index_bytes = out_elems if kind.startswith("max") else 0
                nbytes += index_bytes * 2 + elem * (out_elems + x.numel())
            inputs = {"NCHW": x, "channels_last": x.contiguous(memory_format=CL)}
            impls = {}
            for layout, t in inputs.items():
                t = t.detach().requires_grad_(mode != "fwd")
                name = "torch eager" if layout == "NCHW" else "torch eager channels_last"
                impls[name] = Impl(functools.partial(_step, torch_pool, t, mode))
                for backend in cpu_backends():
                    impls[f"{backend} {layout}"] = Impl(functools.partial(_step, ours, t, mode),
                                                        backend)
            results.extend(Result(f"{kind} {shape} {mode}", name, nbytes, s)
                           for name, s in time_impls(impls, min_seconds=0.6, rounds=7).items())


def run_pool(threads: int = 2, command: str = "brainkern bench pool") -> str:
    """The pooling benchmark as markdown: GB/s and the fraction of the copy bandwidth."""
    def run():
        bandwidth = copy_bandwidth_gbs()
        results: list[Result] = []
        bench_pools(results)
        head = header(threads, None, command).replace(
            "- peak: native core not built", f"- measured copy bandwidth: {bandwidth:.1f} GB/s")
        return head + "\n\n" + format_table(results, bandwidth, unit="GB/s")
    return _with_threads(threads, run)

