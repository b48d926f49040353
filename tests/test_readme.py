"""The README's commands and examples stay true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", text)


def test_readme_has_exactly_two_setup_commands_demo_and_tests() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python -m tfadam compare")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci


def test_readme_quick_start_examples_run() -> None:
    text = (ROOT / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
