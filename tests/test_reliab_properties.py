"""Property tests: the dispatched kernels against the reference, and invariants.

``tfadam.kernels.dense_step``/``sparse_step`` pick a fast implementation where
one applies; whatever they pick must give the bits of
``tfadam.kernels.reference`` on every dtype, size (vector tails included),
memory layout, option and hyperparameter hypothesis generates. Invariants on
the dispatched kernels: ``v >= 0``; lazy mode leaves untouched rows bitwise
unchanged; ``lr = 0`` leaves θ unchanged (up to TF's flush of subnormals
and the sign of a zero).

Reproducible and bounded: derandomized, no example database, no deadline,
``max_examples`` fixed per test (1,250 examples in all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tfadam import kernels, rule
from tfadam.kernels import reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def ci(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(autouse=True, scope="module")
def one_intraop_thread():
    # Tiny tensors: torch's intra-op pool only adds latency (5-10x on a loaded
    # 2-core machine, measured).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- generated inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fill:
    """How to fill a tensor: a seed, a scale, and special values at some positions."""

    seed: int
    log2_scale: int
    specials: tuple[tuple[int, float], ...]
    nonnegative: bool = False

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0**self.log2_scale
        flat = t.reshape(-1)
        for position, value in self.specials:
            if flat.numel():
                flat[position % flat.numel()] = value
        if self.nonnegative:
            t = t.abs()
        return t.to(dtype)


def special_values(finite: bool) -> st.SearchStrategy[float]:
    # Subnormals of each dtype, float16's largest finite value, 3e38 (Inf in float16).
    values = [0.0, -0.0, 5e-324, 1e-45, 6e-8, 1e-30, 1.0, -1.0, 65504.0, -65504.0]
    if not finite:
        values += [3e38, float("inf"), float("-inf"), float("nan")]
    return st.sampled_from(values)


def fills(*, finite: bool = False, nonnegative: bool = False, scale=(-20, 8)) -> st.SearchStrategy:
    return st.builds(
        Fill,
        seed=st.integers(0, 2**31 - 1),
        log2_scale=st.integers(*scale),
        specials=st.lists(
            st.tuples(st.integers(0, 10_000), special_values(finite)), max_size=3
        ).map(tuple),
        nonnegative=st.just(nonnegative),
    )


LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]


def laid_out(make: Callable[[tuple[int, ...]], torch.Tensor], shape, layout: str) -> torch.Tensor:
    """A tensor of ``shape`` in ``layout`` (values from ``make``), for in-place use or reading."""
    if layout == "transposed" and len(shape) == 2:
        return make((shape[1], shape[0])).t()
    if layout == "strided" and len(shape) >= 1:
        return make((shape[0] * 2, *shape[1:]))[::2]
    if layout == "expanded" and len(shape) >= 1:  # gradients only: read, never written
        return make((1, *shape[1:])).expand(shape)
    return make(shape)


shapes = st.one_of(
    st.tuples(st.integers(0, 70)),  # 1-D, covering vector widths and their tails
    st.tuples(st.integers(1, 9), st.integers(1, 9)),
    st.just(()),
)


@st.composite
def coefficients(draw, dtype: torch.dtype, lr=None) -> rule.Coefficients:
    unit = st.floats(0.0, 0.9999, allow_nan=False)
    return rule.tf1_coefficients(
        lr=draw(st.sampled_from([0.0, 1e-3, 0.1, 10.0]) | st.floats(0, 100)) if lr is None else lr,
        beta1=draw(st.sampled_from([0.0, 0.9]) | unit),
        beta2=draw(st.sampled_from([0.0, 0.999]) | unit),
        epsilon=draw(st.sampled_from([0.0, 1e-8, 1e-7, 1e-4, 1.0]) | st.floats(0, 1)),
        beta1_power=draw(unit),
        beta2_power=draw(unit),
        dtype=dtype,
    )


def nan_or_same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same bits, or NaN in both (a NaN's payload and sign are not part of the contract)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    same = a.contiguous().view(ints) == b.contiguous().view(ints)
    return bool((same | (a.isnan() & b.isnan())).all())


def bits_of(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints).clone()


# -- dispatched kernels == reference -------------------------------------------------------------


@st.composite
def dense_cases(draw, finite: bool = False):
    """Finite: finite gradients and state at moderate scales (no Inf - Inf anywhere)."""
    dtype = draw(st.sampled_from(DTYPES))
    value = fills(finite=True, scale=(-20, 4)) if finite else fills()
    positive = (
        fills(finite=True, nonnegative=True, scale=(-20, 4)) if finite else fills(nonnegative=True)
    )
    count = draw(st.integers(1, 3))
    tensors = []
    for _ in range(count):
        shape = draw(shapes)
        tensors.append(
            dict(
                shape=shape,
                param_layout=draw(st.sampled_from(LAYOUTS[:3])),
                grad_layout=draw(st.sampled_from(LAYOUTS)),
                theta=draw(value),
                grad=draw(value),
                m=draw(value),
                v=draw(positive),
                vhat=draw(positive),
            )
        )
    return dict(
        dtype=dtype,
        tensors=tensors,
        c=draw(coefficients(dtype)),
        nesterov=draw(st.booleans()),
        amsgrad=draw(st.booleans()),
    )


def build_dense(case) -> dict[str, list[torch.Tensor]]:
    dtype, built = case["dtype"], {"theta": [], "grad": [], "m": [], "v": [], "vhat": []}
    for spec in case["tensors"]:
        for name in built:
            layout = spec["grad_layout"] if name == "grad" else spec["param_layout"]
            if name != "grad" and layout == "expanded":
                layout = "contiguous"
            built[name].append(
                laid_out(lambda s, f=spec[name]: f.tensor(s, dtype), spec["shape"], layout)
            )
    return built


def run_dense(step, case) -> dict[str, list[torch.Tensor]]:
    t = build_dense(case)
    step(t["theta"], t["grad"], t["m"], t["v"], t["vhat"] if case["amsgrad"] else None,
         case["c"], nesterov=case["nesterov"])  # fmt: skip
    return t


@ci(350)
@given(dense_cases())
def test_dense_dispatch_matches_reference(case):
    fast = run_dense(kernels.dense_step, case)
    slow = run_dense(reference.dense_step, case)
    for name in fast:
        for i, (a, b) in enumerate(zip(fast[name], slow[name], strict=True)):
            assert nan_or_same_bits(a, b), f"{name}[{i}] differs"


@st.composite
def sparse_cases(draw, finite: bool = False):
    dtype = draw(st.sampled_from(DTYPES))
    value = fills(finite=True, scale=(-20, 4)) if finite else fills()
    positive = (
        fills(finite=True, nonnegative=True, scale=(-20, 4)) if finite else fills(nonnegative=True)
    )
    rows, cols = draw(st.integers(1, 20)), draw(st.integers(0, 6))
    n = draw(st.integers(0, 24))
    indices = draw(st.lists(st.integers(0, rows - 1), min_size=n, max_size=n))
    return dict(
        dtype=dtype,
        shape=(rows, cols),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        indices=indices,
        index_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        theta=draw(value),
        m=draw(value),
        v=draw(positive),
        values=draw(value),
        c=draw(coefficients(dtype)),
        lazy=draw(st.booleans()),
        numerics=draw(st.sampled_from(["eager", "graph"])),
    )


def run_sparse(step, case, c=None) -> dict[str, torch.Tensor]:
    dtype, shape = case["dtype"], case["shape"]
    t = {
        name: laid_out(lambda s, f=case[name]: f.tensor(s, dtype), shape, case["layout"])
        for name in ("theta", "m", "v")
    }
    t["indices"] = torch.tensor(case["indices"], dtype=case["index_dtype"])
    t["values"] = case["values"].tensor((len(case["indices"]), shape[1]), dtype)
    step(t["theta"], t["m"], t["v"], t["indices"], t["values"], c or case["c"],
         lazy=case["lazy"], numerics=case["numerics"])  # fmt: skip
    return t


@ci(350)
@given(sparse_cases())
def test_sparse_dispatch_matches_reference(case):
    fast = run_sparse(kernels.sparse_step, case)
    slow = run_sparse(reference.sparse_step, case)
    for name in ("theta", "m", "v"):
        assert nan_or_same_bits(fast[name], slow[name]), f"{name} differs"


# -- invariants, on the dispatched kernels -------------------------------------------------------


def finite_dense_or_sparse_cases():
    """(sparse, case): a dense or a sparse case of finite values."""
    return st.booleans().flatmap(
        lambda sparse: st.tuples(
            st.just(sparse), (sparse_cases(finite=True) if sparse else dense_cases(finite=True))
        )
    )


def finite_in_dtype(case) -> bool:
    """A special like 3e38 is finite as a double but Inf in float16."""
    limit = torch.finfo(case["dtype"]).max
    fills = [f for s in case.get("tensors", [case]) for f in s.values() if isinstance(f, Fill)]
    return all(abs(v) <= limit for f in fills for _, v in f.specials)


@ci(200)
@given(finite_dense_or_sparse_cases())
def test_v_stays_nonnegative(sparse_and_case):
    sparse, case = sparse_and_case
    assume(finite_in_dtype(case))
    if sparse:
        v_after = [run_sparse(kernels.sparse_step, case)["v"]]
    else:
        v_after = run_dense(kernels.dense_step, case)["v"]
    for v in v_after:
        assert not v.isnan().any() and bool((v >= 0).all()), v


@ci(175)
@given(st.data())
def test_lazy_mode_leaves_untouched_rows_bitwise_unchanged(data):
    case = data.draw(sparse_cases())
    case["lazy"] = True
    before = run_sparse(lambda *a, **k: None, case)
    after = run_sparse(kernels.sparse_step, case)
    untouched = sorted(set(range(case["shape"][0])) - set(case["indices"]))
    for name in ("theta", "m", "v"):
        assert torch.equal(bits_of(after[name][untouched]), bits_of(before[name][untouched]))


@ci(175)
@given(finite_dense_or_sparse_cases())
def test_zero_learning_rate_leaves_theta_unchanged(sparse_and_case):
    sparse, case = sparse_and_case
    assume(finite_in_dtype(case))
    c = rule.tf1_coefficients(
        lr=0.0, beta1=0.9, beta2=0.999, epsilon=1.0, beta1_power=0.5, beta2_power=0.5,
        dtype=case["dtype"],
    )  # fmt: skip
    if sparse:
        pairs = [(run_sparse(lambda *a, **k: None, case)["theta"],
                  run_sparse(kernels.sparse_step, case, c)["theta"])]  # fmt: skip
    else:
        case["c"] = c
        before = build_dense(case)["theta"]
        pairs = list(zip(before, run_dense(kernels.dense_step, case)["theta"], strict=True))
    for old, new in pairs:
        # θ - (±0) keeps θ's bits, with two IEEE/TF exceptions that keep the
        # value: -0 - (-0) is +0, and TF's CPU kernels flush a subnormal θ to
        # zero (float32, float64, bfloat16; float16's subnormals are normal in
        # the float32 it computes in).
        may_change = old == 0
        if case["dtype"] != torch.float16:
            may_change |= old.abs() < torch.finfo(case["dtype"]).tiny
        moved = bits_of(new) != bits_of(old)
        assert not (moved & ~(may_change & (new == 0))).any()
