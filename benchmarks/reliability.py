"""What reliability costs: the non-finite scan, checkpoint save/load, unlocked races.

    PYTHONPATH=src python benchmarks/reliability.py [--quick]

Prints one line per measurement (medians of interleaved repetitions). The
numbers of one run on one machine go to docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import tfadam
from tfadam import guard


def timed_ms(fn, repeat: int) -> tuple[float, float]:
    """(median, best) in ms: on a shared machine the best shows the cost, the median the noise."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def scan_cost(quick: bool) -> None:
    """The opt-in scan alone (it is all that nonfinite='raise' adds to a step)."""
    workloads = {
        "D1 16 x 1,000,000 fp32": [torch.randn(1_000_000) for _ in range(16)],
        "D2 2,000 x 4,096 fp32": [torch.randn(4096) for _ in range(2000)],
        "D3 16 x 1,000,000 bf16": [torch.randn(1_000_000).bfloat16() for _ in range(16)],
    }
    for name, grads in workloads.items():
        pairs = [(g, f"p{i}") for i, g in enumerate(grads)]
        elements = sum(g.numel() for g in grads)

        def exact(grads=grads):
            return all(bool(torch.isfinite(g).all()) for g in grads)

        fast, best = timed_ms(
            lambda pairs=pairs: guard.check_finite(pairs, "b"), 5 if quick else 15
        )
        slow, slow_best = timed_ms(exact, 3 if quick else 7)
        print(
            f"scan {name}: median {fast:.1f} ms, best {best:.1f} ms "
            f"({elements / best / 1e6:.2f} G elements/s); isfinite().all() per tensor: "
            f"median {slow:.1f} ms, best {slow_best:.1f} ms"
        )


def checkpoint_cost(quick: bool) -> None:
    elements = 4_000_000 if quick else 16_000_000
    model = torch.nn.Linear(elements // 1000, 1000, bias=False)
    opt = tfadam.Adam(model.parameters())
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    megabytes = 3 * elements * 4 / 2**20  # weights, m, v
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as directory:
        path = Path(directory) / "bench.ckpt"
        repeat = 3 if quick else 5
        _, save = timed_ms(lambda: tfadam.save_checkpoint(path, model=model, optimizer=opt), repeat)
        _, load = timed_ms(lambda: tfadam.load_checkpoint(path, model=model, optimizer=opt), repeat)
        _, plain = timed_ms(
            lambda: torch.save({"m": model.state_dict(), "o": opt.state_dict()}, path), repeat
        )
        _, plain_load = timed_ms(lambda: torch.load(path, weights_only=True), repeat)
    print(
        f"checkpoint {megabytes:.0f} MiB (weights + m + v), best of {repeat}: save {save:.0f} ms "
        f"({megabytes / save * 1e3:.0f} MiB/s, hash + fsync included), load {load:.0f} ms "
        f"(checksum verified, into model and optimizer); plain torch.save {plain:.0f} ms "
        f"(no fsync), torch.load {plain_load:.0f} ms"
    )


def unlocked_race(quick: bool) -> None:
    """8 threads x N calls without use_locking: does the result equal a serial order?"""
    calls = 50 if quick else 200
    variables = {"dense": torch.zeros(64, 32), "table": torch.zeros(100, 16)}
    step = torch.tensor(0)
    opt = tfadam.AdamOptimizer(0.01, use_locking=False)

    def grads(thread: int, call: int):
        gen = torch.Generator().manual_seed(10_000 * thread + call)
        rows = torch.randint(0, 100, (12,), generator=gen)
        return [
            (torch.randn(64, 32, generator=gen), variables["dense"]),
            (tfadam.IndexedSlices(torch.randn(12, 16, generator=gen), rows, (100, 16)),
             variables["table"]),
        ]  # fmt: skip

    order: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def worker(thread: int) -> None:
        for call in range(calls):
            sequence = opt.apply_gradients(grads(thread, call), global_step=step)
            with lock:
                order.append((sequence, thread, call))

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.setswitchinterval(previous)
    sequences = [s for s, _, _ in order]
    result = {k: v.clone() for k, v in variables.items()}
    for v in variables.values():
        v.zero_()
    serial = tfadam.AdamOptimizer(0.01)
    for _, thread, call in sorted(order):
        serial.apply_gradients(grads(thread, call))
    differing = sum(int((result[k] != variables[k]).sum()) for k in result)
    total = sum(v.numel() for v in variables.values())
    print(
        f"unlocked: {len(order)} calls from 8 threads; {len(order) - len(set(sequences))} "
        f"duplicate sequence numbers; global_step {int(step)}; {differing} of {total} "
        "variable elements differ from the serial replay in sequence order"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    # One intra-op thread by default: on a shared, loaded machine two threads
    # make the timings swing 10x (their barriers wait on busy cores).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"({args.threads} intra-op thread(s)), load average {os.getloadavg()[0]:.1f}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    scan_cost(args.quick)
    checkpoint_cost(args.quick)
    unlocked_race(args.quick)


if __name__ == "__main__":
    main()
