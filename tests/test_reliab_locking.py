"""``use_locking=True`` under contention equals a serial replay, bit for bit.

8 threads each issue 200 ``apply_gradients`` calls on shared variables (dense
and sparse gradients, a learning rate that reads ``global_step``, some calls
that raise). ``apply_gradients`` returns the sequence number it took under the
lock; replaying the successful calls serially in that order, on copies of the
initial variables with a fresh optimizer, must give the same bytes everywhere.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from reliab_support import differences, tf1_face_tensors

import tfadam
from tfadam import IndexedSlices

THREADS, CALLS = 8, 200


@pytest.fixture(autouse=True)
def one_intraop_thread() -> Iterator[None]:
    # Measured on the loaded 2-core CI machine: with torch's intra-op pool,
    # these small calls run 5-10x slower in the main thread (the serial replay).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def initial_variables() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "dense": torch.randn(64, 32, generator=gen),
        "bias": torch.randn(256, generator=gen, dtype=torch.float64),
        "table": torch.randn(100, 16, generator=gen),
    }


def gradients(thread: int, call: int) -> dict[str, object] | None:
    """The gradients of one call; None for a call made to fail (wrong shape)."""
    gen = torch.Generator().manual_seed(10_000 * thread + call)
    if call % 67 == 66:
        return None
    rows = torch.randint(0, 100, (12,), generator=gen)  # with repeats: summed as TF does
    return {
        "dense": torch.randn(64, 32, generator=gen),
        # Some calls skip a variable (gradient None): the accumulators still advance.
        "bias": None if call % 5 == 0 else torch.randn(256, generator=gen, dtype=torch.float64),
        "table": IndexedSlices(torch.randn(12, 16, generator=gen), rows, (100, 16)),
    }


def make_optimizer(step: torch.Tensor, use_locking: bool) -> tfadam.AdamOptimizer:
    # Evaluated under the lock, so each call sees the global_step of its turn.
    def learning_rate() -> float:
        return 0.01 / (1.0 + 0.01 * int(step))

    return tfadam.AdamOptimizer(learning_rate, use_locking=use_locking)


def apply(opt, variables, grads, step) -> int:
    if grads is None:
        bad = [(torch.ones(3), variables["dense"])]
        return opt.apply_gradients(bad, global_step=step)
    return opt.apply_gradients(
        [(grads[name], variables[name]) for name in variables], global_step=step
    )


@contextmanager
def frequent_thread_switches() -> Iterator[None]:
    # The interpreter switches threads every 5 ms by default; switching far more
    # often interleaves the Python parts of concurrent calls too.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def run_concurrently(opt, variables, step) -> tuple[list[tuple[int, int, int]], int]:
    """Every thread's calls; returns (sequence, thread, call) per success, and failures."""
    order: list[tuple[int, int, int]] = []
    failures = [0]
    start = threading.Barrier(THREADS)
    record = threading.Lock()
    errors: list[BaseException] = []

    def worker(thread: int) -> None:
        try:
            start.wait()
            for call in range(CALLS):
                grads = gradients(thread, call)
                try:
                    sequence = apply(opt, variables, grads, step)
                except ValueError:
                    assert grads is None
                    with record:
                        failures[0] += 1
                    continue
                with record:
                    order.append((sequence, thread, call))
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    with frequent_thread_switches():
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung: deadlock?"
    assert not errors, errors
    return sorted(order), failures[0]


def state_of(opt, variables, step) -> dict[str, object]:
    return tf1_face_tensors(opt, {**variables, "global_step": step})


def test_locked_concurrent_calls_equal_their_serial_replay():
    variables, step = initial_variables(), torch.tensor(0)
    opt = make_optimizer(step, use_locking=True)
    order, failures = run_concurrently(opt, variables, step)

    successes = THREADS * CALLS - failures
    assert failures == THREADS * (CALLS // 67)
    # Sequence numbers: each success took exactly one, failures took none.
    assert [sequence for sequence, _, _ in order] == list(range(successes))
    assert int(step) == successes
    # Contention really happened: the lock order interleaves the threads.
    switches = sum(a[1] != b[1] for a, b in zip(order, order[1:], strict=False))
    assert switches > THREADS

    replay_variables, replay_step = initial_variables(), torch.tensor(0)
    replay = make_optimizer(replay_step, use_locking=False)
    for _, thread, call in order:
        apply(replay, replay_variables, gradients(thread, call), replay_step)

    # Slots are listed in first-update order, which is the same in both runs.
    assert (
        differences(state_of(replay, replay_variables, replay_step), state_of(opt, variables, step))
        == []
    )


def test_replay_in_another_order_differs():
    """The comparison can fail: two calls swapped give other bits (the order matters)."""
    runs = []
    for swap in (False, True):
        variables, step = initial_variables(), torch.tensor(0)
        opt = make_optimizer(step, use_locking=False)
        calls = [(0, 1), (1, 1), (2, 1)]
        if swap:
            calls[0], calls[1] = calls[1], calls[0]
        for thread, call in calls:
            apply(opt, variables, gradients(thread, call), step)
        runs.append(state_of(opt, variables, step))
    assert "dense" in differences(*runs)


@pytest.mark.parametrize("use_locking", [True, False])
def test_sequence_numbers_count_successful_calls(use_locking):
    step = torch.tensor(0)
    opt = make_optimizer(step, use_locking)
    variables = initial_variables()
    assert apply(opt, variables, gradients(0, 0), step) == 0
    with pytest.raises(ValueError):
        apply(opt, variables, None, step)
    assert apply(opt, variables, gradients(0, 1), step) == 1
    w = torch.zeros(3, requires_grad=True)
    assert opt.minimize(lambda: (w * torch.arange(3.0)).sum(), var_list=[w]) == 2
