"""Layers point one way: `dflash_core` never imports `service` (the server sits on top of
the core), and no two modules of the project import each other, directly or through a
chain (static imports, module level and inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dflash_core", "service", "loadtest")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file (absolute names)."""
    name = _module_name(path)
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    mods = {_module_name(p): p for p in files}
    graph = {}
    for m, p in mods.items():
        deps = set()
        for imp in _imports(p):
            # keep the longest prefix that is a project module (a.b.c -> a.b when c is a name)
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != m and not m.startswith(imp + "."):   # a package's own __init__ is no edge
                deps.add(imp)
        graph[m] = deps
    return graph


def test_core_never_imports_the_server():
    graph = _graph()
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "service")
           for m, deps in graph.items() if m.split(".")[0] == "dflash_core"}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d.rpartition(".")[0] == m or d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
