"""load_tf_checkpoint is all or nothing for the model and the optimizer.

Every case maps a small TF1-style bundle (``w``, ``w/Adam``, ``w/Adam_1`` and
the beta-power accumulators, the keys TF1's Saver writes) into a model whose
targets or checkpoint values are wrong in one way, and checks that the load
raises before anything changes: every byte of every model tensor, slot and
accumulator is compared with a snapshot taken before the call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tfadam
from tfadam.checkpoint.writer import write_bundle


def _bundle(tmp_path, *, beta1_power=0.81, iterations=None):
    tensors = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "w/Adam": np.full((2, 3), 0.5, np.float32),
        "w/Adam_1": np.full((2, 3), 0.25, np.float32),
        "u": np.arange(3, dtype=np.float32),
        "x": np.ones((3, 2), np.float32),
        "u/Adam": np.full(3, 0.5, np.float32),
        "u/Adam_1": np.full(3, 0.25, np.float32),
        "beta1_power": np.array(beta1_power, np.float32),
        "beta2_power": np.array(0.998, np.float32),
    }
    prefix = str(tmp_path / "model.ckpt-2")
    write_bundle(prefix, tensors)
    return prefix


def _snapshot(tensors):
    # Raw bytes: == on integer views, so that NaN payloads and signed zeros count.
    return [t.detach().reshape(-1).clone().view(torch.uint8) for t in tensors]


def _state_tensors(opt, params):
    found = list(params)
    for p in params:
        found += [t for t in opt.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
    for group in opt.param_groups:
        found += [group[k] for k in ("beta1_power", "beta2_power") if k in group]
    return found


def _meta_model():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    u = torch.nn.Parameter(torch.zeros(3, device="meta"))
    return [w, u], {"w": w, "u": u}


def _overlapping_model():
    base = torch.nn.Parameter(torch.zeros(2, 3))
    # two checkpoint variables into one parameter: each element would get two values
    return [base], {"w": base, "x": base.T}


def _inference_model():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    with torch.inference_mode():
        u = torch.zeros(3)
    return [w], {"w": w, "u": u}


CASES = [
    # (id, model builder, bundle options, error type, message fragment)
    ("meta-model-entry", _meta_model, {}, ValueError, "meta device"),
    ("two-names-one-parameter", _overlapping_model, {}, ValueError, "same parameter"),
    ("inference-target", _inference_model, {}, ValueError, "inference tensor"),
    ("accumulator-out-of-range", None, {"beta1_power": 1.5}, ValueError, "outside [0, 1)"),
    ("accumulator-nan", None, {"beta1_power": float("nan")}, ValueError, "outside [0, 1)"),
]


def _plain_model():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    u = torch.nn.Parameter(torch.zeros(3))
    return [w, u], {"w": w, "u": u}


@pytest.mark.parametrize("face", ["torch", "tf1"])
@pytest.mark.parametrize(
    ("build", "bundle", "error", "fragment"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_a_bad_load_changes_nothing(tmp_path, face, build, bundle, error, fragment):
    prefix = _bundle(tmp_path, **bundle)
    params, var_map = (build or _plain_model)()
    trainable = [p for p in params if not p.is_meta and not p.is_inference()]
    if face == "torch":
        opt = tfadam.Adam(trainable, lr=0.1)
        for p in trainable:  # a state to keep: one step
            p.grad = torch.ones_like(p)
        opt.step()
        watched = _state_tensors(opt, trainable)
    else:
        opt = tfadam.AdamOptimizer(0.1)
        opt.apply_gradients([(torch.ones_like(p), p) for p in trainable])
        watched = [*trainable, *opt.variables()]
    watched += [t for t in var_map.values() if not t.is_meta]
    before = _snapshot(watched)
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        tfadam.load_tf_checkpoint(prefix, opt, var_map)
    after = _snapshot(watched)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_good_load_still_loads(tmp_path):
    prefix = _bundle(tmp_path)
    params, var_map = _plain_model()
    opt = tfadam.Adam(params, lr=0.1)
    tfadam.load_tf_checkpoint(prefix, opt, var_map)
    assert torch.equal(params[0].detach(), torch.arange(6.0).reshape(2, 3))
    assert torch.equal(opt.state[params[1]]["v"], torch.full((3,), 0.25))
    assert opt.param_groups[0]["beta1_power"].item() == np.float32(0.81)
