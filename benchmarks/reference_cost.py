"""What the reference kernels cost against the C kernels, per workload.

``tfadam.Adam`` steps on the benchmark's workloads (``tfadam.bench``: D1,
D2, D3 dense, S1/S2 sparse) with each kernel selection in turn: the
reference kernels (what runs where no C kernels exist), the prebuilt ones
of every x86-64 level this CPU runs, and the run-time build. One optimizer
per workload; the selection changes between steps (``TFADAM_KERNELS`` and
``native.reset()``), round-robin, so every selection sees the same machine.
Before each timed step a parallel torch op runs, as a backward pass would
(torch's OpenMP threads are awake, as in training). Prints medians and each
selection's time over the fastest C kernels'. Results: benchmarks/RESULTS.md.

Usage: ``python benchmarks/reference_cost.py [--rounds 15] [--threads N]
[--workloads D1,D2,D3,S1,S2]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import tfadam
from tfadam.bench import ELEMENTS_PER_ROW, WORKLOADS, Workload, machine_line
from tfadam.kernels import native


def selections() -> list[str]:
    modes = ["reference", *(f"prebuilt:{level}" for level in native.cpu_levels())]
    if native.compiler() is not None:
        modes.append("compiled")
    available = []
    for mode in modes:
        os.environ["TFADAM_KERNELS"] = mode
        native.reset()
        if mode == "reference" or native.library() is not None:
            available.append(mode)
    return available


def use(mode: str) -> None:
    os.environ["TFADAM_KERNELS"] = mode
    native.reset()
    native.library()


def workload_step(w: Workload) -> tuple[tfadam.Adam, object]:
    """An optimizer on ``w``'s parameters and a function that sets their gradients."""
    generator = torch.Generator().manual_seed(0)
    if w.kind == "dense":
        params = [
            torch.nn.Parameter(torch.randn(w.size, generator=generator).to(w.dtype))
            for _ in range(w.count)
        ]
        for p in params:
            p.grad = torch.randn(w.size, generator=generator).to(w.dtype)
        return tfadam.Adam(params, lr=1e-3), lambda: None
    shape = (w.rows, ELEMENTS_PER_ROW)
    p = torch.nn.Parameter(torch.randn(shape, generator=generator))
    indices = torch.randint(0, w.rows, (w.touched,), generator=generator)
    values = torch.randn(w.touched, ELEMENTS_PER_ROW, generator=generator)
    sparse = "lazy" if w.name == "S2" else "dense"

    def set_grad() -> None:
        p.grad = torch.sparse_coo_tensor(indices[None], values, shape)

    return tfadam.Adam([p], lr=1e-3, sparse=sparse), set_grad  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workloads", default="D1,D2,D3,S1,S2")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    modes = selections()
    print(f"Machine: {machine_line()}; torch threads: {torch.get_num_threads()}")
    print(f"Selections: {', '.join(modes)}; {args.rounds} rounds, {args.warmup} warm-up")
    scratch = torch.ones(4_000_000)
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        opt, set_grad = workload_step(w)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for round_ in range(args.warmup + args.rounds):
            for mode in modes:
                use(mode)
                set_grad()  # type: ignore[operator]
                scratch.mul_(1.0)  # torch's threads awake, as after a backward pass
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
                if round_ >= args.warmup:
                    times[mode].append(elapsed)
        medians = {m: statistics.median(t) for m, t in times.items()}
        fastest = min(v for m, v in medians.items() if m != "reference")
        print(f"\n{w.name}: {w.description}")
        print("| kernels | median ms | min ms | / fastest C |")
        print("|---|---:|---:|---:|")
        for mode in modes:
            print(
                f"| {mode} | {medians[mode] * 1e3:.2f} | {min(times[mode]) * 1e3:.2f} "
                f"| {medians[mode] / fastest:.2f}x |"
            )
        del opt


if __name__ == "__main__":
    main()
