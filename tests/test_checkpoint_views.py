"""The README's mapping views (``linear.weight.T``) after the load, in each face.

Loading through a view lays the values and slots out like the parameter. Then:
the torch face steps its parameters (torch optimizers take leaf tensors only);
the TF1 face takes the parameter (a fresh ``weight.T`` is refused, since its
slots would start from zero); the Keras face takes the parameter or any view
of all of it, as ``tf.Variable``\\ s are passed in Keras.
Bitwise resumption through views is in test_checkpoint_load.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ckpt_tf import BETA1, BETA2, EPS, LR, keras_resume_run, tf1_session_run
from test_checkpoint_load import Model, to_torch

import tfadam
import tfadam.keras
from tfadam.checkpoint import load_tf_checkpoint


@pytest.fixture(scope="module")
def tf1_run(tmp_path_factory):
    return tf1_session_run(str(tmp_path_factory.mktemp("views")), seed=9)


def test_tf1_face_refuses_a_fresh_view_of_a_slotted_variable(tf1_run):
    model = Model(torch.float32, partitioned=True)
    opt = tfadam.AdamOptimizer(LR, BETA1, BETA2, EPS, numerics="graph")
    load_tf_checkpoint(tf1_run.prefix, opt, model.var_map())
    weight = model.dense.weight.detach().clone()
    m = opt.get_slot(model.dense.weight, "m").clone()
    grad = torch.ones_like(model.dense.weight)
    with pytest.raises(ValueError, match=r"is a view of a variable that has Adam slots"):
        opt.apply_gradients([(grad.T, model.dense.weight.T), (grad[0], model.dense.bias)])
    assert torch.equal(model.dense.weight, weight) and torch.equal(
        opt.get_slot(model.dense.weight, "m"), m
    )
    opt.apply_gradients([(grad, model.dense.weight)])  # the parameter itself: fine
    assert not torch.equal(model.dense.weight, weight)


def test_torch_face_steps_the_parameters(tf1_run):
    model = Model(torch.float32, partitioned=True)
    opt = tfadam.Adam(model.parameters(), lr=LR, numerics="graph")
    load_tf_checkpoint(tf1_run.prefix, opt, model.var_map())
    assert opt.state[model.dense.weight]["m"].shape == model.dense.weight.shape
    with pytest.raises(ValueError, match="non-leaf"):
        tfadam.Adam([model.dense.weight.T])  # torch.optim's own rule


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory):
    return keras_resume_run(str(tmp_path_factory.mktemp("kviews")))


def keras_loaded(run):
    hidden, out = torch.nn.Linear(6, 4), torch.nn.Linear(4, 2)
    var_map = {
        "mlp/hidden/kernel": hidden.weight.T,
        "mlp/hidden/bias": hidden.bias,
        "mlp/out/kernel": out.weight.T,
        "mlp/out/bias": out.bias,
    }
    opt = tfadam.keras.Adam()
    load_tf_checkpoint(run.prefix, opt, var_map)
    return hidden, out, opt


def snapshot(opt, *modules):
    tensors = [p.detach().clone() for m in modules for p in m.parameters()]
    return tensors + [v.clone() for v in opt.variables]


def unchanged(before, opt, *modules):
    return all(torch.equal(a, b) for a, b in zip(before, snapshot(opt, *modules), strict=True))


def test_keras_face_takes_views_and_parameters_alike(keras_run):
    grads = keras_run.dense_grads[0]
    kernel = to_torch(grads["mlp/hidden/kernel"])  # Keras' (in, out)
    results = []
    for as_view in (True, False):
        hidden, out, opt = keras_loaded(keras_run)
        if as_view:
            opt.apply_gradients([(kernel, hidden.weight.T)])
        else:
            opt.apply_gradients([(kernel.T.contiguous(), hidden.weight)])
        results.append(snapshot(opt, hidden, out))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize(
    "bad",
    ["sparse gradient on a view", "wrong dtype", "two views of one variable", "a partial view"],
)
def test_keras_face_refuses_bad_views_and_changes_nothing(keras_run, bad):
    hidden, out, opt = keras_loaded(keras_run)
    before = snapshot(opt, hidden, out)
    kernel = torch.ones(6, 4)
    pairs = {
        "sparse gradient on a view": [
            (tfadam.IndexedSlices(torch.ones(1, 4), torch.tensor([0]), (6, 4)), hidden.weight.T)
        ],
        "wrong dtype": [(kernel.double(), hidden.weight.T)],
        "two views of one variable": [(kernel, hidden.weight.T), (kernel, hidden.weight.T)],
        "a partial view": [(kernel[:3], hidden.weight.T[:3])],
    }[bad]
    with pytest.raises(ValueError):
        opt.apply_gradients(pairs)
    assert unchanged(before, opt, hidden, out)
    assert int(opt.iterations) == 3 and np.isfinite(hidden.weight.detach().numpy()).all()
