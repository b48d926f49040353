"""Which branch of ``tfadam.compat`` the installed torch takes, and that each gives TF's bits.

``.ci/run`` runs this file on both ends of the supported range (torch 2.6 and
the newest), so each version-dependent branch runs where it applies.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from tf_oracle import tf

from tfadam import compat

# float32 NaNs of every kind: quiet and signalling, both signs, payloads in the
# bits float16 keeps and in the bits it drops; then ordinary values.
NAN_BITS = [0x7FC00000, 0x7FC12000, 0xFFC12000, 0x7F812345, 0x7F800001, 0xFFC00000, 0x7FFFFFFF]
NAN_BITS += [0xFFFFE000, 0x7FA00000, 0xFF800001]
PLAIN = [0.0, -0.0, 1.0, -2.5, 65504.0, 70000.0, 1e-8, float("inf"), float("-inf")]
# Lengths below, at and above torch's vector width, and with a scalar tail:
# torch's conversion of the tail runs another loop than the body's.
LENGTHS = [1, 3, 10, 16, 17, 40, 1000]


def float32_cases() -> list[np.ndarray]:
    nan = np.array(NAN_BITS, dtype=np.uint32).view(np.float32)
    pool = np.concatenate([nan, np.array(PLAIN, dtype=np.float32)])
    rng = np.random.default_rng(0)
    return [rng.choice(pool, size=n) for n in LENGTHS]


def bits16(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy()


def tf_bits16(x: np.ndarray) -> np.ndarray:
    return tf.cast(tf.constant(x), tf.float16).numpy().view(np.int16)


def test_the_installed_torch_is_in_the_supported_range() -> None:
    assert compat.TORCH >= compat.MINIMUM, torch.__version__


@pytest.mark.parametrize("x", float32_cases(), ids=[f"n{n}" for n in LENGTHS])
def test_float32_to_float16_gives_tfs_bits(x: np.ndarray) -> None:
    ours = bits16(compat.float32_to_float16(torch.from_numpy(x.copy())))
    np.testing.assert_array_equal(ours, tf_bits16(x))


@pytest.mark.parametrize("x", float32_cases(), ids=[f"n{n}" for n in LENGTHS])
def test_float32_to_float16_on_a_strided_view(x: np.ndarray) -> None:
    # the rule converts views too (e.g. a transposed or sliced variable)
    doubled = torch.from_numpy(np.repeat(x, 2).copy())[::2]
    ours = bits16(compat.float32_to_float16(doubled))
    np.testing.assert_array_equal(ours, tf_bits16(x))


def test_torch_float16_branch_matches_what_torch_does() -> None:
    # FLOAT16_NAN_NATIVE (torch >= 2.13) says torch's own conversion already
    # gives TF's bits: check it does, on the installed torch.
    if not compat.FLOAT16_NAN_NATIVE:
        pytest.skip(f"torch {torch.__version__} takes the explicit conversion")
    for x in float32_cases():
        native = bits16(torch.from_numpy(x.copy()).to(torch.float16))
        np.testing.assert_array_equal(native, tf_bits16(x))


@pytest.mark.skipif(compat.TORCH != (2, 6), reason="the difference measured on torch 2.6")
def test_torch_2_6_scalar_loop_loses_float16_nan_bits() -> None:
    # Why the explicit branch exists: at the floor of the range, torch's scalar
    # loop makes every NaN 0x7fff where TF keeps sign and payload.
    assert not compat.FLOAT16_NAN_NATIVE
    x = np.array([0x7F812345, 0xFFC12000], dtype=np.uint32).view(np.float32)
    assert bits16(torch.from_numpy(x).to(torch.float16)).tolist() == [0x7FFF, 0x7FFF]
    assert tf_bits16(x).tolist() == [0x7E09, -0x01F7]  # 0xfe09 as int16


def test_dtensor_module_holds_dtensor() -> None:
    module = importlib.import_module(compat.DTENSOR_MODULE)
    assert compat.dtensor_class() is module.DTensor


def test_profiler_of_all_threads_exists_where_compat_says() -> None:
    from torch._C._profiler import _ExperimentalConfig

    try:
        _ExperimentalConfig(profile_all_threads=True)
        exists = True
    except TypeError:  # torch < 2.7: no such option
        exists = False
    assert exists == compat.PROFILER_OF_ALL_THREADS == (compat.TORCH >= (2, 7))


def test_fsdp2_on_cpu_where_compat_says() -> None:
    if compat.TORCH >= (2, 13):
        assert compat.FSDP2_RUNS_ON_CPU
    if compat.TORCH == (2, 6):
        assert not compat.FSDP2_RUNS_ON_CPU
        assert not compat.INDUCTOR_COMPILES_SPARSE_EMBEDDING
