"""TensorFlow ``DataType`` enum values and how their bytes are stored.

Numbers follow ``tensorflow/core/framework/types.proto``. Types numpy lacks
(bfloat16, float8) are read as their raw bits (unsigned integers of the same
width) and reinterpreted when converted to torch.

>>> DTYPES[14].name, DTYPES[14].storage.str, DTYPES[14].torch
('bfloat16', '<u2', torch.bfloat16)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DTYPES", "STRING", "DType"]


@dataclass(frozen=True)
class DType:
    """One TensorFlow dtype: its enum number, name and storage."""

    enum: int
    name: str
    storage: np.dtype | None  # little-endian element layout in the data file
    torch: torch.dtype | None  # None: no torch equivalent (strings)

    @property
    def itemsize(self) -> int:
        return 0 if self.storage is None else self.storage.itemsize


def _dt(enum: int, name: str, storage: str | None, torch_name: str | None) -> DType:
    return DType(
        enum,
        name,
        None if storage is None else np.dtype(storage),
        None if torch_name is None else getattr(torch, torch_name, None),
    )


STRING = 7

_ALL = [
    _dt(1, "float32", "<f4", "float32"),
    _dt(2, "float64", "<f8", "float64"),
    _dt(3, "int32", "<i4", "int32"),
    _dt(4, "uint8", "u1", "uint8"),
    _dt(5, "int16", "<i2", "int16"),
    _dt(6, "int8", "i1", "int8"),
    _dt(STRING, "string", None, None),
    _dt(8, "complex64", "<c8", "complex64"),
    _dt(9, "int64", "<i8", "int64"),
    _dt(10, "bool", "?", "bool"),
    # quantized types are plain integers on disk
    _dt(11, "qint8", "i1", "int8"),
    _dt(12, "quint8", "u1", "uint8"),
    _dt(13, "qint32", "<i4", "int32"),
    _dt(14, "bfloat16", "<u2", "bfloat16"),
    _dt(15, "qint16", "<i2", "int16"),
    _dt(16, "quint16", "<u2", "uint16"),
    _dt(17, "uint16", "<u2", "uint16"),
    _dt(18, "complex128", "<c16", "complex128"),
    _dt(19, "float16", "<f2", "float16"),
    _dt(22, "uint32", "<u4", "uint32"),
    _dt(23, "uint64", "<u8", "uint64"),
    _dt(24, "float8_e5m2", "u1", "float8_e5m2"),
    _dt(25, "float8_e4m3fn", "u1", "float8_e4m3fn"),
    _dt(26, "float8_e4m3fnuz", "u1", "float8_e4m3fnuz"),
    _dt(28, "float8_e5m2fnuz", "u1", "float8_e5m2fnuz"),
]

DTYPES: dict[int, DType] = {d.enum: d for d in _ALL}

# Known to TensorFlow but not readable here, with the reason.
UNSUPPORTED: dict[int, str] = {
    0: "DT_INVALID (no dtype recorded)",
    20: "resource handles are not saved data",
    21: "variant tensors hold arbitrary C++ objects",
    27: "float8_e4m3b11fnuz has no torch equivalent",
    29: "int4 (sub-byte type)",
    30: "uint4 (sub-byte type)",
    31: "int2 (sub-byte type)",
    32: "uint2 (sub-byte type)",
    33: "float4_e2m1fn (sub-byte type)",
}
