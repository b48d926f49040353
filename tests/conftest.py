import os

# TensorFlow is the oracle; keep its start-up chatter out of test logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

# tfadam before any test module imports TensorFlow: with a CUDA build of torch
# (triton >= 3.7) triton must load before TF >= 2.20 or a later torch.compile
# segfaults the worker (README, troubleshooting); tfadam's import sees to it.
import tfadam  # noqa: E402, F401

# The quick tier (`pytest -m "not slow"`) leaves out these modules: each spends
# its time in subprocesses, process groups, a compiler or a long random search.
# The bitwise core (the kernels against the reference, every face against TF)
# stays in. A single test can also carry @pytest.mark.slow itself.
SLOW_MODULES = {
    "test_distributed_ddp.py": "spawns gloo process groups",
    "test_distributed_fsdp.py": "spawns gloo process groups",
    "test_distributed_example.py": "runs torchrun",
    "test_kernels_compile.py": "torch.compile with inductor",
    "test_kernels_bench.py": "runs the benchmark",
    "test_reliab_crash.py": "kills subprocesses mid-write",
    "test_reliab_properties.py": "1,250 hypothesis examples",
    "test_checkpoint_convert.py": "runs the converter in subprocesses",
    "test_checkpoint_no_tf.py": "a subprocess without TensorFlow",
    "test_compare.py": "runs the demo",
}

# Single tests that rebuild the kernels, fork or start TF graphs (measured the
# slowest of the quick tier): the build and process variants of the core.
SLOW_TESTS = {
    "test_kernels.py::test_kernels_leave_torchs_threads_float_mode_alone",
    "test_kernels.py::test_without_avx512_paths",
    "test_kernels.py::test_bfloat16_without_avx512_bf16_instructions",
    "test_kernels.py::test_kernels_work_in_a_forked_child",
    "test_kernels.py::test_own_thread_pool_build_agrees",
    "test_keras.py::test_keras_inside_tf_function",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if item.path.name in SLOW_MODULES or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
