"""The ``.index`` file: a LevelDB-style sorted string table (SSTable).

Layout (TensorFlow's ``core/lib/io/table_format.txt``)::

    [data block 0] ... [data block N-1] [metaindex block] [index block] [footer]

* Every block is followed by a 5-byte trailer: a compression type byte
  (0 = none; TensorFlow writes bundle indexes uncompressed) and the masked
  CRC-32C of the block contents *plus* that type byte.
* A block is a run of prefix-compressed entries
  ``varint32 shared | varint32 non_shared | varint32 value_len | key delta | value``,
  then ``uint32`` restart offsets (entries stored with ``shared == 0``), then
  ``uint32`` number of restarts.
* The index block maps a separator key (>= every key of a data block, < every
  key of the next) to that block's handle ``varint64 offset | varint64 size``.
* The 48-byte footer holds the metaindex and index handles, zero padding up to
  40 bytes, and the magic number 0xdb4775248b80fb57 (little-endian).

Everything is verified: checksums, bounds, restart points, key order.

>>> try:
...     read_table(b"not a table")
... except CheckpointError as err:
...     print(err)
file of 11 bytes is too short to be a table (a table ends with a 48-byte footer)
"""

from __future__ import annotations

from .crc32c import crc32c, unmask
from .errors import CheckpointError
from .proto import read_varint

__all__ = ["TABLE_MAGIC", "read_table"]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
_TRAILER_SIZE = 5
# TensorFlow's table builder restarts prefix compression every 16 keys, so its
# keys add up to at most 16 times the file; a forged chain of shared prefixes
# (one 64 KiB key extended 50,000 times) would expand to gigabytes.
_KEY_EXPANSION = 32
_NO_COMPRESSION, _SNAPPY = 0, 1


def _handle(buf: bytes | memoryview, pos: int, what: str) -> tuple[int, int, int]:
    try:
        offset, pos = read_varint(buf, pos)
        size, pos = read_varint(buf, pos)
    except CheckpointError:
        raise CheckpointError(f"{what}: malformed block handle") from None
    return offset, size, pos


def _block(data: bytes, offset: int, size: int, what: str) -> memoryview:
    """The contents of one block, after checking its trailer."""
    end = offset + size + _TRAILER_SIZE
    if offset < 0 or end > len(data) - FOOTER_SIZE:
        raise CheckpointError(
            f"{what} at bytes [{offset}, {end}) lies outside the file "
            f"({len(data)} bytes): the file is truncated or damaged"
        )
    view = memoryview(data)
    stored = unmask(int.from_bytes(data[offset + size + 1 : end], "little"))
    actual = crc32c(view[offset : offset + size + 1])
    if stored != actual:
        raise CheckpointError(
            f"{what} at byte {offset}: checksum mismatch "
            f"(stored {stored:#010x}, computed {actual:#010x}): the file is damaged"
        )
    kind = data[offset + size]
    if kind == _SNAPPY:
        raise CheckpointError(
            f"{what} is Snappy-compressed, which this reader does not support",
            hint="Re-save the checkpoint with TensorFlow >= 1.2 (it writes uncompressed indexes)",
        )
    if kind != _NO_COMPRESSION:
        raise CheckpointError(f"{what}: unknown block type {kind}: the file is damaged")
    return view[offset : offset + size]


def _entries(block: memoryview, what: str, budget: list[int]) -> list[tuple[bytes, bytes]]:
    """Decode a block's prefix-compressed entries, checking restarts and key order.

    ``budget[0]``: how many more key bytes the table may expand to (shared
    prefixes are stored once but copied into every key).
    """
    data = bytes(block)  # indexing and slicing bytes is several times faster
    n = len(data)
    if n < 4:
        raise CheckpointError(f"{what}: block of {n} bytes is too short")
    num_restarts = int.from_bytes(data[n - 4 :], "little")
    limit = n - 4 * (num_restarts + 1)
    if num_restarts == 0 or limit < 0:
        raise CheckpointError(f"{what}: bad restart count {num_restarts}")
    restarts = [
        int.from_bytes(data[limit + 4 * i : limit + 4 * i + 4], "little")
        for i in range(num_restarts)
    ]
    entries: list[tuple[bytes, bytes]] = []
    unshared_starts = set()
    key = b""
    pos = start = 0
    left = budget[0]
    try:
        while pos < limit:
            start = pos
            # three varints, one byte each in practice: that case inline
            shared = data[pos]
            if shared < 0x80:
                pos += 1
            else:
                shared, pos = read_varint(data, pos)
            non_shared = data[pos]
            if non_shared < 0x80:
                pos += 1
            else:
                non_shared, pos = read_varint(data, pos)
            value_len = data[pos]
            if value_len < 0x80:
                pos += 1
            else:
                value_len, pos = read_varint(data, pos)
            if shared > len(key) or pos + non_shared + value_len > limit:
                raise CheckpointError(f"{what}: corrupted entry at byte {start}")
            if shared == 0:
                unshared_starts.add(start)
            left -= shared + non_shared
            if left < 0:
                raise CheckpointError(
                    f"{what}: keys expand to more than {_KEY_EXPANSION} times the size of "
                    "the file (a forged chain of shared prefixes)"
                )
            new_key = key[:shared] + data[pos : pos + non_shared]
            if entries and new_key <= key:
                raise CheckpointError(f"{what}: keys out of order")
            key = new_key
            pos += non_shared
            entries.append((key, data[pos : pos + value_len]))
            pos += value_len
    except CheckpointError as err:
        if err.detail.startswith(what):
            raise
        raise CheckpointError(f"{what}: corrupted entry ({err.detail})") from None
    except IndexError:  # a varint's first byte lies past the entries
        raise CheckpointError(f"{what}: corrupted entry at byte {start}") from None
    budget[0] = left
    if limit > 0 and any(r not in unshared_starts for r in restarts):
        raise CheckpointError(f"{what}: restart points do not match the entries")
    return entries


def read_table(data: bytes) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable, in key order.

    Raises :class:`CheckpointError` (without a file name: the caller adds it)
    if anything is inconsistent.
    """
    size = len(data)
    if size < FOOTER_SIZE:
        raise CheckpointError(
            f"file of {size} bytes is too short to be a table "
            f"(a table ends with a {FOOTER_SIZE}-byte footer)"
        )
    footer = memoryview(data)[size - FOOTER_SIZE :]
    magic = int.from_bytes(footer[FOOTER_SIZE - 8 :], "little")
    if magic != TABLE_MAGIC:
        raise CheckpointError(
            f"bad magic number {magic:#018x} (expected {TABLE_MAGIC:#018x}): "
            "not a TensorFlow checkpoint index, or truncated"
        )
    meta_off, meta_size, pos = _handle(footer, 0, "footer")
    index_off, index_size, pos = _handle(footer, pos, "footer")
    if pos > FOOTER_SIZE - 8:
        raise CheckpointError("footer: block handles overrun the footer")
    budget = [_KEY_EXPANSION * size]
    _block(data, meta_off, meta_size, "metaindex block")  # checked, then unused
    index = _entries(_block(data, index_off, index_size, "index block"), "index block", budget)
    out: list[tuple[bytes, bytes]] = []
    prev_separator = None
    next_free = 0  # data blocks follow each other: none is decoded twice
    for separator, handle in index:
        if prev_separator is not None and separator <= prev_separator:
            raise CheckpointError("index block: keys out of order")
        prev_separator = separator
        offset, bsize, end = _handle(handle, 0, "index block")
        if end != len(handle):
            raise CheckpointError("index block: malformed block handle")
        what = f"data block at byte {offset}"
        if offset < next_free:
            raise CheckpointError(
                f"{what} overlaps the block before it: the index block is damaged"
            )
        next_free = offset + bsize + _TRAILER_SIZE
        block = _entries(_block(data, offset, bsize, what), what, budget)
        # in order within the block (checked there), after the previous block,
        # and not after the separator the index gives for this one
        if block and ((out and block[0][0] <= out[-1][0]) or block[-1][0] > separator):
            raise CheckpointError(f"{what}: keys out of order")
        out += block
    return out
