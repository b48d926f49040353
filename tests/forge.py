"""Forging checkpoints: valid checksums around absurd contents, for the hostile tests.

A checksum only proves the bytes are the ones written; these encoders write
whatever they are told, with correct CRCs, so that the reader's own checks
(and nothing else) stand between a crafted file and the machine. Independent
of ``tfadam.checkpoint.writer`` on purpose: the forger must be able to write
what no valid writer would (one restart point for 50,000 keys, a field
repeated 100,000 times, 65-dimensional shapes...).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from tfadam.checkpoint.crc32c import crc32c, mask

TABLE_MAGIC = 0xDB4775248B80FB57


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fvarint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def fbytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def ffixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + (value & 0xFFFFFFFF).to_bytes(4, "little")


def shape_proto(dims: Sequence[int]) -> bytes:
    return b"".join(fbytes(2, fvarint(1, d)) for d in dims)


def entry(
    dtype: int = 1,
    shape: Sequence[int] = (4,),
    *,
    shard: int = 0,
    offset: int = 0,
    size: int | None = None,
    crc: int = 0,
    slices: Iterable[Sequence[tuple[int, int | None]]] = (),
    extra: bytes = b"",
) -> bytes:
    """A ``BundleEntryProto``; ``size`` defaults to float32 bytes of ``shape``."""
    if size is None:
        size = 4
        for d in shape:
            size *= d
    out = fvarint(1, dtype) + fbytes(2, shape_proto(shape)) + fvarint(3, shard)
    out += fvarint(4, offset) + fvarint(5, size) + ffixed32(6, mask(crc))
    for extents in slices:
        msgs = b""
        for start, length in extents:
            body = fvarint(1, start) + (b"" if length is None else fvarint(2, length))
            msgs += fbytes(1, body)
        out += fbytes(7, msgs)
    return out + extra


def header(num_shards: int = 1, endianness: int = 0, *, extra: bytes = b"") -> bytes:
    return fvarint(1, num_shards) + fvarint(2, endianness) + fbytes(3, fvarint(1, 1)) + extra


def _common_prefix(a: bytes, b: bytes) -> int:
    lo, hi = 0, min(len(a), len(b))  # binary search: byte compares run in C
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def block(items: Sequence[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    """One table block: prefix-compressed entries, restart array, restart count."""
    buf = bytearray()
    restarts = []
    last = b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(buf))
        else:
            shared = _common_prefix(key, last)
        buf += varint(shared) + varint(len(key) - shared) + varint(len(value))
        buf += key[shared:] + value
        last = key
    restarts = restarts or [0]
    buf += b"".join(r.to_bytes(4, "little") for r in restarts)
    return bytes(buf + len(restarts).to_bytes(4, "little"))


def trailer(contents: bytes, kind: int = 0) -> bytes:
    return bytes([kind]) + mask(crc32c(contents + bytes([kind]))).to_bytes(4, "little")


def table(
    items: Sequence[tuple[bytes, bytes]],
    *,
    per_block: int = 64,
    restart_interval: int = 16,
    data_blocks: Sequence[bytes] | None = None,
    index_items: Sequence[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """An SSTable with valid checksums; blocks of ``per_block`` entries.

    ``data_blocks``/``index_items`` replace the computed layout (for forging
    index blocks that point where they should not).
    """
    out = bytearray()

    def put(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + trailer(contents))
        return handle

    index = []
    if data_blocks is None:
        for i in range(0, len(items), per_block):
            chunk = items[i : i + per_block]
            index.append((chunk[-1][0], put(block(chunk, restart_interval))))
    else:
        for contents in data_blocks:
            put(contents)
    if index_items is not None:
        index = list(index_items)
    meta = put(block([]))
    index_handle = put(block(index, 1))
    out += (meta + index_handle).ljust(40, b"\0") + TABLE_MAGIC.to_bytes(8, "little")
    return bytes(out)


def write(prefix: str, index: bytes, shards: Sequence[bytes] = (b"",)) -> str:
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    for i, data in enumerate(shards):
        with open(f"{prefix}.data-{i:05d}-of-{len(shards):05d}", "wb") as f:
            f.write(data)
    with open(prefix + ".index", "wb") as f:
        f.write(index)
    return prefix


def bundle(
    prefix: str,
    entries: dict[bytes, bytes],
    shards: Sequence[bytes] = (bytes(64),),
    *,
    head: bytes | None = None,
    **table_options: int,
) -> str:
    """A checkpoint whose index holds ``entries`` (sorted) under a valid header."""
    head = header(len(shards)) if head is None else head
    items = [(b"", head)] + sorted(entries.items())
    return write(prefix, table(items, **table_options), shards)


def strings(items: Sequence[bytes]) -> tuple[bytes, int]:
    """A string tensor's bytes and its (unmasked) CRC, as TF writes them."""
    lengths = b"".join(varint(len(x)) for x in items)
    crc = 0
    for x in items:
        crc = crc32c(len(x).to_bytes(4, "little"), crc)
    checksum = mask(crc).to_bytes(4, "little")
    crc = crc32c(checksum, crc)
    body = b"".join(items)
    return lengths + checksum + body, crc32c(body, crc)


def object_graph(nodes: Sequence[dict]) -> bytes:
    """A ``TrackableObjectGraph``: each node {"children": [(id, name)],
    "attributes": [(name, full_name, key)], "slots": [(orig, name, slot)]}."""
    out = b""
    for node in nodes:
        body = b""
        for child, local in node.get("children", ()):
            body += fbytes(1, fvarint(1, child) + fbytes(2, local.encode()))
        for name, full, key in node.get("attributes", ()):
            body += fbytes(
                2, fbytes(1, name.encode()) + fbytes(2, full.encode()) + fbytes(3, key.encode())
            )
        for orig, name, slot in node.get("slots", ()):
            body += fbytes(3, fvarint(1, orig) + fbytes(2, name.encode()) + fvarint(3, slot))
        out += fbytes(1, body)
    return out


OBJECT_GRAPH_KEY = b"_CHECKPOINTABLE_OBJECT_GRAPH"


def with_graph(
    prefix: str, graph: bytes, entries: dict[bytes, bytes] | None = None, data: bytes = b""
) -> str:
    """A TF2-style checkpoint: ``graph`` stored as the object-graph string tensor."""
    raw, crc = strings([graph])
    entries = dict(entries or {})
    entries[OBJECT_GRAPH_KEY] = entry(7, (), offset=len(data), size=len(raw), crc=crc)
    return bundle(prefix, entries, [data + raw])
