"""Damaged checkpoints never pass silently and never crash with a stray exception."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from ckpt_tf import every_dtype_checkpoint, sharded_checkpoint, tf1_session_run

from tfadam.checkpoint import BundleReader, CheckpointError
from tfadam.checkpoint.slices import slice_key

# Per source checkpoint; raise it locally (e.g. TFADAM_FUZZ_SECONDS=120) to fuzz harder.
FUZZ_SECONDS = float(os.environ.get("TFADAM_FUZZ_SECONDS", "2"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    return {
        "tf1": tf1_session_run(str(d / "tf1")).prefix,
        "tf2": every_dtype_checkpoint(str(d / "tf2"), big=False),
        "sharded": sharded_checkpoint(str(d / "sharded")),
    }


def _files(prefix: str) -> list[str]:
    directory, base = os.path.split(prefix)
    return sorted(
        os.path.join(directory, n)
        for n in os.listdir(directory)
        if n.startswith(base + ".index") or n.startswith(base + ".data-")
    )


def _copy(prefix: str, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    for f in _files(prefix):
        shutil.copy(f, dest)
    return os.path.join(dest, os.path.basename(prefix))


def _snapshot(prefix: str) -> dict[str, tuple]:
    """Everything the reader returns for a checkpoint, for exact comparison."""
    with BundleReader(prefix) as reader:
        out = {}
        for key in reader.keys():
            arr = reader.read_numpy(key)
            data = tuple(arr.reshape(-1)) if arr.dtype == object else arr.tobytes()
            out[key] = (reader.info(key).dtype, arr.shape, data)
        return out


def _rewrite(path: str, transform) -> None:
    data = Path(path).read_bytes()
    with open(path, "wb") as f:
        f.write(transform(data))


def _flip(offset: int):
    return lambda data: data[:offset] + bytes([data[offset] ^ 0x10]) + data[offset + 1 :]


# -- targeted faults: each names the file and, where there is one, the tensor --


def test_flipped_byte_in_tensor_data(sources, tmp_path):
    prefix = _copy(sources["tf1"], str(tmp_path))
    with BundleReader(prefix) as reader:
        entry = reader.entry("dense/kernel")
    data_file = prefix + ".data-00000-of-00001"
    _rewrite(data_file, _flip(entry.offset + entry.size // 2))
    with BundleReader(prefix) as reader:
        reader.read_numpy("dense/bias")  # other tensors stay readable
        with pytest.raises(CheckpointError, match="checksum mismatch") as err:
            reader.read_numpy("dense/kernel")
    assert err.value.path == data_file and err.value.key == "dense/kernel"


def test_flipped_byte_in_one_slice_of_a_partitioned_tensor(sources, tmp_path):
    prefix = _copy(sources["tf1"], str(tmp_path))
    with BundleReader(prefix) as reader:
        entry = reader.entry("part")
        part = reader._entry(slice_key("part", entry.slices[1]))
    _rewrite(prefix + ".data-00000-of-00001", _flip(part.offset))
    with BundleReader(prefix) as reader, pytest.raises(CheckpointError) as err:
        reader.read_numpy("part")
    assert err.value.key == "part" and "checksum mismatch" in str(err.value)


def test_flipped_byte_in_index_block(sources, tmp_path):
    prefix = _copy(sources["tf1"], str(tmp_path))
    _rewrite(prefix + ".index", _flip(20))
    with pytest.raises(CheckpointError, match="checksum mismatch") as err:
        BundleReader(prefix)
    assert err.value.path == prefix + ".index"


def test_wrong_magic(sources, tmp_path):
    prefix = _copy(sources["tf1"], str(tmp_path))
    _rewrite(prefix + ".index", lambda d: d[:-1] + bytes([d[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="bad magic number") as err:
        BundleReader(prefix)
    assert err.value.path == prefix + ".index"


@pytest.mark.parametrize("keep", [0, 10, -1, -48, -49])
def test_truncated_index(sources, tmp_path, keep):
    prefix = _copy(sources["tf1"], str(tmp_path))
    _rewrite(prefix + ".index", lambda d: d[:keep])
    with pytest.raises(CheckpointError) as err:
        BundleReader(prefix)
    assert err.value.path == prefix + ".index"


def test_truncated_data_file(sources, tmp_path):
    prefix = _copy(sources["tf1"], str(tmp_path))
    data_file = prefix + ".data-00000-of-00001"
    _rewrite(data_file, lambda d: d[: len(d) - 3])
    with BundleReader(prefix) as reader:
        with pytest.raises(CheckpointError, match="truncated") as err:
            reader.verify()
        assert err.value.path == data_file and err.value.key in reader.keys()


def test_missing_shard(sources, tmp_path):
    prefix = _copy(sources["sharded"], str(tmp_path))
    with BundleReader(prefix) as reader:
        n = reader.header.num_shards
        victim = next(k for k in reader.keys() if reader.entry(k).shard_id == 1)
    missing = f"{prefix}.data-00001-of-{n:05d}"
    os.remove(missing)
    with BundleReader(prefix) as reader:
        with pytest.raises(CheckpointError, match="shard 1 .* missing") as err:
            reader.read_numpy(victim)
        with pytest.raises(CheckpointError):
            reader.verify()
    assert err.value.path == missing and err.value.key == victim
    assert "Copy every file" in str(err.value)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.index").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="bad magic"):
        BundleReader(str(tmp_path / "x"))
    (tmp_path / "v1.ckpt").write_bytes(b"old single-file format")
    with pytest.raises(CheckpointError, match="V1 format"):
        BundleReader(str(tmp_path / "v1.ckpt"))


# -- fuzzing: thousands of random mutations of real TF checkpoints -----------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    n = len(data)
    kind = rng.randrange(7)
    if kind == 0:  # flip bits
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # overwrite a byte
        i = rng.randrange(n)
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
    if kind == 2:  # truncate
        return data[: rng.randrange(n)]
    if kind == 3:  # insert bytes
        i = rng.randrange(n + 1)
        return data[:i] + rng.randbytes(rng.randint(1, 8)) + data[i:]
    if kind == 4:  # delete a range
        i = rng.randrange(n)
        return data[:i] + data[i + rng.randint(1, 16) :]
    if kind == 5:  # zero a range (a hole in a sparse file)
        i = rng.randrange(n)
        k = rng.randint(1, 64)
        return data[:i] + bytes(len(data[i : i + k])) + data[i + k :]
    i, j = sorted(rng.randrange(n) for _ in range(2))  # duplicate a range
    return data[:j] + data[i:j] + data[j:]


@pytest.fixture
def scratch(tmp_path):
    """A scratch directory in memory where possible: the fuzz loop is write-bound."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = tempfile.mkdtemp(dir="/dev/shm", prefix="tfadam-fuzz-")
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield str(tmp_path)


@pytest.mark.parametrize("source", ["tf1", "tf2", "sharded"])
def test_fuzz_mutations_raise_checkpoint_error_or_read_identically(sources, scratch, source):
    original = sources[source]
    expected = _snapshot(original)
    files = _files(original)
    pristine = {f: Path(f).read_bytes() for f in files}
    work = _copy(original, scratch)
    rng = random.Random(f"fuzz-{source}")
    outcomes = {"error": 0, "identical": 0}
    deadline = time.perf_counter() + FUZZ_SECONDS
    while time.perf_counter() < deadline:
        victim = rng.choice(files)
        target = os.path.join(os.path.dirname(work), os.path.basename(victim))
        with open(target, "wb") as f:
            f.write(_mutate(rng, pristine[victim]))
        try:
            got = _snapshot(work)
        except CheckpointError as err:
            assert str(err), "errors must say something"
            outcomes["error"] += 1
        else:
            # e.g. a flip in the footer's padding: harmless, and nothing changed
            assert got == expected, f"silent change after mutating {victim}"
            outcomes["identical"] += 1
        with open(target, "wb") as f:
            f.write(pristine[victim])
    total = sum(outcomes.values())
    rate = total / FUZZ_SECONDS
    print(f"\n{source}: {total} mutations in {FUZZ_SECONDS}s ({rate:.0f}/s): {outcomes}")
    assert total >= 100 and outcomes["error"] > total // 2


# -- crafted indexes: checksums valid, contents absurd --------------------------
# A checksum only proves the bytes are the ones written; these files are
# "written" wrong on purpose (with the test writer's table and protobuf
# encoders) and must still give a CheckpointError, without huge allocations.


def _forged(tmp_path, entries: dict[bytes, bytes], *, header: bytes | None = None) -> str:
    from tfadam.checkpoint import writer

    prefix = str(tmp_path / "forged")
    items = [(b"", header if header is not None else writer._header(1, False))]
    items += sorted(entries.items())
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(bytes(64))
    with open(prefix + ".index", "wb") as f:
        writer._write_table(f, items)
    return prefix


def _entry(dtype=1, shape=(4,), shard=0, offset=0, size=16, slices=()) -> bytes:
    from tfadam.checkpoint import writer
    from tfadam.checkpoint.crc32c import crc32c

    raw = writer._entry(dtype, shape, shard, offset, size, crc32c(bytes(size)))
    for extents in slices:
        extent_msgs = b"".join(
            writer._field_bytes(1, writer._field_varint(1, a) + writer._field_varint(2, n))
            for a, n in extents
        )
        raw += writer._field_bytes(7, extent_msgs)
    return raw


@pytest.mark.parametrize(
    "entries, message",
    [
        ({b"w": _entry(shape=(10**12,), size=16)}, "does not match shape"),
        ({b"s": _entry(dtype=7, shape=(10**12,), size=10)}, "cannot fit"),
        ({b"w": _entry(offset=60, size=16)}, "past the end"),
        ({b"w": _entry(shard=3)}, "shard id 3 out of range"),
        ({b"w": _entry(dtype=99)}, "dtype enum 99 is not supported"),
        ({b"w": _entry(dtype=21)}, "variant"),
        # a repeated scalar field: the last value counts, as in protobuf
        ({b"w": _entry(shape=(4,), size=16) + b"\x28\x04"}, "size 4 bytes does not match"),
        (
            {b"p": _entry(shape=(10**9, 10**6), size=0, slices=[((0, 1), (0, 1))])},
            "missing from the index",
        ),
    ],
)
def test_forged_entries_are_refused(tmp_path, entries, message):
    prefix = _forged(tmp_path, entries)
    with BundleReader(prefix) as reader, pytest.raises(CheckpointError, match=message) as err:
        reader.verify()
    assert err.value.key in entries.keys() | {k.decode() for k in entries}


def test_forged_partition_that_does_not_tile(tmp_path):
    full = _entry(shape=(4, 1), size=0, slices=[((0, 2), (0, 1)), ((1, 3), (0, 1))])
    parts = {
        slice_key("p", ((0, 2), (0, 1))): _entry(shape=(2, 1), size=8),
        slice_key("p", ((1, 3), (0, 1))): _entry(shape=(3, 1), size=12),
    }
    prefix = _forged(tmp_path, {b"p": full, **parts})
    with BundleReader(prefix) as reader:
        assert reader.keys() == ["p"]
        with pytest.raises(CheckpointError, match="slices overlap"):
            reader.read_numpy("p")


@pytest.mark.parametrize(
    "header, message",
    [
        (b"\x08\x00", "number of data shards 0"),
        (b"\x08\x01\x10\x07", "endianness 7"),
        (b"\x08\x01\x1a\x04\x08\x02\x10\x05", "needs a reader of version >= 5"),
        (b"\x08\x01\x1a\x02\x18\x01", "needs a reader"),  # version 1 listed as bad
        (b"\x08", "truncated varint"),
    ],
)
def test_forged_headers_are_refused(tmp_path, header, message):
    prefix = _forged(tmp_path, {}, header=header)
    with pytest.raises(CheckpointError, match=message) as err:
        BundleReader(prefix)
    assert err.value.path == prefix + ".index"


def _slice_field(*extents: bytes) -> bytes:
    from tfadam.checkpoint.writer import _field_bytes

    return _field_bytes(7, b"".join(_field_bytes(1, e) for e in extents))


def test_protobuf_decoding_follows_protobuf_on_odd_encodings():
    # Encodings TF never writes but protobuf accepts: compare with the real library.
    from tensorflow.core.protobuf import tensor_bundle_pb2

    from tfadam.checkpoint.proto import parse_entry

    samples = [
        _entry(shape=(2, 3), size=24) + b"\x12\x04\x12\x02\x08\x05",  # shape merged: (2, 3, 5)
        _entry() + b"\x28\x07\x18\x02",  # size and shard_id repeated: the last wins
        _entry() + b"\x98\x06\x01" + b"\xa2\x06\x02ab",  # unknown fields 99 and 100: skipped
        _entry(slices=[((0, 1), (2, 3))]) + _slice_field(b"\x08\x05", b""),  # one extent full
    ]
    for raw in samples:
        ours = parse_entry(raw)
        theirs = tensor_bundle_pb2.BundleEntryProto.FromString(raw)
        assert ours.shape == tuple(d.size for d in theirs.shape.dim)
        assert (ours.dtype, ours.shard_id, ours.offset, ours.size, ours.crc32c) == (
            theirs.dtype,
            theirs.shard_id,
            theirs.offset,
            theirs.size,
            theirs.crc32c,
        )
        assert ours.slices == tuple(
            tuple((e.start, e.length if e.HasField("length") else None) for e in s.extent)
            for s in theirs.slices
        )
