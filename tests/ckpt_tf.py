"""Real TensorFlow runs that write checkpoints, for the checkpoint tests.

TensorFlow is the oracle here: every checkpoint the tests read was written by
TF itself (TF1 ``Saver`` in graph mode, TF2 ``tf.train.Checkpoint``, Keras 3),
and every expected value comes from TF (``tf.train.load_checkpoint``, or the
variables TF holds after more training steps).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf1 = tf.compat.v1

LR, BETA1, BETA2, EPS = 0.01, 0.9, 0.999, 1e-8
SHAPES = {"dense/kernel": (7, 5), "dense/bias": (5,), "emb": (20, 4), "part": (10, 3)}
SPARSE_IDS = [np.array([3, 1, 3, 17, 0]), np.array([5, 5, 2]), np.array([19, 0, 1, 3])]


@dataclass
class Run:
    """A TF training run: its checkpoint, the gradients after it, TF's final state."""

    prefix: str
    dtype: str
    dense_grads: list[dict[str, np.ndarray]] = field(default_factory=list)
    sparse_grads: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    final: dict[str, np.ndarray] = field(default_factory=dict)  # name -> θ, name/m, name/v
    beta_powers: tuple[np.ndarray, np.ndarray] | None = None
    beta_powers_at_save: tuple[np.ndarray, np.ndarray] | None = None


def _grads(rng: np.random.Generator, dtype: str, steps: int, with_sparse: bool):
    dense, sparse = [], []
    for i in range(steps):
        scale = 10.0 ** rng.uniform(-3, 1)
        dense.append(
            {
                n: (rng.standard_normal(SHAPES[n]) * scale).astype(dtype)
                for n in ("dense/kernel", "dense/bias", "part")
            }
        )
        if with_sparse:
            ids = SPARSE_IDS[i % len(SPARSE_IDS)]
            vals = (rng.standard_normal((len(ids), SHAPES["emb"][1])) * scale).astype(dtype)
            sparse.append((ids, vals))
    return dense, sparse


def _initial(rng: np.random.Generator, dtype: str) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def tf1_session_run(
    directory: str, *, dtype: str = "float32", before: int = 4, after: int = 3, seed: int = 0
) -> Run:
    """TF1 graph mode: ``Session`` + ``Saver``; a partitioned variable and a sparse one.

    Trains ``before`` steps, saves, trains ``after`` more with the gradients
    it returns (fed as constants through the loss ``sum(var * g)``).
    """
    rng = np.random.default_rng(seed)
    init = _initial(rng, dtype)
    grads, sparse = _grads(rng, dtype, before + after, with_sparse=True)
    run = Run(os.path.join(directory, "model.ckpt"), dtype)
    graph = tf.Graph()
    with graph.as_default():
        tfdtype = tf.as_dtype(dtype)
        var = {
            n: tf1.get_variable(n, initializer=init[n], use_resource=True)
            for n in ("dense/kernel", "dense/bias", "emb")
        }

        def part_init(shape, dtype=None, partition_info=None):
            start = partition_info.var_offset[0] if partition_info else 0
            return tf.constant(init["part"][start : start + shape[0]], dtype=dtype)

        var["part"] = tf1.get_variable(
            "part",
            initializer=part_init,
            shape=SHAPES["part"],
            dtype=tfdtype,
            partitioner=tf1.fixed_size_partitioner(3),
        )
        # trainable but outside the loss: TF never creates its Adam slots
        frozen = tf1.get_variable("frozen", initializer=init["dense/bias"] * 2, use_resource=True)
        feeds = {
            n: tf1.placeholder(tfdtype, SHAPES[n]) for n in ("dense/kernel", "dense/bias", "part")
        }
        ids = tf1.placeholder(tf.int64, [None])
        rows = tf1.placeholder(tfdtype, [None, SHAPES["emb"][1]])
        loss = (
            tf.reduce_sum(var["dense/kernel"] * feeds["dense/kernel"])
            + tf.reduce_sum(var["dense/bias"] * feeds["dense/bias"])
            + tf.reduce_sum(var["part"].as_tensor() * feeds["part"])
            + tf.reduce_sum(tf.gather(var["emb"], ids) * rows)
        )
        opt = tf1.train.AdamOptimizer(LR, BETA1, BETA2, EPS)
        train = opt.minimize(loss)
        saver = tf1.train.Saver()
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for step in range(before + after):
                if step == before:
                    run.prefix = saver.save(sess, run.prefix, global_step=step)
                    run.beta_powers_at_save = tuple(sess.run(list(opt._get_beta_accumulators())))
                feed = {feeds[n]: grads[step][n] for n in feeds}
                feed[ids], feed[rows] = sparse[step]
                sess.run(train, feed)
            slots = {
                n: (opt.get_slot(var[n], "m"), opt.get_slot(var[n], "v"))
                for n in ("dense/kernel", "dense/bias", "emb")
            }
            for n in ("dense/kernel", "dense/bias", "emb"):
                run.final[n], run.final[n + "/m"], run.final[n + "/v"] = sess.run(
                    [var[n], *slots[n]]
                )
            run.final["frozen"] = sess.run(frozen)
            run.final["part"] = sess.run(var["part"].as_tensor())
            part_slots = [(opt.get_slot(p, "m"), opt.get_slot(p, "v")) for p in var["part"]]
            run.final["part/m"] = np.concatenate([sess.run(m) for m, _ in part_slots])
            run.final["part/v"] = np.concatenate([sess.run(v) for _, v in part_slots])
            run.beta_powers = tuple(sess.run(list(opt._get_beta_accumulators())))
    run.dense_grads = grads[before:]
    run.sparse_grads = sparse[before:]
    return run


def tf2_eager_run(
    directory: str, *, dtype: str = "float32", before: int = 4, after: int = 3, seed: int = 1
) -> Run:
    """TF2 eager: ``tf.train.Checkpoint`` over a ``tf.compat.v1.train.AdamOptimizer``."""
    rng = np.random.default_rng(seed)
    init = _initial(rng, dtype)
    grads, sparse = _grads(rng, dtype, before + after, with_sparse=True)
    names = ("dense/kernel", "dense/bias", "emb")
    var = {n: tf.Variable(init[n], name=n) for n in names}
    opt = tf1.train.AdamOptimizer(LR, BETA1, BETA2, EPS)
    ckpt = tf.train.Checkpoint(
        model={"kernel": var["dense/kernel"], "bias": var["dense/bias"], "emb": var["emb"]},
        optimizer=opt,
    )
    run = Run(os.path.join(directory, "ckpt"), dtype)
    for step in range(before + after):
        if step == before:
            run.prefix = ckpt.save(run.prefix)
        ids, vals = sparse[step]
        pairs = [(tf.constant(grads[step][n]), var[n]) for n in ("dense/kernel", "dense/bias")]
        pairs.append(
            (
                tf.IndexedSlices(tf.constant(vals), tf.constant(ids), tf.constant(SHAPES["emb"])),
                var["emb"],
            )
        )
        opt.apply_gradients(pairs)
    for n in names:
        run.final[n] = var[n].numpy()
        run.final[n + "/m"] = opt.get_slot(var[n], "m").numpy()
        run.final[n + "/v"] = opt.get_slot(var[n], "v").numpy()
    run.beta_powers = tuple(b.numpy() for b in opt._get_beta_accumulators())
    run.dense_grads = grads[before:]
    run.sparse_grads = sparse[before:]
    return run


def keras_run(directory: str) -> str:
    """Keras 3 model and optimizer (a few fit steps), saved by ``tf.train.Checkpoint``."""
    import keras

    rng = np.random.default_rng(2)
    # explicit names: Keras uniquifies default ones per process (dense_1, ...)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="mlp",
    )
    optimizer = keras.optimizers.Adam(0.01)
    model.compile(optimizer, "mse")
    x = rng.standard_normal((16, 6)).astype("float32")
    model.fit(x, x[:, :2], epochs=2, batch_size=8, verbose=0)
    return tf.train.Checkpoint(model=model, optimizer=optimizer).save(
        os.path.join(directory, "keras")
    )


def every_dtype_checkpoint(directory: str, *, big: bool = True) -> str:
    """One TF2 checkpoint holding a variable of every dtype the reader supports.

    ``big`` adds a 12 MiB tensor (the vectorised checksum's multi-block path).
    """
    values = {
        "string": tf.constant([[b"ab", b""], [b"x" * 300, b"\x00\xff"]]),
        "scalar_string": tf.constant(b"hello"),
        "bool": tf.constant([True, False, True]),
        "empty": tf.zeros((0, 3)),
        "scalar": tf.constant(3.5),
    }
    if big:
        values["big"] = tf.reshape(tf.range(3 << 20, dtype=tf.float32) * 0.25, (3 << 10, 1 << 10))
    data = np.array([[1.5, -2.0, 3.25], [0.0, 7.0, 1e-3]])
    for name in ("float16", "bfloat16", "float32", "float64", "complex64", "complex128"):
        values[name] = tf.cast(tf.constant(data), name)
    for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        values[name] = tf.constant([[1, 2, 3], [4, 5, 127]], dtype=name)
    values["float8_e4m3fn"] = tf.cast(tf.constant(data), tf.dtypes.experimental.float8_e4m3fn)
    values["float8_e5m2"] = tf.cast(tf.constant(data), tf.dtypes.experimental.float8_e5m2)
    ckpt = tf.train.Checkpoint(**{k: tf.Variable(v) for k, v in values.items()})
    return ckpt.write(os.path.join(directory, "dtypes"))


def sharded_checkpoint(directory: str) -> str:
    """A TF2 checkpoint split over several data shards by a shard-size policy."""
    variables = {f"v{i}": tf.Variable(tf.fill((64, 16), float(i))) for i in range(6)}
    options = tf.train.CheckpointOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(
            max_shard_size=8 << 10
        )
    )
    return tf.train.Checkpoint(**variables).write(
        os.path.join(directory, "sharded"), options=options
    )


def tf_values(prefix: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as TensorFlow's own reader returns it."""
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


def same_bits(tf_value, ours: np.ndarray) -> bool:
    """TF's value and ours hold the same bits (strings: the same bytes)."""
    theirs = np.asarray(tf_value, dtype=object if ours.dtype == object else None)
    if theirs.shape != ours.shape:
        return False
    if ours.dtype == object:
        return all(a == b for a, b in zip(theirs.reshape(-1), ours.reshape(-1), strict=True))
    return theirs.tobytes() == ours.tobytes() and theirs.dtype.itemsize == ours.dtype.itemsize


def keras_resume_run(
    directory: str, *, before: int = 3, after: int = 3, amsgrad: bool = False, seed: int = 4
) -> Run:
    """Keras 3 Adam with fixed gradients: ``before`` steps, save, ``after`` more.

    ``final`` holds each variable (by Keras path) and its Keras slots
    (``/m``, ``/v``, ``/vhat``); ``beta_powers`` is unused.
    """
    import keras

    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4, name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="mlp",
    )
    optimizer = keras.optimizers.Adam(learning_rate=LR, amsgrad=amsgrad)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    variables = model.trainable_variables
    run = Run(os.path.join(directory, "keras"), "float32")
    for step in range(before + after):
        if step == before:
            run.prefix = ckpt.save(run.prefix)
        scale = 10.0 ** rng.uniform(-3, 1)
        grads = [(rng.standard_normal(v.shape) * scale).astype("float32") for v in variables]
        optimizer.apply_gradients(zip([tf.constant(g) for g in grads], variables, strict=True))
        if step >= before:
            run.dense_grads.append({v.path: g for v, g in zip(variables, grads, strict=True)})
    for i, v in enumerate(variables):
        run.final[v.path] = v.numpy()
        run.final[v.path + "/m"] = optimizer._momentums[i].numpy()
        run.final[v.path + "/v"] = optimizer._velocities[i].numpy()
        if amsgrad:
            run.final[v.path + "/vhat"] = optimizer._velocity_hats[i].numpy()
    run.final["iterations"] = optimizer.iterations.numpy()
    return run


DECAY_STEPS, DECAY_RATE = 7, 0.9


def tf1_global_step_run(directory: str, *, before: int = 50, after: int = 50, seed: int = 8) -> Run:
    """TF1 ``Session``: Adam with ``exponential_decay(LR, global_step, 7, 0.9)``.

    Trains ``before`` steps (``minimize(..., global_step=)``), saves, trains
    ``after`` more. ``final`` also holds ``global_step`` and, per step after
    the save, the learning rate TF used (``lr/<step>``).
    """
    rng = np.random.default_rng(seed)
    names = ("dense/kernel", "dense/bias")
    init = {n: rng.standard_normal(SHAPES[n]).astype("float32") for n in names}
    grads = [
        {
            n: (rng.standard_normal(SHAPES[n]) * 10.0 ** rng.uniform(-3, 1)).astype("float32")
            for n in names
        }
        for _ in range(before + after)
    ]
    run = Run(os.path.join(directory, "model.ckpt"), "float32")
    graph = tf.Graph()
    with graph.as_default():
        var = {n: tf1.get_variable(n, initializer=init[n], use_resource=True) for n in names}
        global_step = tf1.train.get_or_create_global_step()
        feeds = {n: tf1.placeholder(tf.float32, SHAPES[n]) for n in names}
        loss = sum(tf.reduce_sum(var[n] * feeds[n]) for n in names)
        lr = tf1.train.exponential_decay(LR, global_step, DECAY_STEPS, DECAY_RATE)
        opt = tf1.train.AdamOptimizer(lr, BETA1, BETA2, EPS)
        train = opt.minimize(loss, global_step=global_step)
        saver = tf1.train.Saver()
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for step in range(before + after):
                if step == before:
                    run.prefix = saver.save(sess, run.prefix, global_step=global_step)
                feed = {feeds[n]: grads[step][n] for n in names}
                if step >= before:
                    run.final[f"lr/{step}"] = sess.run(lr)
                sess.run(train, feed)
            for n in names:
                run.final[n], run.final[n + "/m"], run.final[n + "/v"] = sess.run(
                    [var[n], opt.get_slot(var[n], "m"), opt.get_slot(var[n], "v")]
                )
            run.final["global_step"] = sess.run(global_step)
            run.beta_powers = tuple(sess.run(list(opt._get_beta_accumulators())))
    run.dense_grads = grads[before:]
    return run
