"""Per-core efficiency: one thread, CPU time of the calling thread.

A supplement to ``python -m tfadam bench`` for shared, noisy machines: with
``torch.set_num_threads(1)`` both tfadam's C kernel and torch's fused kernel
run in the calling thread, so ``time.thread_time()`` counts only the CPU time
the step itself used, whatever else the machine is doing. It says how much
work per element each implementation does; it does not replace the
wall-clock, all-threads comparison of the benchmark.

Run: ``PYTHONPATH=src python benchmarks/per_core.py``
"""

from __future__ import annotations

import time

import torch

import tfadam

WORKLOADS = {
    "D1 fp32 16 x 1M": (16, 1_000_000, torch.float32),
    "D2 fp32 2000 x 4096": (2000, 4096, torch.float32),
    "D3 bf16 16 x 1M": (16, 1_000_000, torch.bfloat16),
    "fp16 16 x 1M": (16, 1_000_000, torch.float16),
    "fp64 16 x 1M": (16, 1_000_000, torch.float64),
}


def params(count: int, size: int, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(size, generator=generator).to(dtype))
        p.grad = torch.randn(size, generator=generator).to(dtype)
        out.append(p)
    return out


def main() -> None:
    torch.set_num_threads(1)
    print("| workload | tfadam ms (CPU) | torch fused ms (CPU) | tfadam speed-up |")
    print("|---|---:|---:|---:|")
    for name, (count, size, dtype) in WORKLOADS.items():
        steps = {
            "tfadam": tfadam.Adam(params(count, size, dtype), lr=1e-3).step,
            "fused": torch.optim.Adam(params(count, size, dtype), lr=1e-3, fused=True).step,
        }
        best = {k: float("inf") for k in steps}
        for step in steps.values():
            step()
        for _ in range(15):
            for k, step in steps.items():
                start = time.thread_time()
                step()
                best[k] = min(best[k], time.thread_time() - start)
        ratio = best["fused"] / best["tfadam"]
        print(f"| {name} | {best['tfadam'] * 1e3:.2f} | {best['fused'] * 1e3:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
