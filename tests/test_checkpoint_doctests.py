"""The examples in the checkpoint package's docstrings run and say what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "tfadam.checkpoint",
    "tfadam.checkpoint.bundle",
    "tfadam.checkpoint.convert",
    "tfadam.checkpoint.crc32c",
    "tfadam.checkpoint.errors",
    "tfadam.checkpoint.mapping",
    "tfadam.checkpoint.names",
    "tfadam.checkpoint.proto",
    "tfadam.checkpoint.slices",
    "tfadam.checkpoint.table",
    "tfadam.checkpoint.writer",
    "tfadam.checkpoint.dtypes",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0, "every module shows an example"
