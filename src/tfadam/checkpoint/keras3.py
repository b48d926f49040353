"""Keras 3's own save formats: ``model.save("m.keras")`` and ``save_weights("m.weights.h5")``.

A ``.weights.h5`` file is HDF5 (read with ``h5py``, the optional extra
``pip install tfadam[keras]``); a ``.keras`` file is a zip archive holding
``config.json``, ``metadata.json`` and that HDF5 file as ``model.weights.h5``.
Keras stores each object's own variables by position, not by name::

    vars                         attrs name="mlp"         (the model)
    layers/dense/vars/0, 1       attrs name="hidden"      (kernel, bias)
    layers/dense_1/vars/0, 1     attrs name="out"
    optimizer/vars/0, 1, 2...    attrs name="adam"        (iteration, learning_rate, m, v...)
    optimizer/inner_optimizer/vars/...                    (under a LossScaleOptimizer)

A layer's group is named after its class (``dense``, ``dense_1`` for the
second Dense, in the order of ``model.layers``); its ``vars/i`` are its
trainable variables, then the others, in the order it created them; the
optimizer's ``vars/i`` follow ``optimizer.variables``. This module turns the
positions back into Keras variable paths (``variable.path``: ``mlp/hidden/kernel``
for a ``Sequential`` named "mlp", ``hidden/kernel`` in a functional model)
from the layer's class and config (a table of Keras' built-in layers; a layer
it does not know keeps positional names, ``mlp/custom/vars/0``), and finds
each trainable variable's Adam slots by its position in
``model.trainable_variables``.

The file is untrusted: every dataset must be a plain numeric array whose
bytes are stored in the file (contiguous or compact, no filters), so that
reading one costs at most the bytes it really holds; nothing is read before
the load has checked its shape and dtype.

Example:
    >>> import zipfile
    >>> sniff_format(__file__)  # this source file is not a checkpoint
    'unknown'
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch

from .bundle import TensorInfo
from .errors import CheckpointError
from .names import OptimizerState, Variable

__all__ = ["KerasFile", "KerasNames", "sniff_format"]

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_WEIGHTS_MEMBER = "model.weights.h5"
_CONFIG_LIMIT = 64 << 20  # config.json: JSON text, never near this
_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "bool": torch.bool,
    "bfloat16": torch.bfloat16,
}

# Keras layers (by snake-case class name, as the save format names their
# groups) -> (trainable, non-trainable) variable names in creation order,
# each with the config flag that must be on for it to exist.
_Spec = tuple[tuple[tuple[str, str | None], ...], tuple[tuple[str, str | None], ...]]
_KERNEL_BIAS: _Spec = ((("kernel", None), ("bias", "use_bias")), ())
_LAYERS: dict[str, _Spec] = {
    "dense": _KERNEL_BIAS,
    "einsum_dense": ((("kernel", None), ("bias", "bias_axes")), ()),
    **{f"conv{d}d{t}": _KERNEL_BIAS for d in (1, 2, 3) for t in ("", "_transpose")},
    "depthwise_conv1d": _KERNEL_BIAS,
    "depthwise_conv2d": _KERNEL_BIAS,
    "separable_conv1d": (
        (("depthwise_kernel", None), ("pointwise_kernel", None), ("bias", "use_bias")),
        (),
    ),
    "separable_conv2d": (
        (("depthwise_kernel", None), ("pointwise_kernel", None), ("bias", "use_bias")),
        (),
    ),
    "embedding": ((("embeddings", None),), ()),
    "batch_normalization": (
        (("gamma", "scale"), ("beta", "center")),
        (("moving_mean", None), ("moving_variance", None)),
    ),
    "layer_normalization": ((("gamma", "scale"), ("beta", "center")), ()),
    "group_normalization": ((("gamma", "scale"), ("beta", "center")), ()),
    "p_re_lu": ((("alpha", None),), ()),
}
_MODELS = {"sequential", "functional", "model"}
_MAX_NESTING = 64  # models within models: a crafted file must not exhaust the stack


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise CheckpointError(
            "reading Keras 3 .keras and .weights.h5 files needs h5py, which is not installed",
            hint="pip install tfadam[keras] (or pip install h5py)",
        ) from None
    return h5py


def sniff_format(path: str | os.PathLike[str]) -> str:
    """``"keras"`` (zip), ``"h5"`` (HDF5) or ``"unknown"``, from a file's first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return "unknown"
    if head.startswith(ZIP_MAGIC):
        return "keras"
    if head == HDF5_MAGIC:
        return "h5"
    return "unknown"


class _Window(io.RawIOBase):
    """A byte range of an open file as a seekable file (a stored zip member)."""

    def __init__(self, f: BinaryIO, start: int, size: int) -> None:
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got or 0
        return got or 0


def _zip_member(archive: zipfile.ZipFile, f: BinaryIO, info: zipfile.ZipInfo) -> BinaryIO:
    """A seekable view of one member, without extracting it to memory or disk."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        # Keras stores it uncompressed. HDF5 reads at random offsets, and every
        # backward seek in a deflated stream inflates it again from the start.
        raise CheckpointError(
            f"zip member {info.filename!r} is compressed or encrypted (Keras stores it "
            "uncompressed)",
            hint=f"Extract {info.filename} and load that file, or re-zip with zip -0",
        )
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or not header.startswith(ZIP_MAGIC):
        raise CheckpointError(f"zip member {info.filename!r}: damaged local header")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    f.seek(0, io.SEEK_END)
    if start + info.file_size > f.tell():
        raise CheckpointError(f"zip member {info.filename!r} runs past the end of the archive")
    f.seek(start)
    head = f.read(len(HDF5_MAGIC))
    if head != HDF5_MAGIC:
        raise CheckpointError(f"zip member {info.filename!r} is not HDF5 (starts {head!r})")
    return io.BufferedReader(_Window(f, start, info.file_size))


@dataclass
class _Dataset:
    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    order: int  # where its bytes are: the order Keras wrote them


class KerasFile:
    """The variables of a ``.keras`` archive or ``.weights.h5`` file (h5py needed).

    Keys are the HDF5 dataset paths (``layers/dense/vars/0``); the interface is
    :class:`~tfadam.checkpoint.BundleReader`'s: ``keys``, ``info``, ``read_torch``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.prefix = self.index_path = os.fspath(path)
        self.kind = sniff_format(self.prefix)
        self.config: dict[str, Any] | None = None
        self._zip: zipfile.ZipFile | None = None
        self._raw: BinaryIO | None = None
        self._h5_size = 0  # bytes of the HDF5 image: every dataset's bytes lie inside
        h5py = _require_h5py()
        try:
            self._raw = open(self.prefix, "rb")  # noqa: SIM115 - closed by close()
            source: Any = self._raw
            self._h5_size = os.fstat(self._raw.fileno()).st_size
            if self.kind == "keras":
                source = self._open_archive()
            elif self.kind != "h5":
                raise CheckpointError("neither a Keras archive nor an HDF5 file", path=self.prefix)
            try:
                self._h5 = h5py.File(source, "r")
            except (OSError, ValueError) as err:
                raise CheckpointError(
                    f"not a readable HDF5 file ({err})", path=self._where()
                ) from None
            self._datasets: dict[str, _Dataset] = {}
            self._walk()
        except BaseException:
            self.close()
            raise

    def _where(self) -> str:
        return f"{self.prefix}:{_WEIGHTS_MEMBER}" if self.kind == "keras" else self.prefix

    def _open_archive(self) -> BinaryIO:
        assert self._raw is not None
        try:
            self._zip = zipfile.ZipFile(self._raw)
            members = {i.filename: i for i in self._zip.infolist()}
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(f"damaged zip archive ({err})", path=self.prefix) from None
        if _WEIGHTS_MEMBER not in members:
            raise CheckpointError(
                f"a zip archive without {_WEIGHTS_MEMBER}: not a Keras 3 .keras file "
                f"(members: {sorted(members)[:5]})",
                path=self.prefix,
            )
        config = members.get("config.json")
        if config is not None:
            if config.file_size > _CONFIG_LIMIT:
                raise CheckpointError(
                    f"config.json declares {config.file_size} bytes (limit {_CONFIG_LIMIT})",
                    path=self.prefix,
                )
            try:
                with self._zip.open(config) as f:
                    text = f.read(_CONFIG_LIMIT + 1)
                loaded = json.loads(text)
            except (zipfile.BadZipFile, OSError, ValueError, RecursionError) as err:
                raise CheckpointError(
                    f"config.json is not readable JSON ({type(err).__name__})", path=self.prefix
                ) from None
            self.config = loaded if isinstance(loaded, dict) else None
        self._h5_size = members[_WEIGHTS_MEMBER].file_size
        try:
            return _zip_member(self._zip, self._raw, members[_WEIGHTS_MEMBER])
        except CheckpointError as err:
            raise err.located(path=self.prefix) from None

    def _walk(self) -> None:
        h5py = _require_h5py()
        found: list[tuple[str, Any]] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                found.append((name, obj))

        try:
            self._h5.visititems(visit)
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"damaged HDF5 file ({err})", path=self._where()) from None
        for name, ds in found:
            self._datasets[name] = self._check_dataset(name, ds)
        # The bytes each dataset declares must lie in the file, each byte in one
        # dataset: reading everything then costs at most the file's size.
        end, previous = 0, None
        for d in sorted(
            (d for d in self._datasets.values() if d.order >= 0 and d.nbytes),
            key=lambda d: d.order,
        ):
            if d.order < end or d.order + d.nbytes > self._h5_size:
                why = (
                    f"overlaps {previous!r}"
                    if d.order < end
                    else f"runs past the end of the {self._h5_size}-byte file"
                )
                raise CheckpointError(
                    f"its {d.nbytes} bytes at offset {d.order} {why}",
                    path=self._where(),
                    key=d.key,
                )
            end, previous = d.order + d.nbytes, d.key

    def _check_dataset(self, name: str, ds: Any) -> _Dataset:
        h5py = _require_h5py()
        where = {"path": self._where(), "key": name}
        try:
            plist = ds.id.get_create_plist()
            layout = plist.get_layout()
            filters = plist.get_nfilters()
            shape = tuple(int(d) for d in ds.shape) if ds.shape is not None else None
            dtype = ds.dtype
            stored = int(ds.id.get_storage_size())
            offset = ds.id.get_offset() if layout == h5py.h5d.CONTIGUOUS else None
            marked = ds.attrs.get("dtype") if "dtype" in ds.attrs else None
        except (RuntimeError, OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"damaged dataset ({err})", **where) from None
        if shape is None:
            raise CheckpointError("a dataset without a shape (null dataspace)", **where)
        if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT) or filters:
            raise CheckpointError(
                "a chunked or filtered (compressed) dataset: Keras writes plain arrays, and "
                "a compressed one could expand without bound",
                **where,
            )
        if isinstance(marked, bytes):
            marked = marked.decode("utf-8", "replace")
        if marked == "bfloat16" and dtype.itemsize == 2:
            dtype_name = "bfloat16"
        elif dtype.kind in "fiub" and dtype.name in _DTYPES and dtype.byteorder in "<=|":
            dtype_name = dtype.name
        else:
            raise CheckpointError(
                f"HDF5 type {dtype} is not a variable type (numbers, little-endian)", **where
            )
        itemsize = _DTYPES[dtype_name].itemsize
        count = 1
        for d in shape:
            count *= d
        nbytes = count * itemsize
        if stored != nbytes:
            raise CheckpointError(
                f"shape {list(shape)} {dtype_name} needs {nbytes} bytes, but the file stores "
                f"{stored} for it",
                **where,
            )
        order = offset if offset is not None else -1
        return _Dataset(name, dtype_name, shape, nbytes, order)

    # -- BundleReader's interface ------------------------------------------------

    def close(self) -> None:
        for closing in (getattr(self, "_h5", None), self._zip, self._raw):
            if closing is not None:
                try:
                    closing.close()
                except Exception:  # noqa: BLE001 - closing a damaged file must not mask the error
                    pass

    def __enter__(self) -> KerasFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KerasFile({self.prefix!r}, {len(self._datasets)} tensors)"

    def keys(self) -> list[str]:
        return sorted(self._datasets)

    def __contains__(self, key: object) -> bool:
        return key in self._datasets

    def __len__(self) -> int:
        return len(self._datasets)

    @property
    def object_graph(self) -> None:
        return None

    def group_name(self, group: str) -> str | None:
        """The ``name`` Keras recorded on ``group/vars`` (the layer's or model's name)."""
        vars_group = f"{group}/vars" if group else "vars"
        try:
            obj = self._h5.get(vars_group)
            value = None if obj is None else obj.attrs.get("name")
        except (RuntimeError, OSError, ValueError, KeyError, TypeError):
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return value if isinstance(value, str) else None

    def subgroups(self, group: str) -> list[str]:
        """Names of the groups directly under ``group``."""
        h5py = _require_h5py()
        try:
            obj = self._h5[group] if group else self._h5
            return [k for k, v in obj.items() if isinstance(v, h5py.Group)]
        except (RuntimeError, OSError, ValueError, KeyError, TypeError):
            return []

    def vars_of(self, group: str) -> list[str]:
        """The keys ``group/vars/0``, ``1``... in Keras' order."""
        prefix = f"{group}/vars/" if group else "vars/"
        found = {}
        for key in self._datasets:
            rest = key[len(prefix) :]
            if key.startswith(prefix) and rest.isdigit():
                found[int(rest)] = key
        if sorted(found) != list(range(len(found))):
            raise CheckpointError(
                f"{prefix}: variables {sorted(found)} are not numbered 0..n-1", path=self._where()
            )
        return [found[i] for i in range(len(found))]

    def first_byte(self, group: str) -> int:
        """Where the data of ``group``'s variables starts: the order Keras saved them in."""
        prefix = f"{group}/"
        offsets = [d.order for k, d in self._datasets.items() if k.startswith(prefix)]
        return min((o for o in offsets if o >= 0), default=-1)

    def check_layout(self, keys: list[str]) -> None:
        """Nothing left to check: opening the file placed every dataset in its bytes.

        (Each stored array lies inside the file and shares no byte with
        another, so reading them all holds at most the file's size.) The
        bundle reader's method of the same name checks this before reading.
        """

    def info(self, key: str) -> TensorInfo:
        d = self._dataset(key)
        return TensorInfo(key, d.dtype, d.shape, d.nbytes, False)

    def _dataset(self, key: str) -> _Dataset:
        d = self._datasets.get(key)
        if d is None:
            raise CheckpointError(
                f"no such tensor in this file ({len(self._datasets)} tensors)",
                path=self._where(),
                key=key,
            )
        return d

    def read_numpy(self, key: str) -> np.ndarray:
        d = self._dataset(key)
        try:
            arr = self._h5[key][()]
        except (RuntimeError, OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"cannot read ({err})", path=self._where(), key=key) from None
        arr = np.asarray(arr)
        if d.dtype == "bfloat16":
            arr = arr.view(np.uint16)
        if arr.shape != d.shape or arr.nbytes != d.nbytes:
            raise CheckpointError(
                "read a different shape than the file declares", path=self._where(), key=key
            )
        return arr

    def read_torch(self, key: str) -> torch.Tensor:
        arr = self.read_numpy(key)
        tensor = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)
        want = _DTYPES[self._dataset(key).dtype]
        return tensor.view(want) if tensor.dtype != want else tensor


def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a dtype name of :meth:`KerasFile.info`."""
    return _DTYPES.get(name)


# -- names ---------------------------------------------------------------------------


@dataclass
class _Layer:
    group: str  # its HDF5 group, e.g. "layers/dense_1"
    path: str  # where its variables' paths start, e.g. "mlp/out"
    names: list[str]  # variable names, one per vars/i
    trainable: int  # the first `trainable` of them are trainable


@dataclass
class _Model:
    layers: list[_Layer] = field(default_factory=list)


def _snake(class_name: str) -> str:
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _unique(base: str, used: dict[str, int]) -> str:
    if base not in used:
        used[base] = 0
        return base
    used[base] += 1
    return f"{base}_{used[base]}"


def _flag(config: dict[str, Any] | None, flag: str | None) -> bool | None:
    if flag is None:
        return True
    if config is None or flag not in config:
        return None
    return bool(config[flag])


def _layer_names(
    kind: str, count: int, config: dict[str, Any] | None
) -> tuple[list[str], int] | None:
    """Variable names and the trainable count of a known layer, or None."""
    spec = _LAYERS.get(kind)
    if spec is None:
        return None
    trainable_spec, other_spec = spec
    candidates = []
    flags = [f for _, f in trainable_spec + other_spec if f is not None]
    known = {f: _flag(config, f) for f in flags}
    # each unknown flag may be on or off: keep the layouts that fit the count
    unknown = [f for f, v in known.items() if v is None]
    for mask in range(1 << len(unknown)):
        values = dict(known)
        for i, f in enumerate(unknown):
            values[f] = bool(mask >> i & 1)
        trainable = [n for n, f in trainable_spec if f is None or values[f]]
        other = [n for n, f in other_spec if f is None or values[f]]
        if len(trainable) + len(other) == count:
            candidates.append((trainable + other, len(trainable)))
    if len({tuple(c[0]) for c in candidates}) != 1:
        return None
    names, trainable_count = candidates[0]
    if config is not None and config.get("trainable") is False:
        trainable_count = 0
    return names, trainable_count


class KerasNames:
    """Keras variable paths and Adam slots of a :class:`KerasFile`.

    Same interface as :class:`~tfadam.checkpoint.names.CheckpointNames`.
    """

    object_based = True
    naming = "keras3"

    def __init__(self, reader: KerasFile) -> None:
        self.reader = reader
        model = _Model()
        root_name = reader.group_name("") or "model"
        config = reader.config.get("config") if isinstance(reader.config, dict) else None
        root_class = reader.config.get("class_name") if isinstance(reader.config, dict) else None
        if root_class is None:
            # A functional model lists its InputLayer among its layers; a Sequential does not.
            inputs = [g for g in reader.subgroups("layers") if g.startswith("input_layer")]
            root_class = "Functional" if inputs else "Sequential"
        self._walk_model(
            model, "", root_class, root_name, config if isinstance(config, dict) else None, ""
        )
        self.model = model
        self.variables: list[Variable] = []
        self.trainable: list[Variable] = []
        for layer in model.layers:
            keys = reader.vars_of(layer.group)
            for i, key in enumerate(keys):
                name = f"{layer.path}/{layer.names[i]}" if i < len(layer.names) else key
                var = Variable(key, name, name)
                self.variables.append(var)
                if i < layer.trainable:
                    self.trainable.append(var)
        self._by_name: dict[str, Variable] = {}
        for var in self.variables:
            self._by_name.setdefault(var.name, var)
            self._by_name[var.key] = var
        self._optimizer_group = self._find_optimizer()
        self._states: dict[str, OptimizerState] = {}
        self._optimizer_vars: dict[str, str] = {}
        self._bookkeeping: set[str] = set()
        # a misaligned optimizer is an error only for a load that wants its state
        self._optimizer_problem: CheckpointError | None = None
        if self._optimizer_group is not None:
            try:
                self._index_optimizer(self._optimizer_group)
            except CheckpointError as err:
                self._optimizer_problem = err
                self._states.clear()
                self._optimizer_vars.clear()

    # -- the model ---------------------------------------------------------------

    def _walk_model(
        self,
        model: _Model,
        group: str,
        class_name: str,
        name: str,
        config: dict[str, Any] | None,
        prefix: str,
        depth: int = 0,
    ) -> None:
        """Collect the layers of a Sequential/functional model in ``model.layers`` order."""
        if depth > _MAX_NESTING:
            raise CheckpointError(
                f"models nested over {_MAX_NESTING} deep at {group!r}", path=self.reader.prefix
            )
        # A Sequential builds its layers inside its own name scope; a functional
        # model's layers were built (called) before the model existed.
        inner = f"{prefix}{name}/" if _snake(class_name) == "sequential" else ""
        layer_configs = config.get("layers") if isinstance(config, dict) else None
        entries: list[tuple[str, str, dict[str, Any] | None]] = []  # group, class, config
        if isinstance(layer_configs, list):
            used: dict[str, int] = {}
            for lc in layer_configs:
                if not isinstance(lc, dict) or not isinstance(lc.get("class_name"), str):
                    continue
                if _snake(class_name) == "sequential" and lc["class_name"] == "InputLayer":
                    continue  # not among a Sequential's layers
                key = _unique(_snake(lc["class_name"]), used)
                entries.append(
                    (f"{group}/layers/{key}".lstrip("/"), lc["class_name"], lc.get("config"))
                )
        else:
            base = f"{group}/layers".lstrip("/")
            subs = sorted(
                self.reader.subgroups(base), key=lambda s: self.reader.first_byte(f"{base}/{s}")
            )
            for sub in subs:
                kind = re.sub(r"_\d+$", "", sub)
                entries.append((f"{base}/{sub}", kind, None))
        for sub_group, kind, sub_config in entries:
            sub_name = self.reader.group_name(sub_group)
            if sub_name is None and isinstance(sub_config, dict):
                sub_name = sub_config.get("name")
            sub_name = sub_name or sub_group.rsplit("/", 1)[-1]
            snake = _snake(kind) if kind[:1].isupper() else kind
            if snake in _MODELS or "layers" in self.reader.subgroups(sub_group):
                self._walk_model(model, sub_group, kind, sub_name, sub_config, inner, depth + 1)
                continue
            count = len(self.reader.vars_of(sub_group))
            if count == 0:
                continue
            layout = _layer_names(
                snake, count, sub_config if isinstance(sub_config, dict) else None
            )
            path = f"{inner}{sub_name}"
            if layout is None:
                # positional names; all of a layer Keras does not know count as trainable
                names = [f"vars/{i}" for i in range(count)]
                trainable = (
                    0
                    if isinstance(sub_config, dict) and sub_config.get("trainable") is False
                    else count
                )
                model.layers.append(_Layer(sub_group, path, names, trainable))
            else:
                model.layers.append(_Layer(sub_group, path, *layout))

    # -- the optimizer -------------------------------------------------------------

    def _find_optimizer(self) -> str | None:
        if "optimizer" not in self.reader.subgroups(""):
            return None
        if "inner_optimizer" in self.reader.subgroups("optimizer"):
            # LossScaleOptimizer (mixed precision): its own vars (loss scale) are
            # bookkeeping; the Adam state is the inner optimizer's.
            return "optimizer/inner_optimizer"
        return "optimizer"

    def _optimizer_config(self) -> dict[str, Any] | None:
        config = self.reader.config
        try:
            opt = config["compile_config"]["optimizer"]["config"]  # type: ignore[index]
            if isinstance(opt, dict) and "inner_optimizer" in opt:
                opt = opt["inner_optimizer"]["config"]
        except (KeyError, TypeError):
            return None
        return opt if isinstance(opt, dict) else None

    def _index_optimizer(self, group: str) -> None:
        keys = self.reader.vars_of(group)
        for key in self.reader.keys():
            if key.startswith("optimizer/") and key not in keys:
                self._bookkeeping.add(key)
        where = {"path": self.reader._where()}
        n = len(self.trainable)
        if not keys:
            return
        first = self.reader.info(keys[0])
        if first.dtype != "int64" or first.shape != ():
            raise CheckpointError(
                f"{keys[0]} is {first.dtype} {list(first.shape)}, not the int64 iteration "
                "counter Keras saves first",
                **where,
            )
        config = self._optimizer_config()
        rest = keys[1:]
        if config is not None:
            has_lr = not isinstance(config.get("learning_rate"), dict)
        else:
            has_lr = n > 0 and (len(rest) - 1) % n == 0 and len(rest) % n != 0
            if n == 1 and len(rest) >= 3:
                lr = self.reader.info(rest[0])
                has_lr = (
                    lr.dtype == "float32"
                    and lr.shape == () != self.reader.info(self.trainable[0].key).shape
                )
        lr_key = None
        if has_lr:
            lr_key, rest = rest[0], rest[1:]
        if n == 0 or len(rest) % n:
            raise CheckpointError(
                f"the optimizer holds {len(rest)} slot variables for the model's {n} trainable "
                "variables: cannot tell which belongs to which",
                **where,
                hint="Load the variables alone (optimizer=None)",
            )
        per = len(rest) // n
        if config is not None:
            ema = bool(config.get("use_ema"))
            acc = bool(config.get("gradient_accumulation_steps"))
            ams = bool(config.get("amsgrad"))
        elif per == 2:
            ema = acc = ams = False
        else:
            raise CheckpointError(
                f"the optimizer keeps {per} variables per trainable variable (amsgrad, "
                "use_ema or gradient accumulation), which a .weights.h5 file does not say",
                **where,
                hint="Load the .keras file (its config says), or optimizer=None",
            )
        if per != 2 + ema + acc + ams:
            raise CheckpointError(
                f"the optimizer keeps {per} variables per trainable variable; its config says "
                f"{2 + ema + acc + ams}",
                **where,
            )
        # optimizer.variables: iteration, learning_rate, averages, accumulators,
        # (momentum, velocity) interleaved, velocity_hats
        it = iter(rest)
        lists: dict[str, list[str]] = {}
        if ema:
            lists["average"] = [next(it) for _ in range(n)]
        if acc:
            lists["gradient_accumulator"] = [next(it) for _ in range(n)]
        pairs = [(next(it), next(it)) for _ in range(n)]
        lists["m"] = [m for m, _ in pairs]
        lists["v"] = [v for _, v in pairs]
        if ams:
            lists["vhat"] = [next(it) for _ in range(n)]
        for i, var in enumerate(self.trainable):
            shape = self.reader.info(var.key).shape
            slots = {slot: keys_[i] for slot, keys_ in lists.items()}
            for slot, key in slots.items():
                if self.reader.info(key).shape != shape:
                    raise CheckpointError(
                        f"slot {slot!r} {key} is {list(self.reader.info(key).shape)}, but the "
                        f"trainable variable it belongs to ({var.name}) is {list(shape)}: the "
                        "optimizer's variables do not line up with the model's",
                        **where,
                        hint="Load the variables alone (optimizer=None)",
                    )
            self._states[var.key] = OptimizerState(
                slots, iterations=keys[0], flavour="keras", learning_rate=lr_key
            )
        self._optimizer_vars[keys[0]] = "iterations"
        if lr_key is not None:
            self._optimizer_vars[lr_key] = "learning_rate"

    # -- CheckpointNames' interface --------------------------------------------------

    def variable(self, name: str) -> Variable:
        found = self._by_name.get(name)
        if found is None:
            import difflib

            close = difflib.get_close_matches(name, list(self._by_name), n=3, cutoff=0.5)
            hint = (
                f"Did you mean {', '.join(map(repr, close))}?"
                if close
                else "List the names with `python -m tfadam convert FILE --list`"
            )
            raise CheckpointError(
                "no variable of this name in the file", path=self.reader.prefix, key=name, hint=hint
            )
        return found

    def optimizer_state(self, var: Variable) -> OptimizerState | None:
        if self._optimizer_problem is not None:
            raise self._optimizer_problem
        return self._states.get(var.key)

    def optimizer_variables(self) -> dict[str, str]:
        return dict(self._optimizer_vars)

    def bookkeeping_keys(self) -> set[str]:
        return set(self._bookkeeping)

    def tf1_accumulators(self) -> tuple[str, str]:  # pragma: no cover - Keras has none
        raise CheckpointError(
            "a Keras file has no beta1_power/beta2_power", path=self.reader.prefix
        )

    def listing(self) -> Iterator[tuple[str, str]]:
        """``(name, key)`` of every model variable, in ``model.variables`` order."""
        for var in self.variables:
            yield var.name, var.key
