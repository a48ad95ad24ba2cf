"""The code's shape, checked: layers point one way (the engine core never imports the
server or the load test), no import cycles, a model spec is resolved once per process,
built-in models are registered in one place."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dflash_core", "service", "loadtest")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                keep = len(base) - node.level + (1 if path.name == "__init__.py" else 0)
                mod = ".".join(base[:keep] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def test_the_core_never_imports_the_server_or_the_load_test():
    graph = _graph()
    assert len([m for m in graph if m.startswith("dflash_core")]) > 20     # the scan sees the core
    bad = {m: sorted(d for d in deps if not d.startswith("dflash_core"))
           for m, deps in graph.items() if m.startswith("dflash_core")}
    assert {m: d for m, d in bad.items() if d} == {}
    served = {m: sorted(d for d in deps if d.startswith("loadtest"))
              for m, deps in graph.items() if m.startswith("service")}
    assert {m: d for m, d in served.items() if d} == {}   # the installed server does not ship loadtest/


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    assert cycles == []
    # the checker does find a cycle when there is one
    graph["dflash_core.engine"].add("dflash_core.api")
    state.clear()
    visit("dflash_core.api")
    assert cycles


def test_builtin_models_are_registered_in_one_place():
    """No module but the registry names a built-in model in code (help texts may)."""
    from dflash_core.models.registry import BUILTIN_MODELS
    assert "tiny-random" in BUILTIN_MODELS
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in BUILTIN_MODELS:
                found.append(name)
    assert set(found) == {"dflash_core.models.registry"}


def test_a_model_is_resolved_once(monkeypatch):
    """Engines, tokenizers, EOS ids, sampling defaults and the server's model check all
    read one ResolvedModel: the spec's folder is looked up once per process."""
    from dflash_core import api
    from dflash_core.engine import EngineConfig
    from dflash_core.models import registry
    calls = []
    real = registry.resolve_model_dir

    def counting(spec):
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(registry, "resolve_model_dir", counting)
    monkeypatch.setattr(registry, "_RESOLVED", {})
    a = registry.resolve_model("default")
    assert registry.resolve_model("default") is a and calls == ["default"]
    for _ in range(2):
        engine, tok = api.build_engine("tiny-random", "random", EngineConfig(max_slots=1, max_seq_len=64,
                                                                             block_size=4))
        assert tok is a.tokenizer and engine.eos_token_ids == (2,)
    assert api.load_tokenizer("default") is a.tokenizer
    assert api.generation_defaults("default") == a.generation_defaults
    assert a.eos_token_ids and set(a.config.eos_token_ids) <= set(a.eos_token_ids)
    from service.cli import check_models
    from service.config import ServiceConfig
    check_models(ServiceConfig(target="default"))
    assert calls == ["default"]
