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

import numpy as np

from .errors import CheckpointError
from .proto import Extent

__all__ = ["box", "check_cover", "slice_key"]


def _num_increasing(value: int) -> bytes:
    # length byte, then big-endian value without leading zero bytes
    body = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(body)]) + body


def _escape(value: bytes) -> bytes:
    out = bytearray()
    for byte in value:
        if byte == 0x00:
            out += b"\x00\xff"
        elif byte == 0xFF:
            out += b"\xff\x00"
        else:
            out.append(byte)
    return bytes(out)


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


def slice_key(name: str | bytes, extents: tuple[Extent, ...]) -> bytes:
    """The table key under which one slice of ``name`` is stored."""
    raw = name if isinstance(name, bytes) else name.encode("utf-8")
    key = _num_increasing(0) + _escape(raw) + b"\x00\x01"
    key += _num_increasing(len(extents))
    for start, length in extents:
        if length is None:
            start, length = 0, -1
        key += _signed_increasing(start) + _signed_increasing(length)
    return key


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


def check_cover(boxes: list[tuple[tuple[int, int], ...]], shape: tuple[int, ...]) -> None:
    """Require the slices to tile the full tensor exactly (no gap, no overlap).

    The slice bounds cut each dimension into intervals; counting how many
    slices cover each cell of that grid is exact and linear in the grid size.

    >>> check_cover([((0, 4), (0, 3)), ((4, 10), (0, 3))], (10, 3))
    >>> check_cover([((0, 4), (0, 3)), ((3, 10), (0, 3))], (10, 3))
    Traceback (most recent call last):
    ...
    tfadam.checkpoint.errors.CheckpointError: slices overlap
    """
    breaks = []
    cells = 1
    for d, dim in enumerate(shape):
        cuts = sorted({0, dim} | {bound for b in boxes for bound in b[d]})
        breaks.append(cuts)
        cells *= len(cuts) - 1
    if cells > 10_000_000:
        raise CheckpointError(f"slice layout too fragmented to check ({cells} grid cells)")
    counts = np.zeros([len(cuts) - 1 for cuts in breaks], dtype=np.int64)
    for b in boxes:
        index = tuple(
            slice(bisect.bisect_left(cuts, start), bisect.bisect_left(cuts, stop))
            for (start, stop), cuts in zip(b, breaks, strict=True)
        )
        counts[index] += 1
    if (counts > 1).any():
        raise CheckpointError("slices overlap")
    if (counts == 0).any():
        raise CheckpointError("slices do not cover the whole tensor: some partitions are missing")
