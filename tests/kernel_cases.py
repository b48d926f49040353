"""Shared helpers of the kernel tests: random tensors with special values, bit comparison."""

from __future__ import annotations

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so that ``==`` compares bits (±0 differ, NaN equals itself)."""
    return t.detach().contiguous().view(INT_VIEW[t.dtype])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """``actual`` and ``expected`` are bit-identical: ±0, ±inf and NaN sign and payload too."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = bits(actual), bits(expected)
    differ = a != e
    if differ.any():
        where = differ.nonzero()[0].tolist()
        flat = differ.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{what}: {int(differ.sum())} of {differ.numel()} elements differ; first at "
            f"{where}: got {actual.detach().flatten()[flat].item()!r} "
            f"(bits {a.flatten()[flat].item():#x}), expected "
            f"{expected.detach().flatten()[flat].item()!r} (bits {e.flatten()[flat].item():#x})"
        )


# NaNs of both signs, with and without payload, quiet and signalling: where two
# of them meet, which one an operation returns depends on operand order.
NAN_BITS = {
    torch.float16: [0x7E00, -0x0200, 0x7E15, -0x0301, 0x7C01],
    torch.bfloat16: [0x7FC0, -0x0040, 0x7FC5, -0x003F, 0x7F81],
    torch.float32: [0x7FC00000, -0x00400000, 0x7FC01234, -0x003FFFFF, 0x7F800001],
    torch.float64: [
        0x7FF8000000000000,
        -0x0008000000000000,
        0x7FF8000000001234,
        0x7FF0000000000001,
    ],
}


def specials(dtype: torch.dtype) -> list[float]:
    info = torch.finfo(dtype)
    return [
        float("nan"),
        float("inf"),
        float("-inf"),
        0.0,
        -0.0,
        info.tiny,
        info.tiny * info.eps,  # the smallest subnormal
        -info.tiny * info.eps,
        info.max,
        -info.max,
    ]


def random_tensor(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    generator: torch.Generator,
    *,
    low: float = -6.0,
    high: float = 3.0,
    special_fraction: float = 0.0,
    positive: bool = False,
) -> torch.Tensor:
    """Normal values at scales 10**low .. 10**high per element, in ``dtype``.

    With ``special_fraction``, that share of elements becomes NaN (of the
    bit patterns in ``NAN_BITS``), ±inf, ±0, subnormals or ±max.
    """
    n = 1
    for d in shape:
        n *= d
    scale = 10 ** (torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low)
    x = torch.randn(n, generator=generator, dtype=torch.float64) * scale
    if positive:
        x = x.abs()
    if special_fraction and n:
        values = torch.tensor(specials(dtype), dtype=torch.float64)
        if positive:
            values = values[~(values < 0) & ~torch.isnan(values)]
        chosen = torch.rand(n, generator=generator) < special_fraction
        picks = torch.randint(0, len(values), (n,), generator=generator)
        x = torch.where(chosen, values[picks], x)
    out = x.to(dtype)
    if special_fraction and n and not positive:
        nan = torch.isnan(out)
        patterns = torch.tensor(NAN_BITS[dtype], dtype=INT_VIEW[dtype])
        picks = torch.randint(0, len(patterns), (n,), generator=generator)
        ints = torch.where(nan, patterns[picks], out.view(INT_VIEW[dtype]))
        out = ints.view(dtype)
    return out.reshape(shape)
