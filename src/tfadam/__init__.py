"""tfadam: TensorFlow's Adam optimizer, bit for bit, on PyTorch tensors.

Three faces over one engine (:mod:`tfadam.engine`), whose arithmetic is
defined once in :mod:`tfadam.rule`:

* :class:`tfadam.Adam` — a ``torch.optim.Optimizer``;
* :class:`tfadam.AdamOptimizer` — TF1's calling convention;
* ``tfadam.keras.Adam`` — Keras 3's (TF2) flavour.

Example:
    >>> import torch, tfadam
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = tfadam.Adam(model.parameters(), lr=1e-3)
    >>> model(torch.randn(8, 4)).square().mean().backward()
    >>> opt.step()
"""

from . import import_order, keras
from .checkpoint import load_tf_checkpoint
from .distributed import init_state
from .errors import (
    BetaRoundsToOneWarning,
    CorruptCheckpointError,
    EpsilonUnderflowWarning,
    NonFiniteGradientError,
    PrecisionWarning,
    StateDictError,
)
from .optimizer import Adam
from .persist import load_checkpoint, read_checkpoint, save_checkpoint
from .sparse import IndexedSlices
from .tf1 import AdamOptimizer

__all__ = [
    "Adam",
    "AdamOptimizer",
    "BetaRoundsToOneWarning",
    "CorruptCheckpointError",
    "EpsilonUnderflowWarning",
    "IndexedSlices",
    "NonFiniteGradientError",
    "PrecisionWarning",
    "StateDictError",
    "keras",
    "load_checkpoint",
    "init_state",
    "load_tf_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]
__version__ = "0.1.0"

# TensorFlow (>= 2.20) and triton crash in one process unless triton is loaded
# first: load it now where both are installed (see import_order).
import_order.arrange()
