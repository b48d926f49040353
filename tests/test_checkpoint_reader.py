"""The reader against TensorFlow's own: every tensor of real TF checkpoints, bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from ckpt_tf import (
    every_dtype_checkpoint,
    keras_run,
    same_bits,
    sharded_checkpoint,
    tf,
    tf1_session_run,
    tf2_eager_run,
    tf_values,
)

from tfadam.checkpoint import BundleReader, CheckpointError, resolve_prefix
from tfadam.checkpoint.writer import write_bundle


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("tf")
    return {
        "tf1_session": tf1_session_run(str(d / "tf1")).prefix,
        "tf1_float64": tf1_session_run(str(d / "tf1_64"), dtype="float64").prefix,
        "tf2_eager": tf2_eager_run(str(d / "tf2")).prefix,
        "keras": keras_run(str(d / "keras")),
        "every_dtype": every_dtype_checkpoint(str(d / "dtypes")),
        "sharded": sharded_checkpoint(str(d / "sharded")),
    }


@pytest.mark.parametrize(
    "kind", ["tf1_session", "tf1_float64", "tf2_eager", "keras", "every_dtype", "sharded"]
)
def test_every_tensor_equals_tf_load_checkpoint(checkpoints, kind):
    prefix = checkpoints[kind]
    expected = tf_values(prefix)
    tf_reader = tf.train.load_checkpoint(prefix)
    with BundleReader(prefix) as reader:
        assert reader.variable_to_shape_map() == {
            k: tuple(v) for k, v in tf_reader.get_variable_to_shape_map().items()
        }
        assert reader.variable_to_dtype_map() == {
            k: v.name for k, v in tf_reader.get_variable_to_dtype_map().items()
        }
        for key, value in expected.items():
            assert same_bits(value, reader.read_numpy(key)), key


def test_shapes_and_dtypes_cover_the_contract(checkpoints):
    with BundleReader(checkpoints["every_dtype"]) as reader:
        dtypes = set(reader.variable_to_dtype_map().values())
        assert {"float16", "bfloat16", "float32", "float64", "bool", "string"} <= dtypes
        assert {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"} <= dtypes
    with BundleReader(checkpoints["sharded"]) as reader:
        assert reader.header.num_shards > 1  # the multi-shard path ran
    with BundleReader(checkpoints["tf1_session"]) as reader:
        assert reader.info("part").partitioned  # the reassembly path ran
        assert reader.info("part/Adam_1").partitioned


def test_read_torch_reinterprets_bits(checkpoints):
    expected = tf_values(checkpoints["every_dtype"])
    with BundleReader(checkpoints["every_dtype"]) as reader:
        for key, value in expected.items():
            dtype = reader.info(key).dtype
            if dtype == "string":
                with pytest.raises(CheckpointError, match="no torch equivalent"):
                    reader.read_torch(key)
                continue
            tensor = reader.read_torch(key)
            assert str(tensor.dtype) == f"torch.{dtype}", key
            assert tuple(tensor.shape) == np.asarray(value).shape
            raw = tensor.contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor
            assert raw.numpy().tobytes() == np.asarray(value).tobytes(), key


def test_paths_resolve_like_tensorflow(checkpoints):
    prefix = checkpoints["tf2_eager"]
    directory = os.path.dirname(prefix)
    assert resolve_prefix(directory) == tf.train.latest_checkpoint(directory)
    assert resolve_prefix(prefix + ".index") == prefix
    assert resolve_prefix(prefix + ".data-00000-of-00001") == prefix
    with pytest.raises(CheckpointError, match="no such file") as err:
        resolve_prefix(prefix + "-nope")
    assert err.value.path == prefix + "-nope.index"


def test_unknown_tensor_name_suggests_close_ones(checkpoints):
    with BundleReader(checkpoints["tf1_session"]) as reader:
        with pytest.raises(CheckpointError, match="Did you mean 'dense/kernel'") as err:
            reader.read_numpy("dense/kernal")
    assert err.value.key == "dense/kernal"


def test_object_graph_decodes_like_protobuf(checkpoints):
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    prefix = checkpoints["keras"]
    proto = trackable_object_graph_pb2.TrackableObjectGraph()
    proto.ParseFromString(
        tf.train.load_checkpoint(prefix).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    )
    with BundleReader(prefix) as reader:
        graph = reader.object_graph
    assert graph is not None and len(graph.nodes) == len(proto.nodes)
    for ours, theirs in zip(graph.nodes, proto.nodes, strict=True):
        assert ours.children == tuple((c.node_id, c.local_name) for c in theirs.children)
        assert ours.attributes == tuple(
            (a.name, a.full_name, a.checkpoint_key) for a in theirs.attributes
        )
        assert ours.slot_variables == tuple(
            (s.original_variable_node_id, s.slot_name, s.slot_variable_node_id)
            for s in theirs.slot_variables
        )


@pytest.mark.parametrize("big_endian", [False, True])
def test_tensorflow_reads_what_the_test_writer_writes(tmp_path, big_endian):
    # The writer used by doctests and damage tests must produce real bundles;
    # big-endian ones exercise the byte swap TF does on load.
    rng = np.random.default_rng(3)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16),
        "c": rng.integers(-5, 5, (4,), dtype=np.int64),
        "s": np.array([b"xyz", b"", b"\x00" * 9], dtype=object),
        "h": rng.standard_normal(7).astype(np.float16),
        "z": np.array([1 + 2j], dtype=np.complex128),
    }
    tensors.update({f"many/{i:03d}": np.full(i % 4, i, np.int32) for i in range(200)})
    prefix = str(tmp_path / "w")
    write_bundle(prefix, tensors, num_shards=3, big_endian=big_endian)
    expected = tf_values(prefix)
    assert set(expected) == set(tensors)
    with BundleReader(prefix) as reader:
        for key, value in expected.items():
            assert same_bits(value, reader.read_numpy(key)), key
