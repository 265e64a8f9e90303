"""The package's layers, and the import-graph check that keeps them: ``python tests/layers.py [ROOT]``.

A module may import modules of its own layer and of the layers below it, never above; and no chain of
imports closes a cycle. Every import statement counts, those inside functions too: a lazy import is
still a dependency. The one dependency that runs by name is the registry's import of the built-in
tasks and models on first use (``registry.BUILTIN_MODULES``), which is how they register.

A module sits in the layer of the longest prefix below that names it; where a theme spans layers
(operations: the signal table is low, the launcher high) each module is placed by what it imports.
A package whose modules lie in several layers keeps its ``__init__`` free of imports that run on import
(lazy ones inside functions are fine), since importing any of its modules runs it first.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

LAYERS: List[Tuple[str, Tuple[str, ...]]] = [  # lowest first
    # the operations' modules are low unless listed higher up (the launcher)
    ("base", ("distseq.errors", "distseq.options", "distseq.registry", "distseq.fsio", "distseq.ops",
              "distseq.distributed.agree", "distseq.plotting")),
    ("tasks", ("distseq.tasks",)),
    ("models", ("distseq.models",)),
    ("data", ("distseq.data",)),
    ("config", ("distseq.config",)),
    ("distributed", ("distseq.distributed",)),
    ("checkpoint", ("distseq.checkpoint",)),
    ("training", ("distseq.training",)),
    ("use", ("distseq.inference",)),
    ("sweep", ("distseq.sweep",)),
    ("entry", ("distseq.ops.launch", "distseq.bench", "distseq.cli", "distseq.__main__", "distseq")),
]
EXACT = ("distseq",)  # the public API's __init__ alone, not every module below it


def layer_of(module: str) -> Tuple[int, str]:
    """(index, name) of the layer whose longest prefix names ``module``."""
    best = (-1, -1, "")
    for index, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix not in EXACT
            if (module == prefix or below) and len(prefix) > best[0]:
                best = (len(prefix), index, name)
    if best[0] < 0:
        raise KeyError(f"{module} is in no layer: add it to tests/layers.py")
    return best[1], best[2]


def modules(root: Path) -> Dict[str, Path]:
    """``{module name: file}`` of every module of the package under ``root`` (the repository)."""
    out = {}
    for path in sorted((root / "distseq").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path, known: Set[str], top_level: bool = False) -> Iterator[Tuple[str, int]]:
    """(imported distseq module, line) for every import statement of ``module``, at any depth (``top_level``:
    only those that run when the module is imported, outside functions)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in (_outside_functions(tree) if top_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "distseq":
                    yield _module(alias.name, known), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "distseq":
                continue
            for alias in node.names:  # `from distseq.tasks import base` imports the module distseq.tasks.base
                yield (f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else _module(target, known)), \
                    node.lineno


def _outside_functions(node: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield child
            yield from _outside_functions(child)


def _module(name: str, known: Set[str]) -> str:
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def problems(root: Path) -> List[str]:
    """Every upward import, every cycle and every import in a multi-layer package's ``__init__``, one line each."""
    found, graph = [], {}
    known = modules(root)
    names = set(known)
    for module, path in known.items():
        edges = graph.setdefault(module, set())
        here = layer_of(module)
        for target, line in imports(module, path, names):
            if target == module:
                continue
            edges.add(target)
            there = layer_of(target)
            if there[0] > here[0]:
                found.append(f"{path.relative_to(root)}:{line}: {module} ({here[1]}) imports {target} ({there[1]}), "
                             f"a layer above it")
    for module, path in known.items():
        inside = [m for m in known if m.startswith(module + ".")]
        if path.name == "__init__.py" and len({layer_of(m)[0] for m in inside}) > 1:
            eager = sorted({target for target, _ in imports(module, path, names, top_level=True)})
            if eager:
                found.append(f"{path.relative_to(root)}: the package {module} spans several layers, so its "
                             f"__init__ must import nothing when imported (it imports {', '.join(eager)})")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(_cycle_in(sorted(component), graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def _cycle_in(component: List[str], graph: Dict[str, Set[str]]) -> List[str]:
    """A path from the component's first module back to itself."""
    inside, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                return paths[node] + [start]
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                frontier.append(nxt)
    return component


if __name__ == "__main__":
    lines = problems(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
    print("\n".join(lines) or "layers: every import goes down or sideways, no cycles")
    sys.exit(1 if lines else 0)
