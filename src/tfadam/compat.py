"""Every place where tfadam depends on which torch is installed.

tfadam supports torch from :data:`MINIMUM` on (see the README's "Supported
torch versions"); ``.ci/run`` runs the suite on both ends of that range. Each
difference between torch versions that tfadam meets is handled here, once,
with the version that changed it, so that call sites stay version-free and
``tests/test_compat.py`` can name the branch the installed torch takes.

Example:
    >>> import torch
    >>> from tfadam import compat
    >>> compat.TORCH >= compat.MINIMUM
    True
"""

from __future__ import annotations

import sys

import torch


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string such as ``2.13.0+cpu``.

    >>> _release("2.5.1+cu121"), _release("2.15.0")
    ((2, 5), (2, 15))
    """
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


#: The installed torch, ``(major, minor)``.
TORCH = _release(torch.__version__)
#: The oldest torch tfadam is tested on (pyproject's ``torch>=`` bound).
MINIMUM = (2, 6)

# DTensor's module: ``torch.distributed.tensor``, public there since torch 2.5
# (torch 2.4 kept it in ``torch.distributed._tensor``, below the supported range).
DTENSOR_MODULE = "torch.distributed.tensor"

# A profiler of all threads (``_ExperimentalConfig(profile_all_threads=True)``)
# exists from torch 2.7; tfadam's step protocol (``hooks.stepped``) reads the
# process-wide profiler flag that it sets on the torch versions that have it.
PROFILER_OF_ALL_THREADS = TORCH >= (2, 7)

# What torch lacks below some release, for the tests that run on this CPU-only
# machine (tfadam's own code is the same on every torch):
# FSDP2 records events on its communication streams, and torch.cpu.Stream has
# no record_event in torch 2.6.0 (measured: a CPU model fails in fully_shard's
# first forward); 2.13.0 and 2.15.0 have it. Below that FSDP2 needs CUDA.
FSDP2_RUNS_ON_CPU = hasattr(torch.cpu.Stream, "record_event")
# inductor's embedding lowering asserts on a sparse=True embedding in torch
# 2.6.0 and 2.4.1 (measured), not in 2.13.0 or 2.15.0; releases between are
# not measured and taken to fail.
INDUCTOR_COMPILES_SPARSE_EMBEDDING = TORCH >= (2, 13)


def dtensor_class() -> type | None:
    """``DTensor``, or None where no DTensor can exist yet.

    A DTensor can only exist once its module has been imported; looking the
    class up in ``sys.modules`` spares every tfadam import the ~0.6 s that
    importing it costs.

    >>> cls = dtensor_class()
    >>> cls is None or cls.__name__ == "DTensor"
    True
    """
    module = sys.modules.get(DTENSOR_MODULE)
    return None if module is None else module.DTensor


# float32 -> float16 of a NaN. TF converts with x86's F16C (``vcvtps2ph``): the
# NaN keeps its sign and the top 10 bits of its payload and becomes quiet.
# torch 2.13 and later do the same on every element (measured on 2.13.0 and
# 2.15.0). torch 2.6 (and 2.4) do it only in their vectorised loop; their scalar
# loop (a tensor's tail, or a tensor shorter than a vector) makes every NaN
# 0x7fff (measured on 2.6.0, 2.4.1). Versions between 2.6 and 2.13 are not
# measured and take the explicit conversion, which is right on any torch.
FLOAT16_NAN_NATIVE = TORCH >= (2, 13)


def float32_to_float16(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to float16 as x86's ``vcvtps2ph``, NaN bits included.

    >>> nan = torch.tensor([0x7F812345], dtype=torch.int32).view(torch.float32)
    >>> hex(float32_to_float16(nan).view(torch.int16).item())
    '0x7e09'
    """
    narrow = x.to(torch.float16)
    if FLOAT16_NAN_NATIVE:
        return narrow
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return narrow
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    half = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)
    half = torch.where(half >= 2**15, half - 2**16, half).to(torch.int16)
    return torch.where(nan, half.view(torch.float16), narrow)
