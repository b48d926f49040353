"""Random scenarios for the oracle tests (see tf_oracle.Scenario)."""

from __future__ import annotations

import numpy as np
import torch
from tf_oracle import NP_DTYPES, Hyper, Scenario, Sparse, to_torch


def coalesced(grad: Sparse, shape: tuple[int, ...]) -> Sparse:
    """The rows of a coalesced torch COO gradient: torch sums the duplicates
    itself, so TF must be given the coalesced rows to see the same gradient."""
    coo = torch.sparse_coo_tensor(
        torch.from_numpy(grad.indices)[None], to_torch(grad.values), shape
    ).coalesce()
    values = coo.values()
    if values.dtype == torch.bfloat16:
        array = values.view(torch.int16).numpy().view(NP_DTYPES["bfloat16"])
    else:
        array = values.numpy()
    return Sparse(coo.indices()[0].numpy().copy(), array.copy(), "coalesced")


def random_shape(rng: np.random.Generator) -> tuple[int, ...]:
    ndim = int(rng.integers(0, 5))
    if ndim == 1 and rng.random() < 0.3:
        return (int(rng.integers(1000, 1100)),)  # not a multiple of any vector width
    return tuple(int(rng.integers(1, 8 if ndim > 2 else 13)) for _ in range(ndim))


def _hyper(rng: np.random.Generator, low: float, high: float, calls: int, log: bool) -> Hyper:
    kind = str(rng.choice(["number", "tensor", "callable"]))
    draw = (
        (lambda: float(10 ** rng.uniform(low, high)))
        if log
        else (lambda: float(rng.uniform(low, high)))
    )
    if kind == "callable":
        return Hyper([draw() for _ in range(calls)], kind)
    return Hyper([draw()], kind)


def random_scenario(
    seed: int,
    dtype: str,
    calls: int = 12,
    sparse: bool = True,
    none_grads: bool = True,
    max_scale: float = 3.0,
) -> Scenario:
    """Variables of 0-d..4-d shapes, gradients at scales 1e-6..10**max_scale,
    hyperparameters as numbers, tensors or callables, None gradients, a
    variable first updated at a later call, sparse gradients with duplicates
    (as IndexedSlices and as COO, coalesced or not)."""
    rng = np.random.default_rng(seed)
    np_dtype = NP_DTYPES[dtype]
    n_vars = int(rng.integers(1, 5))
    shapes = [random_shape(rng) for _ in range(n_vars)]
    variables = [rng.standard_normal(s).astype(np.float32).astype(np_dtype) for s in shapes]
    scale = 10 ** rng.uniform(-6, max_scale)
    late = int(rng.integers(1, calls)) if n_vars > 1 else 0
    all_calls = []
    for call in range(calls):
        grads = []
        for i, shape in enumerate(shapes):
            if (i == 0 and call < late) or (none_grads and rng.random() < 0.15):
                grads.append(None)
                continue
            if sparse and len(shape) >= 1 and rng.random() < 0.4:
                k = int(rng.integers(0, 2 * shape[0] + 2))
                indices = rng.integers(0, shape[0], k)
                values = (rng.standard_normal((k, *shape[1:])) * scale).astype(np.float32)
                form = str(rng.choice(["slices", "coo", "coalesced"]))
                sparse_grad = Sparse(indices, values.astype(np_dtype), form)
                grads.append(coalesced(sparse_grad, shape) if form == "coalesced" else sparse_grad)
                continue
            grad = (rng.standard_normal(shape) * scale).astype(np.float32)
            grads.append(grad.astype(np_dtype))
        if all(g is None for g in grads):
            i = n_vars - 1
            grads[i] = (rng.standard_normal(shapes[i]) * scale).astype(np.float32).astype(np_dtype)
        all_calls.append(grads)
    return Scenario(
        variables,
        all_calls,
        lr=_hyper(rng, -4, -1, calls, log=True),
        beta1=_hyper(rng, 0.5, 0.99, calls, log=False),
        beta2=_hyper(rng, 0.9, 0.9999, calls, log=False),
        epsilon=_hyper(rng, -10, -2, calls, log=True),
    )
