"""The fused CPU kernels (``cpu_adam.c``), bitwise-equal to :mod:`tfadam.rule`.

One C call updates every tensor of a dtype (multi-tensor), streaming θ, g, m,
v once, on ``torch.get_num_threads()`` threads. The functions here only check
layouts and gather data pointers; each returns which tensors it could not
take (a layout the C loop cannot walk), for the reference kernels to do.

Example:
    >>> import torch
    >>> from tfadam import rule
    >>> from tfadam.kernels import cpu
    >>> theta, g, m, v = torch.ones(5), torch.full((5,), 0.5), torch.zeros(5), torch.zeros(5)
    >>> c = rule.tf1_coefficients(lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                           beta1_power=0.9, beta2_power=0.999, dtype=torch.float32)
    >>> cpu.dense_step([theta], [g], [m], [v], None, c, nesterov=False)
    []
    >>> theta
    tensor([0.9000, 0.9000, 0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

import ctypes
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate, chain

import torch

from .. import rule
from . import addresses, native, reference

DTYPE_NAMES = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}
MODES = {"eager": 0, "graph": 1, "lazy": 2}

_is_contiguous = torch.Tensor.is_contiguous
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_detach = torch.Tensor.detach
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_ZERO = (0,)


def available() -> bool:
    """Whether the C kernels are (or can be) loaded; compiles them on first call."""
    return native.library() is not None


def _coefficients(c: rule.Coefficients) -> ctypes.Array[ctypes.c_double]:
    return (ctypes.c_double * 6)(
        c.alpha, c.beta1, c.beta2, c.one_minus_beta1, c.one_minus_beta2, c.epsilon
    )


def _dense_layout(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the tensors can be walked as one flat array each, in step.

    Contiguous tensors can. So can tensors that share strides and cover their
    storage densely without overlap (channels-last, or any permuted layout),
    because an elementwise rule does not care about the order of elements.
    """
    first = tensors[0]
    strides = first.stride()
    if any(t.stride() != strides for t in tensors[1:]):
        return False
    expected = 1
    for size, stride in sorted(zip(first.shape, strides, strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def dense_step(
    thetas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    vhats: Sequence[torch.Tensor] | None,
    c: rule.Coefficients,
    *,
    nesterov: bool,
) -> list[int]:
    """Dense Adam (:func:`tfadam.rule.dense_update`) on CPU tensors of one dtype.

    Returns the positions of the tensors it left alone (layouts it cannot
    walk); everything else is updated in place. The C library must be
    available (:func:`available`).
    """
    groups = [thetas, grads, ms, vs] if vhats is None else [thetas, grads, ms, vs, vhats]
    # The common case (every tensor contiguous) costs one C-level check per
    # tensor: with 2,000 small tensors, Python work per tensor is the bottleneck.
    if all(map(_is_contiguous, chain.from_iterable(groups))):
        chosen: Sequence[int] | range = range(len(thetas))
        skipped: list[int] = []
    else:
        chosen, skipped = [], []
        for i in range(len(thetas)):
            (chosen if _dense_layout([g[i] for g in groups]) else skipped).append(i)
        groups = [[g[i] for i in chosen] for g in groups]
    if not chosen:
        return skipped
    vhats = groups[4] if vhats is not None else None
    batch = DenseBatch(groups[0], groups[2], groups[3], vhats, alias=False)
    batch.step(groups[1], pointers(groups[1]), c, nesterov=nesterov)
    return skipped


def pointers(tensors: Sequence[torch.Tensor]) -> array:
    """The tensors' data pointers, as the C kernels take them (``uint64``).

    In one C++ call where :mod:`tfadam.kernels.addresses` is built (plain
    tensors), else one ``data_ptr()`` call per tensor: the same numbers.
    """
    read = addresses.reader()
    if read is not None:
        out = array("Q", _ZERO) * len(tensors)
        try:
            read(tensors, out, _PLAIN)
            return out
        except TypeError:  # a tensor subclass: its own data_ptr() may differ
            pass
    return array("Q", map(_data_ptr, tensors))


class DenseBatch:
    """The variables and slots of one dense step, their pointers gathered once.

    A step over thousands of small tensors spends more time gathering
    pointers than computing; a batch keeps them, and :meth:`step` takes only
    the gradients' (:func:`pointers`). The tensors must be contiguous plain
    CPU tensors of one dtype, and stay where they are while the batch is
    used (``p.data = x``, ``set_()`` and ``share_memory_()`` move a tensor's
    memory: the caller compares their addresses with :meth:`addresses`
    before each step, as :func:`tfadam.engine.reuse` does). The batch keeps its own
    aliases of them (``detach()``: the same storage, metadata of their own),
    so that a tensor pointed elsewhere leaves its old memory allocated while
    the batch lives, and makes the slots' storages unresizable, as torch
    makes a storage it shares with NumPy (a ``resize_()`` that would
    reallocate one raises).

    >>> theta, m, v = torch.ones(2), torch.zeros(2), torch.zeros(2)
    >>> batch = DenseBatch([theta], [m], [v], None)
    >>> c = rule.tf1_coefficients(lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                           beta1_power=0.9, beta2_power=0.999, dtype=torch.float32)
    >>> g = [torch.ones(2)]
    >>> batch.step(g, pointers(g), c, nesterov=False)
    >>> theta, m
    (tensor([0.9000, 0.9000]), tensor([0.1000, 0.1000]))
    """

    def __init__(
        self,
        thetas: Sequence[torch.Tensor],
        ms: Sequence[torch.Tensor],
        vs: Sequence[torch.Tensor],
        vhats: Sequence[torch.Tensor] | None,
        *,
        alias: bool = True,
    ) -> None:
        lib = native.library()
        assert lib is not None, "DenseBatch needs the C kernels (see cpu.available())"
        self._function = getattr(lib, f"tfadam_dense_{DTYPE_NAMES[thetas[0].dtype]}")
        slots = [ms, vs] if vhats is None else [ms, vs, vhats]
        # (a batch used once, within one step, needs no aliases)
        kept: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] = (
            (lambda group: list(map(_detach, group))) if alias else list
        )
        self._written = [kept(group) for group in [thetas, *slots]]
        if alias:
            for group in self._written[1:]:
                for slot in group:
                    _unresizable(slot)
        self._pointers = [pointers(group) for group in self._written]
        self._offsets = array("q", accumulate(map(_numel, thetas), initial=0))

    def addresses(self) -> array:
        """Where the batch writes: the θs' pointers, then the ms', vs' (and vhats')."""
        return array("Q", chain.from_iterable(self._pointers))

    def step(
        self,
        grads: Sequence[torch.Tensor],
        grad_pointers: array,
        c: rule.Coefficients,
        *,
        nesterov: bool,
    ) -> None:
        """Dense Adam on the batch, with these gradients (contiguous, same shapes)."""
        offsets = self._offsets
        thetas, ms, vs, vhats = self._pointers + [None] * (4 - len(self._pointers))
        nan_blocks = bytearray(2 * -(-offsets[-1] // native.NAN_BLOCK))  # a uint16 per block
        status = self._function(
            len(grad_pointers),
            thetas.buffer_info()[0],
            grad_pointers.buffer_info()[0],
            ms.buffer_info()[0],
            vs.buffer_info()[0],
            vhats.buffer_info()[0] if vhats is not None else None,
            offsets.buffer_info()[0],
            _coefficients(c),
            int(nesterov),
            torch.get_num_threads(),
            (ctypes.c_uint16 * (len(nan_blocks) // 2)).from_buffer(nan_blocks)
            if nan_blocks
            else None,
        )
        if status < 0:
            raise RuntimeError(f"{self._function.__name__} failed with status {status}")
        if status:
            written = self._written
            groups = [written[0], list(grads), *written[1:]]
            _dense_nan_blocks(groups, offsets, nan_blocks, native.NAN_BLOCK, c, nesterov)


def _unresizable(t: torch.Tensor) -> None:
    """Make ``t``'s storage unresizable, so that its memory can never be reallocated.

    torch has no public switch for it; exporting to NumPy sets it (torch
    cannot let NumPy's view of the memory dangle), for good.
    ``tests/test_plan_reuse.py`` checks that it still does.
    """
    t.reshape(-1).view(torch.uint8).numpy()


def _dense_nan_blocks(
    groups: list[list[torch.Tensor]],
    offsets: array,
    nan_blocks: bytearray,
    size: int,
    c: rule.Coefficients,
    nesterov: bool,
) -> None:
    """The reference on the elements the C loop left alone because of a NaN.

    Where two different NaNs meet, which one the C code's result carries
    depends on operand order inside the machine instructions (its compiler may
    swap the operands of + and *); the reference's is the specified one. The
    rule is elementwise, so running it on some elements is running it on those
    elements. Block ``k`` is elements ``[k*size, (k+1)*size)`` of the
    concatenated tensors, as in the C loop; its mark is 0 (done) or ``1 + r``:
    its elements from offset ``r`` on are untouched.
    """
    total = offsets[-1]
    flat = [[_memory_order(t) for t in group] for group in groups]
    marks = torch.frombuffer(nan_blocks, dtype=torch.int16)
    for block in marks.nonzero().flatten().tolist():
        lo, hi = block * size + int(marks[block]) - 1, min((block + 1) * size, total)
        pieces: list[list[torch.Tensor]] = [[] for _ in groups]
        i = bisect_right(offsets, lo) - 1
        while i < len(groups[0]) and offsets[i] < hi:
            a, b = max(lo, offsets[i]) - offsets[i], min(hi, offsets[i + 1]) - offsets[i]
            if b > a:
                for piece, tensors in zip(pieces, flat, strict=True):
                    piece.append(tensors[i][a:b])
            i += 1
        vhats = pieces[4] if len(pieces) == 5 else None
        reference.dense_step(*pieces[:4], vhats, c, nesterov=nesterov)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-d view of a densely laid out tensor's elements, in memory order (as C walks it)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def sparse_step(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    c: rule.Coefficients,
    *,
    lazy: bool,
    numerics: rule.Numerics,
) -> bool:
    """Sparse Adam on raw (possibly repeated) row indices, deduplicated in C.

    Dense-equivalent (:func:`tfadam.rule.sparse_update`) in one pass over the
    table; lazy (:func:`tfadam.rule.lazy_sparse_update`) touching only the
    indexed rows. Returns False (and changes nothing) when the table's layout
    is not row-major contiguous.
    """
    lib = native.library()
    assert lib is not None, "cpu.sparse_step needs the C kernels (see cpu.available())"
    if not (theta.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
        return False
    name = DTYPE_NAMES[theta.dtype]
    nrows = theta.shape[0]
    rowlen = theta.numel() // nrows if nrows else 0
    # (no-op conversions are torch ops too: only where needed)
    if indices.dtype != torch.int64 or not indices.is_contiguous():
        indices = indices.to(torch.int64).contiguous()
    if not values.is_contiguous():
        values = values.contiguous()
    nan_rows = bytearray(nrows)
    status = getattr(lib, f"tfadam_sparse_{name}")(
        nrows,
        rowlen,
        theta.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        indices.numel(),
        indices.data_ptr(),
        values.data_ptr(),
        _coefficients(c),
        MODES["lazy" if lazy else numerics],
        torch.get_num_threads(),
        (ctypes.c_uint8 * nrows).from_buffer(nan_rows) if nrows else None,
    )
    if status == -2:
        raise ValueError(f"sparse gradient index out of range for a variable with {nrows} rows")
    if status < 0:
        raise MemoryError(f"tfadam_sparse_{name}: out of memory (status {status})")
    if status:
        _sparse_nan_rows(theta, m, v, indices, values, c, nan_rows, lazy, numerics)
    return True


def _sparse_nan_rows(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    c: rule.Coefficients,
    nan_rows: bytearray,
    lazy: bool,
    numerics: rule.Numerics,
) -> None:
    """The reference on the rows the C loop left alone because they hold a NaN.

    (See :func:`_dense_nan_blocks` for why.) Rows are independent, so the
    reference runs on a table made of those rows, with their gradient rows in
    their order of occurrence, and the result is written back.
    """
    marked = torch.frombuffer(nan_rows, dtype=torch.uint8).bool()
    rows = marked.nonzero().flatten()
    mine = marked[indices]
    sub = [t[rows] for t in (theta, m, v)]
    reference.sparse_step(
        *sub,
        torch.searchsorted(rows, indices[mine]),
        values[mine],
        c,
        lazy=lazy,
        numerics=numerics,
    )
    for table, part in zip((theta, m, v), sub, strict=True):
        table[rows] = part


class FloorKernel:
    """The benchmark's memory-traffic floor: a dense step's traffic, trivial arithmetic.

    Reads θ, g, m, v and writes θ, m, v (``m += g; v -= g; θ += g``, as
    float32, 16-bit integers or float64 by element size) on the same threads
    as the Adam kernel. Pointers are gathered once, at construction, so a call
    is the C loop alone: the speed limit a fused Adam step can approach. Not
    an optimizer. The tensors must stay alive and in place while it is used.

    >>> t, g, m, v = torch.ones(4), torch.full((4,), 2.0), torch.zeros(4), torch.zeros(4)
    >>> FloorKernel([t], [g], [m], [v])()
    >>> t.tolist(), m.tolist(), v.tolist()
    ([3.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0], [-2.0, -2.0, -2.0, -2.0])
    """

    _BY_SIZE = {4: "f32", 2: "u16", 8: "f64"}

    def __init__(
        self,
        thetas: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        ms: Sequence[torch.Tensor],
        vs: Sequence[torch.Tensor],
    ) -> None:
        lib = native.library()
        assert lib is not None, "FloorKernel needs the C kernels"
        groups = [list(thetas), list(grads), list(ms), list(vs)]
        size = groups[0][0].element_size()
        for group in groups:
            for t in group:
                if t.element_size() != size or not t.is_contiguous() or t.device.type != "cpu":
                    raise ValueError("FloorKernel takes contiguous CPU tensors of one element size")
        self._keep = groups
        self._function = getattr(lib, f"tfadam_floor_{self._BY_SIZE[size]}")
        self._pointers = [array("Q", map(_data_ptr, group)) for group in groups]
        self._offsets = array("q", accumulate(map(_numel, groups[0]), initial=0))
        self._count = len(groups[0])

    def __call__(self) -> None:
        self._function(
            self._count,
            *(p.buffer_info()[0] for p in self._pointers),
            self._offsets.buffer_info()[0],
            torch.get_num_threads(),
        )
