"""Drive real TensorFlow and tfadam with the same inputs; compare bit for bit.

A *scenario* is a list of variables (initial numpy arrays), hyperparameters
and a list of calls; each call gives every variable a dense gradient, a
sparse one (indices, values) or None. :func:`run_tf_eager` and
:func:`run_tf_graph` replay it through ``tf.compat.v1.train.AdamOptimizer``;
:func:`run_tfadam` through either face of tfadam. Both return one snapshot per
call: every variable's (θ, m, v) as numpy arrays (m, v None before the
variable's first update) and the accumulators.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes
import numpy as np
import tensorflow as tf
import torch

import tfadam

NP_DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}
TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(x: Any) -> np.ndarray:
    """An integer view of a tensor or array, so ``==`` compares bits (NaN, ±0 too)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.view(torch.int16)
        x = x.numpy()
    x = np.asarray(x)
    return x.view(UINT[x.dtype.itemsize])


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch copy of a numpy array, bfloat16 by bit view (numpy has no bf16)."""
    array = np.array(array)  # numpy scalars (0-d results of astype) too
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


@dataclasses.dataclass
class Sparse:
    indices: np.ndarray
    values: np.ndarray
    form: str = "slices"  # tfadam side: "slices", "coo" (uncoalesced), "coalesced"


@dataclasses.dataclass
class Hyper:
    """A hyperparameter: its value per call, and how it is passed."""

    values: list[float]  # one per call (constant when all equal)
    kind: str = "number"  # "number", "tensor", "callable"

    def tf(self, clock: list[int]) -> Any:
        if self.kind == "number":
            return self.values[0]
        if self.kind == "tensor":
            return tf.constant(self.values[0], dtype=tf.float32)
        return lambda: tf.constant(self.values[clock[0]], dtype=tf.float32)

    def torch(self, clock: list[int]) -> Any:
        if self.kind == "number":
            return self.values[0]
        if self.kind == "tensor":
            return torch.tensor(self.values[0], dtype=torch.float32)
        return lambda: torch.tensor(self.values[clock[0]], dtype=torch.float32)


@dataclasses.dataclass
class Scenario:
    variables: list[np.ndarray]
    calls: list[list[Any]]  # per call, per variable: None | np.ndarray | Sparse
    lr: Hyper
    beta1: Hyper
    beta2: Hyper
    epsilon: Hyper


Snapshot = dict[str, Any]


def _tf_grad(grad: Any, shape: tuple[int, ...]) -> Any:
    if grad is None:
        return None
    if isinstance(grad, Sparse):
        return tf.IndexedSlices(
            tf.constant(grad.values), tf.constant(grad.indices), tf.constant(shape, tf.int64)
        )
    return tf.constant(grad)


def run_tf_eager(s: Scenario) -> list[Snapshot]:
    """Replay through ``tf.compat.v1.train.AdamOptimizer`` in eager mode."""
    clock = [0]
    opt = tf.compat.v1.train.AdamOptimizer(
        s.lr.tf(clock), s.beta1.tf(clock), s.beta2.tf(clock), s.epsilon.tf(clock)
    )
    variables = [tf.Variable(x) for x in s.variables]
    out = []
    for i, call in enumerate(s.calls):
        clock[0] = i
        pairs = [(_tf_grad(g, x.shape), v) for g, x, v in zip(call, s.variables, variables)]
        opt.apply_gradients(pairs)
        out.append(_tf_snapshot(opt, variables, lambda t: t.numpy()))
    return out


def _tf_snapshot(opt, variables, read) -> Snapshot:
    def slot(v, name):
        value = opt.get_slot(v, name)
        return None if value is None else read(value)

    b1, b2 = opt._get_beta_accumulators()
    return {
        "theta": [read(v) for v in variables],
        "m": [slot(v, "m") for v in variables],
        "v": [slot(v, "v") for v in variables],
        "beta_powers": (read(b1), read(b2)),
    }


def run_tf_graph(s: Scenario, beta2_as_variable: bool = False) -> list[Snapshot]:
    """Replay through a TF1 ``Session`` (graph mode, default Grappler rewriting).

    Hyperparameters must be numbers here (they become graph constants), unless
    ``beta2_as_variable``, which passes β2 as a placeholder (not foldable).
    """
    graph = tf.Graph()
    with graph.as_default():
        beta2: Any = s.beta2.values[0]
        if beta2_as_variable:
            beta2 = tf.compat.v1.placeholder_with_default(tf.constant(beta2, tf.float32), ())
        opt = tf.compat.v1.train.AdamOptimizer(
            s.lr.values[0], s.beta1.values[0], beta2, s.epsilon.values[0]
        )
        variables = [tf.compat.v1.Variable(x, use_resource=True) for x in s.variables]
        ops, feeds = {}, {}
        for call in s.calls:
            key = tuple(
                None if g is None else ("s", g.indices.shape[0]) if isinstance(g, Sparse) else "d"
                for g in call
            )
            if key in ops:
                continue
            pairs, placeholders = [], []
            for kind, x, v in zip(key, s.variables, variables):
                dtype = tf.as_dtype(x.dtype)
                if kind is None:
                    placeholders.append(None)
                    continue
                if kind == "d":
                    p = tf.compat.v1.placeholder(dtype, x.shape)
                    pairs.append((p, v))
                    placeholders.append(p)
                else:
                    pv = tf.compat.v1.placeholder(dtype, (kind[1], *x.shape[1:]))
                    pi = tf.compat.v1.placeholder(tf.int64, (kind[1],))
                    pairs.append((tf.IndexedSlices(pv, pi, tf.constant(x.shape, tf.int64)), v))
                    placeholders.append((pv, pi))
            ops[key] = opt.apply_gradients(pairs)
            feeds[key] = placeholders
        init = tf.compat.v1.global_variables_initializer()
        out = []
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(init)
            slots_made: set[int] = set()
            for call in s.calls:
                key = tuple(
                    None
                    if g is None
                    else ("s", g.indices.shape[0])
                    if isinstance(g, Sparse)
                    else "d"
                    for g in call
                )
                feed = {}
                for g, p in zip(call, feeds[key]):
                    if g is None:
                        continue
                    if isinstance(g, Sparse):
                        feed[p[0]], feed[p[1]] = g.values, g.indices
                    else:
                        feed[p] = g
                session.run(ops[key], feed)
                slots_made |= {i for i, g in enumerate(call) if g is not None}

                def read(t):
                    return session.run(t)

                snap = _tf_snapshot(opt, variables, read)
                # In a graph, slots exist from the start; tfadam creates them on first use.
                for i in range(len(variables)):
                    if i not in slots_made:
                        snap["m"][i] = snap["v"][i] = None
                out.append(snap)
        return out


def _torch_grad(grad: Any, shape: tuple[int, ...]) -> Any:
    if grad is None:
        return None
    if not isinstance(grad, Sparse):
        return to_torch(grad)
    values, indices = to_torch(grad.values), torch.from_numpy(grad.indices.astype(np.int64))
    if grad.form == "slices":
        return tfadam.IndexedSlices(values, indices, shape)
    coo = torch.sparse_coo_tensor(indices[None], values, shape)
    return coo.coalesce() if grad.form == "coalesced" else coo


def run_tfadam(s: Scenario, face: str = "tf1", **options: Any) -> list[Snapshot]:
    """Replay through ``tfadam.AdamOptimizer`` (face="tf1") or ``tfadam.Adam`` ("torch")."""
    clock = [0]
    lr, b1, b2, eps = (h.torch(clock) for h in (s.lr, s.beta1, s.beta2, s.epsilon))
    variables = [to_torch(x) for x in s.variables]
    out = []
    if face == "tf1":
        opt = tfadam.AdamOptimizer(lr, b1, b2, eps, **options)
        for i, call in enumerate(s.calls):
            clock[0] = i
            opt.apply_gradients(
                [(_torch_grad(g, x.shape), v) for g, x, v in zip(call, s.variables, variables)]
            )
            b1p, b2p = opt._get_beta_accumulators()
            out.append(_tfadam_snapshot(variables, opt.get_slot, (b1p, b2p)))
        return out
    params = [torch.nn.Parameter(v) for v in variables]
    opt = tfadam.Adam(params, lr=lr, betas=(b1, b2), eps=eps, **options)
    for i, call in enumerate(s.calls):
        clock[0] = i
        for g, x, p in zip(call, s.variables, params):
            grad = _torch_grad(g, x.shape)
            if isinstance(grad, tfadam.IndexedSlices):  # .grad must be a tensor: use COO
                grad = torch.sparse_coo_tensor(grad.indices[None], grad.values, x.shape)
            p.grad = grad
        opt.step()
        group = opt.param_groups[0]

        def get_slot(p, name):
            return opt.state[p].get(name)

        out.append(_tfadam_snapshot(params, get_slot, (group["beta1_power"], group["beta2_power"])))
    return out


def _tfadam_snapshot(variables, get_slot, powers) -> Snapshot:
    def read(t):
        return None if t is None else t.detach().clone()

    return {
        "theta": [read(v) for v in variables],
        "m": [read(get_slot(v, "m")) for v in variables],
        "v": [read(get_slot(v, "v")) for v in variables],
        "beta_powers": tuple(read(p) for p in powers),
    }


def differences(expected: list[Snapshot], actual: list[Snapshot]) -> list[str]:
    """Every element where the snapshots' bits differ, described; [] when equal."""
    problems = []
    for step, (e, a) in enumerate(zip(expected, actual, strict=True)):
        for key in ("theta", "m", "v"):
            for i, (x, y) in enumerate(zip(e[key], a[key], strict=True)):
                if (x is None) != (y is None):
                    problems.append(
                        f"step {step} {key}[{i}]: exists {x is not None} vs {y is not None}"
                    )
                    continue
                if x is None:
                    continue
                bx, by = bits(x), bits(y)
                if bx.shape != by.shape or bx.dtype != by.dtype:
                    problems.append(
                        f"step {step} {key}[{i}]: {bx.shape}/{bx.dtype} vs {by.shape}/{by.dtype}"
                    )
                    continue
                n = int((bx != by).sum())
                if n:
                    problems.append(
                        f"step {step} {key}[{i}] ({x.dtype}, shape {x.shape}): {n} of {x.size} elements differ"
                    )
        for j in range(2):
            if bits(np.float32(e["beta_powers"][j])) != bits(a["beta_powers"][j].reshape(())):
                problems.append(
                    f"step {step} beta{j + 1}_power: {e['beta_powers'][j]} vs {a['beta_powers'][j]}"
                )
        if len(problems) > 10:
            break
    return problems
