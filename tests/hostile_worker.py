"""Run checkpoints through the reader, each in a forked child with memory and time limits.

    python tests/hostile_worker.py [--mem-mib 512] [--time-s 10] NAME=PATH ...

The process imports torch and tfadam once, then forks one child per file:
the child limits its address space to what the imports took plus
``--mem-mib`` (``RLIMIT_AS``) and its CPU time to ``--time-s`` for the file
(``RLIMIT_CPU``: the work itself, whatever else loads the machine; a wall
clock of six times that catches what blocks), runs the three stages (read every tensor,
``python -m tfadam convert``, ``load_tf_checkpoint``) and reports each as one
JSON line on stdout::

    {"case": NAME, "stage": "read", "outcome": "error", "detail": "...",
     "seconds": 0.01, "cpu_s": 0.01, "peak_mib": 3.2}

outcome is "ok", "error" (a CheckpointError: the only acceptable failure),
"foreign" (any other exception, MemoryError included), "timeout" (the file
used more than ``--time-s`` of CPU, or six times that of wall clock) or "killed" (the child died). A
blow-up costs one child, never this process or the test runner above it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import select
import signal
import sys
import tempfile
import time

import torch

import tfadam
from tfadam.checkpoint import BundleReader, CheckpointError, cli_convert, load_tf_checkpoint


def _status(field: str) -> int:
    """A /proc/self/status value in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def stage_read(path: str) -> str:
    with BundleReader(path) as reader:
        reader.variable_to_shape_map()
        reader.variable_to_dtype_map()
        reader.object_graph  # noqa: B018 - parsed on first access
        for key in reader.keys():
            if reader.info(key).dtype == "string":
                reader.read_numpy(key)
            else:
                reader.read_torch(key)
    return "ok"


def stage_convert(path: str) -> str:
    out = os.path.join(tempfile.mkdtemp(prefix="hostile-out-"), "out.pt")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        listed = cli_convert([path, "--list"])
        code = cli_convert([path, out, "--no-progress"])
    if (listed, code) == (0, 0):
        return "ok"
    message = stderr.getvalue().strip().splitlines()
    if code not in (0, 1) or listed not in (0, 1) or not message[-1].startswith("error: "):
        raise AssertionError(f"convert exited {listed}/{code} with {message!r}")
    raise CheckpointError(message[-1][len("error: ") :])


def stage_load(path: str) -> str:
    var_map = {"w": torch.zeros(4)}
    budget = 1 << 24  # elements of model this harness allocates, at most
    try:
        with BundleReader(path) as reader:
            for key in reader.keys():
                info = reader.info(key)
                numel = 1
                for d in info.shape:
                    numel *= d
                if info.dtype == "float32" and numel <= budget:
                    try:
                        var_map[key] = torch.zeros(info.shape)
                    except RuntimeError:  # a shape torch cannot make: map no tensor to it
                        continue
                    budget -= numel
    except CheckpointError:
        pass  # load_tf_checkpoint must then say so too
    if len(var_map) > 1:
        del var_map["w"]
    params = [torch.nn.Parameter(t) for t in var_map.values()]
    var_map = dict(zip(var_map, params, strict=True))
    load_tf_checkpoint(path, tfadam.Adam(params), var_map)
    return "ok"


STAGES = {"read": stage_read, "convert": stage_convert, "load": stage_load}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(path: str, mem: int, time_s: float, out_fd: int) -> None:
    limit = _status("VmSize") + mem
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = int(_cpu() + time_s + 0.999)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak below is this file's alone
    base = _status("VmRSS")
    for name, stage in STAGES.items():
        start, start_cpu = time.perf_counter(), _cpu()
        try:
            outcome, detail = stage(path), ""
        except CheckpointError as err:
            outcome, detail = "error", str(err)
        except BaseException as err:  # noqa: BLE001 - reporting it is the point
            outcome, detail = "foreign", f"{type(err).__name__}: {err}"
        record = {
            "stage": name,
            "outcome": outcome,
            "detail": detail[:300],
            "seconds": round(time.perf_counter() - start, 4),
            "cpu_s": round(_cpu() - start_cpu, 4),
            "peak_mib": round((_status("VmHWM") - base) / (1 << 20), 1),
        }
        os.write(out_fd, (json.dumps(record) + "\n").encode())


def run_case(name: str, path: str, mem: int, time_s: float) -> list[dict]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        code = 0
        try:
            _child(path, mem, time_s, write_fd)
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    os.close(write_fd)
    deadline = time.perf_counter() + 6 * time_s
    start = time.perf_counter()
    buf = b""
    timed_out = False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            buf += chunk
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    records = [json.loads(line) for line in buf.decode().splitlines()]
    for r in records:
        r["case"] = name
    done = {r["stage"] for r in records}
    for stage in STAGES:
        if stage not in done:
            outcome = "timeout" if timed_out else "killed"
            detail = (
                f"after {time.perf_counter() - start:.1f} s" if timed_out else f"status {status}"
            )
            records.append({"case": name, "stage": stage, "outcome": outcome, "detail": detail})
            break
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mem-mib", type=int, default=512)
    p.add_argument("--time-s", type=float, default=10.0)
    p.add_argument("cases", nargs="+", help="NAME=PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # no thread pool to fork under, or to reserve memory
    for spec in args.cases:
        name, path = spec.split("=", 1)
        for record in run_case(name, path, args.mem_mib << 20, args.time_s):
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
