"""Every ```python block of docs/migration.md runs, and its bitwise asserts hold."""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "migration.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_doc_has_an_example_per_face() -> None:
    text = "\n".join(BLOCKS)
    for face in ("tfadam.AdamOptimizer(", "tfadam.Adam(", "tfadam.keras.Adam("):
        assert face in text, face


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_migration_example_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"{DOC.name}[block {index}]", "exec"), {})
