"""``python -m tfadam bench``'s bar checks, on medians chosen to sit either side of each bar."""

from __future__ import annotations

import pytest

from tfadam.bench import (
    BARS,
    WORKLOADS,
    Contender,
    Report,
    report_alone,
    report_dense,
    report_sparse,
)

# (bar name, wanted as printed, a value that holds, one that does not)
SPEC = [
    ("D1: tfadam vs torch fused (speed-up)", ">= 1x", 1.0, 0.99),
    ("D1: tfadam vs TF1 (speed-up)", ">= 1.5x", 1.5, 1.49),
    ("D1: tfadam vs the memory-traffic floor (speed-up)", ">= 0.8x", 0.8, 0.79),
    ("D2: tfadam vs torch fused (speed-up)", ">= 2x", 2.0, 1.99),
    ("D2: tfadam step / memory-traffic floor step (time)", "<= 2x", 2.0, 2.01),
    ("D2 alone: tfadam vs torch fused, the two alternating (speed-up)", ">= 2x", 2.0, 1.99),
    ("D2 alone: tfadam step / floor step, the two alternating (time)", "<= 2x", 2.0, 2.01),
    ("D3: tfadam vs torch fused, bf16 (speed-up)", ">= 1x", 1.0, 0.99),
    ("S1: tfadam vs TF1's sparse path (speed-up)", ">= 5x", 5.0, 4.99),
    ("S1: tfadam S1 step / tfadam D1-sized dense step (time)", "<= 1.25x", 1.25, 1.26),
    ("S2: tfadam lazy vs torch.optim.SparseAdam (speed-up)", ">= 2x", 2.0, 1.99),
    ("transient memory of a step, worst tfadam workload", "<= 5% of parameter bytes", 5.0, 5.01),
    ("cold start: first step, empty kernel cache", "<= 5 s", 5.0, 5.01),
    ("cold start: first step, warm kernel cache", "<= 1 s", 1.0, 1.01),
]


def test_the_bars_are_the_specs() -> None:
    assert [(b.name, b.wanted) for b in BARS] == [(name, wanted) for name, wanted, _, _ in SPEC]


@pytest.mark.parametrize(("name", "wanted", "holds", "fails"), SPEC, ids=[s[0] for s in SPEC])
def test_each_bar_holds_at_its_limit_and_not_past_it(
    name: str, wanted: str, holds: float, fails: float
) -> None:
    for value, verdict in ((holds, True), (fails, False)):
        report = Report()
        report.measure(name, value)
        [(row_name, row_wanted, _, ok)] = report.bar_rows()
        assert (row_name, row_wanted, ok) == (name, wanted, verdict)


def timed(name: str, ms: float) -> Contender:
    return Contender(name, lambda: None, times=[ms / 1e3])


def bar_values(report: Report) -> dict[str, str]:
    return {name: measured for name, _, measured, _ in report.bar_rows()}


def test_d2_bars_come_from_the_rotation_medians() -> None:
    report = Report()
    rotation = [
        timed("tfadam", 10.0),
        timed("torch fused", 19.0),
        timed("torch foreach", 40.0),
        timed("floor (traffic)", 4.0),
    ]
    report_dense(report, WORKLOADS["D2"], rotation, [])
    rows = {name: ok for name, _, _, ok in report.bar_rows()}
    assert rows == {
        "D2: tfadam vs torch fused (speed-up)": False,  # 1.9x < 2x
        "D2: tfadam step / memory-traffic floor step (time)": False,  # 2.5x > 2x
    }
    assert bar_values(report)["D2: tfadam vs torch fused (speed-up)"] == "1.90x"


def test_d2_alone_bars_come_from_the_pairs() -> None:
    report = Report()
    pairs = [
        (timed("tfadam", 8.0), timed("torch fused", 17.0)),
        (timed("tfadam", 9.0), timed("floor (traffic)", 4.4)),
    ]
    report_alone(report, WORKLOADS["D2"], pairs)
    rows = {name: (measured, ok) for name, _, measured, ok in report.bar_rows()}
    assert rows == {
        "D2 alone: tfadam vs torch fused, the two alternating (speed-up)": ("2.12x", True),
        "D2 alone: tfadam step / floor step, the two alternating (time)": ("2.05x", False),
    }


def test_s2_is_measured_against_sparse_adam_and_s1_against_tf() -> None:
    report = Report()
    rotation = [
        timed("tfadam S1 (dense-equivalent)", 20.0),
        timed("tfadam S2 (lazy)", 1.0),
        timed("tfadam dense step, same table", 16.0),
        timed("torch fused dense step, same table", 15.0),
        timed("torch SparseAdam (lazy)", 2.5),
    ]
    tf_process = [
        timed("tfadam S1 (dense-equivalent), TF process", 22.0),
        timed("tfadam S2 (lazy), TF process", 1.1),
        timed("TF1 AdamOptimizer sparse (IndexedSlices)", 121.0),
    ]
    report_sparse(report, WORKLOADS["S1"], rotation, {"S1", "S2"}, tf_process)
    assert bar_values(report) == {
        "S1: tfadam vs TF1's sparse path (speed-up)": "5.50x",  # within the TF process
        "S1: tfadam S1 step / tfadam D1-sized dense step (time)": "1.25x",
        "S2: tfadam lazy vs torch.optim.SparseAdam (speed-up)": "2.50x",
    }


def test_a_bar_that_could_not_be_measured_says_why() -> None:
    report = Report()
    report_dense(report, WORKLOADS["D1"], [timed("tfadam", 1.0), timed("torch fused", 1.0)], [])
    rows = {name: (measured, ok) for name, _, measured, ok in report.bar_rows()}
    assert rows["D1: tfadam vs TF1 (speed-up)"] == ("TF not run", None)
    assert rows["D1: tfadam vs the memory-traffic floor (speed-up)"][1] is None
    with pytest.raises(KeyError, match="no bar"):
        report.measure("D9: not a bar", 1.0)
