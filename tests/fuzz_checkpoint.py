"""Coverage-guided fuzzing of the checkpoint reader (atheris, libFuzzer's engine).

    python tests/fuzz_checkpoint.py [libFuzzer flags] [CORPUS_DIR ...]
    python tests/fuzz_checkpoint.py -max_total_time=900 -rss_limit_mb=1024 -timeout=10 \\
        -print_final_stats=1 /tmp/ckpt-corpus            # the long run
    python tests/fuzz_checkpoint.py --no-atheris --runs 2000 --seed 1   # without atheris
    coverage run --source=src/tfadam/checkpoint tests/fuzz_checkpoint.py --no-atheris \
        --replay /tmp/ckpt-corpus && coverage report       # line coverage of a corpus

One fuzz input describes a whole checkpoint, so that mutations reach past the
checksums into the entries, the object graph and the name resolution:

* mode byte & 3 == 0 (raw): ``u32 n | n bytes of .index | the data file``,
  written as is (the table parser's own checks);
* & 3 == 1 (structured): ``u8 entries per block | u16 count | (u16 len, key,
  u32 len, value)* | the data file``, written as an SSTable with valid block
  checksums; with mode & 4, each entry whose bytes lie in the data file gets
  its tensor checksum recomputed (appended: protobuf keeps the last value);
* & 3 == 2 (state file): the rest is a directory's ``checkpoint`` file, next
  to a small valid checkpoint.

Each input goes through :class:`BundleReader` (every tensor, the object
graph), :class:`CheckpointNames` and ``convert``; anything but a
:class:`CheckpointError` is a finding. Without atheris (``--no-atheris``) the
same target runs on random structure-aware mutations of the seeds.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import atheris
except ImportError:  # the fallback generator below needs none of it
    atheris = None

if __name__ == "__main__" and atheris is not None and "--no-atheris" not in sys.argv:
    # instrument the reader for coverage: it must be imported first, in here
    with atheris.instrument_imports(include=["tfadam.checkpoint"]):
        import tfadam.checkpoint  # noqa: F401

import forge  # noqa: E402

from tfadam.checkpoint import BundleReader, CheckpointError, convert  # noqa: E402
from tfadam.checkpoint.crc32c import crc32c, mask  # noqa: E402
from tfadam.checkpoint.names import CheckpointNames  # noqa: E402
from tfadam.checkpoint.proto import parse_entry, read_varint  # noqa: E402
from tfadam.checkpoint.slices import slice_key  # noqa: E402

RAW, STRUCTURED, STATE = 0, 1, 2
FIX_CRC = 4


def _scratch() -> str:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="tfadam-fuzz-", dir=base)


# -- the input format ------------------------------------------------------------


def _string_crc(data: bytes, count: int) -> int | None:
    """The CRC TF stores for a string tensor laid out in ``data``, if it parses."""
    try:
        pos, crc, lengths = 0, 0, []
        for _ in range(count):
            n, pos = read_varint(data, pos)
            lengths.append(n)
            crc = crc32c(n.to_bytes(4 if n <= 0xFFFFFFFF else 8, "little"), crc)
        crc = crc32c(data[pos : pos + 4], crc)
        return crc32c(data[pos + 4 :], crc)
    except (CheckpointError, OverflowError):
        return None


def _fix_crc(value: bytes, data: bytes) -> bytes:
    try:
        e = parse_entry(value)
    except CheckpointError:
        return value
    if e.slices or not 0 <= e.offset <= e.offset + e.size <= len(data) or len(e.shape) > 8:
        return value
    chunk = data[e.offset : e.offset + e.size]
    if e.dtype == 7:
        count = 1
        for d in e.shape:
            count *= d
        crc = _string_crc(chunk, count) if count <= len(chunk) else None
    else:
        crc = crc32c(chunk)
    return value if crc is None else value + forge.ffixed32(6, mask(crc))


def materialize(blob: bytes, directory: str) -> str:
    """Write the checkpoint ``blob`` describes; returns the path to read."""
    prefix = os.path.join(directory, "ckpt")
    mode = blob[0] if blob else 0
    rest = blob[1:]
    if mode & 3 == STATE:
        forge.bundle(prefix, {b"w": forge.entry(crc=crc32c(bytes(16)))}, [bytes(16)])
        with open(os.path.join(directory, "checkpoint"), "wb") as f:
            f.write(rest)
        return directory
    if mode & 3 != STRUCTURED:
        n = int.from_bytes(rest[:4].ljust(4, b"\0"), "little") % (len(rest) + 1)
        return forge.write(prefix, rest[4 : 4 + n], [rest[4 + n :]])
    per_block = max(rest[0] if rest else 1, 1)
    count = int.from_bytes(rest[1:3].ljust(2, b"\0"), "little")
    pos, items = 3, []
    for _ in range(count):
        if pos + 2 > len(rest):
            break
        klen = int.from_bytes(rest[pos : pos + 2], "little")
        key = rest[pos + 2 : pos + 2 + klen]
        pos += 2 + klen
        vlen = int.from_bytes(rest[pos : pos + 4].ljust(4, b"\0"), "little")
        value = rest[pos + 4 : pos + 4 + vlen]
        pos += 4 + vlen
        items.append((key, value))
    data = rest[pos:]
    if mode & FIX_CRC:
        items = [(k, _fix_crc(v, data) if k else v) for k, v in items]
    return forge.write(prefix, forge.table(items, per_block=per_block), [data])


def encode(
    items: list[tuple[bytes, bytes]], data: bytes, mode: int = STRUCTURED | FIX_CRC
) -> bytes:
    """The fuzz input for a structured checkpoint (used to make the seeds)."""
    out = bytes([mode, 16]) + len(items).to_bytes(2, "little")
    for key, value in items:
        out += len(key).to_bytes(2, "little") + key + len(value).to_bytes(4, "little") + value
    return out + data


def seeds() -> list[bytes]:
    """Valid checkpoints of every shape the reader handles, as fuzz inputs."""
    head = forge.header()
    out = []
    # plain tensors of several dtypes
    f32 = struct.pack("<4f", 1, 2, 3, 4)
    i64 = struct.pack("<2q", 7, -1)
    data = f32 + i64 + b"\x01\x00"
    out.append(
        encode(
            [
                (b"", head),
                (b"b", forge.entry(10, (2,), offset=32, size=2)),
                (b"dense/kernel", forge.entry(1, (2, 2), offset=0, size=16)),
                (b"step", forge.entry(9, (2,), offset=16, size=16)),
            ],
            data,
        )
    )
    # a TF1 Adam run: variable, slots, accumulators
    z = bytes(8)
    tf1 = [(b"", head)]
    for i, name in enumerate([b"beta1_power", b"beta2_power", b"w", b"w/Adam", b"w/Adam_1"]):
        shape = () if b"power" in name else (2,)
        size = 4 if b"power" in name else 8
        tf1.append((name, forge.entry(1, shape, offset=8 * i, size=size)))
    out.append(encode(tf1, z * 5))
    # strings
    raw, _ = forge.strings([b"abc", b"", b"de"])
    out.append(encode([(b"", head), (b"s", forge.entry(7, (3,), size=len(raw)))], raw))
    # a partitioned tensor
    part = [
        (b"", head),
        (b"p", forge.entry(1, (4, 2), size=0, slices=[[(0, 2), (0, None)], [(2, 2), (0, None)]])),
    ]
    part.append((slice_key("p", ((0, 2), (0, None))), forge.entry(1, (2, 2), offset=0, size=16)))
    part.append((slice_key("p", ((2, 2), (0, None))), forge.entry(1, (2, 2), offset=16, size=16)))
    part.sort()
    out.append(encode(part, bytes(32)))
    # a TF2 object graph with a Keras-style optimizer
    key = "model/w/.ATTRIBUTES/VARIABLE_VALUE"
    m_key = "optimizer/_momentums/0/.ATTRIBUTES/VARIABLE_VALUE"
    it_key = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    graph = forge.object_graph(
        [
            {"children": [(1, "model"), (3, "optimizer")]},
            {"children": [(2, "w")]},
            {"attributes": [("VARIABLE_VALUE", "w", key)]},
            {"children": [(4, "_trainable_variables"), (5, "_momentums"), (7, "_iterations")]},
            {"children": [(2, "0")]},
            {"children": [(6, "0")]},
            {"attributes": [("VARIABLE_VALUE", "m", m_key)]},
            {"attributes": [("VARIABLE_VALUE", "iterations", it_key)]},
        ]
    )
    graph_raw, _ = forge.strings([graph])
    tf2 = [
        (b"", head),
        (key.encode(), forge.entry(1, (2,), offset=0, size=8)),
        (m_key.encode(), forge.entry(1, (2,), offset=8, size=8)),
        (it_key.encode(), forge.entry(9, (), offset=16, size=8)),
        (forge.OBJECT_GRAPH_KEY, forge.entry(7, (), offset=24, size=len(graph_raw))),
    ]
    out.append(encode(sorted(tf2), bytes(24) + graph_raw))
    # the raw form of the first seed, and a state file
    d = _scratch()
    try:
        prefix = materialize(out[0], d)
        with open(prefix + ".index", "rb") as f:
            index = f.read()
        with open(prefix + ".data-00000-of-00001", "rb") as f:
            data = f.read()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out.append(bytes([RAW]) + len(index).to_bytes(4, "little") + index + data)
    out.append(
        bytes([STATE]) + b'model_checkpoint_path: "ckpt"\nall_model_checkpoint_paths: "ckpt"\n'
    )
    return out


# -- the target -------------------------------------------------------------------


def exercise(path: str, out: str) -> None:
    """Everything a user does with a checkpoint; only CheckpointError may escape."""
    try:
        with BundleReader(path) as reader:
            for key in reader.keys():
                reader.info(key)
            for key in reader.keys():
                if reader.info(key).dtype == "string":
                    reader.read_numpy(key)
                else:
                    reader.read_torch(key)
            names = CheckpointNames(reader)
            for var in names.variables:
                names.optimizer_state(var)
            names.optimizer_variables()
    except CheckpointError:
        pass
    try:
        convert(path, out, progress=False)
    except CheckpointError:
        pass


def one_input(blob: bytes) -> None:
    d = _scratch()
    try:
        exercise(materialize(blob, d), os.path.join(d, "out.pt"))
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- without atheris: structure-aware random mutations -------------------------------


def mutate(rng: random.Random, blob: bytes) -> bytes:
    """One random edit of a fuzz input (bytes flipped, cut, repeated, varints grown)."""
    b = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        n = len(b)
        kind = rng.randrange(6)
        i = rng.randrange(1, n) if n > 1 else 0
        if kind == 0 and n:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and n:
            b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif kind == 2:
            b[i:i] = forge.varint(rng.choice([2**31, 2**32, 2**63, rng.randrange(1 << 20)]))
        elif kind == 3:
            j = min(n, i + rng.randint(1, 32))
            b[i:i] = b[i:j] * rng.randint(1, 50)
        elif kind == 4:
            del b[i : i + rng.randint(1, 16)]
        else:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
    return bytes(b[:65536])


def replay(directory: str) -> int:
    """Run every input of a corpus once; print the slowest and the peak memory."""
    import resource
    import time

    timings = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            blob = f.read()
        start = time.perf_counter()
        one_input(blob)
        timings.append((time.perf_counter() - start, len(blob), name))
    timings.sort(reverse=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"replayed {len(timings)} inputs; peak RSS {peak:.0f} MiB (imports included)")
    for seconds, size, name in timings[:3]:
        print(f"  slowest: {name} ({size} bytes) {seconds * 1000:.1f} ms")
    return 0


def run_fallback(runs: int, seed: int) -> int:
    rng = random.Random(seed)
    corpus = seeds()
    for _ in range(runs):
        one_input(mutate(rng, rng.choice(corpus)))
    print(f"fallback fuzzer: {runs} inputs, seed {seed}, no finding")
    return 0


def main() -> int:
    if "--no-atheris" in sys.argv or atheris is None:
        p = argparse.ArgumentParser()
        p.add_argument("--no-atheris", action="store_true")
        p.add_argument("--runs", type=int, default=1000)
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--replay", metavar="CORPUS_DIR")
        args, _ = p.parse_known_args()
        if args.replay:
            return replay(args.replay)
        return run_fallback(args.runs, args.seed)
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus and not os.listdir(corpus[0]):  # start from the seeds
        for i, blob in enumerate(seeds()):
            with open(os.path.join(corpus[0], f"seed-{i}"), "wb") as f:
                f.write(blob)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
