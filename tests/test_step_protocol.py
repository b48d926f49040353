"""tfadam.Adam.step keeps torch.optim's step protocol (see tfadam.hooks).

torch wraps an optimizer's step in ``profile_hook_step``; tfadam runs the same
protocol itself (hooks, ``_optimizer_step_code``, a profiler range while a
profiler records). Each test runs the same calls on ``torch.optim.Adam`` and
on ``tfadam.Adam`` and asks for the same observations.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import tfadam
from tfadam import compat


def optimizers() -> list[torch.optim.Optimizer]:
    out = []
    for make in (torch.optim.Adam, tfadam.Adam):
        w = torch.nn.Parameter(torch.ones(3))
        w.grad = torch.ones(3)
        out.append(make([w], lr=0.1))
    return out


def record(opt: torch.optim.Optimizer, log: list[Any]) -> None:
    def pre(o: Any, args: tuple, kwargs: dict) -> None:
        log.append(("pre", o is opt, len(args), args[0] is opt, sorted(kwargs)))

    def post(o: Any, args: tuple, kwargs: dict) -> None:
        log.append(("post", o is opt, len(args), sorted(kwargs)))

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)


def test_hooks_see_what_torchs_see() -> None:
    logs: list[list[Any]] = []
    for opt in optimizers():
        log: list[Any] = []
        record(opt, log)
        opt.step()
        opt.step(lambda: 1.0)
        logs.append(log)
    assert logs[0] == logs[1]
    assert logs[1][0] == ("pre", True, 1, True, [])


def test_global_hooks_run_in_torchs_order() -> None:
    logs: list[list[str]] = []
    for opt in optimizers():
        log: list[str] = []

        def note(word: str, log: list[str] = log) -> Any:
            return lambda *_: log.append(word)

        handles = [
            register_optimizer_step_pre_hook(note("gpre")),
            register_optimizer_step_post_hook(note("gpost")),
            opt.register_step_pre_hook(note("pre")),
            opt.register_step_post_hook(note("post")),
        ]
        try:
            opt.step()
        finally:
            for handle in handles:
                handle.remove()
        logs.append(log)
    assert logs[0] == logs[1] == ["gpre", "pre", "post", "gpost"]


def test_a_pre_hook_may_replace_the_closure() -> None:
    for opt in optimizers():
        opt.register_step_pre_hook(lambda o, args, kwargs: ((args[0], lambda: 42.0), kwargs))
        assert opt.step() == 42.0


def test_a_pre_hook_returning_nonsense_is_refused() -> None:
    for opt in optimizers():
        opt.register_step_pre_hook(lambda *_: "nonsense")
        with pytest.raises(RuntimeError, match="must return None or a tuple"):
            opt.step()


def test_the_profiler_sees_the_step() -> None:
    names = []
    for opt in optimizers():
        with torch.profiler.profile() as profile:
            opt.step()
        names.append({e.name for e in profile.events() if e.name.startswith("Optimizer.step#")})
    assert names == [{"Optimizer.step#Adam.step"}] * 2


def test_a_subclass_step_runs_the_hooks_once() -> None:
    class Clipped(tfadam.Adam):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            for group in self.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
            return super().step(closure)

    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 10.0)
    opt = Clipped([w], lr=0.1)
    log: list[Any] = []
    record(opt, log)
    opt.step()
    assert [entry[0] for entry in log] == ["pre", "post"]
    assert bool((w.detach() < 1.0).all())


def test_lr_scheduler_sees_the_step_called() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = tfadam.Adam([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns if the scheduler steps first
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.05


def test_optimizer_step_code_is_called_once_per_step() -> None:
    # torch's Python tracer (profile(with_stack=True)) looks at the optimizer there
    counts = []
    for opt in optimizers():
        calls: list[int] = []
        opt._optimizer_step_code = lambda calls=calls: calls.append(1)  # type: ignore[method-assign]
        opt.step()
        opt.step()
        counts.append(len(calls))
    assert counts == [2, 2]


def test_hooks_see_a_keyword_closure_as_torchs_do() -> None:
    # e.g. ZeroRedundancyOptimizer and Lightning call step(closure=...)
    logs: list[list[Any]] = []
    for opt in optimizers():
        log: list[Any] = []
        record(opt, log)
        opt.step(closure=lambda: 1.0)
        logs.append(log)
        # a pre-hook may swap the closure where the caller put it
        opt.register_step_pre_hook(
            lambda o, args, kwargs: (args, {**kwargs, "closure": lambda: 7.0})
        )
        assert opt.step(closure=lambda: 1.0) == 7.0
    assert logs[0] == logs[1]
    assert logs[1][0] == ("pre", True, 1, True, ["closure"])


@pytest.mark.skipif(
    not compat.PROFILER_OF_ALL_THREADS, reason="torch < 2.7 has no profiler of all threads"
)
def test_a_profiler_of_all_threads_sees_a_step_in_another_thread() -> None:
    from torch._C._profiler import _ExperimentalConfig

    names: list[set[str]] = []
    for opt in optimizers():
        config = _ExperimentalConfig(profile_all_threads=True)
        with torch.profiler.profile(experimental_config=config) as profile:
            worker = threading.Thread(target=opt.step)
            worker.start()
            worker.join()
        names.append({e.name for e in profile.events() if e.name.startswith("Optimizer.step#")})
    assert names == [{"Optimizer.step#Adam.step"}] * 2
