"""Run a function in several CPU processes (gloo) and compare tensors bit for bit.

The distributed tests spawn their ranks with :func:`spawn`; each rank writes
what it ends with to ``tmp/rank{r}.pt`` and the test process, which never
joins the process group, compares those tensors with a single-process
tfadam run.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2

# A rank that dies leaves the others waiting in a collective; they give up after
# this long instead of hanging the test run (mp.spawn ends them sooner anyway).
TIMEOUT = datetime.timedelta(seconds=60)


def _rank_main(
    rank: int, world_size: int, tmp: Path, worker: Callable[..., Any], args: tuple
) -> None:
    # Two ranks share two cores: more threads per rank only contend.
    torch.set_num_threads(1)
    store = dist.FileStore(str(tmp / "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        worker(rank, world_size, tmp, *args)
        # destroy_process_group while a peer still sends now and then aborts a
        # rank: leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_now()


def exit_now() -> None:
    """End a rank that has finished its work without the interpreter's shutdown.

    Gloo's worker threads free the last collectives' work objects a moment
    after those complete, and with them tensors that Python owned; when the
    interpreter is already shutting down, taking the GIL for that ends the
    thread and std::terminate aborts the process (SIGABRT, "terminate called
    without an active exception"; pytorch issue 190489). destroy_process_group
    does not wait for those threads. On this busy 2-core machine that aborted
    2 of about 90 two-process runs (core dump: ProcessGroupGloo::runLoop ->
    ~AsyncBarrierWork -> decref -> take_gil -> pthread_exit), so a rank that
    is done flushes its output and leaves with os._exit instead.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Callable[..., Any], tmp: Path, *args: Any, world_size: int = WORLD_SIZE) -> None:
    """Run ``worker(rank, world_size, tmp, *args)`` in ``world_size`` processes.

    ``worker`` must be importable (a module-level function). A rank's exception
    fails the call, with the rank's traceback.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world_size, tmp, worker, args), nprocs=world_size, join=True)


def save_rank(tmp: Path, rank: int, results: Mapping[str, Any]) -> None:
    """Write what one rank ends with, for :func:`load_ranks`."""
    torch.save(dict(results), tmp / f"rank{rank}.pt")


def load_ranks(tmp: Path, world_size: int = WORLD_SIZE) -> list[dict[str, Any]]:
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@contextmanager
def single_thread() -> Iterator[None]:
    """Compute references with one thread, as the ranks do, so reductions match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_INTEGER_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers, so that ``==`` tells +0 from -0 and NaN == NaN."""
    t = t.detach().contiguous()
    return t.view(_INTEGER_VIEW[t.dtype]) if t.dtype in _INTEGER_VIEW else t


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Fail unless ``actual`` and ``expected`` have the same shape, dtype and bits."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    differ = bits(actual) != bits(expected)
    if differ.any():
        count = int(differ.sum())
        first = tuple(int(i) for i in differ.nonzero()[0])
        raise AssertionError(
            f"{what}: {count} of {actual.numel()} elements differ; first at {first}: "
            f"{actual[first].item()!r} != {expected[first].item()!r}"
        )


def assert_same(actual: Any, expected: Any, what: str) -> None:
    """:func:`assert_bitwise_equal` through nested dicts, lists and sparse tensors."""
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{what}: {type(actual).__name__} is not a mapping"
        assert set(actual) == set(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{what}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{what}: {len(actual)} items != {len(expected)}"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{what}[{index}]")
    elif isinstance(expected, torch.Tensor) and expected.is_sparse:
        assert isinstance(actual, torch.Tensor) and actual.is_sparse, f"{what}: not sparse"
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        assert_bitwise_equal(actual._indices(), expected._indices(), f"{what} indices")
        assert_bitwise_equal(actual._values(), expected._values(), f"{what} values")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{what}: {type(actual).__name__} is no tensor"
        assert_bitwise_equal(actual, expected, what)
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def train_single_process(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    grads: list[dict[str, torch.Tensor]],
) -> None:
    """The reference run: ``optimizer`` steps ``model`` in this process with the recorded gradients."""
    for step in steps:
        for name, p in model.named_parameters():
            p.grad = grads[step][name].clone()
        optimizer.step()
