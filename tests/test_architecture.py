"""The package's shape: no import cycles, no module reading another's private attributes.

Both are read from the source (the AST of every ``src/tfadam/**/*.py``), so they
hold for every module whether or not a test happens to import it; every module
is also imported for real, each into a fresh ``tfadam``, in one subprocess.
See docs/architecture.md for the layers these rules keep apart.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tfadam"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


# --- the import graph -------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    module_level: bool  # executed when ``source`` is imported (TYPE_CHECKING blocks count)


def _resolve(source: str, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``source``."""
    package = source if MODULES[source].name == "__init__.py" else source.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def _targets(source: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The tfadam modules an import statement executes, parent subpackages included."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level == 0:
        base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
        base = _resolve(source, node.level, node.module)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = []
    for name in names:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        parts = name.split(".")
        # Importing a.b.c runs a.b's __init__ first, unless it is already running:
        # the root package, or a package that contains ``source``.
        for depth in range(2, len(parts)):
            parent = ".".join(parts[:depth])
            if not source.startswith(parent + "."):
                found.append(parent)
        found.append(name)  # the named module or package itself, always a dependency
    return [t for t in dict.fromkeys(found) if t in MODULES and t != source]


def imports_of(source: str) -> list[Import]:
    tree = ast.parse(MODULES[source].read_text(), str(MODULES[source]))
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(
                    Import(source, t, child.lineno, module_level) for t in _targets(source, child)
                )
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, module_level and not inner)

    visit(tree, True)
    return found


IMPORTS = [i for source in MODULES for i in imports_of(source)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def describe(component: list[str], edges: list[Import]) -> str:
    inside = [e for e in edges if e.source in component and e.target in component]
    return "; ".join(
        f"{e.source} -> {e.target} ({MODULES[e.source].relative_to(SRC)}:{e.line})" for e in inside
    )


def test_the_graph_sees_the_imports() -> None:
    # The parser must find what is there, or the cycle test below proves nothing.
    edges = {(e.source, e.target, e.module_level) for e in IMPORTS}
    assert ("tfadam.engine", "tfadam.kernels", True) in edges
    assert ("tfadam.kernels.reference", "tfadam.rule", True) in edges
    assert ("tfadam.hyper", "tfadam.kernels", True) in edges  # via kernels.scalars
    assert ("tfadam.checkpoint.mapping", "tfadam", False) in edges  # a late import
    made_up = [Import("tfadam.rule", "tfadam.engine", 1, True)]
    assert cycles([*IMPORTS, *made_up]), "a cycle added by hand must be found"


def test_no_import_cycle_among_module_level_imports() -> None:
    found = cycles([e for e in IMPORTS if e.module_level])
    assert found == [], "\n".join(describe(c, IMPORTS) for c in found)


def test_function_level_imports_are_listed() -> None:
    # Late imports (inside functions) may close a loop: that is what they are for
    # (e.g. checkpoint/mapping.py needs the faces that tfadam/__init__ imports
    # after it). They are allowed, and listed here so that a new one is seen.
    late = sorted({(e.source, e.target) for e in IMPORTS if not e.module_level})
    loops = [c for c in cycles(IMPORTS) if c not in cycles([e for e in IMPORTS if e.module_level])]
    print("function-level imports:", late, "cycles they close:", loops)
    assert all(source in MODULES and target in MODULES for source, target in late)


def test_every_module_imports_on_its_own() -> None:
    # Each module first, into a fresh tfadam (torch stays loaded): an import that
    # only works in one order fails here.
    names = [m for m in MODULES if m != "tfadam.__main__"]
    script = (
        "import importlib, sys, torch\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'tfadam' or m.startswith('tfadam.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# --- private attributes -----------------------------------------------------------------

# Private APIs of torch and the standard library that tfadam uses on purpose.
ALLOWED = {
    ("tfadam.checkpoint.mapping", "_base"): "a view's base tensor: storage overlap of the model",
    ("tfadam.callsite", "_getframe"): "sys._getframe: the user's frame, where a warning points",
    ("tfadam.sparse", "_values"): "a COO tensor's values without coalescing (TF keeps duplicates)",
    ("tfadam.sparse", "_indices"): "a COO tensor's indices without coalescing",
    ("tfadam.hooks", "_optimizer_step_pre_hooks"): "torch.optim's step protocol, run by tfadam",
    ("tfadam.hooks", "_optimizer_step_post_hooks"): "torch.optim's step protocol",
    ("tfadam.hooks", "_global_optimizer_pre_hooks"): "torch.optim's step protocol",
    ("tfadam.hooks", "_global_optimizer_post_hooks"): "torch.optim's step protocol",
    ("tfadam.hooks", "_optimizer_step_code"): "torch.optim's step protocol (profiler hook)",
    ("tfadam.hooks", "_is_profiler_enabled"): "whether a torch profiler records",
    ("tfadam.hooks", "_profiler_enabled"): "whether a torch profiler records (older torch)",
    ("tfadam.guard", "_is_zerotensor"): "torch's efficient zero tensors have no memory to read",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: methods, class attributes, ``self._x = ...``,
    ``__slots__`` entries and string constants (``argparse`` dests, ``setattr``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value.lstrip("-"))  # "--_memory": argparse's dest "_memory"
    return {n for n in names if _private(n)}


def private_reads() -> list[tuple[str, int, str]]:
    """``x._name`` where ``x`` is not ``self``/``cls`` and ``_name`` is not this module's own."""
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        own = defined_names(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr in own or (module, node.attr) in ALLOWED:
                continue
            found.append((module, node.lineno, ast.unparse(node)))
    return sorted(set(found))


def test_the_scan_sees_private_reads() -> None:
    tree = ast.parse("def f(opt):\n    return opt._slots, self._mine\n")
    reads = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    assert "opt._slots" in reads and "_slots" not in defined_names(tree)
    assert "_x" in defined_names(ast.parse("class A:\n    def f(self):\n        self._x = 1\n"))


def test_no_module_reads_another_modules_private_attributes() -> None:
    reads = private_reads()
    assert reads == [], f"modules read other modules' private attributes: {reads}"


def test_allowed_private_apis_are_still_used() -> None:
    # A stale allowance would let a later, unrelated use through unexplained.
    used = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (module, node.attr) in ALLOWED:
                used.add((module, node.attr))
    assert used == set(ALLOWED)
