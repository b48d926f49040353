"""Partitioned ("sliced") variables: slice keys and reassembly bookkeeping.

A partitioned variable is stored as one metadata entry under its own name,
listing its slices (``TensorSliceProto``), plus one ordinary entry per slice
under a key built with TensorFlow's ``OrderedCode``::

    NumIncreasing(0) String(name) NumIncreasing(rank) {SignedNumIncreasing(start),
                                                       SignedNumIncreasing(length)}*

where a whole-dimension extent is written as start 0, length -1.

>>> slice_key("part", ((4, 3), (0, None)))
b'\\x00part\\x00\\x01\\x01\\x02\\x84\\x83\\x80\\x7f'
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import numpy as np

from .errors import CheckpointError
from .proto import Extent

__all__ = ["box", "check_cover", "check_volumes", "slice_key", "slice_keys"]


def _num_increasing(value: int) -> bytes:
    # length byte, then big-endian value without leading zero bytes
    body = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(body)]) + body


def _escape(value: bytes) -> bytes:
    # 0x00 -> 00 ff, 0xff -> ff 00 (OrderedCode's string escapes), at C speed
    return b"\x00\xff".join(part.replace(b"\xff", b"\xff\x00") for part in value.split(b"\x00"))


# Header bits of the first two bytes, by encoded length 1..10.
_HEADER_BITS = (0, 0x8000, 0xC000, 0xE000, 0xF000, 0xF800, 0xFC00, 0xFE00, 0xFF00, 0xFF80, 0xFFC0)


def _signed_increasing(value: int) -> bytes:
    # n bytes hold [-2**(7n-1), 2**(7n-1)); the leading bits of the first one
    # or two bytes say n (sign bit, then n-1 copies of it, then its opposite).
    magnitude = ~value if value < 0 else value
    length = 1
    while magnitude >= 1 << (7 * length - 1):
        length += 1
    if length > 10:
        raise CheckpointError(f"slice bound {value} is out of the int64 range")
    raw = bytearray((value & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))
    header_bits = _HEADER_BITS[length]
    raw[0] ^= header_bits >> 8
    if length >= 2:
        raw[1] ^= header_bits & 0xFF
    return bytes(raw)


def _prefix(name: str | bytes) -> bytes:
    raw = name if isinstance(name, bytes) else name.encode("utf-8")
    return _num_increasing(0) + _escape(raw) + b"\x00\x01"


def _suffix(extents: tuple[Extent, ...]) -> bytes:
    key = _num_increasing(len(extents))
    for start, length in extents:
        if length is None:
            start, length = 0, -1
        key += _signed_increasing(start) + _signed_increasing(length)
    return key


def slice_key(name: str | bytes, extents: tuple[Extent, ...]) -> bytes:
    """The table key under which one slice of ``name`` is stored."""
    return _prefix(name) + _suffix(extents)


def slice_keys(name: str | bytes, slices: Iterable[tuple[Extent, ...]]) -> list[bytes]:
    """:func:`slice_key` of each slice (the name is escaped once, not once per slice)."""
    prefix = _prefix(name)
    return [prefix + _suffix(extents) for extents in slices]


def box(extents: tuple[Extent, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Half-open (start, stop) per dimension, checked against the full shape."""
    if len(extents) != len(shape):
        raise CheckpointError(
            f"slice has rank {len(extents)} but the full tensor has rank {len(shape)}"
        )
    out = []
    for (start, length), dim in zip(extents, shape, strict=True):
        stop = dim if length is None else start + length
        if length is None:
            start = 0
        if not 0 <= start <= stop <= dim:
            raise CheckpointError(f"slice extent {start}:{stop} lies outside dimension {dim}")
        out.append((start, stop))
    return tuple(out)


def check_volumes(boxes: list[tuple[tuple[int, int], ...]], shape: tuple[int, ...]) -> None:
    """Require the slices' volumes to add up to the tensor's (arithmetic only).

    >>> check_volumes([((0, 2),), ((1, 4),)], (4,))
    Traceback (most recent call last):
    ...
    tfadam.checkpoint.errors.CheckpointError: slices overlap
    """
    total = 1
    for dim in shape:
        total *= dim
    volume = 0
    for b in boxes:
        size = 1
        for start, stop in b:
            size *= stop - start
        volume += size
    if volume < total:
        raise CheckpointError("slices do not cover the whole tensor: some partitions are missing")
    if volume > total:
        raise CheckpointError("slices overlap")


def check_cover(boxes: list[tuple[tuple[int, int], ...]], shape: tuple[int, ...]) -> None:
    """Require the slices to tile the full tensor exactly (no gap, no overlap).

    Their volumes must add up to the tensor's; then the slice bounds cut each
    dimension into intervals, and each slice marks the cells of that grid it
    covers, stopping at the first cell marked twice. A cell holds at least one
    element, so the work and the grid are bounded by the tensor's size
    (callers check that the slices' bytes exist before calling this).

    >>> check_cover([((0, 4), (0, 3)), ((4, 10), (0, 3))], (10, 3))
    >>> check_cover([((0, 4), (0, 3)), ((3, 10), (0, 3))], (10, 3))
    Traceback (most recent call last):
    ...
    tfadam.checkpoint.errors.CheckpointError: slices overlap
    """
    check_volumes(boxes, shape)
    breaks = [
        sorted({0, dim} | {bound for b in boxes for bound in b[d]}) for d, dim in enumerate(shape)
    ]
    covered = np.zeros([len(cuts) - 1 for cuts in breaks], dtype=bool)
    for b in boxes:
        index = tuple(
            slice(bisect.bisect_left(cuts, start), bisect.bisect_left(cuts, stop))
            for (start, stop), cuts in zip(b, breaks, strict=True)
        )
        if covered[index].any():
            raise CheckpointError("slices overlap")
        covered[index] = True
