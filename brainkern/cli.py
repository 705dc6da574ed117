"""The ``brainkern`` command: info, bench, demo."""

from __future__ import annotations

import argparse
import platform
import sys


def info() -> str:
    """Versions, the backends built here, the native core's ISA, and whether a GPU is present."""
    import numpy
    import torch

    import brainkern
    from brainkern import backends
    from brainkern.kernels import native

    lines = [
        f"brainkern {brainkern.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}",
    ]
    for mod in ("numba", "triton"):
        try:
            lines.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            lines.append(f"{mod}: not installed")
    lines.append(
        f"native core: ISA {native.isa()} (supported here: {', '.join(native.supported_isas())})"
        if native.is_built()
        else f"native core: not built ({native.why_not_built()})"
    )
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"GPU: {gpu}")
    lines.append(f"available backends: {', '.join(backends.available_backends())}")
    lines.append(f"torch threads: {torch.get_num_threads()}")
    return "\n".join(lines)


def demo() -> int:
    """Linear, the CNN's conv block and a transposed conv against torch on every CPU backend:
    correctness, then speed."""
    import torch

    import brainkern.nn as bnn
    from brainkern import backends, bench

    print(info(), "\n")
    torch.manual_seed(0)
    x = torch.randn(512, 784, requires_grad=True)
    ref_layer = torch.nn.Linear(784, 128, dtype=torch.float64)
    x64 = x.detach().double().requires_grad_()
    ref = torch.relu(ref_layer(x64))
    grad = torch.randn_like(ref)  # random, so no gradient is an exact small-integer sum
    ref.backward(grad)
    ok = True
    print("correctness: Linear(784 -> 128) + ReLU, batch 512, float32 vs torch float64")
    for name in bench.cpu_backends() + ["torch"]:
        layer = bnn.Linear(784, 128, activation="relu")
        layer.load_state_dict({k: v.float() for k, v in ref_layer.state_dict().items()})
        x.grad = None
        with backends.use_backend(name):
            y = layer(x)
            y.backward(grad.float())
        errs = {
            "output": _rel(y, ref),
            "d input": _rel(x.grad, x64.grad),
            "d weight": _rel(layer.weight.grad, ref_layer.weight.grad),
            "d bias": _rel(layer.bias.grad, ref_layer.bias.grad),
        }
        good = all(e < 1e-5 for e in errs.values())
        ok &= good
        detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        print(f"  {name:7s} {'ok  ' if good else 'FAIL'} relative error: {detail}")
    ok &= _demo_conv()
    print("\nspeed (float32, 2 threads):")
    print(bench.run_linear(sizes=(512, 1024), batches=(64, 512), command="make demo"))
    from brainkern import bench_conv

    print()
    print(bench_conv.run_conv(groups=("cnn", "models"), command="make demo"))
    print()
    print(bench_conv.run_pool(command="make demo"))
    return 0 if ok else 1


def _demo_conv() -> bool:
    """The CNN's block, Conv2d(32 -> 64, 5x5) + ReLU + MaxPool2d(2), and a DCGAN upsampling
    ConvTranspose2d against torch in float64, on every CPU backend, channels_last input."""
    import copy

    import torch

    from brainkern import accelerate, backends, bench

    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(
        torch.nn.Conv2d(32, 64, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.ConvTranspose2d(64, 16, 4, 2, 1), torch.nn.Tanh()).double()
    x64 = torch.randn(8, 32, 16, 16, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    ref = ref_model(x64)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    ok = True
    print("\ncorrectness: Conv2d(32 -> 64, 5x5) + ReLU + MaxPool2d(2) (fused by accelerate), "
          "ConvTranspose2d(64 -> 16, 4, 2, 1) + Tanh,\nbatch 8, channels_last, float32 vs "
          "torch float64")
    for name in bench.cpu_backends() + ["torch"]:
        model = accelerate(copy.deepcopy(ref_model).float())
        x = x64.detach().float().requires_grad_()
        with backends.use_backend(name):
            y = model(x)
            y.backward(grad.float())
        errs = {"output": _rel(y, ref), "d input": _rel(x.grad, x64.grad),
                "d conv weight": _rel(model[0].weight.grad, ref_model[0].weight.grad),
                "d convT weight": _rel(model[3].weight.grad, ref_model[3].weight.grad)}
        good = all(e < 1e-5 for e in errs.values())
        ok &= good
        detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        print(f"  {name:7s} {'ok  ' if good else 'FAIL'} relative error: {detail}")
    return ok


def _rel(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="brainkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends built, native ISA, GPU")
    sub.add_parser("demo", help="Linear, conv and pooling against torch: correctness and speed")
    bench_parser = sub.add_parser("bench", help="benchmarks side by side with torch/vendor libraries")
    bench_parser.add_argument("op", choices=["linear", "conv", "pool"])
    bench_parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048],
                              help="square GEMM sizes")
    bench_parser.add_argument("--batches", type=int, nargs="+", default=[64, 512],
                              help="batch sizes for the MLP's layers")
    bench_parser.add_argument("--threads", type=int, default=2)
    bench_parser.add_argument("--groups", nargs="+",
                              default=["cnn", "resnet", "dcgan", "models", "block"],
                              choices=["cnn", "resnet", "dcgan", "models", "block", "kernels",
                                       "coverage"],
                              help="conv: which layer groups to time (kernels: each kernel "
                                   "alone, beside aten's convolution and its backward; "
                                   "coverage: layers off the models' path, for cliffs)")
    bench_parser.add_argument("--compile", action="store_true",
                              help="conv: also time torch.compile of each torch layer")
    bench_parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)

    if args.command == "info":
        print(info())
        return 0
    if args.command == "demo":
        return demo()
    from brainkern import bench, bench_conv

    command = "brainkern " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.op == "conv":
        table = bench_conv.run_conv(args.threads, args.compile, command, tuple(args.groups))
    elif args.op == "pool":
        table = bench_conv.run_pool(args.threads, command)
    else:
        table = bench.run_linear(tuple(args.sizes), tuple(args.batches), args.threads, command)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# brainkern bench {args.op}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
