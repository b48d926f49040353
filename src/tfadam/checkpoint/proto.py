"""Just enough protocol-buffer decoding for the checkpoint's messages.

No protobuf dependency: the handful of messages a tensor bundle holds
(``BundleHeaderProto``, ``BundleEntryProto`` with its ``TensorShapeProto`` and
``TensorSliceProto``, and TF2's ``TrackableObjectGraph``) are decoded from the
wire format by a small schema-driven reader. Field numbers are those of
TensorFlow's ``.proto`` files. Unknown fields are skipped, as protobuf does,
so newer writers stay readable; malformed bytes raise :class:`CheckpointError`.

>>> read_varint(b"\\xac\\x02", 0)
(300, 2)
>>> parse_entry(b"\\x08\\x01\\x12\\x04\\x12\\x02\\x08\\x03").shape
(3,)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

__all__ = [
    "BundleEntry",
    "BundleHeader",
    "ObjectGraph",
    "ObjectNode",
    "parse_entry",
    "parse_header",
    "parse_object_graph",
    "read_varint",
]

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, next position)."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise CheckpointError("truncated varint in a protocol buffer")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise CheckpointError("varint longer than 10 bytes in a protocol buffer")


def _signed(value: int, bits: int) -> int:
    # int32 and int64 fields are sign-extended to 64 bits on the wire.
    value &= (1 << 64) - 1
    if value >= 1 << 63:
        value -= 1 << 64
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if not lo <= value <= hi:
        raise CheckpointError(f"int{bits} field out of range: {value}")
    return value


# A schema maps field number -> (attribute name, kind, repeated).
# kinds: "int32", "int64", "bool", "fixed32", "string", "bytes", or a schema.
Schema = dict[int, tuple[str, Any, bool]]


_REPEATED: dict[int, tuple[str, ...]] = {}


def _decode(buf: bytes | memoryview, schema: Schema, what: str) -> dict[str, Any]:
    repeated_names = _REPEATED.get(id(schema))
    if repeated_names is None:
        repeated_names = tuple(name for name, _, rep in schema.values() if rep)
        _REPEATED[id(schema)] = repeated_names
    out: dict[str, Any] = {name: [] for name in repeated_names}
    pos = 0
    end = len(buf)
    while pos < end:
        # one-byte varints (tags, small values) inline: the common case by far
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise CheckpointError(f"{what}: field number 0 is invalid")
        if wire == _VARINT:
            if pos < end and buf[pos] < 0x80:
                value = buf[pos]
                pos += 1
            else:
                value, pos = read_varint(buf, pos)
        elif wire == _LENGTH:
            if pos < end and buf[pos] < 0x80:
                length = buf[pos]
                pos += 1
            else:
                length, pos = read_varint(buf, pos)
            if pos + length > end:
                raise CheckpointError(f"{what}: field {number} runs past the end of the message")
            value = buf[pos : pos + length]
            pos += length
        elif wire == _FIXED64:
            if pos + 8 > end:
                raise CheckpointError(f"{what}: truncated 64-bit field {number}")
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == _FIXED32:
            if pos + 4 > end:
                raise CheckpointError(f"{what}: truncated 32-bit field {number}")
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise CheckpointError(f"{what}: unsupported wire type {wire} (field {number})")
        spec = schema.get(number)
        if spec is None:
            continue
        name, kind, repeated = spec
        if wire == _VARINT and (kind == "int32" or kind == "int64") and value < 0x80000000:
            values = [value]  # a non-negative int32/int64: nothing to convert
        else:
            values = _convert(value, wire, kind, what, name, packed_ok=repeated)
        if repeated:
            out[name].extend(values)
        elif isinstance(kind, dict) and name in out:
            out[name] = _merge(out[name], values[-1])  # protobuf merges a repeated message
        else:
            out[name] = values[-1]  # and keeps the last of a repeated scalar
    return out


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    # In place: a message repeated n times must cost n merges, not n copies of
    # its growing lists (a field repeated 100,000 times would be quadratic).
    # ``old`` is always a dict this decoder just built, owned by no one else.
    for name, value in new.items():
        if isinstance(value, list):
            old.setdefault(name, []).extend(value)
        elif isinstance(value, dict) and isinstance(old.get(name), dict):
            _merge(old[name], value)
        else:
            old[name] = value
    return old


def _convert(
    value: Any, wire: int, kind: Any, message: str, name: str, packed_ok: bool
) -> list[Any]:
    what = f"{message}.{name}"
    if isinstance(kind, dict):
        if wire != _LENGTH:
            raise CheckpointError(f"{what}: expected a message, got wire type {wire}")
        return [_decode(value, kind, what)]
    if kind in ("string", "bytes"):
        if wire != _LENGTH:
            raise CheckpointError(f"{what}: expected a string, got wire type {wire}")
        if kind == "bytes":
            return [bytes(value)]
        try:
            return [bytes(value).decode("utf-8")]
        except UnicodeDecodeError:
            raise CheckpointError(f"{what}: string is not valid UTF-8") from None
    if kind == "fixed32":
        if wire != _FIXED32:
            raise CheckpointError(f"{what}: expected fixed32, got wire type {wire}")
        return [value]
    # integer kinds: a varint, or (repeated, proto3 default) a packed run of them
    if wire == _LENGTH and packed_ok:
        items, pos = [], 0
        while pos < len(value):
            item, pos = read_varint(value, pos)
            items.append(item)
    elif wire == _VARINT:
        items = [value]
    else:
        raise CheckpointError(f"{what}: expected an integer, got wire type {wire}")
    if kind == "int32":
        return [_signed(v, 32) for v in items]
    if kind == "int64":
        return [_signed(v, 64) for v in items]
    if kind == "bool":
        return [bool(v) for v in items]
    raise AssertionError(kind)  # pragma: no cover - schema typo


_VERSION: Schema = {
    1: ("producer", "int32", False),
    2: ("min_consumer", "int32", False),
    3: ("bad_consumers", "int32", True),
}
_HEADER: Schema = {
    1: ("num_shards", "int32", False),
    2: ("endianness", "int32", False),
    3: ("version", _VERSION, False),
}
_DIM: Schema = {1: ("size", "int64", False), 2: ("name", "string", False)}
_SHAPE: Schema = {2: ("dim", _DIM, True), 3: ("unknown_rank", "bool", False)}
_EXTENT: Schema = {1: ("start", "int64", False), 2: ("length", "int64", False)}
_SLICE: Schema = {1: ("extent", _EXTENT, True)}
_ENTRY: Schema = {
    1: ("dtype", "int32", False),
    2: ("shape", _SHAPE, False),
    3: ("shard_id", "int32", False),
    4: ("offset", "int64", False),
    5: ("size", "int64", False),
    6: ("crc32c", "fixed32", False),
    7: ("slices", _SLICE, True),
}
_OBJECT_REF: Schema = {1: ("node_id", "int32", False), 2: ("local_name", "string", False)}
_SERIALIZED_TENSOR: Schema = {
    1: ("name", "string", False),
    2: ("full_name", "string", False),
    3: ("checkpoint_key", "string", False),
}
_SLOT_REF: Schema = {
    1: ("original_variable_node_id", "int32", False),
    2: ("slot_name", "string", False),
    3: ("slot_variable_node_id", "int32", False),
}
_OBJECT: Schema = {
    1: ("children", _OBJECT_REF, True),
    2: ("attributes", _SERIALIZED_TENSOR, True),
    3: ("slot_variables", _SLOT_REF, True),
}
_GRAPH: Schema = {1: ("nodes", _OBJECT, True)}


@dataclass(frozen=True)
class BundleHeader:
    """``BundleHeaderProto``: the entry stored under the empty key."""

    num_shards: int
    endianness: int  # 0 little, 1 big
    producer: int
    min_consumer: int
    bad_consumers: tuple[int, ...]


# A slice extent is (start, length); length None means "the whole dimension".
Extent = tuple[int, "int | None"]


@dataclass(frozen=True)
class BundleEntry:
    """``BundleEntryProto``: where one tensor (or one slice of it) lives."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    slices: tuple[tuple[Extent, ...], ...] = ()


def parse_header(buf: bytes | memoryview) -> BundleHeader:
    """Decode a ``BundleHeaderProto``.

    >>> parse_header(b"\\x08\\x01\\x1a\\x02\\x08\\x01").num_shards
    1
    """
    d = _decode(memoryview(buf), _HEADER, "BundleHeaderProto")
    version = d.get("version") or {}
    return BundleHeader(
        num_shards=d.get("num_shards", 0),
        endianness=d.get("endianness", 0),
        producer=version.get("producer", 0),
        min_consumer=version.get("min_consumer", 0),
        bad_consumers=tuple(version.get("bad_consumers", ())),
    )


def parse_entry(buf: bytes | memoryview) -> BundleEntry:
    """Decode a ``BundleEntryProto``.

    >>> parse_entry(b"\\x08\\x01\\x12\\x06\\x12\\x02\\x08\\x02\\x12\\x00").shape
    (2, 0)
    """
    d = _decode(memoryview(buf), _ENTRY, "BundleEntryProto")
    shape_d = d.get("shape") or {}
    if shape_d.get("unknown_rank"):
        raise CheckpointError("BundleEntryProto: tensor shape has unknown rank")
    shape = tuple(dim.get("size", 0) for dim in shape_d.get("dim", []))
    slices = tuple(
        tuple((ext.get("start", 0), ext.get("length")) for ext in s.get("extent", []))
        for s in d["slices"]
    )
    return BundleEntry(
        dtype=d.get("dtype", 0),
        shape=shape,
        shard_id=d.get("shard_id", 0),
        offset=d.get("offset", 0),
        size=d.get("size", 0),
        crc32c=d.get("crc32c", 0),
        slices=slices,
    )


@dataclass(frozen=True)
class ObjectNode:
    """One ``TrackableObjectGraph.TrackableObject``."""

    children: tuple[tuple[int, str], ...]  # (node_id, local_name)
    attributes: tuple[tuple[str, str, str], ...]  # (name, full_name, checkpoint_key)
    slot_variables: tuple[tuple[int, str, int], ...] = field(default=())
    # (original_variable_node_id, slot_name, slot_variable_node_id)


@dataclass(frozen=True)
class ObjectGraph:
    """TF2's ``TrackableObjectGraph``, saved as ``_CHECKPOINTABLE_OBJECT_GRAPH``."""

    nodes: tuple[ObjectNode, ...]


def parse_object_graph(buf: bytes | memoryview) -> ObjectGraph:
    """Decode a serialized ``TrackableObjectGraph``.

    >>> g = parse_object_graph(b"\\n\\x05\\n\\x03\\x12\\x01x")
    >>> g.nodes[0].children
    ((0, 'x'),)
    """
    d = _decode(memoryview(buf), _GRAPH, "TrackableObjectGraph")
    if not d["nodes"]:
        raise CheckpointError("TrackableObjectGraph: no root object (the graph has no nodes)")
    nodes = []
    for n in d["nodes"]:
        nodes.append(
            ObjectNode(
                children=tuple(
                    (c.get("node_id", 0), c.get("local_name", "")) for c in n["children"]
                ),
                attributes=tuple(
                    (a.get("name", ""), a.get("full_name", ""), a.get("checkpoint_key", ""))
                    for a in n["attributes"]
                ),
                slot_variables=tuple(
                    (
                        s.get("original_variable_node_id", 0),
                        s.get("slot_name", ""),
                        s.get("slot_variable_node_id", 0),
                    )
                    for s in n["slot_variables"]
                ),
            )
        )
    n_nodes = len(nodes)
    for i, node in enumerate(nodes):
        refs = [c[0] for c in node.children]
        refs += [x for s in node.slot_variables for x in (s[0], s[2])]
        if any(not 0 <= r < n_nodes for r in refs):
            raise CheckpointError(f"TrackableObjectGraph: node {i} refers to a missing node")
    return ObjectGraph(nodes=tuple(nodes))
