"""Integer variables: a TF1 run whose learning rate decays with ``global_step``
resumes in tfadam with its counter, bit for bit (TF continuing is the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ckpt_tf import BETA1, BETA2, DECAY_RATE, DECAY_STEPS, EPS, LR, SHAPES, tf1_global_step_run
from test_checkpoint_load import assert_same_bits, to_torch

import tfadam
from tfadam.checkpoint import convert, load_tf_checkpoint

BEFORE = AFTER = 50


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tf1_global_step_run(str(tmp_path_factory.mktemp("gs")), before=BEFORE, after=AFTER)


def exponential_decay(step: torch.Tensor) -> torch.Tensor:
    """``tf.compat.v1.train.exponential_decay(LR, step, 7, 0.9)`` as a TF1 Session runs it.

    Grappler rewrites ``step / 7`` into ``step * (1 / 7)`` (in float32), which
    rounds differently; eager TF divides.
    """
    one_seventh = torch.tensor(1.0) / torch.tensor(DECAY_STEPS, dtype=torch.float32)
    p = step.to(torch.float32) * one_seventh
    return torch.tensor(LR, dtype=torch.float32) * torch.pow(
        torch.tensor(DECAY_RATE, dtype=torch.float32), p
    )


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(*SHAPES["dense/kernel"])

    def var_map(self, step: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "dense/kernel": self.dense.weight.T,
            "dense/bias": self.dense.bias,
            "global_step": step,
        }

    def set_grads(self, grads: dict[str, np.ndarray]) -> None:
        self.dense.weight.grad = to_torch(grads["dense/kernel"]).T.contiguous()
        self.dense.bias.grad = to_torch(grads["dense/bias"])


def check(model: Model, slots, step: torch.Tensor, beta_powers, run) -> None:
    for name, tensor in (("dense/kernel", model.dense.weight.T), ("dense/bias", model.dense.bias)):
        m, v = slots(tensor if tensor._base is None else tensor._base)
        if tensor._base is not None:
            m, v = m.T, v.T
        assert_same_bits(tensor, run.final[name], name)
        assert_same_bits(m, run.final[name + "/m"], name + "/m")
        assert_same_bits(v, run.final[name + "/v"], name + "/v")
    assert_same_bits(beta_powers[0], run.beta_powers[0], "beta1_power")
    assert_same_bits(beta_powers[1], run.beta_powers[1], "beta2_power")
    assert_same_bits(step, run.final["global_step"], "global_step")
    assert int(step) == BEFORE + AFTER


def test_the_schedule_matches_tf_at_every_step(run):
    for i in range(BEFORE, BEFORE + AFTER):
        assert_same_bits(exponential_decay(torch.tensor(i)), run.final[f"lr/{i}"], f"lr at {i}")


def test_tf1_face_resumes_with_the_counter(run):
    model, step = Model(), torch.tensor(-1, dtype=torch.int64)
    opt = tfadam.AdamOptimizer(lambda: exponential_decay(step), BETA1, BETA2, EPS, numerics="graph")
    result = load_tf_checkpoint(run.prefix, opt, model.var_map(step))
    assert int(step) == BEFORE and result.variables["global_step"] == "global_step"
    assert "global_step" not in result.slots and "global_step" not in result.unused
    params = [model.dense.weight, model.dense.bias]
    for grads in run.dense_grads:
        model.set_grads(grads)
        opt.apply_gradients([(p.grad, p) for p in params], global_step=step)
    check(
        model,
        lambda p: (opt.get_slot(p, "m"), opt.get_slot(p, "v")),
        step,
        opt._get_beta_accumulators(),
        run,
    )


def test_torch_face_resumes_with_the_counter(run):
    model, step = Model(), torch.tensor(0, dtype=torch.int64)
    opt = tfadam.Adam(
        model.parameters(),
        lr=lambda: exponential_decay(step),
        betas=(BETA1, BETA2),
        eps=EPS,
        numerics="graph",
    )
    load_tf_checkpoint(run.prefix, opt, model.var_map(step))
    assert int(step) == BEFORE
    for grads in run.dense_grads:
        model.set_grads(grads)
        opt.step()
        step += 1
    group = opt.param_groups[0]
    check(
        model,
        lambda p: (opt.state[p]["m"], opt.state[p]["v"]),
        step,
        (group["beta1_power"], group["beta2_power"]),
        run,
    )


def test_an_integer_variable_loads_without_an_optimizer_and_into_keras_face(run):
    import tfadam.keras

    for optimizer in (None, tfadam.keras.Adam()):
        step = torch.tensor(0, dtype=torch.int64)
        load_tf_checkpoint(run.prefix, optimizer, {"global_step": step})
        assert int(step) == BEFORE
    assert not optimizer.built  # an integer variable is never an optimizer variable
    wrong = torch.tensor(0, dtype=torch.int32)  # TF's global_step is int64
    with pytest.raises(ValueError, match="'global_step' is \\[\\] int64 in the checkpoint"):
        load_tf_checkpoint(run.prefix, None, {"global_step": wrong})
    assert int(wrong) == 0


def test_convert_lists_the_counter(run, tmp_path):
    result = convert(run.prefix, tmp_path / "out.pt")
    assert result.model["global_step"] == "global_step"
    saved = torch.load(tmp_path / "out.pt")
    assert saved["model"]["global_step"].dtype == torch.int64
    assert int(saved["model"]["global_step"]) == BEFORE
