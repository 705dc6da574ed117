"""The fused conv block against the unfused brainkern layers, alternated in one process.

On the shared VMs this project runs on, the machine's speed moves for seconds to minutes at a
time, and memory-bound passes move more than compute-bound ones (README, "Measured"): a ratio
from two separate timings can land in two states. This alternates short blocks of each training
step (the bench's own step, brainkern.bench_conv._step) for a while and reports the median and
spread of the per-pair ratios.

Run: BRAINKERN_BACKEND=native .venv/bin/python benchmarks/alternate_block.py {stem,32-64}
     [channels_last] [seconds]
"""

import copy
import functools
import sys
import time

import torch

import brainkern.nn as bnn
from brainkern import accelerate
from brainkern.bench_conv import _step

LAYERS = {"stem": (1, 32, 32), "32-64": (32, 64, 16)}  # the CNN's: c_in, c_out, input size


def main(layer="stem", layout="NCHW", seconds="40"):
    torch.set_num_threads(2)
    c_in, c_out, hw = LAYERS[layer]
    block = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 5, padding=2), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2))
    conv = bnn.Conv2d(c_in, c_out, 5, padding=2, activation="relu")
    conv.load_state_dict(block[0].state_dict())
    unfused = torch.nn.Sequential(conv, bnn.MaxPool2d(2))
    fused = accelerate(copy.deepcopy(block))
    x = torch.randn(64, c_in, hw, hw)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(c_in > 1)  # the stem's input wants no gradient
    steps = {name: functools.partial(_step, model, x, "fwd+bwd")
             for name, model in (("unfused", unfused), ("fused", fused))}
    n = 20 if c_in == 1 else 4  # ~50 ms a block

    def timed(fn):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    for fn in steps.values():
        fn()
    times = {name: [] for name in steps}
    end = time.time() + float(seconds)
    while time.time() < end:
        for name, fn in steps.items():
            times[name].append(timed(fn))
    ratios = sorted(u / f for u, f in zip(times["unfused"], times["fused"]))
    k = len(ratios)
    median = {name: sorted(v)[k // 2] * 1e3 for name, v in times.items()}
    print(f"{layer} {layout}: {k} pairs, fused speed-up median {ratios[k // 2]:.2f}x "
          f"(10th-90th percentile {ratios[k // 10]:.2f}-{ratios[9 * k // 10]:.2f}x); "
          f"fused {median['fused']:.2f} ms, unfused {median['unfused']:.2f} ms a step")


if __name__ == "__main__":
    main(*sys.argv[1:])
