"""Reading a TensorFlow tensor-bundle checkpoint (the "V2" format) without TensorFlow.

A checkpoint ``PREFIX`` is ``PREFIX.index`` (an SSTable mapping tensor names
to ``BundleEntryProto`` records, plus a ``BundleHeaderProto`` under the empty
key) and data shards ``PREFIX.data-00000-of-0000N`` holding the raw tensor
bytes. Every block of the index and every tensor carries a masked CRC-32C,
verified on each read; anything inconsistent raises :class:`CheckpointError`
naming the file and tensor.

>>> import numpy as np, tempfile, os
>>> from tfadam.checkpoint.writer import write_bundle
>>> prefix = os.path.join(tempfile.mkdtemp(), "ckpt")
>>> write_bundle(prefix, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
>>> with BundleReader(prefix) as reader:
...     reader.variable_to_shape_map(), reader.read_numpy("w")[1]
({'w': (2, 3)}, array([3., 4., 5.], dtype=float32))
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from .crc32c import crc32c, unmask
from .dtypes import DTYPES, STRING, UNSUPPORTED, DType
from .errors import CheckpointError
from .proto import (
    BundleEntry,
    BundleHeader,
    ObjectGraph,
    parse_entry,
    parse_header,
    parse_object_graph,
    read_varint,
)
from .slices import box, check_cover, slice_key
from .table import read_table

__all__ = ["OBJECT_GRAPH_KEY", "BundleReader", "TensorInfo", "resolve_prefix"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_BUNDLE_VERSION = 1  # kTensorBundleVersion: the format version this reader implements
_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


def _text_proto_string(text: str, field: str) -> str | None:
    # CheckpointState is a text proto; its strings are C-escaped.
    match = re.search(rf'^\s*{field}\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if match is None:
        return None
    raw = codecs.escape_decode(match.group(1).encode("utf-8"))[0]
    return raw.decode("utf-8")


def resolve_prefix(path: str | os.PathLike[str]) -> str:
    """The checkpoint prefix that ``path`` designates.

    ``path`` may be the prefix itself (``model.ckpt-100``), its ``.index`` or a
    ``.data-*`` file, or a directory with a ``checkpoint`` state file (the
    latest checkpoint is taken, as ``tf.train.latest_checkpoint`` does).

    >>> try:
    ...     resolve_prefix("/nonexistent/model.ckpt.index")
    ... except CheckpointError as err:
    ...     print(err.path, "--", err.detail)
    /nonexistent/model.ckpt.index -- no such file
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        latest = None
        if os.path.isfile(state):
            with open(state, encoding="utf-8", errors="replace") as f:
                latest = _text_proto_string(f.read(), "model_checkpoint_path")
        if latest is not None:
            path = latest if os.path.isabs(latest) else os.path.join(path, latest)
        else:
            found = sorted(n[: -len(".index")] for n in os.listdir(path) if n.endswith(".index"))
            if len(found) != 1:
                what = f"{len(found)} checkpoints: {found}" if found else "no .index file"
                raise CheckpointError(
                    f"directory has no 'checkpoint' state file and {what}",
                    path=path,
                    hint="Pass the prefix of the checkpoint to read",
                )
            path = os.path.join(path, found[0])
    if path.endswith(".index"):
        path = path[: -len(".index")]
    path = _DATA_SUFFIX.sub("", path)
    index = path + ".index"
    if not os.path.isfile(index):
        hint = (
            "Pass a checkpoint prefix (the path without .index), its .index file, "
            "or a directory holding a 'checkpoint' file"
        )
        if os.path.isfile(path):
            hint = (
                "This looks like a single-file checkpoint of TF1's old V1 format "
                "(SaverDef.V1), which this reader does not support; re-save it with "
                "tf.compat.v1.train.Saver() (V2, the default since TF 1.0)"
            )
        raise CheckpointError("no such file", path=index, hint=hint)
    return path


@dataclass(frozen=True)
class TensorInfo:
    """What the index says about one tensor.

    ``dtype`` is TensorFlow's name ("float32", "bfloat16", "string", ...);
    ``nbytes`` is its size in the data files (all slices for a partitioned one).
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    partitioned: bool


class BundleReader:
    """Random access to the tensors of one checkpoint; no TensorFlow needed.

    Use it as a context manager (or call :meth:`close`) to release the data
    files. Arrays come back as numpy (``read_numpy``: bfloat16 and float8 as
    their raw bits) or torch (``read_torch``: every numeric dtype, exact bits).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.prefix = resolve_prefix(path)
        self.index_path = self.prefix + ".index"
        self._files: dict[int, BinaryIO] = {}
        try:
            with open(self.index_path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise CheckpointError(f"cannot read: {err.strerror}", path=self.index_path) from None
        try:
            entries = read_table(data)
        except CheckpointError as err:
            raise err.located(path=self.index_path) from None
        if not entries or entries[0][0] != b"":
            raise CheckpointError(
                "the header entry (empty key) is missing: not a tensor bundle",
                path=self.index_path,
            )
        try:
            self.header: BundleHeader = parse_header(entries[0][1])
        except CheckpointError as err:
            raise err.located(path=self.index_path, key="<header>") from None
        self._check_header()
        self._raw: dict[bytes, memoryview] = dict(entries[1:])
        self._entries: dict[bytes, BundleEntry] = {}
        self._object_graph: ObjectGraph | None = None
        # Slice entries are an implementation detail of partitioned tensors;
        # TF's reader hides them, and so does this one. Their keys are
        # OrderedCode strings starting with a zero byte, which no tensor name
        # does; recognising them by that keeps opening lazy (no entry parsed).
        self._names: list[str] = []
        for raw_key in self._raw:
            if raw_key.startswith(b"\x00"):
                continue
            try:
                self._names.append(raw_key.decode("utf-8"))
            except UnicodeDecodeError:
                raise CheckpointError(
                    f"key {raw_key!r} is not valid UTF-8: the index is damaged",
                    path=self.index_path,
                ) from None
        self._name_set = frozenset(self._names)

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Close the data files (the reader reopens them if used again)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        for f in getattr(self, "_files", {}).values():
            f.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BundleReader({self.prefix!r}, {len(self._names)} tensors)"

    # -- metadata -----------------------------------------------------------

    def _check_header(self) -> None:
        h = self.header
        where = {"path": self.index_path, "key": "<header>"}
        if not 1 <= h.num_shards <= 99999:
            raise CheckpointError(f"invalid number of data shards {h.num_shards}", **where)
        if h.endianness not in (0, 1):
            raise CheckpointError(f"invalid endianness {h.endianness}", **where)
        if h.min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in h.bad_consumers:
            raise CheckpointError(
                f"format version {h.producer} needs a reader of version >= {h.min_consumer}; "
                f"this one implements version {_BUNDLE_VERSION}",
                hint="Re-save the checkpoint with an older TensorFlow, or upgrade tfadam",
                **where,
            )

    def keys(self) -> list[str]:
        """Tensor names, sorted, as ``tf.train.load_checkpoint`` lists them."""
        return list(self._names)

    def __contains__(self, key: object) -> bool:
        return key in self._name_set

    def __len__(self) -> int:
        return len(self._names)

    def entry(self, key: str) -> BundleEntry:
        """The decoded ``BundleEntryProto`` of tensor ``key``."""
        if key not in self._name_set:
            raise self._missing(key)
        return self._entry(key.encode("utf-8"))

    def _entry(self, raw_key: bytes) -> BundleEntry:
        entry = self._entries.get(raw_key)
        if entry is None:
            name = raw_key.decode("utf-8", "backslashreplace")
            raw = self._raw.get(raw_key)
            if raw is None:
                raise self._missing(name)
            try:
                entry = parse_entry(raw)
            except CheckpointError as err:
                raise err.located(path=self.index_path, key=name) from None
            if any(d < 0 for d in entry.shape):
                raise CheckpointError(
                    f"invalid shape {entry.shape}", path=self.index_path, key=name
                )
            self._entries[raw_key] = entry
        return entry

    def _missing(self, key: str) -> CheckpointError:
        close = difflib.get_close_matches(key, self._names, n=3, cutoff=0.6)
        hint = f"Did you mean {', '.join(map(repr, close))}?" if close else None
        return CheckpointError(
            f"no such tensor in this checkpoint ({len(self._names)} tensors)",
            path=self.index_path,
            key=key,
            hint=hint,
        )

    def _dtype(self, key: str, entry: BundleEntry) -> DType:
        dtype = DTYPES.get(entry.dtype)
        if dtype is None:
            reason = UNSUPPORTED.get(entry.dtype, "unknown to this reader")
            raise CheckpointError(
                f"dtype enum {entry.dtype} is not supported ({reason})",
                path=self.index_path,
                key=key,
            )
        return dtype

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape and size of one tensor, without reading its data."""
        entry = self.entry(key)
        dtype = DTYPES.get(entry.dtype)
        name = dtype.name if dtype else f"DT_{entry.dtype}"
        nbytes = entry.size
        if entry.slices:
            nbytes = 0
            for extents in entry.slices:
                part = self._raw.get(slice_key(key, extents))
                if part is not None:
                    try:
                        nbytes += parse_entry(part).size
                    except CheckpointError:
                        pass  # reported when the tensor is read
        return TensorInfo(key, name, entry.shape, nbytes, bool(entry.slices))

    def variable_to_shape_map(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}``, as TF's ``CheckpointReader`` (shapes as tuples)."""
        return {k: self.entry(k).shape for k in self._names}

    def variable_to_dtype_map(self) -> dict[str, str]:
        """``{name: TensorFlow dtype name}``."""
        return {k: self.info(k).dtype for k in self._names}

    @property
    def object_graph(self) -> ObjectGraph | None:
        """TF2's object graph (``tf.train.Checkpoint``), or None for a TF1 checkpoint."""
        if self._object_graph is None and OBJECT_GRAPH_KEY in self._name_set:
            raw = self.read_numpy(OBJECT_GRAPH_KEY)
            if raw.dtype != object or raw.size != 1:
                raise CheckpointError(
                    "expected a scalar string", path=self.index_path, key=OBJECT_GRAPH_KEY
                )
            try:
                self._object_graph = parse_object_graph(raw.item())
            except CheckpointError as err:
                raise err.located(path=self.index_path, key=OBJECT_GRAPH_KEY) from None
        return self._object_graph

    # -- data ---------------------------------------------------------------

    def data_path(self, shard: int) -> str:
        """File name of data shard ``shard``."""
        return f"{self.prefix}.data-{shard:05d}-of-{self.header.num_shards:05d}"

    def _file(self, shard: int, key: str) -> BinaryIO:
        f = self._files.get(shard)
        if f is None:
            path = self.data_path(shard)
            try:
                f = open(path, "rb")  # kept open across reads; closed by close()
            except FileNotFoundError:
                raise CheckpointError(
                    f"data shard {shard} of {self.header.num_shards} is missing",
                    path=path,
                    key=key,
                    hint="Copy every file of the checkpoint: the .index and all .data-* shards",
                ) from None
            except OSError as err:
                raise CheckpointError(f"cannot read: {err.strerror}", path=path, key=key) from None
            self._files[shard] = f
        return f

    def _check_range(self, key: str, entry: BundleEntry) -> None:
        """The entry's bytes lie inside an existing data file."""
        if not 0 <= entry.shard_id < self.header.num_shards:
            raise CheckpointError(
                f"shard id {entry.shard_id} out of range (the header says "
                f"{self.header.num_shards} shards)",
                path=self.index_path,
                key=key,
            )
        if entry.offset < 0 or entry.size < 0:
            raise CheckpointError(
                f"invalid byte range offset={entry.offset} size={entry.size}",
                path=self.index_path,
                key=key,
            )
        f = self._file(entry.shard_id, key)
        file_size = os.fstat(f.fileno()).st_size
        if entry.offset + entry.size > file_size:
            raise CheckpointError(
                f"bytes [{entry.offset}, {entry.offset + entry.size}) lie past the end of "
                f"the file ({file_size} bytes): the data file is truncated",
                path=self.data_path(entry.shard_id),
                key=key,
                hint="Copy the checkpoint again, completely",
            )

    def _read_bytes(self, key: str, entry: BundleEntry) -> tuple[np.ndarray, str]:
        self._check_range(key, entry)
        f = self._file(entry.shard_id, key)
        path = self.data_path(entry.shard_id)
        buf = np.empty(entry.size, dtype=np.uint8)
        f.seek(entry.offset)
        got = f.readinto(memoryview(buf))
        if got != entry.size:
            raise CheckpointError(f"short read ({got} of {entry.size} bytes)", path=path, key=key)
        return buf, path

    def _checksum_error(self, key: str, path: str, stored: int, actual: int) -> CheckpointError:
        return CheckpointError(
            f"checksum mismatch (stored {stored:#010x}, computed {actual:#010x}): "
            "the data file is damaged",
            path=path,
            key=key,
            hint="Copy the checkpoint again or use an earlier one",
        )

    def _read_entry(self, key: str, entry: BundleEntry) -> np.ndarray:
        dtype = self._dtype(key, entry)
        count = 1
        for dim in entry.shape:
            count *= dim
        if dtype.enum == STRING:
            return self._read_strings(key, entry, count)
        if entry.size != count * dtype.itemsize:
            raise CheckpointError(
                f"size {entry.size} bytes does not match shape {entry.shape} of "
                f"{dtype.name} ({count * dtype.itemsize} bytes)",
                path=self.index_path,
                key=key,
            )
        buf, path = self._read_bytes(key, entry)
        # TF checksums the bytes as they lie in the file, before any byte swap.
        actual = crc32c(buf)
        if actual != unmask(entry.crc32c):
            raise self._checksum_error(key, path, unmask(entry.crc32c), actual)
        storage = dtype.storage
        assert storage is not None
        if self.header.endianness == 1:
            arr = buf.view(storage.newbyteorder(">")).astype(storage)
        else:
            arr = buf.view(storage)
        if dtype.name == "bool" and arr.size and buf.max() > 1:
            raise CheckpointError("bool tensor holds bytes other than 0 and 1", path=path, key=key)
        return arr.reshape(entry.shape)

    def _read_strings(self, key: str, entry: BundleEntry, count: int) -> np.ndarray:
        # [varint64 len]*count [masked crc of the lengths] [bytes]*count; the
        # lengths are checksummed as little-endian uint32 (uint64 when large).
        if count > entry.size - (4 if count else 0):
            # every string needs at least a one-byte length, plus the checksum:
            # refuse before allocating for an absurd element count
            raise CheckpointError(
                f"{count} strings cannot fit in {entry.size} bytes",
                path=self.index_path,
                key=key,
            )
        out = np.empty(count, dtype=object)
        if count == 0:
            return out.reshape(entry.shape)
        buf, path = self._read_bytes(key, entry)
        data = memoryview(buf)
        byteorder = "big" if self.header.endianness == 1 else "little"
        lengths = []
        pos = 0
        crc = 0
        try:
            for _ in range(count):
                length, pos = read_varint(data, pos)
                lengths.append(length)
                width = 4 if length <= 0xFFFFFFFF else 8
                crc = crc32c(length.to_bytes(width, byteorder), crc)
        except (CheckpointError, OverflowError):
            raise CheckpointError(
                "malformed string lengths: the data file is damaged", path=path, key=key
            ) from None
        if pos + 4 > len(data):
            raise CheckpointError("string tensor truncated", path=path, key=key)
        raw_checksum = bytes(data[pos : pos + 4])
        stored_lengths_crc = unmask(int.from_bytes(raw_checksum, byteorder))
        if stored_lengths_crc != crc:
            raise self._checksum_error(key, path, stored_lengths_crc, crc)
        crc = crc32c(raw_checksum, crc)
        pos += 4
        if pos + sum(lengths) != len(data):
            raise CheckpointError(
                f"string lengths add up to {pos + sum(lengths)} bytes, entry says {len(data)}",
                path=path,
                key=key,
            )
        for i, length in enumerate(lengths):
            out[i] = bytes(data[pos : pos + length])
            pos += length
        crc = crc32c(data[pos - sum(lengths) : pos], crc)
        if crc != unmask(entry.crc32c):
            raise self._checksum_error(key, path, unmask(entry.crc32c), crc)
        return out.reshape(entry.shape)

    def _read_partitioned(self, key: str, entry: BundleEntry) -> np.ndarray:
        dtype = self._dtype(key, entry)
        if dtype.storage is None:
            raise CheckpointError(
                "partitioned string tensors are not supported", path=self.index_path, key=key
            )
        # Check the whole layout before allocating the full tensor: its size
        # is then bounded by slices that were checked to fit in the files.
        parts = []
        for extents in entry.slices:
            try:
                b = box(extents, entry.shape)
            except CheckpointError as err:
                raise err.located(path=self.index_path, key=key) from None
            part_key = slice_key(key, extents)
            if part_key not in self._raw:
                raise CheckpointError(
                    f"slice {[f'{a}:{z}' for a, z in b]} is missing from the index",
                    path=self.index_path,
                    key=key,
                )
            part = self._entry(part_key)
            want = tuple(z - a for a, z in b)
            if part.slices or part.dtype != entry.dtype or part.shape != want:
                raise CheckpointError(
                    f"slice entry has dtype {part.dtype} shape {part.shape}, "
                    f"expected dtype {entry.dtype} shape {want}",
                    path=self.index_path,
                    key=key,
                )
            parts.append((b, part))
        try:
            check_cover([b for b, _ in parts], entry.shape)
        except CheckpointError as err:
            raise err.located(path=self.index_path, key=key) from None
        for _, part in parts:
            self._check_range(key, part)
        out = np.empty(entry.shape, dtype=dtype.storage.newbyteorder("="))
        for b, part in parts:
            try:
                out[tuple(slice(a, z) for a, z in b)] = self._read_entry(key, part)
            except CheckpointError as err:
                raise err.located(key=key) from None
        return out

    def read_numpy(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a numpy array, checksum verified.

        Strings come back as an object array of ``bytes``; bfloat16 and float8
        as their raw bits (uint16 / uint8), since numpy has no such types.
        """
        entry = self.entry(key)
        if entry.slices:
            return self._read_partitioned(key, entry)
        return self._read_entry(key, entry)

    def read_torch(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a CPU torch tensor with the exact stored bits."""
        arr = self.read_numpy(key)
        dtype = DTYPES[self.entry(key).dtype]
        if dtype.torch is None:
            raise CheckpointError(
                f"{dtype.name} tensors have no torch equivalent",
                path=self.index_path,
                key=key,
                hint="Use read_numpy() for it",
            )
        # (np.ascontiguousarray would turn a 0-dim array into a 1-dim one)
        tensor = torch.from_numpy(arr if arr.flags.c_contiguous else arr.copy())
        if tensor.dtype != dtype.torch:
            tensor = tensor.view(dtype.torch)  # same width: reinterpret the bits
        return tensor

    def verify(self) -> None:
        """Read every tensor once, checking every checksum; raise on the first fault."""
        for key in self._names:
            self.read_numpy(key)
