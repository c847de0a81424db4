"""The layering of ARCHITECTURE.md, checked on the source: which package may import
which, SQL only in corral.store, and no import cycles among the store's modules.
A change that breaks a rule fails here, naming the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "corral"

# package -> the corral packages it may import. `corral.api` is the shared wire
# vocabulary, so every layer that speaks it may import it.
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "api": {"domain"},
    "store": {"domain", "api"},
    "server": {"domain", "api", "store"},
    "agent": {"domain", "api"},
    "backends": {"domain", "api"},
    "client": {"domain", "api"},
    "sim": {"domain", "api", "store", "server", "agent"},
}
# modules of the package root every layer may use: the version and data-dir rule,
# and the long-lived processes' set-up (logging, the heap)
SHARED = {"corral", "corral.logsetup", "corral.heap", "corral.eventloop"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        if "migrations" in rel.parts:
            continue
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every absolute import in the file, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from corral.store import jobs` imports the module corral.store.jobs
            found += [
                (node.lineno, f"{node.module}.{a.name}")
                for a in node.names
                if f"{node.module}.{a.name}" in MODULES
            ]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "corral" and parts[1] in ALLOWED else None


def violation(module: str, target: str) -> str | None:
    """Why `module` may not import `target`, or None if it may."""
    layer = _layer(module)
    if layer is None or not target.startswith("corral") or target in SHARED:
        return None
    other = _layer(target)
    if other is None:  # a root module: corral.cli, corral.up, corral.testing
        return f"{layer} imports the composition root {target}"
    if other != layer and other not in ALLOWED[layer]:
        return f"{layer} imports {target} ({other})"
    return None


def test_every_package_imports_only_what_its_layer_allows():
    broken = [
        f"{path.relative_to(ROOT.parent)}:{line}: {why}"
        for name, path in sorted(MODULES.items())
        for line, target in _imports(path)
        if (why := violation(name, target))
    ]
    assert not broken, "layering violations:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("module", "target", "allowed"),
    [
        ("corral.agent.daemon", "corral.client.config", False),
        ("corral.server.app", "corral.backends.local", False),
        ("corral.domain.jobs", "corral.api.jobs", False),
        ("corral.store.jobs", "corral.testing", False),
        ("corral.server.app", "corral.store.db", True),
        ("corral.agent.cli", "corral", True),
    ],
)
def test_the_layer_rule_itself(module, target, allowed):
    assert (violation(module, target) is None) is allowed


def test_sql_is_built_only_in_the_store():
    broken = [
        f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
        for name, path in sorted(MODULES.items())
        if _layer(name) != "store"
        for line, target in _imports(path)
        if target.split(".")[0] == "sqlalchemy"
    ]
    assert not broken, "SQL outside corral.store:\n" + "\n".join(broken)


def test_store_modules_import_each_other_without_a_cycle():
    store = {n for n in MODULES if n.startswith("corral.store.")}
    # `from corral.store import jobs` is recorded as corral.store.jobs too
    graph = {
        n: {t for _, t in _imports(MODULES[n]) if t in store and t != n} for n in sorted(store)
    }
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle in corral.store: " + " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if state.get(m) is None and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in graph:
        if state.get(n) is None and (found := visit(n)):
            return found
    return None


@pytest.mark.parametrize(
    ("graph", "cyclic"),
    [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": {"c"}, "c": set()}, False)],
)
def test_the_cycle_finder_finds_cycles(graph, cyclic):
    assert (_find_cycle(graph) is not None) is cyclic
