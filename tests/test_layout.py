"""The package's import graph: layered from the PEFT tuners up to the command line, without cycles.

Every import of a bayeslora module by another is read from the source (module-level and inside functions alike),
so that a lazy import cannot hide a dependency that points the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bayeslora

PACKAGE = Path(bayeslora.__file__).parent

#: Layers from low to high, as module-name prefixes (the longest matching prefix decides). A module may import
#: modules of its own layer and of lower ones only.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("bayeslora.tuners",),  # PEFT tuners: torch and PEFT only
    (
        "bayeslora._quiet_imports",
        "bayeslora.io",
        "bayeslora.system",
        "bayeslora.assets",
        "bayeslora.precision",
        "bayeslora.runs.layout",
    ),
    ("bayeslora.runs.__init__", "bayeslora.config", "bayeslora.tasks", "bayeslora.models"),
    ("bayeslora.evaluation",),
    ("bayeslora.training",),
    ("bayeslora.methods",),
    ("bayeslora.integrations",),
    ("bayeslora.runs",),
    ("bayeslora.reporting",),
    ("bayeslora.pipeline",),
    ("bayeslora.cli", "bayeslora.__main__", "bayeslora.__init__", "bayeslora.exporters", "bayeslora.lm_eval"),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts)


def _layer(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def _imports(path: Path, module: str) -> set[str]:
    """The bayeslora modules ``module`` (at ``path``) imports, resolved to module names (a package import counts
    as its ``__init__``)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule; `from mod import name` the module that defines it
            candidates = [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate.startswith("bayeslora"):
                resolved = _resolve(candidate)
                if resolved is not None and resolved != module:
                    found.add(resolved)
    return found


def _resolve(name: str) -> str | None:
    """The module file a dotted name refers to (a name inside a module resolves to that module)."""
    parts = name.split(".")
    while parts:
        path = PACKAGE.parent.joinpath(*parts)
        if path.with_suffix(".py").is_file():
            return ".".join(parts)
        if (path / "__init__.py").is_file():
            return ".".join([*parts, "__init__"])
        parts = parts[:-1]
    return None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = _imports(path, name)
    return graph


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert wrong == []


def test_the_tuners_import_nothing_else_of_the_package():
    graph = _graph()
    outside = {m: {t for t in ts if not t.startswith("bayeslora.tuners")} for m, ts in graph.items()}
    assert {m: ts for m, ts in outside.items() if m.startswith("bayeslora.tuners") and ts} == {}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
