"""Sparse gradients: ``IndexedSlices``, torch COO conversion, deduplication.

A sparse gradient of a variable θ of shape ``(N, ...)`` is a set of rows:
``values[k, ...]`` belongs to row ``indices[k]`` of θ. Indices may repeat; TF
sums repeated rows before applying them (``_deduplicate_indexed_slices``).

Example:
    >>> import torch
    >>> from tfadam import IndexedSlices
    >>> g = IndexedSlices(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([4, 0, 4]), (5, 1))
    >>> rows, values = deduplicate(g.indices, g.values)
    >>> rows.tolist(), values.flatten().tolist()
    ([0, 4], [2.0, 4.0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rule import deduplicate

__all__ = ["IndexedSlices", "check_indices", "deduplicate"]


@dataclass(frozen=True)
class IndexedSlices:
    """A sparse gradient over dim 0, as TF's ``tf.IndexedSlices``.

    Attributes:
        values: ``(k, *dense_shape[1:])`` rows of the gradient.
        indices: ``(k,)`` integer row numbers into the variable; may repeat.
        dense_shape: the shape of the variable the gradient belongs to.

    >>> IndexedSlices(torch.ones(2, 3), torch.tensor([0, 7]), (10, 3)).dense_shape
    (10, 3)
    """

    values: torch.Tensor
    indices: torch.Tensor
    dense_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dense_shape is not None:
            shape = self.dense_shape
            if isinstance(shape, torch.Tensor):
                shape = shape.tolist()
            object.__setattr__(self, "dense_shape", tuple(int(d) for d in shape))

    @classmethod
    def from_coo(cls, grad: torch.Tensor) -> IndexedSlices:
        """Rows of a torch sparse COO gradient (e.g. ``nn.Embedding(sparse=True)``).

        Only dim 0 may be sparse (hybrid COO); coalesced or not.

        >>> coo = torch.sparse_coo_tensor([[2, 0, 2]], torch.ones(3, 4), (5, 4))
        >>> IndexedSlices.from_coo(coo).indices.tolist()
        [2, 0, 2]
        """
        if grad.sparse_dim() != 1:
            raise ValueError(
                f"sparse COO gradient of shape {tuple(grad.shape)} has {grad.sparse_dim()} "
                "sparse dims; tfadam applies row-sparse gradients only (sparse_dim() == 1, "
                "as nn.Embedding(sparse=True) makes). Densify it with grad.to_dense()."
            )
        # _indices()/_values() read an uncoalesced tensor as is, in its own order:
        # TF sums duplicate rows in order of occurrence, and so must we.
        return cls(grad._values(), grad._indices()[0], tuple(grad.shape))


def check_indices(indices: torch.Tensor, num_rows: int, culprit: str) -> None:
    """Raise ``ValueError`` unless every index lies in ``[0, num_rows)``."""
    if indices.numel() == 0:
        return
    low, high = (int(x) for x in torch.aminmax(indices))  # one pass, one op
    if low < 0 or high >= num_rows:
        bad = low if low < 0 else high
        raise ValueError(
            f"{culprit}: sparse gradient index {bad} is out of range for a variable with "
            f"{num_rows} rows (valid: 0..{num_rows - 1}); TF raises InvalidArgumentError "
            "here. Fix the indices (e.g. the embedding lookup ids) before applying."
        )
