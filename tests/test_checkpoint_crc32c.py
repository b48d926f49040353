"""CRC-32C: the vectorised implementation against TensorFlow's own checksums."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from ckpt_tf import tf
from hypothesis import given, settings
from hypothesis import strategies as st

from tfadam.checkpoint import crc32c as crc_module
from tfadam.checkpoint.crc32c import crc32c, mask, unmask

# Lengths around every path switch: the byte loop, lane remainders, 8 MiB blocks.
LENGTHS = [0, 1, 3, 4, 511, 512, 8191, 8192, 8193, 8192 + 511, 100_003, (8 << 20) + 4097]


def _reference(data: bytes) -> int:
    return crc_module._register_py(0xFFFFFFFF, memoryview(data)) ^ 0xFFFFFFFF


def test_masked_crc_equals_tensorflow_tfrecord_checksums(tmp_path):
    # A TFRecord stores masked_crc32c(length) and masked_crc32c(data), written
    # by TF's C++ CRC-32C: an independent oracle for arbitrary bytes.
    rng = np.random.default_rng(0)
    records = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in LENGTHS]
    path = str(tmp_path / "r.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    raw = Path(path).read_bytes()
    pos = 0
    for record in records:
        header = raw[pos : pos + 8]
        assert int.from_bytes(header, "little") == len(record)
        assert mask(crc32c(header)) == int.from_bytes(raw[pos + 8 : pos + 12], "little")
        pos += 12
        assert raw[pos : pos + len(record)] == record
        pos += len(record)
        assert mask(crc32c(record)) == int.from_bytes(raw[pos : pos + 4], "little"), len(record)
        pos += 4
    assert pos == len(raw)


def test_published_check_values():
    # RFC 3720 (iSCSI) B.4 test vectors and the CRC catalogue's check value.
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("n", LENGTHS)
def test_vectorised_path_equals_byte_loop(n):
    data = os.urandom(n) if n < 200_000 else np.random.default_rng(n).bytes(n)
    if n > 200_000:  # the byte loop is slow: check the big one in two extended halves
        half = n // 2
        assert crc32c(data) == crc32c(data[half:], crc32c(data[:half]))
        return
    assert crc32c(data) == _reference(data)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=20_000), st.integers(0, 20_000))
def test_extend_is_concatenation(data, cut):
    cut = min(cut, len(data))
    assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data) == _reference(data)


def test_accepts_numpy_and_memoryview():
    arr = np.arange(10_000, dtype=np.float32)
    assert crc32c(arr) == crc32c(arr.tobytes()) == crc32c(memoryview(arr.tobytes()))


@given(st.integers(0, 0xFFFFFFFF))
def test_mask_roundtrip(value):
    assert unmask(mask(value)) == value
