"""Which checkpoint format a path holds, and the reader and names for it.

Supported: a TensorFlow tensor bundle (``PREFIX.index`` + ``PREFIX.data-*``,
written by TF1 ``Saver``, TF2 ``tf.train.Checkpoint``, Keras under TF), a
Keras 3 ``.keras`` archive and a Keras 3 ``.weights.h5`` file. Anything else
is refused with what it looked like.

>>> import tempfile
>>> with tempfile.NamedTemporaryFile(suffix=".bin") as f:
...     _ = f.write(b"root:x:0:0:root:/root:/bin/bash\\n")
...     f.flush()
...     try:
...         open_checkpoint(f.name)
...     except CheckpointError as err:
...         print(err.detail.split("; ")[0], "|", SUPPORTED in err.detail)
not a checkpoint format tfadam reads (32 bytes, starting b'root:x:0:0:root:') | True
"""

from __future__ import annotations

import os
from typing import Any

from .bundle import BundleReader
from .errors import CheckpointError
from .keras3 import KerasFile, KerasNames, sniff_format
from .names import CheckpointNames

__all__ = ["SUPPORTED", "open_checkpoint"]

SUPPORTED = (
    "a TF1/TF2 tensor bundle (PREFIX with PREFIX.index and PREFIX.data-*), "
    "a Keras 3 .keras archive, a Keras 3 .weights.h5 file"
)
_TABLE_MAGIC = (0xDB4775248B80FB57).to_bytes(8, "little")  # LevelDB table footer


def _looks_like(path: str) -> str:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            tail = b""
            if size >= 48:
                f.seek(size - 8)
                tail = f.read(8)
    except OSError as err:
        return f"unreadable: {err.strerror}"
    if tail == _TABLE_MAGIC:
        return (
            f"{size} bytes, an SSTable: a single-file checkpoint of TF1's old V1 format "
            "(SaverDef.V1), which tfadam does not read; re-save it with "
            "tf.compat.v1.train.Saver() (V2, the default since TF 1.0)"
        )
    return f"{size} bytes, starting {head!r}"


def open_checkpoint(path: str | os.PathLike[str], *, optimizer_name: str = "Adam") -> Any:
    """``(reader, names)`` for the checkpoint at ``path``; the reader is a context manager."""
    path = os.fspath(path)
    if os.path.isfile(path):
        kind = sniff_format(path)
        if kind in ("keras", "h5"):
            reader = KerasFile(path)
            try:
                return reader, KerasNames(reader)
            except BaseException:
                reader.close()
                raise
        bundle_file = path.endswith(".index") or ".data-" in os.path.basename(path)
        if not bundle_file and not os.path.isfile(path + ".index"):
            raise CheckpointError(
                f"not a checkpoint format tfadam reads ({_looks_like(path)}); "
                f"supported: {SUPPORTED}",
                path=path,
            )
    reader = BundleReader(path)
    try:
        return reader, CheckpointNames(reader, optimizer_name=optimizer_name)
    except BaseException:
        reader.close()
        raise
