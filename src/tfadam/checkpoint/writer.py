"""A minimal tensor-bundle writer, for tests, examples and benchmarks.

It writes what TensorFlow's ``BundleWriter`` writes for plain (unpartitioned)
tensors: the ``.index`` SSTable (uncompressed 4 KiB blocks, a restart point
every 16 entries) and the data shards, with masked CRC-32C everywhere. The
test suite checks that ``tf.train.load_checkpoint`` reads its output
bit for bit, including the big-endian variant TensorFlow byte-swaps on load.

>>> import numpy as np, tempfile, os
>>> prefix = os.path.join(tempfile.mkdtemp(), "ckpt")
>>> write_bundle(prefix, {"b": np.zeros(3, np.float32), "a": np.array([b"x"], object)})
>>> sorted(os.listdir(os.path.dirname(prefix)))
['ckpt.data-00000-of-00001', 'ckpt.index']
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import BinaryIO

import numpy as np
import torch

from .crc32c import crc32c, mask
from .dtypes import DTYPES, STRING
from .table import TABLE_MAGIC

__all__ = ["write_bundle"]

_BLOCK_SIZE = 4096
_RESTART_INTERVAL = 16


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are sign-extended to 64 bits
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _entry(
    dtype: int, shape: tuple[int, ...], shard: int, offset: int, size: int, crc: int
) -> bytes:
    shape_proto = b"".join(_field_bytes(2, _field_varint(1, d)) for d in shape)
    return (
        _field_varint(1, dtype)
        + _field_bytes(2, shape_proto)
        + _field_varint(3, shard)
        + _field_varint(4, offset)
        + _field_varint(5, size)
        + _varint(6 << 3 | 5)
        + mask(crc).to_bytes(4, "little")
    )


def _header(num_shards: int, big_endian: bool) -> bytes:
    version = _field_varint(1, 1)  # producer = kTensorBundleVersion
    return (
        _field_varint(1, num_shards) + _field_varint(2, int(big_endian)) + _field_bytes(3, version)
    )


class _BlockBuilder:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.restarts = [0]
        self.count = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.count < _RESTART_INTERVAL:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.count = 0
        self.buf += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.count += 1

    def finish(self) -> bytes:
        tail = b"".join(r.to_bytes(4, "little") for r in self.restarts)
        return bytes(self.buf) + tail + len(self.restarts).to_bytes(4, "little")

    def size(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4


def _write_table(f: BinaryIO, items: list[tuple[bytes, bytes]]) -> None:
    offset = 0

    def put_block(contents: bytes) -> bytes:
        nonlocal offset
        trailer = b"\x00" + mask(crc32c(contents + b"\x00")).to_bytes(4, "little")
        f.write(contents + trailer)
        handle = _varint(offset) + _varint(len(contents))
        offset += len(contents) + len(trailer)
        return handle

    index = _BlockBuilder()
    block = _BlockBuilder()
    for key, value in items:
        block.add(key, value)
        if block.size() >= _BLOCK_SIZE:
            index.add(block.last_key, put_block(block.finish()))
            block = _BlockBuilder()
    if block.count:
        index.add(block.last_key, put_block(block.finish()))
    meta_handle = put_block(_BlockBuilder().finish())
    index_handle = put_block(index.finish())
    footer = (meta_handle + index_handle).ljust(40, b"\x00")
    f.write(footer + TABLE_MAGIC.to_bytes(8, "little"))


_NUMPY_ENUM = {
    np.dtype(DTYPES[e].storage): e for e in (1, 2, 3, 4, 5, 6, 8, 9, 10, 17, 18, 19, 22, 23)
}


def _as_numpy(value: np.ndarray | torch.Tensor) -> tuple[int, np.ndarray]:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        enums = [e for e, d in DTYPES.items() if d.torch == t.dtype and not d.name.startswith("q")]
        if not enums:
            raise TypeError(f"no TensorFlow dtype for {t.dtype}")
        if t.dtype.is_floating_point and t.element_size() <= 2 and t.dtype != torch.float16:
            # bfloat16 and float8: numpy has no such types; keep the raw bits
            raw = t.view(torch.int16 if t.element_size() == 2 else torch.uint8).numpy()
            return enums[0], raw.view(np.uint16) if t.element_size() == 2 else raw
        return enums[0], t.numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        return STRING, arr
    enum = _NUMPY_ENUM.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
    if enum is None:
        raise TypeError(f"no TensorFlow dtype for numpy {arr.dtype}")
    return enum, arr


def _tensor_bytes(dtype: int, arr: np.ndarray, big_endian: bool) -> tuple[bytes, int]:
    order = "big" if big_endian else "little"
    if dtype != STRING:
        storage = np.dtype(DTYPES[dtype].storage).newbyteorder(">" if big_endian else "<")
        data = np.ascontiguousarray(arr, dtype=storage).tobytes()
        return data, crc32c(data)
    items = [bytes(x) for x in arr.reshape(-1)]
    if not items:
        return b"", 0
    lengths = b"".join(_varint(len(x)) for x in items)
    crc = 0
    for x in items:
        crc = crc32c(len(x).to_bytes(4 if len(x) <= 0xFFFFFFFF else 8, order), crc)
    checksum = mask(crc).to_bytes(4, order)
    crc = crc32c(checksum, crc)
    body = b"".join(items)
    return lengths + checksum + body, crc32c(body, crc)


def write_bundle(
    prefix: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray | torch.Tensor],
    *,
    num_shards: int = 1,
    big_endian: bool = False,
) -> None:
    """Write ``tensors`` as a TensorFlow checkpoint at ``prefix``.

    numpy arrays (object arrays of bytes for strings) or torch tensors (for
    bfloat16 and float8). Tensors go to ``num_shards`` data files round-robin.
    ``big_endian`` writes the data bytes as a big-endian machine would.
    """
    prefix = os.fspath(prefix)
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    shards = [bytearray() for _ in range(num_shards)]
    items = [(b"", _header(num_shards, big_endian))]
    for i, name in enumerate(sorted(tensors, key=lambda n: n.encode("utf-8"))):
        dtype, arr = _as_numpy(tensors[name])
        data, crc = _tensor_bytes(dtype, arr, big_endian)
        shard = i % num_shards
        entry = _entry(dtype, tuple(arr.shape), shard, len(shards[shard]), len(data), crc)
        shards[shard] += data
        items.append((name.encode("utf-8"), entry))
    for shard, data in enumerate(shards):
        with open(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}", "wb") as f:
            f.write(data)
    with open(prefix + ".index", "wb") as f:
        _write_table(f, items)
