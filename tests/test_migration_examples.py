"""Every ```python block of the README's migration section runs, and its bitwise asserts hold.

(```py blocks there are sketches that need the reader's own model.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "README.md"
SECTION = DOC.read_text().split("## Migrating from TensorFlow")[1].split("\n## ")[0]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION, flags=re.DOTALL)


def test_the_doc_has_an_example_per_face() -> None:
    text = "\n".join(BLOCKS)
    for face in ("tfadam.AdamOptimizer(", "tfadam.Adam(", "tfadam.keras.Adam("):
        assert face in text, face


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_migration_example_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"{DOC.name}[block {index}]", "exec"), {})
