"""What the tensors of a checkpoint are: variables, Adam slots, accumulators.

Two naming schemes exist:

* **TF1** (``tf.compat.v1.train.Saver``): keys are variable names. Adam's
  slots of ``dense/kernel`` are ``dense/kernel/Adam`` (m) and
  ``dense/kernel/Adam_1`` (v) — ``Adam`` being the optimizer's ``name`` — and
  the accumulators are ``beta1_power`` / ``beta2_power`` (uniquified as
  ``beta1_power_1``... when a graph had several optimizers).
* **TF2** (``tf.train.Checkpoint``): keys are object paths such as
  ``model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE``; the saved object graph
  (``_CHECKPOINTABLE_OBJECT_GRAPH``) records each variable's TF name
  (``full_name``) and which slot variable belongs to which variable. A TF1
  ``AdamOptimizer`` saved this way has slots "m"/"v" and child variables
  ``beta1_power``/``beta2_power``; a Keras 3 optimizer keeps parallel lists
  ``_trainable_variables``, ``_momentums``, ``_velocities`` and an
  ``_iterations`` counter.

A variable can be named by its TF name (``dense/kernel``), its object path
(``model/dense/kernel``) or its checkpoint key; :meth:`CheckpointNames.variable`
accepts each.

>>> import numpy as np, tempfile, os
>>> from tfadam.checkpoint.bundle import BundleReader
>>> from tfadam.checkpoint.writer import write_bundle
>>> prefix = os.path.join(tempfile.mkdtemp(), "ckpt")
>>> z = np.zeros(2, np.float32)
>>> write_bundle(prefix, {"w": z, "w/Adam": z, "w/Adam_1": z,
...                       "beta1_power": np.float32(0.9), "beta2_power": np.float32(0.999)})
>>> names = CheckpointNames(BundleReader(prefix))
>>> names.optimizer_state(names.variable("w")).slots
{'m': 'w/Adam', 'v': 'w/Adam_1'}
>>> names.tf1_accumulators()
('beta1_power', 'beta2_power')
"""

from __future__ import annotations

import difflib
import re
from collections import deque
from dataclasses import dataclass, field

from .bundle import OBJECT_GRAPH_KEY, BundleReader
from .errors import CheckpointError
from .proto import ObjectGraph

__all__ = ["CheckpointNames", "OptimizerState", "Variable"]

_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# Keras 3 optimizer lists (parallel to _trainable_variables) -> slot names used here
KERAS_SLOT_LISTS = (
    ("_momentums", "m"),
    ("_velocities", "v"),
    ("_velocity_hats", "vhat"),
    ("_model_variables_moving_average", "average"),
    ("_accumulated_gradients", "gradient_accumulator"),
)
_BETA_POWER = re.compile(r"(?:^|/)beta([12])_power(?:_(\d+))?$")


@dataclass(frozen=True)
class Variable:
    """One saved variable: its checkpoint key, TF name and (TF2) object path."""

    key: str
    name: str
    path: str | None = None
    node: int | None = None  # index in the object graph (TF2)


@dataclass(frozen=True)
class OptimizerState:
    """Checkpoint keys of one variable's optimizer state.

    ``flavour`` is "tf1" (slots "m", "v" plus ``beta1_power``/``beta2_power``)
    or "keras" (slots "m", "v" and maybe "vhat", "average",
    "gradient_accumulator", plus an ``iterations`` counter and the optimizer's
    ``learning_rate`` variable).
    """

    slots: dict[str, str] = field(default_factory=dict)
    beta1_power: str | None = None
    beta2_power: str | None = None
    iterations: str | None = None
    flavour: str = "tf1"
    learning_rate: str | None = None


class CheckpointNames:
    """Name resolution over one checkpoint (TF1 name-based or TF2 object-based)."""

    def __init__(self, reader: BundleReader, *, optimizer_name: str = "Adam") -> None:
        self.reader = reader
        self.optimizer_name = optimizer_name
        self.graph: ObjectGraph | None = reader.object_graph
        self.variables: list[Variable] = []
        # node -> (parent, local name) on its first breadth-first path; the
        # path strings are built on demand (all of them at once would take
        # memory quadratic in the depth of a chain of nodes)
        self._parent: dict[int, tuple[int, str]] = {}
        self._node_var: dict[int, Variable] = {}
        self._children: dict[int, dict[str, int]] = {}
        # original variable node -> [(owner node, slot name, slot variable)]
        self._slot_refs: dict[int, list[tuple[int, str, Variable]]] = {}
        # trainable variable node -> [(list node, index)]; list node -> its optimizers
        self._keras_refs: dict[int, list[tuple[int, str]]] = {}
        self._list_owners: dict[int, list[int]] = {}
        self._tf1_accumulators: tuple[str, str] | None = None
        if self.graph is None:
            self.variables = [Variable(k, k) for k in reader.keys()]
        else:
            self._index_graph(self.graph)
        self._by_key = {v.key: v for v in self.variables}
        self._by_path: dict[str, Variable] = {}
        self._by_name: dict[str, list[Variable]] = {}
        for v in self.variables:
            if v.path is not None:
                self._by_path.setdefault(v.path, v)
            self._by_name.setdefault(v.name, []).append(v)

    @property
    def object_based(self) -> bool:
        """True for a TF2 ``tf.train.Checkpoint`` (it has an object graph)."""
        return self.graph is not None

    # -- TF2 object graph ---------------------------------------------------

    def _index_graph(self, graph: ObjectGraph) -> None:
        # Breadth-first from the root, first path wins: how TF names objects.
        parent: dict[int, tuple[int, str]] = {0: (-1, "")}
        queue = deque([0])
        while queue:
            node_id = queue.popleft()
            for child, local in graph.nodes[node_id].children:
                if child not in parent:
                    parent[child] = (node_id, local)
                    queue.append(child)
        self._parent = parent
        for node_id, node in enumerate(graph.nodes):
            for name, full_name, key in node.attributes:
                if name == "VARIABLE_VALUE" and key in self.reader:
                    path = key[: -len(_VALUE_SUFFIX)] if key.endswith(_VALUE_SUFFIX) else key
                    var = Variable(key, full_name or path, path, node_id)
                    self.variables.append(var)
                    self._node_var[node_id] = var
        for owner_id, node in enumerate(graph.nodes):
            for original, slot_name, slot_node in node.slot_variables:
                slot_var = self._node_var.get(slot_node)
                if slot_var is not None:
                    self._slot_refs.setdefault(original, []).append((owner_id, slot_name, slot_var))
            # Keras 3 optimizers track parallel lists, not slot_variables.
            trainable = self._child(owner_id, "_trainable_variables")
            if trainable is not None:
                owners = self._list_owners.setdefault(trainable, [])
                if not owners:  # each list indexed once, however many share it
                    for child, index in graph.nodes[trainable].children:
                        self._keras_refs.setdefault(child, []).append((trainable, index))
                owners.append(owner_id)

    def _path(self, node_id: int) -> str:
        """The object path of a node (``model/dense/kernel``), or ``node N``."""
        if node_id not in self._parent:
            return f"node {node_id}"
        parts = []
        while node_id > 0:
            node_id, local = self._parent[node_id]
            parts.append(local)
        return "/".join(reversed(parts))

    def _child(self, node_id: int, local_name: str) -> int | None:
        assert self.graph is not None
        children = self._children.get(node_id)
        if children is None:
            children = {}
            for child, local in self.graph.nodes[node_id].children:
                children.setdefault(local, child)
            self._children[node_id] = children
        return children.get(local_name)

    def _node_variable(self, node_id: int | None) -> Variable | None:
        return None if node_id is None else self._node_var.get(node_id)

    # -- lookup -------------------------------------------------------------

    def variable(self, name: str) -> Variable:
        """The variable called ``name`` (TF name, object path or checkpoint key)."""
        found = self._by_key.get(name)
        if found is None and self.object_based:
            found = self._by_path.get(name)
            if found is None:
                same = self._by_name.get(name, [])
                if len(same) > 1:
                    raise CheckpointError(
                        f"{len(same)} variables have the TF name {name!r}: "
                        + ", ".join(v.path or v.key for v in same),
                        path=self.reader.index_path,
                        hint="Name the variable by its object path instead",
                    )
                found = same[0] if same else None
        if found is None:
            candidates = [v.name for v in self.variables]
            candidates += [v.path for v in self.variables if v.path]
            close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
            hint = (
                f"Did you mean {', '.join(map(repr, close))}?"
                if close
                else ("List the names with `python -m tfadam convert CKPT --list`")
            )
            raise CheckpointError(
                "no variable of this name in the checkpoint",
                path=self.reader.index_path,
                key=name,
                hint=hint,
            )
        return found

    def optimizer_state(self, var: Variable) -> OptimizerState | None:
        """Keys of ``var``'s Adam state, or None if the checkpoint has none."""
        if self.object_based:
            return self._object_state(var)
        return self._tf1_state(var)

    def _tf1_state(self, var: Variable) -> OptimizerState | None:
        m = f"{var.key}/{self.optimizer_name}"
        v = f"{var.key}/{self.optimizer_name}_1"
        if m not in self.reader and v not in self.reader:
            return None
        if m not in self.reader or v not in self.reader:
            missing = m if m not in self.reader else v
            raise CheckpointError(
                "the checkpoint has one Adam slot of this variable but not the other "
                f"({missing!r} is missing)",
                path=self.reader.index_path,
                key=var.key,
            )
        # the accumulators are looked up by the caller (it may be told which)
        return OptimizerState({"m": m, "v": v}, flavour="tf1")

    def tf1_accumulators(self) -> tuple[str, str]:
        """The keys of ``beta1_power`` and ``beta2_power`` in a TF1 checkpoint."""
        if self._tf1_accumulators is not None:
            return self._tf1_accumulators
        found: dict[str, list[str]] = {"1": [], "2": []}
        for key in self.reader.keys():
            match = _BETA_POWER.search(key)
            if match:
                found[match.group(1)].append(key)
        if not found["1"] or not found["2"]:
            raise CheckpointError(
                "the checkpoint has Adam slots but no beta1_power/beta2_power accumulators",
                path=self.reader.index_path,
                hint="Pass accumulators=(beta1_key, beta2_key) naming them",
            )
        if len(found["1"]) > 1 or len(found["2"]) > 1:
            raise CheckpointError(
                f"several accumulators: {found['1'] + found['2']} (the graph had several "
                "Adam optimizers)",
                path=self.reader.index_path,
                hint="Pass accumulators=(beta1_key, beta2_key) for the one to load",
            )
        self._tf1_accumulators = found["1"][0], found["2"][0]
        return self._tf1_accumulators

    def _object_state(self, var: Variable) -> OptimizerState | None:
        assert var.node is not None
        owners: dict[int, OptimizerState] = {}
        by_owner: dict[int, dict[str, str]] = {}
        for owner_id, slot_name, slot_var in self._slot_refs.get(var.node, []):
            by_owner.setdefault(owner_id, {})[slot_name] = slot_var.key
        for owner_id, slots in by_owner.items():
            beta1 = self._node_variable(self._child(owner_id, "beta1_power"))
            beta2 = self._node_variable(self._child(owner_id, "beta2_power"))
            if beta1 is not None and beta2 is not None:
                owners[owner_id] = OptimizerState(slots, beta1.key, beta2.key, flavour="tf1")
            else:  # tf.keras (Keras 2) optimizers: slots and an "iter" counter
                it = self._node_variable(self._child(owner_id, "iter"))
                owners[owner_id] = OptimizerState(
                    slots, iterations=it.key if it else None, flavour="keras"
                )
        for trainable, index in self._keras_refs.get(var.node, []):
            owner_ids = self._list_owners[trainable]
            if len(owner_ids) > 1:  # Keras gives each optimizer a list of its own
                raise CheckpointError(
                    f"{len(owner_ids)} optimizers share one list of trainable variables: "
                    + ", ".join(self._path(o) for o in owner_ids[:3])
                    + (", ..." if len(owner_ids) > 3 else ""),
                    path=self.reader.index_path,
                    key=var.key,
                )
            owner_id = owner_ids[0]
            slots = {}
            for list_name, slot in KERAS_SLOT_LISTS:
                holder = self._child(owner_id, list_name)
                slot_var = self._node_variable(
                    None if holder is None else self._child(holder, index)
                )
                if slot_var is not None:
                    slots[slot] = slot_var.key
            if slots:
                it = self._node_variable(self._child(owner_id, "_iterations"))
                lr = self._node_variable(self._child(owner_id, "_learning_rate"))
                owners[owner_id] = OptimizerState(
                    slots,
                    iterations=it.key if it else None,
                    flavour="keras",
                    learning_rate=lr.key if lr else None,
                )
        if not owners:
            return None
        if len(owners) > 1:
            where = ", ".join(self._path(o) for o in owners)
            raise CheckpointError(
                f"several optimizers hold state for this variable: {where}",
                path=self.reader.index_path,
                key=var.key,
            )
        return next(iter(owners.values()))

    def optimizer_variables(self) -> dict[str, str]:
        """Non-slot variables owned by an optimizer: checkpoint key -> local name.

        TF1: the accumulators; TF2: every variable child of an optimizer node
        (``beta1_power``, Keras' ``_iterations``, ``_learning_rate``...).
        """
        if not self.object_based:
            try:
                b1, b2 = self.tf1_accumulators()
            except CheckpointError:
                return {}
            return {b1: "beta1_power", b2: "beta2_power"}
        assert self.graph is not None
        owners = {o for refs in self._slot_refs.values() for o, _, _ in refs}
        for trainable, list_owners in self._list_owners.items():
            if self.graph.nodes[trainable].children:
                owners.update(list_owners)
        found = {}
        for owner_id in owners:
            for child, local in self.graph.nodes[owner_id].children:
                var = self._node_var.get(child)
                if var is not None:
                    found[var.key] = local.lstrip("_")
        return found

    def bookkeeping_keys(self) -> set[str]:
        """Keys that are neither model variables nor optimizer state."""
        keys = {OBJECT_GRAPH_KEY}
        if self.object_based:
            keys.add("save_counter" + _VALUE_SUFFIX)
        return keys & set(self.reader.keys())
