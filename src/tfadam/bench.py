"""``python -m tfadam bench``: tfadam against torch and TF1, interleaved, in one process.

Workloads, and the bars the report checks (:data:`BARS`; ratios within one run):

======  ================================================  ===========================
D1      dense fp32, 16 tensors x 1,000,000 elements        >= 1.0x torch fused,
                                                           >= 1.5x TF1, >= 0.8x the
                                                           memory-traffic floor
D2      dense fp32, 2,000 tensors x 4,096 elements         >= 2x torch fused, a step
        (many small params)                                <= 2x the floor's
D3      dense bf16, 16 tensors x 1,000,000 elements        >= 1.0x torch fused
S1      sparse, TF1 dense-equivalent: table 250,000 x 64   >= 5x TF1's sparse path; a
        fp32, 4,096 rows per step, with duplicates         step <= 1.25x tfadam's dense
                                                           step on the same table
S2      the same in lazy mode                              >= 2x torch.optim.SparseAdam
mem     transient memory of a step                         <= 5% of parameter bytes
cold    first step of a fresh process                      <= 5 s (empty kernel cache),
                                                           <= 1 s (warm)
======  ================================================  ===========================

Every contender of a workload steps in turn (A B C A B C ..., the starting
contender rotating each round) after a warm-up, and the median time of a
step is reported, with ratios taken within the run: absolute times on a
shared machine drift, ratios from one run do not (much). Contenders: tfadam
(``tfadam.Adam.step``), ``torch.optim.Adam`` fused / foreach / for-loop,
``torch.optim.SparseAdam`` (S2), and the memory-traffic floor
(:class:`tfadam.kernels.cpu.FloorKernel`: a fused loop with a dense step's
traffic, 4 reads and 3 writes per element, and trivial arithmetic), all in
this process; then, when TensorFlow is installed, TF1
(``tf.compat.v1.train.AdamOptimizer`` in eager mode on ``tf.Variable``,
dense and ``IndexedSlices``) interleaved with tfadam in a second process,
because TensorFlow's thread pool and torch's OpenMP threads starve each
other in one process (the report gives the numbers). For D2 tfadam also
alternates alone with torch fused, and with the floor: warm caches, where
per-tensor Python shows most; the D2 bars are checked there too.

Also measured, each in a fresh subprocess: the transient memory of a step
(peak RSS during the step minus RSS before it, with glibc's mmap threshold
pinned at one page (4 KiB) so that every large temporary is a fresh mapping
that shows in RSS; tracemalloc cannot see tensors), as a fraction of the
parameter bytes; and the cold start (the first ``step()`` of a fresh
process, with an empty and then a warm kernel cache).

A bar and its verdict:
    >>> from tfadam.bench import BAR
    >>> bar = BAR["D2: tfadam vs torch fused (speed-up)"]
    >>> bar.wanted, bar.holds(1.9), bar.holds(2.1)
    ('>= 2x', False, True)

A small smoke run (the real one takes ~10 minutes):
    >>> from tfadam import bench
    >>> bench.main(["--quick", "--workloads", "D1", "--repeats", "2", "--no-tf",
    ...             "--no-memory", "--no-cold", "--no-progress"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cli import ArgumentParser, nonnegative_int, output_file, positive_int

ELEMENTS_PER_ROW = 64


@dataclass(frozen=True)
class Workload:
    """One benchmark workload; ``scale`` shrinks it for ``--quick``."""

    name: str
    description: str
    kind: str  # "dense" or "sparse"
    count: int = 0  # dense: tensors
    size: int = 0  # dense: elements per tensor
    dtype: torch.dtype = torch.float32
    rows: int = 0  # sparse: table rows
    touched: int = 0  # sparse: indices per step (with duplicates)

    def scaled(self, factor: int) -> Workload:
        if factor == 1:
            return self
        if self.kind == "dense":
            count = max(1, self.count // factor) if self.count > 16 else self.count
            size = self.size if self.count > 16 else max(1, self.size // factor)
            return Workload(
                self.name, self.description + " (quick)", "dense", count, size, self.dtype
            )
        return Workload(
            self.name,
            self.description + " (quick)",
            "sparse",
            dtype=self.dtype,
            rows=self.rows // factor,
            touched=max(8, self.touched // factor),
        )

    @property
    def elements(self) -> int:
        if self.kind == "dense":
            return self.count * self.size
        return self.rows * ELEMENTS_PER_ROW


WORKLOADS = {
    "D1": Workload("D1", "dense fp32, 16 x 1,000,000", "dense", 16, 1_000_000),
    "D2": Workload("D2", "dense fp32, 2,000 x 4,096", "dense", 2000, 4096),
    "D3": Workload("D3", "dense bf16, 16 x 1,000,000", "dense", 16, 1_000_000, torch.bfloat16),
    "S1": Workload(
        "S1",
        "sparse dense-equivalent, 250,000 x 64 fp32, 4,096 rows/step",
        "sparse",
        rows=250_000,
        touched=4096,
    ),
    "S2": Workload(
        "S2",
        "sparse lazy, 250,000 x 64 fp32, 4,096 rows/step",
        "sparse",
        rows=250_000,
        touched=4096,
    ),
}


@dataclass
class Contender:
    """Something that steps: ``prepare`` (untimed) then ``step`` (timed)."""

    name: str
    step: Callable[[], Any]
    prepare: Callable[[], Any] | None = None
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


# --------------------------------------------------------------------------- #
# Building contenders                                                          #
# --------------------------------------------------------------------------- #


def _dense_tensors(w: Workload, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(w.size, generator=generator).to(w.dtype) for _ in range(w.count)]
    grads = [torch.randn(w.size, generator=generator).to(w.dtype) for _ in range(w.count)]
    return params, grads


def _torch_params(w: Workload, seed: int) -> list[torch.nn.Parameter]:
    params, grads = _dense_tensors(w, seed)
    out = []
    for p, g in zip(params, grads, strict=True):
        parameter = torch.nn.Parameter(p)
        parameter.grad = g
        out.append(parameter)
    return out


def _tfadam_dense(w: Workload, seed: int) -> Contender:
    import tfadam

    opt = tfadam.Adam(_torch_params(w, seed), lr=1e-3)
    return Contender("tfadam", opt.step)


def _torch_dense(w: Workload, seed: int, flavour: str) -> Contender:
    options = {
        "fused": dict(fused=True),
        "foreach": dict(foreach=True),
        "for-loop": dict(foreach=False),
    }[flavour]
    opt = torch.optim.Adam(_torch_params(w, seed), lr=1e-3, **options)  # type: ignore[arg-type]
    return Contender(f"torch {flavour}", opt.step)


def _floor(w: Workload, seed: int) -> Contender:
    from .kernels import cpu

    params, grads = _dense_tensors(w, seed)
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    if w.dtype in (torch.float16, torch.bfloat16):  # the floor moves bytes; 16-bit ints
        params, grads, ms, vs = (
            [t.view(torch.int16) for t in ts] for ts in (params, grads, ms, vs)
        )
    return Contender("floor (traffic)", cpu.FloorKernel(params, grads, ms, vs))


def _tf_dense(w: Workload, seed: int, tf: Any) -> Contender:
    params, grads = _dense_tensors(w, seed)
    dtype = tf.bfloat16 if w.dtype == torch.bfloat16 else tf.float32
    variables = [tf.Variable(tf.cast(p.float().numpy(), dtype)) for p in params]
    tf_grads = [tf.cast(g.float().numpy(), dtype) for g in grads]
    opt = tf.compat.v1.train.AdamOptimizer(learning_rate=1e-3)
    pairs = list(zip(tf_grads, variables, strict=True))
    return Contender("TF1 AdamOptimizer", lambda: opt.apply_gradients(pairs))


def _index_sets(w: Workload, seed: int, sets: int = 16) -> list[torch.Tensor]:
    """Row indices per step: 7/8 drawn at random, 1/8 repeats of those, shuffled."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sets):
        fresh = torch.randint(0, w.rows, (w.touched - w.touched // 8,), generator=generator)
        repeats = fresh[torch.randint(0, fresh.numel(), (w.touched // 8,), generator=generator)]
        rows = torch.cat([fresh, repeats])
        out.append(rows[torch.randperm(rows.numel(), generator=generator)])
    return out


def _sparse_contenders(w: Workload, seed: int, tf: Any | None) -> list[Contender]:
    import tfadam

    generator = torch.Generator().manual_seed(seed)
    shape = (w.rows, ELEMENTS_PER_ROW)
    index_sets = _index_sets(w, seed)
    values = [torch.randn(w.touched, ELEMENTS_PER_ROW, generator=generator) for _ in index_sets]
    dense_grad = torch.randn(shape, generator=generator)
    cycle = {"n": 0}

    def table() -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(shape, generator=generator))

    def next_coo(p: torch.Tensor) -> Callable[[], None]:
        def prepare() -> None:
            k = cycle["n"] = (cycle["n"] + 1) % len(index_sets)
            p.grad = torch.sparse_coo_tensor(index_sets[k][None], values[k], shape)

        return prepare

    contenders = []
    for mode, name in (("dense", "tfadam S1 (dense-equivalent)"), ("lazy", "tfadam S2 (lazy)")):
        p = table()
        opt = tfadam.Adam([p], lr=1e-3, sparse=mode)  # type: ignore[arg-type]
        contenders.append(Contender(name, opt.step, next_coo(p)))
    p = table()
    p.grad = dense_grad
    contenders.append(Contender("tfadam dense step, same table", tfadam.Adam([p], lr=1e-3).step))
    p = table()
    p.grad = dense_grad
    fused = torch.optim.Adam([p], lr=1e-3, fused=True)
    contenders.append(Contender("torch fused dense step, same table", fused.step))
    p = table()
    sparse_adam = torch.optim.SparseAdam([p], lr=1e-3)
    contenders.append(Contender("torch SparseAdam (lazy)", sparse_adam.step, next_coo(p)))
    if tf is not None:
        variable = tf.Variable(torch.randn(shape, generator=generator).numpy())
        opt_sparse = tf.compat.v1.train.AdamOptimizer(learning_rate=1e-3)
        slices = [
            tf.IndexedSlices(tf.constant(v.numpy()), tf.constant(i.numpy()), tf.constant(shape))
            for i, v in zip(index_sets, values, strict=True)
        ]
        state = {"n": 0, "grad": slices[0]}

        def tf_prepare() -> None:
            state["n"] = (state["n"] + 1) % len(slices)
            state["grad"] = slices[state["n"]]

        contenders.append(
            Contender(
                "TF1 AdamOptimizer sparse (IndexedSlices)",
                lambda: opt_sparse.apply_gradients([(state["grad"], variable)]),
                tf_prepare,
            )
        )
        dense_variable = tf.Variable(torch.randn(shape, generator=generator).numpy())
        tf_dense_grad = tf.constant(dense_grad.numpy())
        opt_dense = tf.compat.v1.train.AdamOptimizer(learning_rate=1e-3)
        contenders.append(
            Contender(
                "TF1 AdamOptimizer dense, same table",
                lambda: opt_dense.apply_gradients([(tf_dense_grad, dense_variable)]),
            )
        )
    return contenders


def build_contenders(w: Workload, tf: Any | None, for_loop: bool) -> list[Contender]:
    """All contenders of a workload, each on its own copy of the same data.

    With ``tf`` (the TF phase): tfadam and the TF1 contenders only.
    """
    if w.kind == "sparse":
        contenders = _sparse_contenders(w, 0, tf)
        if tf is not None:
            contenders = [c for c in contenders if c.name.startswith(("tfadam S", "TF1"))]
        return contenders
    if tf is not None:
        return [_tfadam_dense(w, 0), _tf_dense(w, 0, tf)]
    from .kernels import cpu

    contenders = [
        _tfadam_dense(w, 0),
        _torch_dense(w, 0, "fused"),
        _torch_dense(w, 0, "foreach"),
    ]
    if cpu.available():  # the floor is a C loop too
        contenders.append(_floor(w, 0))
    if for_loop:
        contenders.append(_torch_dense(w, 0, "for-loop"))
    return contenders


# --------------------------------------------------------------------------- #
# Running                                                                      #
# --------------------------------------------------------------------------- #


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        self._done = 0
        self._total = total
        self._enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self, label: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(label, refresh=False)
            self._bar.update()
        elif self._enabled and (self._done % 25 == 0 or self._done == self._total):
            print(f"  {self._done}/{self._total} steps ({label})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_interleaved(
    contenders: Sequence[Contender], repeats: int, warmup: int, progress: _Progress, label: str
) -> None:
    """Warm up every contender, then time ``repeats`` rounds, rotating the order."""
    for c in contenders:
        for _ in range(warmup):
            if c.prepare:
                c.prepare()
            c.step()
            progress.update(f"{label} warm-up")
    for r in range(repeats):
        order = list(contenders[r % len(contenders) :]) + list(contenders[: r % len(contenders)])
        for c in order:
            if c.prepare:
                c.prepare()
            start = time.perf_counter()
            c.step()
            c.times.append(time.perf_counter() - start)
            progress.update(label)


# Where per-tensor Python shows most, the rotation through five contenders
# leaves tfadam's small tensors cold in cache; two contenders alternating alone
# keep them warm. The D2 bars must hold in both (issue #15): the pairs have
# bars of their own.
PAIRED = {"D2": ("torch fused", "floor")}


def run_alone(
    w: Workload, repeats: int, warmup: int, progress: _Progress
) -> list[tuple[Contender, Contender]]:
    """tfadam and each of ``PAIRED[w.name]`` alternating alone; their times only."""
    from .kernels import cpu

    out = []
    for other in PAIRED[w.name]:
        if other == "floor" and not cpu.available():
            continue
        pair = [
            _tfadam_dense(w, 0),
            _floor(w, 0) if other == "floor" else _torch_dense(w, 0, other.split()[-1]),
        ]
        run_interleaved(pair, repeats, warmup, progress, f"{w.name}, tfadam and {other} alone")
        mine, theirs = pair  # keep the times, free the tensors
        out.append(
            (
                Contender(mine.name, lambda: None, times=mine.times),
                Contender(theirs.name, lambda: None, times=theirs.times),
            )
        )
    return out


# --------------------------------------------------------------------------- #
# The TF phase: TF1 against tfadam, in a process of its own                    #
# --------------------------------------------------------------------------- #

TF_PROCESS = ", TF process"
_TF_VERSION = [""]  # filled in by the TF phase, for the report


def _tf_phase(names: list[str], scale: int, repeats: int, warmup: int) -> int:
    """(Child process) TF1 and tfadam interleaved; prints their times as JSON."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    results: dict[str, dict[str, list[float]]] = {}
    plan = []
    for n in [n for n in names if WORKLOADS[n].kind == "dense"]:
        plan.append((n, build_contenders(WORKLOADS[n].scaled(scale), tf, for_loop=False)))
    if any(WORKLOADS[n].kind == "sparse" for n in names):
        plan.append(("S", build_contenders(WORKLOADS["S1"].scaled(scale), tf, for_loop=False)))
    progress = _Progress(sum(len(cs) * (repeats + warmup) for _, cs in plan), True)
    try:
        for key, contenders in plan:
            run_interleaved(contenders, repeats, warmup, progress, f"{key} (TF process)")
            results[key] = {c.name: c.times for c in contenders}
    finally:
        progress.close()
    print(json.dumps({"tensorflow": tf.__version__, "results": results}))
    return 0


def _run_tf_phase(
    names: list[str], args: argparse.Namespace, progress: bool
) -> dict[str, list[Contender]]:
    command = [
        sys.executable,
        "-m",
        "tfadam.bench",
        "--_tf-phase",
        "--workloads",
        ",".join(names),
        "--warmup",
        str(args.warmup),
    ]
    if args.repeats is not None:
        command += ["--repeats", str(args.repeats)]
    if args.quick:
        command.append("--quick")
    # Passive OpenMP waiting: torch's threads must not spin against TF's pool.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=None if progress else subprocess.DEVNULL,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        print("the TF phase failed; no TF1 numbers", file=sys.stderr)
        return {}
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    _TF_VERSION[0] = payload["tensorflow"]
    out: dict[str, list[Contender]] = {}
    for key, contenders in payload["results"].items():
        out[key] = []
        for name, times in contenders.items():
            label = name + TF_PROCESS if name.startswith("tfadam") else name
            out[key].append(Contender(label, lambda: None, times=times))
    return out


# --------------------------------------------------------------------------- #
# Memory and cold start: fresh subprocesses                                    #
# --------------------------------------------------------------------------- #

_MEMORY_ENV = {
    # Every allocation of a page or more gets its own mapping, given back on
    # free: a temporary shows in RSS while it lives (glibc would otherwise
    # raise this threshold after the first free and recycle heap memory).
    "MALLOC_MMAP_THRESHOLD_": "4096",
    "MALLOC_TRIM_THRESHOLD_": "0",
}


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _measure_memory_here(workload: str, contender: str, scale: int) -> dict[str, float]:
    """In this (fresh) process: peak extra RSS during one step, over 3 steps."""
    w = WORKLOADS[workload].scaled(scale)
    found = [c for c in build_contenders(w, None, for_loop=False) if c.name == contender]
    if not found:
        raise SystemExit(f"no contender {contender!r} in {workload}")
    c = found[0]
    for _ in range(2):
        if c.prepare:
            c.prepare()
        c.step()
    peak = 0
    for _ in range(3):
        if c.prepare:
            c.prepare()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak (VmHWM) to the current RSS
        before = _rss_kib("VmRSS")
        c.step()
        peak = max(peak, _rss_kib("VmHWM") - before)
    param_bytes = w.elements * torch.empty((), dtype=w.dtype).element_size()
    return {"extra_bytes": peak * 1024.0, "param_bytes": float(param_bytes)}


def measure_memory(workload: str, contender: str, scale: int) -> dict[str, float] | None:
    command = [sys.executable, "-m", "tfadam.bench", "--_memory", workload, contender, str(scale)]
    env = dict(os.environ, **_MEMORY_ENV)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        print(f"memory measurement failed: {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


_COLD_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import torch
import tfadam
imported = time.perf_counter() - start
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn({size})) for _ in range({count})]
for p in params:
    p.grad = torch.randn_like(p)
opt = {optimizer}
start = time.perf_counter()
opt.step()
first = time.perf_counter() - start
start = time.perf_counter()
opt.step()
second = time.perf_counter() - start
print(json.dumps(dict(imported=imported, first=first, second=second)))
"""


def measure_cold_start(scale: int) -> dict[str, dict[str, float]]:
    """First step of a fresh process: tfadam with an empty then warm cache, torch fused."""
    w = WORKLOADS["D1"].scaled(scale)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TFADAM_CACHE_DIR=cache)
        env.pop("TFADAM_KERNELS", None)
        runs = [
            ("tfadam, empty cache", "tfadam.Adam(params, lr=1e-3)"),
            ("tfadam, warm cache", "tfadam.Adam(params, lr=1e-3)"),
            ("torch fused", "torch.optim.Adam(params, lr=1e-3, fused=True)"),
        ]
        for label, optimizer in runs:
            script = _COLD_SCRIPT.format(size=w.size, count=w.count, optimizer=optimizer)
            done = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
            )
            if done.returncode != 0:
                print(f"cold start ({label}) failed: {done.stderr[-2000:]}", file=sys.stderr)
                continue
            results[label] = json.loads(done.stdout.strip().splitlines()[-1])
            # The empty-cache run started the address reader's build, which
            # outlives it (kernels/addresses.py): a warm cache is one it finished.
            deadline = time.monotonic() + 120
            while list(Path(cache).glob("*.building")) and time.monotonic() < deadline:
                time.sleep(0.2)
    return results


# --------------------------------------------------------------------------- #
# Reporting                                                                    #
# --------------------------------------------------------------------------- #


def _tensorflow_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    tf_version = ""
    if "tensorflow" in sys.modules:
        tf_version = f", tensorflow {sys.modules['tensorflow'].__version__}"
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads){tf_version}, Python {platform.python_version()}, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='minutes')}"
    )


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}x"


def _by_name(contenders: Iterable[Contender], prefix: str) -> Contender | None:
    for c in contenders:
        if c.name.startswith(prefix):
            return c
    return None


@dataclass(frozen=True)
class Bar:
    """One bar of the project's performance spec: ``measured <op> limit``.

    ``speed-up`` bars are "tfadam is this many times faster" (the other's
    median time over tfadam's); ``time ratio`` bars are tfadam's time over
    the other's, ``%`` and ``s`` bars plain amounts.
    """

    workload: str  # the spec's id: D1 .. S2, mem, cold
    name: str
    op: str  # ">=" or "<="
    limit: float
    unit: str  # "x", "%" or "s"

    @property
    def wanted(self) -> str:
        unit = {"x": "x", "%": "% of parameter bytes", "s": " s"}[self.unit]
        return f"{self.op} {self.limit:g}{unit}"

    def holds(self, measured: float) -> bool:
        return measured >= self.limit if self.op == ">=" else measured <= self.limit

    def format(self, measured: float) -> str:
        if self.unit == "x":
            return _fmt_ratio(measured)
        return f"{measured:.2f}%" if self.unit == "%" else f"{measured:.2f} s"


# The bars, as the performance spec states them (CPU, ratios within one run).
BARS = (
    Bar("D1", "D1: tfadam vs torch fused (speed-up)", ">=", 1.0, "x"),
    Bar("D1", "D1: tfadam vs TF1 (speed-up)", ">=", 1.5, "x"),
    Bar("D1", "D1: tfadam vs the memory-traffic floor (speed-up)", ">=", 0.8, "x"),
    Bar("D2", "D2: tfadam vs torch fused (speed-up)", ">=", 2.0, "x"),
    Bar("D2", "D2: tfadam step / memory-traffic floor step (time)", "<=", 2.0, "x"),
    Bar("D2", "D2 alone: tfadam vs torch fused, the two alternating (speed-up)", ">=", 2.0, "x"),
    Bar("D2", "D2 alone: tfadam step / floor step, the two alternating (time)", "<=", 2.0, "x"),
    Bar("D3", "D3: tfadam vs torch fused, bf16 (speed-up)", ">=", 1.0, "x"),
    Bar("S1", "S1: tfadam vs TF1's sparse path (speed-up)", ">=", 5.0, "x"),
    Bar("S1", "S1: tfadam S1 step / tfadam D1-sized dense step (time)", "<=", 1.25, "x"),
    Bar("S2", "S2: tfadam lazy vs torch.optim.SparseAdam (speed-up)", ">=", 2.0, "x"),
    Bar("mem", "transient memory of a step, worst tfadam workload", "<=", 5.0, "%"),
    Bar("cold", "cold start: first step, empty kernel cache", "<=", 5.0, "s"),
    Bar("cold", "cold start: first step, warm kernel cache", "<=", 1.0, "s"),
)
BAR = {bar.name: bar for bar in BARS}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    measured: dict[str, float | str] = field(default_factory=dict)  # bar name -> value or why not

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def measure(self, name: str, value: float | str) -> None:
        """Record a bar's measurement (a number), or why there is none (a string)."""
        if name not in BAR:
            raise KeyError(f"no bar {name!r} in BARS")
        self.measured[name] = value

    def bar_rows(self) -> list[tuple[str, str, str, bool | None]]:
        """(bar, wanted, measured, holds) for every bar that was measured or tried, in
        the spec's order; ``holds`` is None where it could not be measured."""
        rows = []
        for bar in BARS:
            if bar.name not in self.measured:
                continue
            value = self.measured[bar.name]
            if isinstance(value, str):
                rows.append((bar.name, bar.wanted, value, None))
            else:
                rows.append((bar.name, bar.wanted, bar.format(value), bar.holds(value)))
        return rows


def _speed_up(other: Contender | None, tfadam: Contender | None) -> float | str:
    if other is None or tfadam is None:
        return "not run"
    return other.median / tfadam.median


def report_dense(
    report: Report, w: Workload, contenders: list[Contender], extra: list[Contender]
) -> None:
    tfadam = _by_name(contenders, "tfadam")
    assert tfadam is not None
    report.add(f"### {w.name}: {w.description}")
    report.add("")
    report.add("| contender | median ms/step | G elements/s | tfadam speed-up vs it |")
    report.add("|---|---:|---:|---:|")
    tfadam_tf = _by_name(extra, "tfadam")
    for c in [*contenders, *extra]:
        mine = tfadam_tf if (c in extra and tfadam_tf is not None) else tfadam
        report.add(
            f"| {c.name} | {c.median * 1e3:.2f} | {w.elements / c.median / 1e9:.2f} | "
            f"{_fmt_ratio(c.median / mine.median)} |"
        )
    report.add("")
    fused = _by_name(contenders, "torch fused")
    floor = _by_name(contenders, "floor")
    no_floor = "no floor (it needs the C kernels)"
    if w.name == "D1":
        report.measure("D1: tfadam vs torch fused (speed-up)", _speed_up(fused, tfadam))
        tf1 = _by_name(extra, "TF1")
        report.measure(
            "D1: tfadam vs TF1 (speed-up)",
            _speed_up(tf1, tfadam_tf) if tf1 and tfadam_tf else "TF not run",
        )
        report.measure(
            "D1: tfadam vs the memory-traffic floor (speed-up)",
            _speed_up(floor, tfadam) if floor else no_floor,
        )
    elif w.name == "D2":
        report.measure("D2: tfadam vs torch fused (speed-up)", _speed_up(fused, tfadam))
        report.measure(
            "D2: tfadam step / memory-traffic floor step (time)",
            tfadam.median / floor.median if floor else no_floor,
        )
    elif w.name == "D3":
        report.measure("D3: tfadam vs torch fused, bf16 (speed-up)", _speed_up(fused, tfadam))


def report_alone(report: Report, w: Workload, pairs: list[tuple[Contender, Contender]]) -> None:
    report.add(f"{w.name}, tfadam and one other contender alternating alone (warm caches):")
    report.add("")
    report.add("| pair | tfadam ms/step | other ms/step | tfadam speed-up vs it |")
    report.add("|---|---:|---:|---:|")
    for tfadam, other in pairs:
        report.add(
            f"| tfadam, {other.name} | {tfadam.median * 1e3:.2f} | {other.median * 1e3:.2f} | "
            f"{_fmt_ratio(other.median / tfadam.median)} |"
        )
        if w.name == "D2" and other.name == "torch fused":
            report.measure(
                "D2 alone: tfadam vs torch fused, the two alternating (speed-up)",
                other.median / tfadam.median,
            )
        if w.name == "D2" and other.name.startswith("floor"):
            report.measure(
                "D2 alone: tfadam step / floor step, the two alternating (time)",
                tfadam.median / other.median,
            )
    report.add("")


def report_sparse(
    report: Report,
    w: Workload,
    contenders: list[Contender],
    names: set[str],
    extra: list[Contender],
) -> None:
    s1 = _by_name(contenders, "tfadam S1")
    s2 = _by_name(contenders, "tfadam S2")
    dense = _by_name(contenders, "tfadam dense")
    sparse_adam = _by_name(contenders, "torch SparseAdam")
    s1_tf = _by_name(extra, "tfadam S1")
    s2_tf = _by_name(extra, "tfadam S2")
    tf_sparse = _by_name(extra, "TF1 AdamOptimizer sparse")
    assert s1 and s2 and dense
    report.add(
        f"### S1 / S2: table {w.rows:,} x {ELEMENTS_PER_ROW} fp32, "
        f"{w.touched:,} rows per step (1/8 of them repeats)"
    )
    report.add("")
    report.add("| contender | median ms/step | vs tfadam S1 | vs tfadam S2 |")
    report.add("|---|---:|---:|---:|")
    for c in [*contenders, *extra]:
        one, two = (s1_tf, s2_tf) if (c in extra and s1_tf and s2_tf) else (s1, s2)
        report.add(
            f"| {c.name} | {c.median * 1e3:.3f} | {_fmt_ratio(c.median / one.median)} | "
            f"{_fmt_ratio(c.median / two.median)} |"
        )
    report.add("")
    if "S1" in names:
        report.measure(
            "S1: tfadam vs TF1's sparse path (speed-up)",
            _speed_up(tf_sparse, s1_tf) if tf_sparse and s1_tf else "TF not run",
        )
        report.measure(
            "S1: tfadam S1 step / tfadam D1-sized dense step (time)", s1.median / dense.median
        )
    if "S2" in names:
        report.measure(
            "S2: tfadam lazy vs torch.optim.SparseAdam (speed-up)", _speed_up(sparse_adam, s2)
        )


def workload_list(text: str) -> list[str]:
    """``--workloads``: a comma-separated subset of the workloads, each named once."""
    names = [n.strip().upper() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"names no workload; choose from {','.join(WORKLOADS)}")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {','.join(unknown)}; choose from {','.join(WORKLOADS)}"
        )
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked whole before any work starts (exit status 2 if bad)."""
    parser = ArgumentParser(
        prog="python -m tfadam bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workloads",
        type=workload_list,
        default=list(WORKLOADS),
        help="comma-separated subset of D1,D2,D3,S1,S2 (default: all)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, help="timed rounds, >= 1 (default 30)"
    )
    parser.add_argument(
        "--warmup", type=nonnegative_int, default=3, help="untimed steps per contender (>= 0)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="10x smaller workloads, 5 rounds: a smoke run, not a measurement",
    )
    parser.add_argument(
        "--markdown", metavar="PATH", type=output_file, help="also write the report there"
    )
    parser.add_argument("--no-tf", action="store_true", help="skip TensorFlow even if installed")
    parser.add_argument("--no-for-loop", action="store_true", help="skip torch's for-loop Adam")
    parser.add_argument("--no-memory", action="store_true", help="skip transient memory")
    parser.add_argument("--no-cold", action="store_true", help="skip cold-start timing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # The subprocesses the bench starts itself:
    parser.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_tf-phase", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print (and optionally write as Markdown) the results.

    Returns 0; a bad command line exits with status 2 before anything runs.
    Bars that fail are reported, not raised.
    """
    args = parse_args(argv)
    if args._memory:
        workload, contender, scale = args._memory
        print(json.dumps(_measure_memory_here(workload, contender, int(scale))))
        return 0

    names = args.workloads
    scale = 10 if args.quick else 1
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 30)
    from .kernels import addresses, native

    native.library()  # compile (or load) before anything is timed
    if args._tf_phase:
        return _tf_phase(names, scale, repeats, args.warmup)

    want_tf = not args.no_tf and _tensorflow_installed()
    command = "python -m tfadam bench " + " ".join(argv if argv is not None else sys.argv[1:])
    report = Report()
    report.add(f"Machine: {machine_line()}")
    report.add(f"Command: `{command.strip()}`")
    lib = native.library()
    threads = "on torch's OpenMP threads" if lib and lib.tfadam_threading() else "own thread pool"
    report.add(
        f"C kernels: {f'loaded, {threads}' if lib else native.unavailable_reason()}; "
        f"TF1 contenders: {'yes, in their own process (see below)' if want_tf else 'no'}"
    )
    # A reused plan reads every tensor's address each step: in C++ once it is
    # built (the first time, in the background); the bench times that steady state.
    addresses.reader(wait=True)
    report.add(f"Tensor addresses read by: {addresses.status()}")
    load_before = os.getloadavg()

    plan: list[tuple[Workload, list[Contender]]] = []
    for n in [n for n in names if WORKLOADS[n].kind == "dense"]:
        w = WORKLOADS[n].scaled(scale)
        plan.append((w, build_contenders(w, None, for_loop=not args.no_for_loop)))
    sparse_names = {n for n in names if WORKLOADS[n].kind == "sparse"}
    if sparse_names:
        w = WORKLOADS["S1"].scaled(scale)
        plan.append((w, build_contenders(w, None, for_loop=False)))
    pairs = [w for w, _ in plan if w.name in PAIRED]
    total = sum(len(cs) * (repeats + args.warmup) for _, cs in plan)
    total += sum(2 * len(PAIRED[w.name]) * (repeats + args.warmup) for w in pairs)
    progress = _Progress(total, not args.no_progress)
    alone: dict[str, list[tuple[Contender, Contender]]] = {}
    try:
        for w, contenders in plan:
            label = "S1/S2" if w.kind == "sparse" else w.name
            run_interleaved(contenders, repeats, args.warmup, progress, label)
        for w in pairs:
            alone[w.name] = run_alone(w, repeats, args.warmup, progress)
    finally:
        progress.close()
    tf_results: dict[str, list[Contender]] = {}
    if want_tf:
        tf_results = _run_tf_phase(names, args, progress=not args.no_progress)
    load_after = os.getloadavg()
    report.add(
        f"Load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"{repeats} timed rounds, {args.warmup} warm-up steps per contender"
    )
    if _TF_VERSION[0]:
        report.lines[0] += f"; tensorflow {_TF_VERSION[0]} (TF process)"
    if want_tf:
        report.add(
            "TF1 runs in a second process, interleaved with tfadam there (`tfadam, TF process` "
            "rows), and the TF ratios come from that process. In one process TensorFlow's "
            "thread pool and torch's OpenMP threads starve each other: measured here, torch "
            "fused on 200 x 4,096 params went from 7 ms to 1,560 ms per step; "
            "OMP_WAIT_POLICY=PASSIVE cures that but makes torch pay a thread wake-up per "
            "tensor (D2: 129 ms instead of ~20 ms)."
        )
    report.add("")
    for w, contenders in plan:
        key = "S" if w.kind == "sparse" else w.name
        extra = tf_results.get(key, [])
        if w.kind == "dense":
            report_dense(report, w, contenders, extra)
            if w.name in alone:
                report_alone(report, w, alone[w.name])
        else:
            report_sparse(report, w, contenders, sparse_names, extra)

    if not args.no_memory:
        report.add("### Transient memory of one step (peak RSS during the step - RSS before)")
        report.add("")
        report.add("| workload | contender | peak extra | of parameter bytes |")
        report.add("|---|---|---:|---:|")
        worst: float | None = None
        for n in names:
            w = WORKLOADS[n]
            contender = {"S1": "tfadam S1 (dense-equivalent)", "S2": "tfadam S2 (lazy)"}.get(
                n, "tfadam"
            )
            # torch foreach allocates temporaries: a control that the method sees them
            others = [] if w.kind == "sparse" else ["torch fused", "torch foreach"]
            for name in [contender, *others]:
                m = measure_memory(n, name, scale)
                if m is None:
                    continue
                fraction = m["extra_bytes"] / m["param_bytes"]
                if name.startswith("tfadam"):
                    worst = fraction if worst is None else max(worst, fraction)
                report.add(
                    f"| {n} | {name} | {m['extra_bytes'] / 2**20:.2f} MiB | {fraction * 100:.2f}% |"
                )
        report.add("")
        report.measure(
            "transient memory of a step, worst tfadam workload",
            "measurement failed" if worst is None else worst * 100,
        )

    if not args.no_cold:
        cold = measure_cold_start(scale)
        report.add("### Cold start: first step() of a fresh process (D1-sized model)")
        report.add("")
        report.add("| run | import torch+tfadam s | first step s | second step s |")
        report.add("|---|---:|---:|---:|")
        for label, r in cold.items():
            report.add(f"| {label} | {r['imported']:.2f} | {r['first']:.3f} | {r['second']:.3f} |")
        report.add("")
        for label in ("empty", "warm"):
            run = cold.get(f"tfadam, {label} cache")
            report.measure(
                f"cold start: first step, {label} kernel cache",
                "measurement failed" if run is None else run["first"],
            )

    report.add("### Bars")
    report.add("")
    report.add("| bar | wanted | measured | holds |")
    report.add("|---|---|---:|---|")
    for name, wanted, measured, ok in report.bar_rows():
        verdict = "n/a" if ok is None else ("yes" if ok else "**NO**")
        report.add(f"| {name} | {wanted} | {measured} | {verdict} |")
    text = "\n".join(report.lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
