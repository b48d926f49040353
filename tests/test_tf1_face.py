"""``tfadam.AdamOptimizer``: TF1's calling convention and TF1's error cases.

Every failing call is checked to leave every tensor bit-identical."""

import pytest
import torch
from tf_oracle import bits

import tfadam


def snapshot(*tensors):
    return [bits(t).copy() for t in tensors]


def unchanged(before, *tensors) -> bool:
    return all((b == bits(t)).all() for b, t in zip(before, tensors, strict=True))


def trained_optimizer():
    """An optimizer after one step on two variables, so slots and accumulators exist."""
    a, b = torch.ones(3, 2), torch.zeros(4)
    step = torch.tensor(0)
    opt = tfadam.AdamOptimizer(0.1)
    opt.apply_gradients([(torch.ones(3, 2), a), (torch.ones(4), b)], global_step=step)
    everything = [a, b, step, *opt.variables()]
    return opt, a, b, step, everything


def test_apply_gradients_increments_global_step_and_creates_slots() -> None:
    opt, a, b, step, _ = trained_optimizer()
    assert int(step) == 1
    assert opt.get_slot_names() == ["m", "v"]
    assert opt.get_slot(a, "m").shape == a.shape and opt.get_slot(b, "v") is not None
    assert opt.get_slot(a, "nope") is None and opt.get_slot(torch.ones(1), "m") is None
    b1p, b2p = opt._get_beta_accumulators()
    assert b1p.dtype == torch.float32 and float(b1p) == float(torch.tensor(0.9) * 0.9)
    assert len(opt.variables()) == 2 + 4
    assert opt.get_name() == "Adam" and opt.use_locking is False


def test_none_gradients_are_skipped_but_accumulators_advance() -> None:
    opt, a, b, step, _ = trained_optimizer()
    b_before = b.clone()
    power_before = float(opt._get_beta_accumulators()[0])
    opt.apply_gradients([(torch.ones(3, 2), a), (None, b)])
    assert (bits(b) == bits(b_before)).all()
    assert float(opt._get_beta_accumulators()[0]) < power_before


def test_compute_gradients_with_callable_and_tensor_loss() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.tensor([3.0], requires_grad=True)
    opt = tfadam.AdamOptimizer()
    pairs = opt.compute_gradients(lambda: (w**2).sum(), var_list=[w, unused])
    assert torch.equal(pairs[0][0], 2 * w.detach()) and pairs[0][1] is w
    assert pairs[1] == (None, unused)
    discovered = opt.compute_gradients((w * 3).sum())  # var_list=None: the loss's leaves
    assert [v for _, v in discovered] == [w] and torch.equal(
        discovered[0][0], torch.full((2,), 3.0)
    )
    scaled = opt.compute_gradients((w * 3).sum(), var_list=[w], grad_loss=torch.tensor(2.0))
    assert torch.equal(scaled[0][0], torch.full((2,), 6.0))


def test_minimize_equals_compute_then_apply() -> None:
    w1 = torch.tensor([1.0, -2.0], requires_grad=True)
    w2 = torch.tensor([1.0, -2.0])
    step = torch.tensor(5, dtype=torch.int64)
    opt1, opt2 = tfadam.AdamOptimizer(0.01), tfadam.AdamOptimizer(0.01)
    for _ in range(3):
        opt1.minimize(lambda: (w1**3).sum(), global_step=step, var_list=[w1])
        opt2.apply_gradients([(3 * w2**2, w2)])
    assert (bits(w1) == bits(w2)).all() and int(step) == 8


def test_minimize_with_sparse_embedding_gradient() -> None:
    table = torch.nn.Embedding(10, 3, sparse=True)
    opt = tfadam.AdamOptimizer(0.1)
    before = table.weight.detach().clone()
    opt.minimize(lambda: table(torch.tensor([1, 1, 4])).sum(), var_list=[table.weight])
    moved = (table.weight.detach() != before).any(1)
    assert moved.tolist() == [i in (1, 4) for i in range(10)]


def test_a_variable_first_updated_later_gets_the_current_accumulators() -> None:
    opt, a, _, _, _ = trained_optimizer()
    late = torch.ones(2)
    opt.apply_gradients([(torch.ones(2), late)])
    fresh, fresh_var = tfadam.AdamOptimizer(0.1), torch.ones(2)
    fresh.apply_gradients([(torch.ones(2), fresh_var)])
    assert not (bits(late) == bits(fresh_var)).all()  # alpha uses beta_power^2, not beta


BAD_CALLS = {
    "no variables": (lambda a, b: [], ValueError, "No variables provided"),
    "all gradients None": (
        lambda a, b: [(None, a), (None, b)],
        ValueError,
        r"No gradients provided for any variable",
    ),
    "non-float variable": (
        lambda a, b: [(torch.ones(3, 2), a), (torch.ones(2), torch.ones(2, dtype=torch.int32))],
        TypeError,
        r"variable #1 .*int32.*not a floating variable",
    ),
    "shape mismatch": (
        lambda a, b: [(torch.ones(3, 2), a), (torch.ones(5), b)],
        ValueError,
        r"gradient of variable #1 .* has shape \(5,\) but the variable has shape \(4,\)",
    ),
    "dtype mismatch": (
        lambda a, b: [(torch.ones(3, 2), a), (torch.ones(4, dtype=torch.float64), b)],
        TypeError,
        r"variable #1 .*float64.*float32",
    ),
    "device mismatch": (
        lambda a, b: [(torch.ones(3, 2), a), (torch.ones(4, device="meta"), b)],
        ValueError,
        r"variable #1 .* on meta",
    ),
    "index out of range": (
        lambda a, b: [
            (torch.ones(3, 2), a),
            (tfadam.IndexedSlices(torch.ones(2), torch.tensor([1, 4]), (4,)), b),
        ],
        ValueError,
        r"variable #1 .*index 4 is out of range .* 4 rows",
    ),
    "negative index": (
        lambda a, b: [(tfadam.IndexedSlices(torch.ones(1, 2), torch.tensor([-1]), (3, 2)), a)],
        ValueError,
        r"variable #0 .*index -1 is out of range",
    ),
    "dense_shape mismatch": (
        lambda a, b: [(tfadam.IndexedSlices(torch.ones(1, 2), torch.tensor([0]), (9, 2)), a)],
        ValueError,
        r"dense_shape \(9, 2\) but the variable has shape \(3, 2\)",
    ),
    "float indices": (
        lambda a, b: [(tfadam.IndexedSlices(torch.ones(1, 2), torch.tensor([0.0]), (3, 2)), a)],
        TypeError,
        r"indices are torch.float32",
    ),
    "non-leaf variable": (
        lambda a, b: [(torch.ones(3), torch.ones(3, requires_grad=True) * 2)],
        ValueError,
        r"not a leaf tensor",
    ),
    "variable passed twice": (
        lambda a, b: [(torch.ones(4), b), (torch.ones(4), b)],
        ValueError,
        r"appears twice",
    ),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_raise_clear_errors_and_modify_nothing(case: str) -> None:
    opt, a, b, step, everything = trained_optimizer()
    make_pairs, error, message = BAD_CALLS[case]
    before = snapshot(*everything)
    with pytest.raises(error, match=message):
        opt.apply_gradients(make_pairs(a, b), global_step=step)
    assert unchanged(before, *everything)


def test_bad_hyperparameter_modifies_nothing() -> None:
    a = torch.ones(3)
    opt = tfadam.AdamOptimizer(learning_rate=lambda: float("nan"))
    with pytest.raises(ValueError, match=r"lr=nan"):
        opt.apply_gradients([(torch.ones(3), a)])
    assert (bits(a) == bits(torch.ones(3))).all() and opt.variables() == []


def test_use_locking_serialises_concurrent_calls() -> None:
    import threading

    var = torch.zeros(10_000)
    opt = tfadam.AdamOptimizer(0.01, use_locking=True)
    grads = [torch.full((10_000,), float(i + 1)) for i in range(8)]
    order = []
    lock = threading.Lock()

    def worker(g):
        opt.apply_gradients([(g, var)])
        with lock:
            order.append(g)

    threads = [threading.Thread(target=worker, args=(g,)) for g in grads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert float(opt._get_beta_accumulators()[0]) == pytest.approx(0.9**9, rel=1e-6)
    assert torch.isfinite(var).all()
