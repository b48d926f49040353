"""Kernels: implementations of :mod:`tfadam.rule`, chosen per call.

A kernel receives tensors and :class:`~tfadam.rule.Coefficients` — never a
param group or an optimizer. :func:`dense_step` and :func:`sparse_step` pick
the fastest implementation that handles the given tensors:

* CPU: the fused C kernels of :mod:`tfadam.kernels.cpu` (compiled on first
  use, or prebuilt at install time, see :mod:`tfadam.kernels.native`; :func:`which`
  says which), for plain tensors in a dense layout;
* other CPU tensors (tensor subclasses such as DTensor, layouts the C loop
  cannot walk, no C kernels): :mod:`tfadam.kernels.reference`. Where the C
  kernels are missing, the first step warns once, with what that costs
  (:data:`REFERENCE_SLOWDOWN`) and how to get them;
* tensors on any other device (CUDA included): copied to the CPU for the
  step, updated there as above, and copied back (:func:`through_cpu`).

All of them give the same bits; the tests prove it with ``==`` on integer views.
Why CUDA goes through the CPU: the rule is proven against TF on the CPU only.
On a GPU three of its primitives are unproven or known to differ — NaN bits
(CUDA returns a canonical NaN where x86 keeps the operand's sign and
payload), the float32-to-float16 conversion of NaNs, and correctly rounded
square roots (documented for CUDA, never measured here) — so no arithmetic
runs there until a GPU run proves a kernel bitwise-equal to the reference.
Copies are exact (bytes, no conversion), so the bits are the CPU's.
The per-step scalars (:func:`tf1_coefficients`, :func:`advance_accumulators`)
come from :mod:`tfadam.kernels.scalars`: the rule's numbers without torch ops.

Example:
    >>> import torch
    >>> from tfadam import kernels, rule
    >>> theta, g, m, v = torch.ones(3), torch.ones(3), torch.zeros(3), torch.zeros(3)
    >>> c = rule.tf1_coefficients(lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                           beta1_power=0.9, beta2_power=0.999, dtype=torch.float32)
    >>> kernels.dense_step([theta], [g], [m], [v], None, c)
    >>> theta
    tensor([0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Literal

import torch

from .. import rule
from ..callsite import user_stacklevel
from ..eager import eager_only
from . import cpu, native, reference
from .cpu import DenseBatch, pointers
from .scalars import advance_accumulators, float32_value, tf1_coefficients

__all__ = [
    "DenseBatch",
    "advance_accumulators",
    "dense_batch",
    "dense_step",
    "pointers",
    "float32_value",
    "path_for",
    "sparse_step",
    "through_cpu",
    "tf1_coefficients",
    "which",
]

# Plain tensors only: a tensor subclass (DTensor, FakeTensor, ...) may have no
# storage behind data_ptr(), or its own idea of in-place ops.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _plain(tensors: Iterable[torch.Tensor]) -> bool:
    return _PLAIN.issuperset(map(type, tensors))


Path = Literal["fused-cpu", "reference", "through-cpu"]


def path_for(device: torch.device, *, plain: bool = True) -> Path:
    """Which implementation updates tensors on ``device`` (the dispatch decision).

    ``"fused-cpu"`` where the C kernels run (plain CPU tensors, a compiler),
    ``"through-cpu"`` on every device but the CPU (and meta, which holds no
    values: the reference raises its own error there), ``"reference"`` otherwise.

    >>> path_for(torch.device("cuda", 0))
    'through-cpu'
    >>> path_for(torch.device("cpu"), plain=False)
    'reference'
    """
    if device.type == "cpu":
        return "fused-cpu" if plain and cpu.available() else "reference"
    if device.type == "meta":
        return "reference"
    return "through-cpu"


def through_cpu(
    written: Sequence[torch.Tensor],
    read: Sequence[torch.Tensor],
    step: Callable[[list[torch.Tensor], list[torch.Tensor]], None],
) -> None:
    """``step(written_copies, read_copies)`` on CPU copies, then the written copies copied back.

    A same-dtype copy moves bytes: NaN payloads, signed zeros and subnormals
    arrive as they were, so the result is exactly the CPU step's. The write
    back happens only after the whole step has run on the copies.

    >>> theta = torch.ones(2)
    >>> through_cpu([theta], [torch.full((2,), 3.0)], lambda w, r: w[0].sub_(r[0]))
    >>> theta
    tensor([-2., -2.])
    """
    written_copies = [t.detach().to("cpu", copy=True) for t in written]
    read_copies = [t.detach().to("cpu") for t in read]
    step(written_copies, read_copies)
    for target, result in zip(written, written_copies, strict=True):
        target.copy_(result)


def which() -> str:
    """Which CPU kernels run here: prebuilt, compiled at run time, or reference (and why).

    Loads them if not done yet. ``python -m tfadam.kernels`` prints it.

    >>> which().split()[0] in ("prebuilt", "compiled", "reference")
    True
    """
    return str(native.selection())


# A step's time on the reference kernels over its time on the C kernels, per
# benchmark workload: measured by benchmarks/reference_cost.py on this
# project's x86-64 machine (benchmarks/RESULTS.md, "Without the C kernels").
REFERENCE_SLOWDOWN: dict[str, tuple[str, float]] = {
    "D1": ("16 tensors x 1,000,000 float32 (dense)", 180.0),
    "D2": ("2,000 tensors x 4,096 float32 (dense)", 105.0),
    "D3": ("16 tensors x 1,000,000 bfloat16 (dense)", 215.0),
    "S1": ("a 250,000 x 64 float32 table, 4,096 rows a step (sparse)", 293.0),
    "S2": ("a 250,000 x 64 float32 table, 4,096 rows a step (lazy sparse)", 142.0),
}
_warned: list[native.Selection] = []  # the selection warned about (native.reset makes a new one)


def _warn_reference(workload: str) -> None:
    """Once per kernel selection: this step runs the reference kernels, at what cost."""
    chosen = native.selection()
    if chosen.detail == "TFADAM_KERNELS=reference" or any(w is chosen for w in _warned):
        return
    _warned[:] = [chosen]
    description, slowdown = REFERENCE_SLOWDOWN[workload]
    warnings.warn(
        "tfadam: no C kernels here, so steps run the reference kernels: the same bits, "
        f"slower (measured {slowdown:.0f}x slower on {description}, "
        f"the benchmark workload most like this step). Why: {chosen.detail}. "
        "For the fast kernels: install tfadam with pip on x86-64 Linux (the wheel carries "
        "them prebuilt), or install a C compiler (gcc or clang; or set TFADAM_CC) to build "
        "them on first use. `python -m tfadam.kernels` says which kernels run.",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def _dense_workload(thetas: Sequence[torch.Tensor]) -> str:
    if thetas[0].element_size() == 2:
        return "D3"
    return "D2" if sum(map(torch.Tensor.numel, thetas)) < 65_536 * len(thetas) else "D1"


@eager_only
def dense_step(
    thetas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    vhats: Sequence[torch.Tensor] | None,
    c: rule.Coefficients,
    *,
    nesterov: bool = False,
) -> None:
    """Dense Adam on tensors of one dtype and device (see :func:`rule.dense_update`)::

        m = m + (g - m) * (1 - β1)
        v = v + (g*g - v) * (1 - β2)
        θ = θ - (m * alpha) / (sqrt(v) + ε)

    every operation rounded to the dtype, in place, for each tensor.
    """
    if not thetas:
        return
    path = path_for(thetas[0].device, plain=_plain(chain(thetas, grads, ms, vs, vhats or ())))
    if path != "through-cpu":
        _dense_on_cpu(path, thetas, grads, ms, vs, vhats, c, nesterov)
        return
    n, amsgrad = len(thetas), vhats is not None

    def on_cpu(written: list[torch.Tensor], read: list[torch.Tensor]) -> None:
        thetas, ms, vs = written[:n], written[n : 2 * n], written[2 * n : 3 * n]
        vhats = written[3 * n :] if amsgrad else None
        _dense_on_cpu(_cpu_path(), thetas, read, ms, vs, vhats, c, nesterov)

    through_cpu([*thetas, *ms, *vs, *(vhats or ())], grads, on_cpu)


def dense_batch(
    thetas: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    vhats: Sequence[torch.Tensor] | None,
) -> DenseBatch | None:
    """A :class:`DenseBatch` over these tensors, where the fused C kernels take them all.

    None where they do not (no C kernels, another device, a tensor subclass,
    a layout other than contiguous): :func:`dense_step` then picks per call.
    The caller checks that the tensors are of one dtype.

    >>> batch = dense_batch([torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)], None)
    >>> batch is None or isinstance(batch, DenseBatch)
    True
    """
    groups = [thetas, ms, vs] if vhats is None else [thetas, ms, vs, vhats]
    tensors = list(chain.from_iterable(groups))
    if (
        not thetas
        or path_for(thetas[0].device, plain=_plain(tensors)) != "fused-cpu"
        or not all(map(torch.Tensor.is_contiguous, tensors))
    ):
        return None
    return DenseBatch(thetas, ms, vs, vhats)


def _for_want_of_kernels(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether plain CPU tensors go to the reference because no C kernels load here."""
    return tensors[0].device.type == "cpu" and _plain(tensors) and not cpu.available()


def _cpu_path() -> Path:
    """The path of plain CPU tensors (the copies :func:`through_cpu` makes)."""
    return "fused-cpu" if cpu.available() else "reference"


def _dense_on_cpu(
    path: Path,
    thetas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    vhats: Sequence[torch.Tensor] | None,
    c: rule.Coefficients,
    nesterov: bool,
) -> None:
    if path == "fused-cpu":
        skipped = cpu.dense_step(thetas, grads, ms, vs, vhats, c, nesterov=nesterov)
        if skipped:
            reference.dense_step(
                [thetas[i] for i in skipped],
                [grads[i] for i in skipped],
                [ms[i] for i in skipped],
                [vs[i] for i in skipped],
                None if vhats is None else [vhats[i] for i in skipped],
                c,
                nesterov=nesterov,
            )
        return
    if _for_want_of_kernels(thetas):
        _warn_reference(_dense_workload(thetas))
    reference.dense_step(thetas, grads, ms, vs, vhats, c, nesterov=nesterov)


@eager_only
def sparse_step(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    c: rule.Coefficients,
    *,
    lazy: bool = False,
    numerics: rule.Numerics = "eager",
) -> None:
    """Sparse Adam with raw (possibly repeated) row indices, already range-checked.

    Duplicate rows are summed as TF does (from zero, in order of occurrence,
    rounding each addition), then :func:`rule.sparse_update` (every row decays
    and moves) or, with ``lazy``, :func:`rule.lazy_sparse_update` (touched rows only).
    """
    path = path_for(theta.device, plain=_plain((theta, m, v, indices, values)))
    if path != "through-cpu":
        _sparse_on_cpu(path, theta, m, v, indices, values, c, lazy, numerics)
        return

    def on_cpu(written: list[torch.Tensor], read: list[torch.Tensor]) -> None:
        _sparse_on_cpu(_cpu_path(), *written, *read, c, lazy, numerics)

    through_cpu([theta, m, v], [indices, values], on_cpu)


def _sparse_on_cpu(
    path: Path,
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    c: rule.Coefficients,
    lazy: bool,
    numerics: rule.Numerics,
) -> None:
    # Grappler folds float32/float64 only (see rule.sparse_update); its
    # x * rsqrt(v) form when ε is 0 in T is rare and left to the reference.
    folded = numerics == "graph" and theta.dtype in (torch.float32, torch.float64)
    graph_rsqrt = numerics == "graph" and c.epsilon == 0 and not lazy
    if path == "reference" and _for_want_of_kernels((theta, m, v)):
        _warn_reference("S2" if lazy else "S1")
    elif (
        not graph_rsqrt
        and path == "fused-cpu"
        and cpu.sparse_step(
            theta, m, v, indices, values, c, lazy=lazy, numerics="graph" if folded else "eager"
        )
    ):
        return
    reference.sparse_step(theta, m, v, indices, values, c, lazy=lazy, numerics=numerics)
