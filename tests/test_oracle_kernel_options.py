"""nesterov and amsgrad against TF's own kernels, and lazy mode against an
independent numpy transcription of semantics.md's lazy rule.

TF1's AdamOptimizer exposes neither kernel option, so the oracle is
``tf.raw_ops.ResourceApplyAdam(use_nesterov=True)`` and
``tf.raw_ops.ResourceApplyAdamWithAmsgrad``, driven with float32 accumulators
exactly as the optimizer would.
"""

import numpy as np
import pytest
import tensorflow as tf
import torch
from scenarios import random_shape
from tf_oracle import NP_DTYPES, bits, to_torch

import tfadam

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def tf_raw_adam(theta0, grads, lr, beta1, beta2, eps, *, nesterov=False, amsgrad=False):
    var, m, v = (tf.Variable(x) for x in (theta0, np.zeros_like(theta0), np.zeros_like(theta0)))
    vhat = tf.Variable(np.zeros_like(theta0))
    beta1_power, beta2_power = tf.constant(beta1, tf.float32), tf.constant(beta2, tf.float32)
    out = []
    for g in grads:

        def cast(x):
            return tf.cast(x, var.dtype)

        scalars = dict(
            beta1_power=cast(beta1_power),
            beta2_power=cast(beta2_power),
            lr=cast(tf.constant(lr, tf.float32)),
            beta1=cast(tf.constant(beta1, tf.float32)),
            beta2=cast(tf.constant(beta2, tf.float32)),
            epsilon=cast(tf.constant(eps, tf.float32)),
            grad=tf.constant(g),
        )
        if amsgrad:
            tf.raw_ops.ResourceApplyAdamWithAmsgrad(
                var=var.handle, m=m.handle, v=v.handle, vhat=vhat.handle, **scalars
            )
        else:
            tf.raw_ops.ResourceApplyAdam(
                var=var.handle, m=m.handle, v=v.handle, use_nesterov=nesterov, **scalars
            )
        beta1_power = beta1_power * tf.constant(beta1, tf.float32)
        beta2_power = beta2_power * tf.constant(beta2, tf.float32)
        out.append([x.numpy() for x in (var, m, v, vhat)])
    return out


@pytest.mark.parametrize("option", ["nesterov", "amsgrad"])
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_options_match_tf_raw_ops(dtype: str, seed: int, option: str) -> None:
    rng = np.random.default_rng(seed)
    shape = random_shape(rng)
    np_dtype = NP_DTYPES[dtype]
    theta0 = rng.standard_normal(shape).astype(np.float32).astype(np_dtype)
    scale = 10 ** rng.uniform(-6, 2)
    grads = [
        (rng.standard_normal(shape) * scale).astype(np.float32).astype(np_dtype) for _ in range(25)
    ]
    lr, beta1 = 10 ** rng.uniform(-4, -1), rng.uniform(0.5, 0.99)
    beta2, eps = rng.uniform(0.9, 0.9999), 10 ** rng.uniform(-10, -2)
    expected = tf_raw_adam(theta0, grads, lr, beta1, beta2, eps, **{option: True})

    param = torch.nn.Parameter(to_torch(theta0))
    opt = tfadam.Adam([param], lr=lr, betas=(beta1, beta2), eps=eps, **{option: True})
    for step, g in enumerate(grads):
        param.grad = to_torch(g)
        opt.step()
        state = opt.state[param]
        actual = [param, state["m"], state["v"], state.get("vhat", torch.zeros_like(param))]
        for name, e, a in zip(("theta", "m", "v", "vhat"), expected[step], actual):
            assert (bits(e) == bits(a)).all(), f"step {step}: {name} differs"


def numpy_lazy_adam(theta, m, v, indices, values, lr, beta1, beta2, eps, b1p, b2p, dtype):
    """semantics.md's lazy rule, transcribed with numpy scalars of dtype T."""
    T = NP_DTYPES[dtype]

    def f32(x):
        return T(np.float32(x))

    order = []
    sums = {}
    for k, row in enumerate(indices):
        if row not in sums:
            order.append(row)
            sums[row] = np.zeros(values.shape[1:], T)
        sums[row] = (sums[row] + values[k]).astype(T)
    one = T(1)
    lr_t = T(T(f32(lr) * T(np.sqrt(T(one - f32(b2p))))) / T(one - f32(b1p)))
    for row in order:
        g = sums[row]
        m[row] = (T(f32(beta1)) * m[row] + T(one - f32(beta1)) * g).astype(T)
        v[row] = (T(f32(beta2)) * v[row] + T(one - f32(beta2)) * (g * g).astype(T)).astype(T)
        step = (lr_t * m[row]).astype(T) / (np.sqrt(v[row]).astype(T) + f32(eps)).astype(T)
        theta[row] = (theta[row] - step.astype(T)).astype(T)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lazy_mode_matches_the_numpy_lazy_rule(dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    T = NP_DTYPES[dtype]
    rows, width = int(rng.integers(3, 40)), int(rng.integers(1, 7))
    theta = rng.standard_normal((rows, width)).astype(np.float32).astype(T)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    lr, beta1, beta2, eps = 0.01, float(rng.uniform(0.5, 0.95)), 0.99, 1e-3
    b1p, b2p = np.float32(beta1), np.float32(beta2)
    param = torch.nn.Parameter(to_torch(theta))
    opt = tfadam.Adam([param], lr=lr, betas=(beta1, beta2), eps=eps, sparse="lazy")
    for _ in range(20):
        k = int(rng.integers(1, 2 * rows))
        indices = rng.integers(0, rows, k)
        values = rng.standard_normal((k, width)).astype(np.float32).astype(T)
        numpy_lazy_adam(theta, m, v, indices, values, lr, beta1, beta2, eps, b1p, b2p, dtype)
        b1p, b2p = np.float32(b1p * np.float32(beta1)), np.float32(b2p * np.float32(beta2))
        param.grad = torch.sparse_coo_tensor(
            torch.from_numpy(indices)[None], to_torch(values), (rows, width)
        )
        opt.step()
        for name, e, a in (
            ("theta", theta, param),
            ("m", m, opt.state[param]["m"]),
            ("v", v, opt.state[param]["v"]),
        ):
            assert (bits(e) == bits(a)).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_amsgrad_with_nan_and_inf_gradients_matches_tf(dtype: str) -> None:
    """TF's cwiseMax keeps vhat when v is NaN; torch.maximum would not."""
    T = NP_DTYPES[dtype]
    rng = np.random.default_rng(0)
    theta0 = np.ones(16, np.float32).astype(T)
    grads = [rng.standard_normal(16).astype(np.float32).astype(T) for _ in range(4)]
    grads[1][3], grads[2][5], grads[2][6] = np.nan, np.inf, -np.inf
    expected = tf_raw_adam(theta0, grads, 0.01, 0.9, 0.999, 1e-8, amsgrad=True)
    param = torch.nn.Parameter(to_torch(theta0))
    opt = tfadam.Adam([param], lr=0.01, amsgrad=True)
    for step, g in enumerate(grads):
        param.grad = to_torch(g)
        opt.step()
        state = opt.state[param]
        for name, e, a in zip(
            ("theta", "m", "v", "vhat"),
            expected[step],
            (param, state["m"], state["v"], state["vhat"]),
        ):
            expected_bits, actual_bits = bits(e), bits(a)
            if dtype == "bfloat16":
                # TF quirk (measured): Eigen's vectorised float->bfloat16 conversion
                # makes every NaN +0x7fc0, its scalar tail keeps the sign (0xffc0),
                # so a NaN's sign depends on the element's position in a packet.
                # tfadam keeps the sign; NaN positions and all other bits must match.
                nan = (expected_bits & 0x7FFF) > 0x7F80
                assert (nan == ((actual_bits & 0x7FFF) > 0x7F80)).all(), name
                expected_bits, actual_bits = expected_bits[~nan], actual_bits[~nan]
            assert (expected_bits == actual_bits).all(), f"step {step}: {name} differs"
