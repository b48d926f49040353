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
    """``actual`` and ``expected`` are bit-identical, except the payload of a NaN.

    Where both are NaN, their payloads are not compared: the reference's own
    NaN bits depend on an element's position (torch's vectorised loop body
    writes 0xFFFF for a bfloat16 NaN and ``torch.maximum`` writes an all-ones
    NaN, the scalar tail writes 0x7FC0 and a canonical NaN; the thread split
    moves the tail), so no kernel can match them element for element. Every
    other bit pattern, ±0 and ±inf included, must be equal; a NaN on one side
    only is a difference.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = bits(actual), bits(expected)
    both_nan = torch.isnan(actual.detach()) & torch.isnan(expected.detach())
    differ = (a != e) & ~both_nan
    if differ.any():
        where = differ.nonzero()[0].tolist()
        flat = differ.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{what}: {int(differ.sum())} of {differ.numel()} elements differ; first at "
            f"{where}: got {actual.detach().flatten()[flat].item()!r} "
            f"(bits {a.flatten()[flat].item():#x}), expected "
            f"{expected.detach().flatten()[flat].item()!r} (bits {e.flatten()[flat].item():#x})"
        )


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

    With ``special_fraction``, that share of elements becomes NaN, ±inf, ±0,
    subnormals or ±max.
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
    return x.to(dtype).reshape(shape)
