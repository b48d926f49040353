"""TensorFlow and triton in one process: tfadam is never the import that crashes.

TensorFlow >= 2.20 loads its LLVM globally and a triton (>= 3.7) loaded after
it segfaults the process (see :mod:`tfadam.import_order`). Each import order
runs in a fresh interpreter, as a user's script would; a crash is a non-zero
exit (-11 for SIGSEGV). The crash needs triton, which only CUDA builds of
torch bring: where it is not installed the orders are skipped (they would
prove nothing).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton_release() -> tuple[int, int]:
    from importlib import metadata

    major, minor = metadata.version("triton").split(".")[:2]
    return int(major), int(minor)


# The crash (and so tfadam's warning) needs triton >= 3.7 with TF >= 2.20
# (requirements-dev pins TF 2.21): torch 2.6 brings triton 3.2, which binds
# to no LLVM of TF's, so there no warning is due.
CRASHES = HAS_TRITON and _triton_release() >= (3, 7)
needs_triton = pytest.mark.skipif(
    not HAS_TRITON,
    reason="triton is not installed in this environment (CPU builds of torch have none); "
    "the crash these orders avoid needs it",
)

# (name, script, what stderr must contain): each script ends by printing "done".
ORDERS = [
    (
        "tfadam, then tensorflow, then torch's compiler and an optimizer",
        """
        import sys, tfadam
        assert "torch._dynamo" not in sys.modules
        import tensorflow as tf, torch
        import torch._dynamo  # what torch.compile and torch.optim's constructors import
        w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.ones(3)
        opt = tfadam.Adam([w], lr=0.1); opt.step()
        assert (w - 0.9).abs().max() < 1e-6, w
        float(tf.reduce_sum(tf.constant([1.0, 2.0])))
        """,
        "",
    ),
    (
        "tfadam, then tensorflow, then torch.compile of a step",
        """
        import tfadam, tensorflow, torch
        w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.ones(3)
        opt = tfadam.Adam([w], lr=0.1)
        step = torch.compile(lambda x: (opt.step(), x * 2)[1], backend="aot_eager")
        step(torch.ones(2))
        assert (w - 0.9).abs().max() < 1e-6, w
        """,
        "",
    ),
    (
        "tensorflow, then tfadam: the import survives, triton untouched, a warning",
        """
        import sys, tensorflow, tfadam
        assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules
        """,
        "tensorflow was imported before triton" if CRASHES else "",
    ),
    (
        "tensorflow, then tfadam's TF1 and Keras faces (no torch.optim, so no triton)",
        """
        import sys, tensorflow, tfadam, torch
        w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.ones(3)
        tfadam.AdamOptimizer(learning_rate=0.1).apply_gradients([(w.grad, w)])
        tfadam.keras.Adam(learning_rate=0.1).apply_gradients([(w.grad, w)])
        assert "triton" not in sys.modules
        """,
        "tensorflow was imported before triton" if CRASHES else "",
    ),
    (
        "triton, then tensorflow, then tfadam and torch's compiler",
        """
        import importlib.util, sys
        if importlib.util.find_spec("triton"):
            import triton
        import tensorflow, tfadam, torch
        import torch._dynamo
        """,
        "",
    ),
]


def run(script: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="default")
    code = textwrap.dedent(script) + "\nprint('done')\n"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )


@needs_triton
@pytest.mark.parametrize(("name", "script", "warning"), ORDERS, ids=[o[0] for o in ORDERS])
def test_import_order(name: str, script: str, warning: str) -> None:
    pytest.importorskip("tensorflow")
    done = run(script)
    assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert done.stdout.strip().endswith("done")
    assert warning in done.stderr
    if not warning:
        assert "imported before triton" not in done.stderr


def test_import_loads_no_compiler() -> None:
    # torch._dynamo (and triton with it) was ~1.1 s of tfadam's 1.4 s import,
    # and loading it after TensorFlow crashes: tfadam imports it only when a
    # compile happens.
    done = run(
        """
        import sys, torch, tfadam
        assert "torch._dynamo" not in sys.modules, "tfadam imported torch._dynamo"
        assert "torch._inductor" not in sys.modules
        w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.ones(3)
        tfadam.AdamOptimizer(learning_rate=0.1).apply_gradients([(w.grad, w)])
        assert "torch._dynamo" not in sys.modules, "a TF1-face step imported torch._dynamo"
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
