"""The README's commands run as written, its examples run, and its links resolve.

Every command in a ```bash / ```sh block of the README is either run here, from
the repository root, or listed in ``NOT_RUN`` with the reason. ``.venv/bin/``
stands for the virtual environment the setup commands create; when the suite
runs in another environment, that environment's ``bin/`` stands in for it.
Scratch paths under ``/tmp/`` are moved into the test's own directory, so that
runs do not see each other's checkpoints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Commands (or the parts of a `&&` chain) not run here, by regular expression.
NOT_RUN: dict[str, str] = {
    r"pip install \.(\s|$)": "installs tfadam into the interpreter running this test; the "
    "setup commands do the same into .venv, and .ci/run runs them from a fresh clone",
    r"python -m tfadam\.kernels(\s|$)": "asks the interpreter the Install block installed into; "
    "tests/test_kernel_selection.py runs the same query",
    r"python3 -m venv \.venv$": "creates the environment this suite runs in (.ci/run runs it)",
    r"\.venv/bin/pip install -q -r requirements-dev\.txt -e \.$": "installs the environment "
    "this suite runs in (.ci/run runs it from a fresh clone)",
    r"\.venv/bin/python -m pytest -n 2$": "the whole suite: .ci/run runs exactly this command "
    "(test_ci_runs_the_readme_test_command), and this test is part of it",
}
# Run with --collect-only appended: the command line is proven, the tests it
# names run in the suite anyway.
COLLECT_ONLY: dict[str, str] = {
    r"\.venv/bin/python -m pytest tests/test_distributed\*\.py -q$": "the distributed tests, "
    "which the suite runs",
}


def shell_blocks() -> list[str]:
    text = README.read_text()
    return re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands() -> list[str]:
    """Each command line of the shell blocks (comments dropped, `\\` lines joined)."""
    commands = []
    for block in shell_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def steps(command: str) -> list[str]:
    return [part.strip() for part in command.split("&&")]


def matching(table: dict[str, str], step: str) -> str | None:
    return next((reason for pattern, reason in table.items() if re.search(pattern, step)), None)


def runnable(command: str) -> str:
    """The part of a `&&` chain run here (the parts in NOT_RUN are dropped)."""
    return " && ".join(s for s in steps(command) if matching(NOT_RUN, s) is None)


def as_here(command: str, scratch: Path) -> str:
    if matching(COLLECT_ONLY, command):
        command += " --collect-only"
    # The README's scratch paths first: the environment's own path may lie under /tmp/.
    command = command.replace("/tmp/", f"{scratch}/")
    venv_bin = ROOT / ".venv" / "bin"
    here_bin = Path(sys.executable).parent
    if venv_bin.resolve() != here_bin.resolve():
        command = command.replace(".venv/bin/", f"{here_bin}/")
    return command


def shell(command: str, scratch: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail; " + as_here(command, scratch)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_every_shell_command_is_run_or_says_why_not() -> None:
    commands = shell_commands()
    assert len(commands) >= 6
    for command in commands:
        for step in steps(command):
            # The README runs tools from the environment it set up, never from $PATH.
            program = step.split()[0]
            if matching(NOT_RUN, step) is None:
                assert program.startswith(".venv/bin/"), f"{step!r}: use .venv/bin/{program}"


def test_every_table_row_matches_a_readme_command() -> None:
    all_steps = [s for c in shell_commands() for s in steps(c)]
    for pattern in [*NOT_RUN, *COLLECT_ONLY]:
        assert any(re.search(pattern, s) for s in all_steps), f"stale row {pattern!r}"


@pytest.mark.slow  # ~12 s of CPU: 200 steps of three optimizers, TF's import
def test_readme_demo_command_runs_and_its_table_is_what_it_prints(tmp_path: Path) -> None:
    [demo] = [c for c in shell_commands() if c.endswith("-m tfadam compare")]
    done = shell(runnable(demo), tmp_path)
    verdict = re.search(
        r"bit-identical to TensorFlow; (torch\.optim\.Adam\(fused=True\)): ([\d.]+)% of "
        r"elements differ \(max relative ([\d.e+-]+)\)",
        done.stdout,
    )
    assert verdict, done.stdout
    label, percent, relative = verdict.groups()
    row = f"| `{label}` | {percent}% | {float(relative):.1e} |".replace("e-0", "e-")
    assert row in README.read_text(), f"README's table lacks {row!r}"


@pytest.mark.slow  # three torchrun launches, ~20 s of CPU
def test_readme_distributed_commands_run_and_resume_to_the_same_bits(tmp_path: Path) -> None:
    runs = [c for c in shell_commands() if "torchrun" in c]
    assert len(runs) == 3
    outputs = [shell(c, tmp_path).stdout for c in runs]
    fingerprints = [re.findall(r"^fingerprint (\w+) at step 40$", o, re.M) for o in outputs]
    assert fingerprints[0] and fingerprints[0] == fingerprints[2], outputs
    assert re.search(r"^resumed from \S+/step-000020 on 1 process\(es\)$", outputs[2], re.M)
    # The first run prints the lines the README shows after it (the numbers are this CPU's).
    shown = README.read_text().split(runs[0], 1)[1].split("```text\n", 1)[1].split("```")[0]
    shape = [re.sub(r"[\d.]+$|\b[0-9a-f]{16}\b", "#", line) for line in shown.splitlines()]
    printed = [line for line in outputs[0].splitlines() if line.startswith(("step", "finger"))]
    assert [re.sub(r"[\d.]+$|\b[0-9a-f]{16}\b", "#", line) for line in printed] == shape


def test_readme_distributed_test_command_collects(tmp_path: Path) -> None:
    [command] = [c for c in shell_commands() if matching(COLLECT_ONLY, c)]
    done = shell(command, tmp_path)
    collected = re.search(r"^(\d+) tests? collected", done.stdout, re.M)
    assert collected and int(collected.group(1)) >= 3, done.stdout


def readme_setup_commands() -> list[str]:
    return [c for c in shell_commands() if c.startswith("python3 -m venv")]


def test_readme_has_exactly_two_setup_commands_demo_and_tests() -> None:
    commands = readme_setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python -m tfadam compare")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_setup_commands()[1] in ci


def test_readme_quick_start_examples_run() -> None:
    text = README.read_text().split("## Quick start")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# --------------------------------------------------------------------------- #
# Links                                                                        #
# --------------------------------------------------------------------------- #

DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # not in code
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("document", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_every_link_resolves_to_a_file_in_the_repository(document: Path) -> None:
    found = links(document)
    for link in found:
        if re.match(r"[a-z]+:", link):
            continue  # a URL
        target, _, anchor = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        assert path.is_relative_to(ROOT), f"{document.name}: {link} points outside the repository"
        assert path.exists(), f"{document.name}: {link} does not exist"
        if anchor:
            assert anchor in anchors(path), f"{document.name}: no heading #{anchor} in {target}"
    if document == README:
        assert "docs/semantics.md" in found


def test_no_document_points_outside_the_repository() -> None:
    for path in [*DOCUMENTS, *sorted((ROOT / "src" / "tfadam").rglob("*.py"))]:
        text = path.read_text()
        assert "/work/" not in text and "shared/spec" not in text, path
