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
import itertools
import os
import re
import stat
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
from .slices import box, check_cover, check_volumes, slice_keys
from .table import read_table

__all__ = ["OBJECT_GRAPH_KEY", "BundleReader", "TensorInfo", "open_regular", "resolve_prefix"]

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_BUNDLE_VERSION = 1  # kTensorBundleVersion: the format version this reader implements
_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
# numpy's limit on dimensions (NPY_MAXDIMS): 64 since numpy 2, 32 before
_NUMPY_MAX_RANK = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
_MAX_ARRAY_BYTES = (1 << 63) - 1


def open_regular(path: str, *, key: str | None = None) -> BinaryIO:
    """``path`` opened for reading, refused unless it is a regular file.

    A FIFO would block the open (or the reads) forever, a device such as
    ``/dev/zero`` would feed endless bytes: a checkpoint names only regular
    files. ``O_NONBLOCK`` keeps the open itself from waiting on a FIFO.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise CheckpointError(f"cannot read: {err.strerror}", path=path, key=key) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(
                "not a regular file (a checkpoint's files are plain files)", path=path, key=key
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _text_proto_string(text: str, field: str, path: str) -> str | None:
    # CheckpointState is a text proto; its strings are C-escaped. Line by line:
    # a pattern spanning lines (^\s* under MULTILINE) rescans every line.
    pattern = re.compile(rf'[ \t]*{field}[ \t]*:[ \t]*"((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        match = pattern.match(line)
        if match is not None:
            break
    else:
        return None
    try:
        raw = codecs.escape_decode(match.group(1).encode("utf-8"))[0]
    except ValueError as err:
        raise CheckpointError(
            f"malformed {field} ({err}): the state file is damaged",
            path=path,
            hint="Pass the checkpoint prefix instead of its directory",
        ) from None
    # a file name is bytes: keep undecodable ones as the OS does (surrogateescape)
    return os.fsdecode(raw)


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
            with open_regular(state) as f:
                text = f.read().decode("utf-8", errors="replace")
            latest = _text_proto_string(text, "model_checkpoint_path", state)
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
        with open_regular(self.index_path) as f:
            try:
                data = f.read()
            except OSError as err:
                raise CheckpointError(
                    f"cannot read: {err.strerror}", path=self.index_path
                ) from None
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
        self._raw: dict[bytes, bytes] = dict(entries[1:])
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
            raise self.missing_key_error(key)
        return self._entry(key.encode("utf-8"))

    def _entry(self, raw_key: bytes) -> BundleEntry:
        entry = self._entries.get(raw_key)
        if entry is None:
            name = raw_key.decode("utf-8", "backslashreplace")
            raw = self._raw.get(raw_key)
            if raw is None:
                raise self.missing_key_error(name)
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

    def missing_key_error(self, key: str) -> CheckpointError:
        """The error for ``key`` absent from this checkpoint, naming the closest keys."""
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
            for part_key in set(slice_keys(key, entry.slices)):
                if part_key in self._raw:
                    try:
                        nbytes += self._entry(part_key).size
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
            if not os.path.lexists(path):
                raise CheckpointError(
                    f"data shard {shard} of {self.header.num_shards} is missing",
                    path=path,
                    key=key,
                    hint="Copy every file of the checkpoint: the .index and all .data-* shards",
                )
            f = open_regular(path, key=key)  # kept open across reads; closed by close()
            self._files[shard] = f
        return f

    def _check_shape(self, key: str, shape: tuple[int, ...], itemsize: int) -> int:
        """The element count of ``shape``, refused where numpy could not hold it."""
        if len(shape) > _NUMPY_MAX_RANK:
            raise CheckpointError(
                f"rank {len(shape)} exceeds the {_NUMPY_MAX_RANK} dimensions numpy supports",
                path=self.index_path,
                key=key,
                hint="TensorFlow allows up to 254; this reader cannot hold such a tensor",
            )
        count, extent = 1, max(itemsize, 1)
        for dim in shape:
            count *= dim
            extent *= dim or 1  # numpy refuses these even when a dimension is 0
        if extent > _MAX_ARRAY_BYTES:
            raise CheckpointError(
                f"shape {list(shape)} is too large for an array", path=self.index_path, key=key
            )
        return count

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

    def _check_disjoint(self, ranges: list[tuple[str, BundleEntry]]) -> None:
        """The entries' bytes lie in their files and no two share a byte.

        TensorFlow writes every tensor (and every slice) to bytes of its own;
        entries sharing bytes are forged, and would let a small file expand
        into any number of copies of itself.
        """
        spans = []
        for key, entry in ranges:
            self._check_range(key, entry)
            if entry.size:
                spans.append((entry.shard_id, entry.offset, entry.offset + entry.size, key))
        spans.sort()
        for (shard, _, stop, first), (shard2, start, _, second) in itertools.pairwise(spans):
            if shard == shard2 and start < stop:
                what = "two of its slices" if first == second else f"it and tensor {first!r}"
                raise CheckpointError(
                    f"{what} share bytes [{start}, {stop}) of the data file "
                    "(TensorFlow gives every tensor and slice bytes of its own): the index "
                    "is forged or damaged",
                    path=self.data_path(shard),
                    key=second,
                )

    def check_layout(self, keys: list[str]) -> None:
        """Check, before reading, that ``keys`` lie in the data files without sharing bytes.

        Reading them all then holds at most the size of the data files.
        """
        ranges = []
        for key in keys:
            entry = self.entry(key)
            if entry.slices:
                ranges += [(key, part) for _, part in self._slice_parts(key, entry)]
            else:
                ranges.append((key, entry))
        self._check_disjoint(ranges)

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
        if dtype.enum == STRING:
            return self._read_strings(key, entry, self._check_shape(key, entry.shape, 8))
        count = self._check_shape(key, entry.shape, dtype.itemsize)
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
        if count == 0:
            return np.empty(entry.shape, dtype=object)
        # the bytes must exist before `count` objects are allocated for them
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
        out = np.empty(count, dtype=object)
        for i, length in enumerate(lengths):
            out[i] = bytes(data[pos : pos + length])
            pos += length
        crc = crc32c(data[pos - sum(lengths) : pos], crc)
        if crc != unmask(entry.crc32c):
            raise self._checksum_error(key, path, unmask(entry.crc32c), crc)
        return out.reshape(entry.shape)

    def _slice_parts(
        self, key: str, entry: BundleEntry
    ) -> list[tuple[tuple[tuple[int, int], ...], BundleEntry]]:
        """Each slice's box in the full tensor and its entry, checked against the whole."""
        dtype = self._dtype(key, entry)
        if dtype.storage is None:
            raise CheckpointError(
                "partitioned string tensors are not supported", path=self.index_path, key=key
            )
        self._check_shape(key, entry.shape, dtype.itemsize)
        parts = []
        seen = set()
        for extents, part_key in zip(entry.slices, slice_keys(key, entry.slices), strict=True):
            try:
                b = box(extents, entry.shape)
            except CheckpointError as err:
                raise err.located(path=self.index_path, key=key) from None
            if b in seen:  # TF lists each slice once
                raise CheckpointError(
                    f"slice {[f'{a}:{z}' for a, z in b]} is listed twice",
                    path=self.index_path,
                    key=key,
                )
            seen.add(b)
            if part_key not in self._raw:
                raise CheckpointError(
                    f"slice {[f'{a}:{z}' for a, z in b]} is missing from the index",
                    path=self.index_path,
                    key=key,
                )
            part = self._entry(part_key)
            want = tuple(z - a for a, z in b)
            count = 1
            for dim in want:
                count *= dim
            if part.slices or part.dtype != entry.dtype or part.shape != want:
                raise CheckpointError(
                    f"slice entry has dtype {part.dtype} shape {part.shape}, "
                    f"expected dtype {entry.dtype} shape {want}",
                    path=self.index_path,
                    key=key,
                )
            if part.size != count * dtype.itemsize:
                raise CheckpointError(
                    f"slice {[f'{a}:{z}' for a, z in b]} has {part.size} bytes, its shape "
                    f"{list(want)} of {dtype.name} needs {count * dtype.itemsize}",
                    path=self.index_path,
                    key=key,
                )
            parts.append((b, part))
        # Sizes match volumes and the bytes exist, once each: the volumes add
        # up to at most the data files, which bounds the cover check's work.
        try:
            check_volumes([b for b, _ in parts], entry.shape)
        except CheckpointError as err:
            raise err.located(path=self.index_path, key=key) from None
        self._check_disjoint([(key, part) for _, part in parts])
        try:
            check_cover([b for b, _ in parts], entry.shape)
        except CheckpointError as err:
            raise err.located(path=self.index_path, key=key) from None
        return parts

    def _read_partitioned(self, key: str, entry: BundleEntry) -> np.ndarray:
        # Check the whole layout before allocating the full tensor: the slices
        # tile it exactly and lie in the files without sharing bytes, so its
        # size is bounded by the data files.
        parts = self._slice_parts(key, entry)
        storage = self._dtype(key, entry).storage
        assert storage is not None
        out = np.empty(entry.shape, dtype=storage.newbyteorder("="))
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
