"""TensorFlow checkpoints without TensorFlow: read them, migrate a run to tfadam.

* :class:`BundleReader` reads a tensor-bundle checkpoint (TF1 ``Saver``, TF2
  ``tf.train.Checkpoint``, Keras under TF) with numpy alone: the ``.index``
  table, the data shards, partitioned variables; every checksum verified.
* :class:`~tfadam.checkpoint.keras3.KerasFile` reads Keras 3's own files,
  ``.keras`` and ``.weights.h5`` (h5py needed: ``pip install tfadam[keras]``),
  naming each variable by its Keras path.
* :func:`load_tf_checkpoint` restores variables and Adam's m, v and
  ``beta1_power``/``beta2_power`` into :class:`tfadam.Adam` or
  :class:`tfadam.AdamOptimizer`, so a TF run continues bit for bit.
* :func:`convert` / ``python -m tfadam convert CKPT OUT`` write a
  ``torch.save`` file with the model tensors and the optimizer state.
* Bad input raises :class:`CheckpointError` (a ``ValueError``) naming the file
  and tensor.

Example:
    >>> import numpy as np, os, tempfile
    >>> from tfadam.checkpoint import BundleReader
    >>> from tfadam.checkpoint.writer import write_bundle
    >>> prefix = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> write_bundle(prefix, {"dense/bias": np.array([0.5, -1.0], np.float32)})
    >>> BundleReader(prefix).read_torch("dense/bias")
    tensor([ 0.5000, -1.0000])
"""

from .bundle import BundleReader, TensorInfo, resolve_prefix
from .convert import cli_convert, convert
from .errors import CheckpointError
from .mapping import LoadResult, load_tf_checkpoint

__all__ = [
    "BundleReader",
    "CheckpointError",
    "LoadResult",
    "TensorInfo",
    "cli_convert",
    "convert",
    "load_tf_checkpoint",
    "resolve_prefix",
]
