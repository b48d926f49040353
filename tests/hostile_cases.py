"""The hostile-checkpoint table: one row per class of crafted file.

Each row builds its file(s) under a directory and returns the path to hand to
the reader (a prefix or a directory). ``expect`` is a fragment of the
:class:`CheckpointError` the reader must give when it reads the file (None:
any of the reader's own errors, or none at all). The worker
(``hostile_worker.py``) runs every row through read, convert and
``load_tf_checkpoint`` under a memory and a time limit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import forge
from forge import bundle, entry, fbytes, fvarint, object_graph, with_graph

from tfadam.checkpoint.crc32c import crc32c
from tfadam.checkpoint.slices import slice_key

MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[str], str]
    expect: str | None


CASES: list[Case] = []


def case(expect: str | None):
    def register(build: Callable[[str], str]) -> Callable[[str], str]:
        CASES.append(Case(build.__name__.replace("_", "-"), build, expect))
        return build

    return register


def _ok(d: str) -> str:
    """A small valid checkpoint (the baseline every mutation starts from)."""
    data = bytes(16)
    return bundle(
        os.path.join(d, "ckpt"),
        {b"w": entry(shape=(4,), crc=crc32c(data))},
        [data],
    )


# -- the table (.index) ----------------------------------------------------------


@case(None)
def valid_small(d):
    return _ok(d)


@case("too short")
def truncated_index_to_10_bytes(d):
    p = _ok(d)
    with open(p + ".index", "r+b") as f:
        f.truncate(10)
    return p


@case("bad magic")
def truncated_index_by_one_byte(d):
    p = _ok(d)
    size = os.path.getsize(p + ".index")
    with open(p + ".index", "r+b") as f:
        f.truncate(size - 1)
    return p


@case("checksum mismatch")
def bad_block_crc(d):
    p = _ok(d)
    with open(p + ".index", "r+b") as f:
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(bytes([byte[0] ^ 0x40]))
    return p


@case("restart")
def huge_restart_count(d):
    contents = forge.block([(b"", forge.header())])[:-4] + (2**32 - 1).to_bytes(4, "little")
    index = forge.table(
        [],
        data_blocks=[contents],
        index_items=[(b"", forge.varint(0) + forge.varint(len(contents)))],
    )
    return forge.write(os.path.join(d, "ckpt"), index, [b""])


@case("outside the file")
def block_handle_past_eof(d):
    index = forge.table(
        [], data_blocks=[], index_items=[(b"\xff", forge.varint(2**40) + forge.varint(2**40))]
    )
    return forge.write(os.path.join(d, "ckpt"), index, [b""])


@case("overlaps")
def index_points_at_one_block_twice(d):
    items = [(b"", forge.header()), (b"w", entry(crc=crc32c(bytes(16))))]
    contents = forge.block(items)
    handle = forge.varint(0) + forge.varint(len(contents))
    index = forge.table([], data_blocks=[contents], index_items=[(b"w", handle), (b"x", handle)])
    return forge.write(os.path.join(d, "ckpt"), index, [bytes(16)])


@case("times the size of the file")
def long_shared_key_prefix(d):
    # one restart point, a 64 KiB key, then 50,000 keys each one byte longer:
    # 300 kB of index, 3.2 GB of keys once the prefixes are expanded (written
    # entry by entry here: the forger must not expand them either)
    base = 65536
    head = forge.header()
    body = forge.varint(0) + forge.varint(0) + forge.varint(len(head)) + head
    body += forge.varint(0) + forge.varint(base) + forge.varint(0) + b"k" * base
    for i in range(1, 50_000):
        body += forge.varint(base + i - 1) + forge.varint(1) + forge.varint(0) + b"a"
    contents = body + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
    last = b"k" * base + b"a" * 49_999
    handle = forge.varint(0) + forge.varint(len(contents))
    index = forge.table([], data_blocks=[contents], index_items=[(last, handle)])
    return forge.write(os.path.join(d, "ckpt"), index, [b""])


@case(None)
def many_tiny_entries(d):
    # 130 kB of index holding 20,000 empty entries: the per-entry overhead
    items = [(b"", forge.header())] + [(b"%06d" % i, b"") for i in range(1, 20_000)]
    return forge.write(os.path.join(d, "ckpt"), forge.table(items, per_block=1000), [b""])


@case("not valid UTF-8")
def key_not_utf8(d):
    return bundle(os.path.join(d, "ckpt"), {b"\xff\xfe": entry(crc=crc32c(bytes(16)))})


# -- the header --------------------------------------------------------------------


@case("number of data shards")
def header_zero_shards(d):
    return bundle(os.path.join(d, "ckpt"), {}, head=forge.header(0))


@case(None)
def header_version_repeated(d):
    # 50,000 `version` messages, each adding a bad_consumers value: protobuf
    # merges them; merging must not copy the list each time
    head = forge.header() + fbytes(3, fvarint(3, 7)) * 50_000
    return bundle(os.path.join(d, "ckpt"), {}, head=head)


# -- entries -----------------------------------------------------------------------


@case("rank")
def rank_65(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(shape=(1,) * 65, crc=crc32c(bytes(4)))})


@case("rank")
def rank_65_empty(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(shape=(0,) * 65, size=0)})


@case("rank")
def rank_65_string(d):
    raw, crc = forge.strings([b"x"])
    return bundle(
        os.path.join(d, "ckpt"), {b"s": entry(7, (1,) * 65, size=len(raw), crc=crc)}, [raw]
    )


@case("rank")
def rank_65_partitioned(d):
    ext = [(0, None)] * 65
    return bundle(
        os.path.join(d, "ckpt"),
        {
            b"p": entry(shape=(1,) * 65, size=0, slices=[ext]),
            slice_key("p", tuple((0, None) for _ in range(65))): entry(
                shape=(1,) * 65, crc=crc32c(bytes(4))
            ),
        },
    )


@case("rank")
def rank_65_in_a_slice(d):
    shape = (1,) * 65
    ext = [(0, 1)] * 65
    return bundle(
        os.path.join(d, "ckpt"),
        {
            b"p": entry(shape=shape, size=0, slices=[ext]),
            slice_key("p", tuple((0, 1) for _ in range(65))): entry(
                shape=shape, crc=crc32c(bytes(4))
            ),
        },
    )


@case("rank")
def repeated_shape_field(d):
    # 50,000 `shape` fields of one dimension each: protobuf merges them into
    # one shape of rank 50,000 (quadratic if each merge copies the list)
    extra = fbytes(2, forge.shape_proto([1])) * 50_000
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(shape=(), size=4, extra=extra)})


@case("too large")
def huge_dims_zero_elements(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(shape=(0, 2**62, 2**62), size=0)})


@case("too large")
def huge_dim_small_size(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(shape=(2**62,), size=16)})


@case("past the end")
def string_count_2_27(d):
    # a 131-byte index, an 8-byte data file, 2**27 strings claimed
    n = 2**27
    return bundle(os.path.join(d, "ckpt"), {b"s": entry(7, (n,), size=n + 4)}, [bytes(8)])


@case("past the end")
def string_count_2_33(d):
    n = 2**33
    return bundle(os.path.join(d, "ckpt"), {b"s": entry(7, (n,), size=n + 4)}, [bytes(8)])


@case("cannot fit")
def string_count_beyond_size(d):
    return bundle(os.path.join(d, "ckpt"), {b"s": entry(7, (1000,), size=10)}, [bytes(10)])


@case("string")
def string_length_2_64(d):
    raw = forge.varint(2**63) + bytes(4)
    return bundle(os.path.join(d, "ckpt"), {b"s": entry(7, (1,), size=len(raw))}, [raw])


@case("checksum mismatch")
def string_bad_crc(d):
    raw, crc = forge.strings([b"abc", b"de"])
    return bundle(
        os.path.join(d, "ckpt"), {b"s": entry(7, (2,), size=len(raw), crc=crc ^ 1)}, [raw]
    )


@case("past the end")
def offset_past_eof(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(offset=2**62)})


@case("invalid byte range")
def negative_offset(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(offset=-8)})


@case("out of range")
def shard_out_of_range(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(shard=7)})


@case("checksum mismatch")
def tensor_bad_crc(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(crc=12345)})


@case("not supported")
def dtype_variant(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(21)})


@case("out of range")
def int32_field_overflow(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": fvarint(1, 2**40)})


@case("unknown rank")
def unknown_rank(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": entry(extra=fbytes(2, fvarint(3, 1)))})


@case("varint")
def varint_too_long(d):
    return bundle(os.path.join(d, "ckpt"), {b"w": b"\x08" + b"\xff" * 11})


@case("other than 0 and 1")
def bool_holding_two(d):
    data = b"\x02"
    return bundle(
        os.path.join(d, "ckpt"), {b"b": entry(10, (1,), size=1, crc=crc32c(data))}, [data]
    )


# -- partitioned tensors -------------------------------------------------------------


def _partitioned(d, name, shape, boxes, *, part_offset=None, data=b""):
    entries = {name.encode(): entry(shape=shape, size=0, slices=boxes)}
    for i, ext in enumerate(boxes):
        dims = [length for _, length in ext]
        size = 4
        for n in dims:
            size *= n
        offset = part_offset(i, size) if part_offset else 0
        crc = crc32c(data[offset : offset + size])
        entries[slice_key(name, tuple(ext))] = entry(shape=dims, offset=offset, size=size, crc=crc)
    return bundle(os.path.join(d, "ckpt"), entries, [data])


@case("share bytes")
def slices_share_one_region(d):
    # 512 slices of 1 MiB each, all pointing at the same 1 MiB of the data file:
    # a 512 MiB tensor from a 1 MiB file
    rows = MiB // 4
    boxes = [[(i, 1), (0, rows)] for i in range(512)]
    return _partitioned(d, "p", (512, rows), boxes, data=bytes(MiB))


@case("overlap")
def slices_overlap(d):
    boxes = [[(0, 3), (0, 2)], [(2, 2), (0, 2)]]
    return _partitioned(d, "p", (4, 2), boxes, part_offset=lambda i, s: 24 * i, data=bytes(64))


@case("cover")
def slices_gap(d):
    boxes = [[(0, 1), (0, 2)], [(2, 2), (0, 2)]]
    return _partitioned(d, "p", (4, 2), boxes, part_offset=lambda i, s: 8 * i, data=bytes(64))


@case("outside dimension")
def slice_outside_tensor(d):
    return _partitioned(d, "p", (4,), [[(2, 5)]], data=bytes(64))


@case("missing from the index")
def slice_entry_missing(d):
    return bundle(
        os.path.join(d, "ckpt"),
        {b"p": entry(shape=(10**9, 10**6), size=0, slices=[[(0, 1), (0, 1)]])},
    )


@case("listed twice")
def fragmented_slice_grid(d):
    # 2,000 row slices, 2,000 column slices and 300 copies of a full slice over
    # a 2000x2000 tensor: a grid of 4M cells that each full slice covers again
    n = 2000
    boxes = [[(i, 1), (0, n)] for i in range(n)] + [[(0, n), (j, 1)] for j in range(n)]
    boxes += [[(0, n), (0, n)]] * 300
    return _partitioned(d, "p", (n, n), boxes, data=bytes(64))


# -- the object graph (TF2) ------------------------------------------------------------


@case("root")
def empty_object_graph(d):
    return with_graph(os.path.join(d, "ckpt"), b"")


@case("missing node")
def object_graph_dangling_child(d):
    return with_graph(os.path.join(d, "ckpt"), object_graph([{"children": [(5, "x")]}]))


@case(None)
def object_graph_long_chain(d):
    # a 420 kB chain of 40,000 nodes: the path strings of all nodes add up to N**2
    n = 40_000
    nodes = [{"children": [(i + 1, "a")]} for i in range(n - 1)] + [{}]
    return with_graph(os.path.join(d, "ckpt"), object_graph(nodes))


@case("share one list")
def object_graph_shared_keras_list(d):
    # 5,000 optimizer nodes all tracking one `_trainable_variables` list of 5,000
    # variables: 25M (optimizer, variable) pairs if each pair is indexed
    n = 5000
    var_key = "v/.ATTRIBUTES/VARIABLE_VALUE"
    list_node = 1
    nodes = [{"children": [(2 + n, "v")] + [(2 + i, f"o{i}") for i in range(n)]}]
    nodes.append({"children": [(2 + n, str(i)) for i in range(n)]})
    nodes += [{"children": [(list_node, "_trainable_variables")]} for _ in range(n)]
    nodes.append({"attributes": [("VARIABLE_VALUE", "v", var_key)]})
    data = bytes(16)
    return with_graph(
        os.path.join(d, "ckpt"),
        object_graph(nodes),
        {var_key.encode(): entry(crc=crc32c(data))},
        data,
    )


@case("scalar string")
def object_graph_not_a_string(d):
    return bundle(os.path.join(d, "ckpt"), {forge.OBJECT_GRAPH_KEY: entry(crc=crc32c(bytes(16)))})


# -- the `checkpoint` state file ---------------------------------------------------------


def _state(d, text: bytes) -> str:
    _ok(d)
    with open(os.path.join(d, "checkpoint"), "wb") as f:
        f.write(text)
    return d


@case("no such file")
def state_file_not_utf8_path(d):
    return _state(d, b'model_checkpoint_path: "\\377\\376"\n')


@case("checkpoint")
def state_file_bad_escape(d):
    return _state(d, b'model_checkpoint_path: "\\x"\n')


@case(None)
def state_file_raw_bytes(d):
    return _state(d, b"\xff\xfe" * 1000)


@case(None)
def state_file_whitespace_bomb(d):
    # a regex with `^\s*` under MULTILINE rescans every remaining line from each one
    return _state(d, b"\n" * 300_000 + b'model_checkpoint_path: "ckpt"\n')


# -- the files themselves ------------------------------------------------------------------


@case("regular file")
def data_file_is_a_fifo(d):
    p = _ok(d)
    os.remove(p + ".data-00000-of-00001")
    os.mkfifo(p + ".data-00000-of-00001")
    return p


@case("regular file")
def data_file_is_a_directory(d):
    p = _ok(d)
    os.remove(p + ".data-00000-of-00001")
    os.mkdir(p + ".data-00000-of-00001")
    return p


@case("regular file")
def data_file_links_to_dev_zero(d):
    p = _ok(d)
    os.remove(p + ".data-00000-of-00001")
    os.symlink("/dev/zero", p + ".data-00000-of-00001")
    return p


@case("share bytes")
def tensors_alias_one_region(d):
    # 520 tensors of 1 MiB each, all stored at the same 1 MiB: convert would hold
    # 520 MiB read out of a 1 MiB file
    data = bytes(MiB)
    crc = crc32c(data)
    entries = {f"t{i:04d}".encode(): entry(shape=(MiB // 4,), crc=crc) for i in range(520)}
    return bundle(os.path.join(d, "ckpt"), entries, [data])
