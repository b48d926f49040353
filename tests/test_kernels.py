"""The fast kernels are bitwise-equal to the reference (``kernels/reference.py``).

Every comparison is ``==`` on integer views of θ, m, v (and vhat); see
:func:`kernel_cases.assert_same_bits` for the one exception (NaN payloads).
The whole module runs once per C kernel build this machine has: the run-time
build (``-march=native``) and each prebuilt x86-64 level (installed by
``setup.py``) this CPU runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import pytest
import torch
from kernel_cases import DTYPES, assert_same_bits, random_tensor

from tfadam import kernels, rule, tfmath
from tfadam.kernels import cpu, native, reference


def kernel_builds() -> list[str]:
    """``TFADAM_KERNELS`` values of every C kernel build this machine has."""
    builds = ["compiled"] if native.compiler() is not None else []
    return builds + [
        f"prebuilt:{level}" for level in native.cpu_levels() if native.prebuilt_path(level).exists()
    ]


BUILDS = kernel_builds()
pytestmark = pytest.mark.skipif(
    not BUILDS, reason="no C compiler and no prebuilt kernels: only the reference kernels exist"
)


# The run-time build in the quick tier; every prebuilt level in the full suite.
PARAMS = [
    pytest.param(build, marks=[pytest.mark.slow] if build.startswith("prebuilt") else [])
    for build in BUILDS or ["none"]
]


@pytest.fixture(autouse=True, scope="module", params=PARAMS)
def c_kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFADAM_KERNELS", request.param)
        native.reset()
        assert cpu.available(), f"no C kernels ({request.param}): {native.unavailable_reason()}"
        assert native.selection().source == request.param.partition(":")[0]
        yield request.param
    native.reset()


@pytest.fixture
def run_time_build(c_kernels: str) -> None:
    """For tests of the run-time build's variants: once, with the run-time build."""
    if c_kernels != "compiled":
        pytest.skip("a test of the run-time build (run with TFADAM_KERNELS=compiled)")


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def coefficients(dtype: torch.dtype, step: int, **hyper: float) -> rule.Coefficients:
    """The scalars of step ``step`` (1-based), as the engine would compute them."""
    lr, beta1, beta2, epsilon = (
        hyper.get("lr", 1e-3),
        hyper.get("beta1", 0.9),
        hyper.get("beta2", 0.999),
        hyper.get("epsilon", 1e-8),
    )
    b1p, b2p = torch.tensor(beta1), torch.tensor(beta2)
    for _ in range(step - 1):
        rule.advance_accumulators(b1p, b2p, beta1, beta2)
    return rule.tf1_coefficients(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        epsilon=epsilon,
        beta1_power=b1p,
        beta2_power=b2p,
        dtype=dtype,
    )


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone(memory_format=torch.preserve_format) for t in tensors]


SHAPES = [(), (0,), (1,), (7,), (67,), (1000,), (3, 5, 7), (2, 0, 3), (70001,)]


def dense_state(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int, amsgrad: bool
) -> dict[str, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    state = {
        "theta": [random_tensor(s, dtype, generator, special_fraction=0.02) for s in shapes],
        "m": [random_tensor(s, dtype, generator, low=-8, high=1) for s in shapes],
        "v": [random_tensor(s, dtype, generator, low=-12, high=2, positive=True) for s in shapes],
    }
    if amsgrad:
        # vhat above v in some elements, below in others
        state["vhat"] = [
            random_tensor(s, dtype, generator, low=-12, high=2, positive=True) for s in shapes
        ]
    return state


def gradients(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1000)
    return [
        random_tensor(s, dtype, generator, low=-8, high=4, special_fraction=0.02) for s in shapes
    ]


def run_dense(
    step: object, state: dict[str, list[torch.Tensor]], grads: list[torch.Tensor], **kw: object
) -> None:
    step(  # type: ignore[operator]
        state["theta"], grads, state["m"], state["v"], state.get("vhat"), kw.pop("c"), **kw
    )


def assert_states_equal(
    actual: dict[str, list[torch.Tensor]], expected: dict[str, list[torch.Tensor]]
) -> None:
    for name in expected:
        for i, (a, e) in enumerate(zip(actual[name], expected[name], strict=True)):
            assert_same_bits(a, e, f"{name}[{i}] shape {tuple(e.shape)}")


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_matches_reference(dtype: torch.dtype, nesterov: bool, amsgrad: bool) -> None:
    expected = dense_state(SHAPES, dtype, seed=1, amsgrad=amsgrad)
    actual = {k: clones(v) for k, v in expected.items()}
    for step in (1, 30):
        grads = gradients(SHAPES, dtype, seed=step)
        c = coefficients(dtype, step, lr=0.01 * step)
        run_dense(reference.dense_step, expected, grads, c=c, nesterov=nesterov)
        run_dense(kernels.dense_step, actual, grads, c=c, nesterov=nesterov)
        assert_states_equal(actual, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_same_bits_on_any_number_of_threads(dtype: torch.dtype) -> None:
    shapes = [(5,), (70_001,), (33,)]
    expected = dense_state(shapes, dtype, seed=2, amsgrad=True)
    grads = gradients(shapes, dtype, seed=2)
    c = coefficients(dtype, 3)
    run_dense(reference.dense_step, expected, grads, c=c, nesterov=True)
    for n in (1, 2, 7):
        actual = dense_state(shapes, dtype, seed=2, amsgrad=True)
        with threads(n):
            run_dense(kernels.dense_step, actual, grads, c=c, nesterov=True)
        assert_states_equal(actual, expected)


def test_dense_hyperparameter_corners() -> None:
    # β1 = β2 = 0 (1 - β = 1), ε = 0, lr = 0, huge lr: each coefficient path.
    shapes = [(257,)]
    for dtype in DTYPES:
        for hyper in (
            dict(beta1=0.0, beta2=0.0),
            dict(epsilon=0.0),
            dict(lr=0.0),
            dict(lr=1e4),
            dict(beta1=0.5, beta2=0.25, epsilon=1.0),
        ):
            expected = dense_state(shapes, dtype, seed=3, amsgrad=False)
            actual = {k: clones(v) for k, v in expected.items()}
            grads = gradients(shapes, dtype, seed=3)
            c = coefficients(dtype, 1, **hyper)
            run_dense(reference.dense_step, expected, grads, c=c, nesterov=False)
            run_dense(kernels.dense_step, actual, grads, c=c, nesterov=False)
            assert_states_equal(actual, expected)


def test_exhaustive_square_roots_of_float16_and_bfloat16() -> None:
    # AMSGrad divides by sqrt(vhat) with vhat = max(vhat, v): feeding every
    # non-negative bit pattern as vhat (v = 0, g = 0) exercises the kernel's
    # square root and rounding on all of them.
    for dtype in (torch.float16, torch.bfloat16):
        patterns = torch.arange(0, 0x7FFF + 1, dtype=torch.int32).to(torch.int16)
        vhat = patterns.view(dtype).clone()
        n = vhat.numel()
        expected = {
            "theta": [torch.ones(n, dtype=dtype)],
            "m": [torch.full((n,), 0.5, dtype=dtype)],
            "v": [torch.zeros(n, dtype=dtype)],
            "vhat": [vhat],
        }
        actual = {k: clones(v) for k, v in expected.items()}
        grads = [torch.zeros(n, dtype=dtype)]
        c = coefficients(dtype, 1, epsilon=0.0)
        run_dense(reference.dense_step, expected, grads, c=c, nesterov=False)
        run_dense(kernels.dense_step, actual, grads, c=c, nesterov=False)
        assert_states_equal(actual, expected)


def same_strides_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with ``t``'s strides, gaps and all (``clone`` would compact a sliced view)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


def test_dense_layouts_fast_where_walkable_reference_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(4)

    def r(*shape: int) -> torch.Tensor:
        return random_tensor(shape, torch.float32, generator)

    cl = torch.channels_last
    cases = {  # name: (theta, grad, m, v), walkable by the C loop?
        "contiguous": ((r(11), r(11), r(11), r(11).abs()), True),
        "channels_last": (
            tuple(r(4, 3, 5, 6).to(memory_format=cl) for _ in range(4)),
            True,
        ),
        "all_transposed": ((r(6, 9).t(), r(6, 9).t(), r(6, 9).t(), r(6, 9).abs().t()), True),
        "sliced": ((r(10, 8)[:, ::2], r(10, 8)[:, ::2], r(10, 8)[:, ::2], r(10, 4)), False),
        "m_transposed": ((r(9, 6), r(9, 6), r(6, 9).t(), r(9, 6).abs()), False),
        "expanded_grad": ((r(5, 4), r(1, 4).expand(5, 4), r(5, 4), r(5, 4).abs()), False),
    }
    names = list(cases)
    # gradients are read only: an expanded one stays expanded
    expected = [
        [t if i == 1 else same_strides_copy(t) for i, t in enumerate(cases[n][0])] for n in names
    ]
    actual = [
        [t if i == 1 else same_strides_copy(t) for i, t in enumerate(cases[n][0])] for n in names
    ]
    taken_by_reference: list[tuple[int, ...]] = []
    real_reference = reference.dense_step

    def recording(thetas, *args, **kwargs):  # type: ignore[no-untyped-def]
        taken_by_reference.extend(tuple(t.shape) for t in thetas)
        return real_reference(thetas, *args, **kwargs)

    c = coefficients(torch.float32, 2)
    columns = [[e[i] for e in expected] for i in range(4)]
    real_reference(*columns, None, c, nesterov=False)
    monkeypatch.setattr(reference, "dense_step", recording)
    columns = [[a[i] for a in actual] for i in range(4)]
    kernels.dense_step(*columns, None, c)
    for name, a, e in zip(names, actual, expected, strict=True):
        for slot in (0, 2, 3):
            assert_same_bits(a[slot], e[slot], f"{name} slot {slot}")
    not_walkable = {tuple(cases[n][0][0].shape) for n in names if not cases[n][1]}
    assert set(taken_by_reference) == not_walkable


@pytest.mark.parametrize("mode", ["eager", "graph", "lazy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_matches_reference(dtype: torch.dtype, mode: str) -> None:
    generator = torch.Generator().manual_seed(5)
    cases = [
        ((1000, 17), 300, "random"),  # few duplicates
        ((40,), 200, "random"),  # 1-D table, many duplicates
        ((20, 3, 4), 0, "random"),  # nothing indexed: dense-equivalent still decays
        ((20, 3, 4), 1, "random"),
        ((100, 16), 1500, "sorted"),  # coalesced-like order, many duplicates
        ((2000, 40), 2000, "random"),  # big enough for two threads
        ((7, 5), 50, "int32"),
        ((30, 700), 40, "random"),  # rows wider than a NaN block
    ]
    lazy = mode == "lazy"
    numerics = "eager" if lazy else mode
    for shape, k, order in cases:
        theta = random_tensor(shape, dtype, generator, special_fraction=0.01)
        m = random_tensor(shape, dtype, generator, low=-8, high=1)
        v = random_tensor(shape, dtype, generator, low=-12, high=2, positive=True)
        indices = torch.randint(0, shape[0], (k,), generator=generator)
        if order == "sorted":
            indices = indices.sort().values
        if order == "int32":
            indices = indices.to(torch.int32)
        values = random_tensor((k, *shape[1:]), dtype, generator, special_fraction=0.01)
        expected = [theta, m, v]
        actual = clones(expected)
        for step in (1, 7):
            c = coefficients(dtype, step)
            reference.sparse_step(*expected, indices, values, c, lazy=lazy, numerics=numerics)
            kernels.sparse_step(*actual, indices, values, c, lazy=lazy, numerics=numerics)
            for name, a, e in zip("θmv", actual, expected, strict=True):
                assert_same_bits(a, e, f"{name} {shape} k={k} {order} step {step}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_duplicates_summed_in_order_of_occurrence_in_dtype(dtype: torch.dtype) -> None:
    # TF adds a row's duplicates from +0, in order, rounding each addition to T:
    # 1 + u/2 + u/2 (u: T's epsilon) stays 1, where float32 accumulation gives 1 + u.
    u = torch.finfo(dtype).eps
    values = torch.tensor([[1.0], [u / 2], [-0.0], [u / 2]], dtype=dtype)
    indices = torch.tensor([2, 2, 0, 2])
    c = coefficients(dtype, 1, lr=0.0, beta1=0.0, beta2=0.0)  # m = v = summed gradient
    for lazy in (False, True):
        m, v = torch.zeros(3, 1, dtype=dtype), torch.zeros(3, 1, dtype=dtype)
        kernels.sparse_step(torch.zeros(3, 1, dtype=dtype), m, v, indices, values, c, lazy=lazy)
        assert m[2].item() == 1.0
        assert torch.equal(m[0].view(torch.int16), torch.zeros(1, dtype=torch.int16))  # +0 + -0
        mr, vr = torch.zeros(3, 1, dtype=dtype), torch.zeros(3, 1, dtype=dtype)
        reference.sparse_step(
            torch.zeros(3, 1, dtype=dtype), mr, vr, indices, values, c, lazy=lazy, numerics="eager"
        )
        assert_same_bits(m, mr)
        assert_same_bits(v, vr)


def test_sparse_table_not_row_major_uses_reference() -> None:
    generator = torch.Generator().manual_seed(6)
    theta = random_tensor((8, 10), torch.float32, generator).t()  # (10, 8), column-major
    m, v = torch.zeros(8, 10).t(), torch.zeros(8, 10).t()
    indices = torch.tensor([3, 1, 3, 9])
    values = random_tensor((4, 8), torch.float32, generator)
    c = coefficients(torch.float32, 1)
    assert not cpu.sparse_step(
        theta.clone(), m, v, indices, values, c, lazy=False, numerics="eager"
    )
    expected = [theta.clone(), m.clone(), v.clone()]
    actual = [theta.clone(), m.clone(), v.clone()]
    reference.sparse_step(*expected, indices, values, c, lazy=False, numerics="eager")
    kernels.sparse_step(*actual, indices, values, c)
    for a, e in zip(actual, expected, strict=True):
        assert_same_bits(a, e)


def test_sparse_index_out_of_range_raises_and_changes_nothing() -> None:
    theta, m, v = torch.ones(5, 3), torch.ones(5, 3), torch.ones(5, 3)
    c = coefficients(torch.float32, 1)
    for bad in (5, -1):
        indices = torch.tensor([0, bad, 2])
        with pytest.raises(ValueError, match="out of range"):
            cpu.sparse_step(theta, m, v, indices, torch.ones(3, 3), c, lazy=False, numerics="eager")
        assert torch.equal(theta, torch.ones(5, 3)) and torch.equal(m, torch.ones(5, 3))


def test_conversions_exhaustive() -> None:
    lib = native.library()
    assert lib is not None
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    as_float = halves.view(torch.float16).float()
    loaded = torch.tensor([lib.tfadam_f16_load(h & 0xFFFF) for h in halves.tolist()])
    assert_same_bits(loaded, as_float, "float16 -> float32")
    generator = torch.Generator().manual_seed(7)
    floats = torch.randint(-(2**31), 2**31, (60_000,), generator=generator, dtype=torch.int64)
    floats = torch.cat(
        [floats.to(torch.int32), halves.view(torch.float16).float().view(torch.int32)]
    )
    floats = torch.cat([floats, (floats.view(torch.float32) * 1.0001).view(torch.int32)])
    values = floats.view(torch.float32)
    for dtype, convert in (
        (torch.float16, lib.tfadam_f16_bits),
        (torch.bfloat16, lib.tfadam_bf16_bits),
    ):
        got = torch.tensor([convert(x) for x in values.tolist()], dtype=torch.int32)
        got = got.to(torch.int16).view(dtype)
        # the rule's conversion: torch's own makes every bfloat16 NaN 0xFFFF
        expected = (
            tfmath.float32_to_bfloat16(values) if dtype == torch.bfloat16 else values.to(dtype)
        )
        assert_same_bits(got, expected, f"float32 -> {dtype}")


def test_without_avx512_paths(
    tmp_path, monkeypatch: pytest.MonkeyPatch, run_time_build: None
) -> None:  # type: ignore[no-untyped-def]
    """The loops of machines without AVX-512, on whole tensors.

    float16 by bit manipulation (where AVX-512 exists it only runs the last
    < 16 elements of a tensor), and float32/float64 dense steps that keep
    copies of the old values instead of checking before they store.
    """
    scalar_only = native.build(
        tmp_path, extra_flags=["-DTFADAM_NO_VECTOR_F16", "-DTFADAM_NO_CHECKED_DENSE"]
    )
    monkeypatch.setattr(native, "_library", scalar_only)
    monkeypatch.setattr(native, "_loaded", True)
    shapes = [(1001,), (3, 7), (70_001,)]
    for dtype in (torch.float16, torch.float32, torch.float64):
        for amsgrad, nesterov in ((False, False), (True, True)):
            expected = dense_state(shapes, dtype, seed=9, amsgrad=amsgrad)
            actual = {k: clones(v) for k, v in expected.items()}
            grads = gradients(shapes, dtype, seed=9)
            c = coefficients(dtype, 4)
            run_dense(reference.dense_step, expected, grads, c=c, nesterov=nesterov)
            run_dense(kernels.dense_step, actual, grads, c=c, nesterov=nesterov)
            assert_states_equal(actual, expected)
    generator = torch.Generator().manual_seed(9)
    for lazy, numerics in ((False, "eager"), (False, "graph"), (True, "eager")):
        table = [random_tensor((200, 24), torch.float16, generator) for _ in range(3)]
        table[2] = table[2].abs()
        indices = torch.randint(0, 200, (300,), generator=generator)
        values = random_tensor((300, 24), torch.float16, generator)
        expected_table, actual_table = clones(table), clones(table)
        c = coefficients(torch.float16, 2)
        reference.sparse_step(*expected_table, indices, values, c, lazy=lazy, numerics=numerics)
        kernels.sparse_step(*actual_table, indices, values, c, lazy=lazy, numerics=numerics)
        for a, e in zip(actual_table, expected_table, strict=True):
            assert_same_bits(a, e, f"lazy={lazy} {numerics}")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return info.read()
    except OSError:
        return ""


@pytest.mark.skipif(
    "avx512_bf16" not in _cpu_flags(),
    reason="no AVX512-BF16 on this CPU: the default build already rounds by bits",
)
def test_bfloat16_without_avx512_bf16_instructions(
    tmp_path, monkeypatch: pytest.MonkeyPatch, run_time_build: None
) -> None:  # type: ignore[no-untyped-def]
    """bfloat16 rounding by bit manipulation, where vcvtne2ps2bf16 does not exist."""
    without = native.build(tmp_path, extra_flags=["-mno-avx512bf16"])
    monkeypatch.setattr(native, "_library", without)
    monkeypatch.setattr(native, "_loaded", True)
    shapes = [(1001,), (3, 7), (70_001,)]
    for amsgrad, nesterov in ((False, False), (True, True)):
        expected = dense_state(shapes, torch.bfloat16, seed=10, amsgrad=amsgrad)
        actual = {k: clones(v) for k, v in expected.items()}
        grads = gradients(shapes, torch.bfloat16, seed=10)
        c = coefficients(torch.bfloat16, 4)
        run_dense(reference.dense_step, expected, grads, c=c, nesterov=nesterov)
        run_dense(kernels.dense_step, actual, grads, c=c, nesterov=nesterov)
        assert_states_equal(actual, expected)


def test_no_compiler_falls_back_to_reference(
    tmp_path, monkeypatch: pytest.MonkeyPatch, run_time_build: None
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TFADAM_CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TFADAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TFADAM_KERNELS", "compiled")  # (and no prebuilt ones)
    native.reset()
    try:
        shapes = [(129,)]
        expected = dense_state(shapes, torch.float32, seed=10, amsgrad=False)
        actual = {k: clones(v) for k, v in expected.items()}
        grads = gradients(shapes, torch.float32, seed=10)
        c = coefficients(torch.float32, 1)
        with pytest.warns(RuntimeWarning, match="reference kernels"):
            run_dense(kernels.dense_step, actual, grads, c=c, nesterov=False)
        assert native.library() is None
        assert "no C compiler" in (native.unavailable_reason() or "")
        run_dense(reference.dense_step, expected, grads, c=c, nesterov=False)
        assert_states_equal(actual, expected)
        theta, m, v = torch.ones(4, 2), torch.zeros(4, 2), torch.zeros(4, 2)
        kernels.sparse_step(theta, m, v, torch.tensor([1, 1]), torch.ones(2, 2), c, lazy=True)
        assert torch.equal(theta[0], torch.ones(2)) and not torch.equal(theta[1], torch.ones(2))
    finally:
        monkeypatch.undo()
        native.reset()
    assert cpu.available()


def test_reference_only_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFADAM_KERNELS", "reference")
    native.reset()
    try:
        assert native.library() is None
        assert native.unavailable_reason() == "TFADAM_KERNELS=reference"
    finally:
        monkeypatch.undo()
        native.reset()


def test_floor_kernel_does_its_trivial_arithmetic() -> None:
    for dtype in (torch.float32, torch.float64):
        t, g = torch.ones(100, dtype=dtype), torch.full((100,), 2.0, dtype=dtype)
        m, v = torch.zeros(100, dtype=dtype), torch.zeros(100, dtype=dtype)
        cpu.FloorKernel([t], [g], [m], [v])()
        assert torch.equal(t, torch.full((100,), 3.0, dtype=dtype))
        assert torch.equal(m, g) and torch.equal(v, -g)
    t16, g16 = torch.ones(70, dtype=torch.int16), torch.full((70,), 2, dtype=torch.int16)
    m16, v16 = torch.zeros(70, dtype=torch.int16), torch.zeros(70, dtype=torch.int16)
    cpu.FloorKernel([t16], [g16], [m16], [v16])()
    assert t16.tolist() == [3] * 70 and v16.tolist() == [-2] * 70


def test_threads_are_torchs_own_where_torch_uses_gnu_openmp(run_time_build: None) -> None:
    """The kernels run on torch's OpenMP team, not a second set of threads.

    torch's workers spin for a while after each parallel op; helper threads
    of our own would wait for those cores (measured: +20-30% on a D1 step
    right after torch's fused step).
    """
    runtime = native.openmp_runtime()
    if (
        runtime is None
        or native.compiler() is None
        or "gcc" not in os.path.realpath(native.compiler() or "")
    ):
        pytest.skip("torch does not thread with GNU OpenMP here, or the compiler is not GCC")
    lib = native.library()
    assert lib is not None and lib.tfadam_threading() == 1
    assert native._loaded_openmp_runtimes() == {runtime}  # one runtime: one team


def test_kernels_leave_torchs_threads_float_mode_alone() -> None:
    # TF's flush-to-zero is set for our chunks only: torch's own ops on the
    # same threads must still see subnormals afterwards.
    assert _dense_agrees(21)
    tiny = torch.full((1_000_000,), 1e-40)  # subnormal in float32
    with threads(2):
        assert _dense_agrees(22)
        assert torch.equal(tiny * 1.0, tiny)
        assert bool((tiny + tiny > 0).all())


def test_own_thread_pool_build_agrees(
    tmp_path, monkeypatch: pytest.MonkeyPatch, run_time_build: None
) -> None:  # type: ignore[no-untyped-def]
    """The build for torch builds without GNU OpenMP: the kernels' own pool."""
    monkeypatch.setenv("TFADAM_OPENMP", "0")
    pooled = native.build(tmp_path)
    assert pooled.tfadam_threading() == 0
    monkeypatch.setattr(native, "_library", pooled)
    monkeypatch.setattr(native, "_loaded", True)
    for n in (2, 7):
        with threads(n):
            assert _dense_agrees(23 + n)
            generator = torch.Generator().manual_seed(n)
            table = [random_tensor((5000, 24), torch.float32, generator) for _ in range(3)]
            table[2] = table[2].abs()
            indices = torch.randint(0, 5000, (3000,), generator=generator)
            values = random_tensor((3000, 24), torch.float32, generator)
            for lazy in (False, True):
                expected_table, actual_table = clones(table), clones(table)
                c = coefficients(torch.float32, 2)
                reference.sparse_step(
                    *expected_table, indices, values, c, lazy=lazy, numerics="eager"
                )
                kernels.sparse_step(*actual_table, indices, values, c, lazy=lazy, numerics="eager")
                for a, e in zip(actual_table, expected_table, strict=True):
                    assert_same_bits(a, e, f"pool, {n} threads, lazy={lazy}")


def _dense_agrees(seed: int) -> bool:
    shapes = [(150_001,), (70_000,)]
    expected = dense_state(shapes, torch.float32, seed=seed, amsgrad=False)
    actual = {k: clones(v) for k, v in expected.items()}
    grads = gradients(shapes, torch.float32, seed=seed)
    c = coefficients(torch.float32, 2)
    for _ in range(3):
        run_dense(reference.dense_step, expected, grads, c=c, nesterov=False)
        run_dense(kernels.dense_step, actual, grads, c=c, nesterov=False)
    try:
        assert_states_equal(actual, expected)
    except AssertionError:
        return False
    return True


def test_concurrent_python_threads() -> None:
    # ctypes drops the GIL: several Python threads may be inside the C kernels
    # at once; the thread pool serves one job, the others run on their own thread.
    results: dict[int, bool] = {}
    workers = [
        threading.Thread(target=lambda s=s: results.__setitem__(s, _dense_agrees(s)))
        for s in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert results == {0: True, 1: True, 2: True, 3: True}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_kernels_work_in_a_forked_child() -> None:
    assert _dense_agrees(11)  # the helper threads exist in this process now
    shapes = [(150_001,), (70_000,)]
    expected = dense_state(shapes, torch.float32, seed=12, amsgrad=False)
    grads = gradients(shapes, torch.float32, seed=12)
    # No NaNs: a block holding one goes to the reference, whose torch ops the
    # child must not run threaded (see below).
    for t in [*expected["theta"], *grads]:
        t.nan_to_num_(0.0)
    actual = {k: clones(v) for k, v in expected.items()}
    c = coefficients(torch.float32, 2)
    run_dense(reference.dense_step, expected, grads, c=c, nesterov=False)
    threads_before = torch.get_num_threads()
    pid = os.fork()
    if pid == 0:  # the child has no helper threads: the pool must start afresh
        # torch's own OpenMP pool is not fork-safe (a parallel torch op hangs in
        # the child, as DataLoader workers know): only our kernels run threaded.
        torch.set_num_threads(1)
        try:
            with threads(2):
                run_dense(kernels.dense_step, actual, grads, c=c, nesterov=False)
            assert_states_equal(actual, expected)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert torch.get_num_threads() == threads_before
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
