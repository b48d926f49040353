"""CRC-32C (Castagnoli), as TensorFlow's checkpoints use it, in numpy.

TensorFlow stores a CRC-32C of every table block and of every tensor's bytes.
Most of them are *masked* (see :func:`mask`) so that a CRC computed over data
that itself embeds CRCs does not degenerate.

Speed: a byte-at-a-time Python loop runs at ~5-10 MB/s, far too slow for a
checkpoint of gigabytes. CRC is linear over GF(2), so a buffer is split into
many equal chunks whose CRCs are computed side by side as numpy vectors (4
bytes per step through two 65,536-entry tables), then folded together with
the "append n zero bytes" operator. Small inputs take the plain loop.

>>> hex(crc32c(b"123456789"))
'0xe3069283'
>>> unmask(mask(0xE3069283)) == 0xE3069283
True
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["crc32c", "mask", "unmask"]

_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reflected
_MASK_DELTA = 0xA282EAD8  # TensorFlow's (and LevelDB's) mask constant
_U32 = 0xFFFFFFFF


def _byte_table() -> list[int]:
    table = []
    for byte in range(256):
        reg = byte
        for _ in range(8):
            reg = (reg >> 1) ^ (_POLY if reg & 1 else 0)
        table.append(reg)
    return table


_T0 = _byte_table()


def _slice_tables() -> list[np.ndarray]:
    # tables[k][b]: register contribution of byte b followed by k zero bytes
    tables = [np.array(_T0, dtype=np.uint32)]
    t0 = tables[0]
    for _ in range(3):
        prev = tables[-1]
        tables.append((prev >> 8) ^ t0[prev & 0xFF])
    return tables


_S0, _S1, _S2, _S3 = _slice_tables()
# One step consumes a little-endian 32-bit word w: s = reg ^ w, then
# reg' = S3[s & 0xff] ^ S2[s >> 8 & 0xff] ^ S1[s >> 16 & 0xff] ^ S0[s >> 24];
# pairing the bytes gives two lookups into 65,536-entry tables instead of four.
_LO16 = (_S2[:, None] ^ _S3[None, :]).ravel()
_HI16 = (_S0[:, None] ^ _S1[None, :]).ravel()


def mask(crc: int) -> int:
    """TensorFlow's masked form of a CRC (rotate right 15, add a constant).

    >>> hex(mask(0))
    '0xa282ead8'
    """
    crc &= _U32
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`.

    >>> unmask(mask(123456789))
    123456789
    """
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


# --- the register, without the initial/final inversion -------------------


def _register_py(reg: int, data: memoryview) -> int:
    table = _T0
    for byte in data:
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


_LO16_LIST: list[int] = []
_HI16_LIST: list[int] = []


def _register_words(reg: int, data: memoryview) -> int:
    """:func:`_register_py` a 32-bit word per step (two lookups): ~4x faster.

    For the small inputs the vector path does not pay for (index blocks of
    4 KiB, short tensors); the 16-bit tables become lists on first use.
    """
    if not _LO16_LIST:
        _LO16_LIST.extend(_LO16.tolist())
        _HI16_LIST.extend(_HI16.tolist())
    lo, hi = _LO16_LIST, _HI16_LIST
    n4 = len(data) - len(data) % 4
    for (word,) in struct.iter_unpack("<I", data[:n4]):
        reg ^= word
        reg = lo[reg & 0xFFFF] ^ hi[reg >> 16]
    return _register_py(reg, data[n4:])


# Linear operator "feed n zero bytes": a 32x32 GF(2) matrix kept as its 32
# columns (column i = image of bit i). Powers of two are cached.
_ZERO_OPS: dict[int, tuple[int, ...]] = {}


def _apply(op: tuple[int, ...], vec: int) -> int:
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= op[i]
        vec >>= 1
        i += 1
    return out


def _zero_op_pow2(k: int) -> tuple[int, ...]:
    """The operator for 2**k zero bytes."""
    op = _ZERO_OPS.get(k)
    if op is None:
        if k == 0:
            op = tuple(_register_py(1 << i, memoryview(b"\0")) for i in range(32))
        else:
            half = _zero_op_pow2(k - 1)
            op = tuple(_apply(half, col) for col in half)
        _ZERO_OPS[k] = op
    return op


def _shift(reg: int, nbytes: int) -> int:
    """The register after feeding ``nbytes`` zero bytes."""
    k = 0
    while nbytes and reg:
        if nbytes & 1:
            reg = _apply(_zero_op_pow2(k), reg)
        nbytes >>= 1
        k += 1
    return reg


_VEC_OPS: dict[int, tuple[np.ndarray, ...]] = {}


def _vector_shift_tables(nbytes: int) -> tuple[np.ndarray, ...]:
    """Byte tables that apply "feed nbytes zeros" to a numpy vector of registers."""
    tables = _VEC_OPS.get(nbytes)
    if tables is None:
        cols = [_shift(1 << i, nbytes) for i in range(32)]
        idx = np.arange(256, dtype=np.uint32)
        tables = []
        for byte_pos in range(4):
            t = np.zeros(256, dtype=np.uint32)
            for bit in range(8):
                t ^= np.where((idx >> bit) & 1, np.uint32(cols[8 * byte_pos + bit]), np.uint32(0))
            tables.append(t)
        tables = tuple(tables)
        _VEC_OPS[nbytes] = tables
    return tables


def _vector_shift(regs: np.ndarray, nbytes: int) -> np.ndarray:
    t0, t1, t2, t3 = _vector_shift_tables(nbytes)
    return t0[regs & 0xFF] ^ t1[(regs >> 8) & 0xFF] ^ t2[(regs >> 16) & 0xFF] ^ t3[regs >> 24]


_CHUNK = 512  # bytes per lane; a multiple of 4 (measured best, with _BLOCK)
_BLOCK = 1 << 23  # bytes per vectorised pass: keeps the working set in cache


def _register_block(words: np.ndarray) -> int:
    """Register (started at 0) after a block of ``lanes * _CHUNK`` bytes."""
    lanes = words.reshape(-1, _CHUNK // 4)
    regs = np.zeros(lanes.shape[0], dtype=np.uint32)
    idx = np.empty_like(regs)
    lo16, hi16 = _LO16, _HI16
    for j in range(lanes.shape[1]):
        np.bitwise_xor(regs, lanes[:, j], out=regs)
        np.bitwise_and(regs, 0xFFFF, out=idx)
        np.right_shift(regs, 16, out=regs)
        regs = lo16[idx] ^ hi16[regs]
    # Fold neighbouring lanes: R(0, a || b) = shift(R(0, a), |b|) ^ R(0, b).
    # A leading zero lane is harmless because R(0, zeros || x) == R(0, x).
    span = _CHUNK
    while regs.shape[0] > 1:
        if regs.shape[0] % 2:
            regs = np.concatenate([np.zeros(1, dtype=np.uint32), regs])
        regs = _vector_shift(regs[0::2], span) ^ regs[1::2]
        span *= 2
    return int(regs[0])


def _register(reg: int, data: memoryview) -> int:
    n = len(data)
    head = n % _CHUNK
    if n - head < 16 * _CHUNK:
        return _register_words(reg, data) if n >= 64 else _register_py(reg, data)
    reg = _register_py(reg, data[:head])
    words = np.frombuffer(data, dtype="<u4", offset=head)
    for start in range(0, words.shape[0], _BLOCK // 4):
        block = words[start : start + _BLOCK // 4]
        reg = _shift(reg, block.shape[0] * 4) ^ _register_block(block)
    return reg


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, crc: int = 0) -> int:
    """CRC-32C of ``data``; pass a previous result as ``crc`` to extend it.

    ``crc32c(b, crc32c(a)) == crc32c(a + b)``, as TensorFlow's ``Extend``.

    >>> crc32c(b"56789", crc32c(b"1234")) == crc32c(b"123456789")
    True
    """
    view = memoryview(data).cast("B")
    return _register(crc ^ _U32, view) ^ _U32
