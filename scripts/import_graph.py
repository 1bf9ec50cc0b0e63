"""The import graph of the afmp sources, its cycles and its upward imports: `python scripts/import_graph.py`.

Reads src/ with the ast module (nothing is imported, so it runs without torch). An edge
A -> B is an import of afmp module B by module A at module level; imports inside
functions (the lazy ones, made when a command runs) are listed apart with --lazy.

Every module has a role (ROLES, lowest first; docs/layout.md says why this order). A
module may import its own role and those below it, lazily or not, never one above: the
library does not reach up into the commands that drive it. Exits 1 when the module-level
graph has a cycle, when a module imports a role above its own, or when a module has no
role (a new top-level module must be given one here).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first: each role's modules are the packages or modules listed, and what is under them.
ROLES: list[tuple[str, tuple[str, ...]]] = [
    ("utils", ("afmp.utils",)),
    (
        "geometry",
        ("afmp.scaffold",),
    ),  # scaffolds of positions: built by data pipelines (point sets) and models
    ("data", ("afmp.data",)),
    ("blocks", ("afmp.layers", "afmp.registry", "afmp.ops")),
    ("models", ("afmp.models",)),
    ("measure", ("afmp.measure",)),
    ("training", ("afmp.training",)),
    ("deploy", ("afmp.deploy",)),  # a trained run put to use: predict files, export the model
    ("bench", ("afmp.bench",)),
    ("tuning", ("afmp.tuning",)),  # searches over training runs; the studies' tuned recipes use it
    ("studies", ("afmp.studies",)),
    ("commands", ("afmp.commands",)),
    ("entry points", ("afmp", "afmp_cli")),  # the package's public API and the console script
]


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def role_of(module: str) -> int | None:
    """The index in ROLES of ``module``'s role: the longest listed prefix it is or lies under."""
    best, length = None, -1
    for rank, (_, prefixes) in enumerate(ROLES):
        for prefix in prefixes:
            exact_only = prefix in ("afmp", "afmp_cli")  # the package root is itself, not everything under it
            matches = module == prefix or (not exact_only and module.startswith(prefix + "."))
            if matches and len(prefix) > length:
                best, length = rank, len(prefix)
    return best


def imports(path: Path, modules: set[str], src: Path = SRC) -> tuple[set[str], set[str]]:
    """(module-level, inside-function) afmp modules imported by ``path``."""
    top, lazy = set(), set()
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def where(node) -> str:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return "function"
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                return "script"
        return "module"

    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` needs the submodule; `from pkg import name` needs the package.
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = subs + ([node.module] if any(s not in modules for s in subs) else [])
        found = {n for n in names if n in modules}
        place = where(node) if found else "module"
        # Under `if __name__ == "__main__":` the module runs as a program (`python -m`), an
        # entry point of its own: what it imports there is not part of the graph.
        if place != "script":
            (lazy if place == "function" else top).update(found)
    me = module_name(path, src)
    return top - {me}, lazy - {me}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def read_graph(src: Path = SRC) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level, inside-function) imports of every module under ``src``."""
    files = sorted(src.rglob("*.py"))
    modules = {module_name(f, src) for f in files}
    graph, lazy = {}, {}
    for f in files:
        graph[module_name(f, src)], lazy[module_name(f, src)] = imports(f, modules, src)
    return graph, lazy


def layering_problems(graph: dict[str, set[str]], lazy: dict[str, set[str]]) -> list[str]:
    """A line for each module without a role and each import of a role above the importer's."""
    problems = []
    for module in sorted(graph):
        rank = role_of(module)
        if rank is None:
            problems.append(f"no role: {module} (give it one in scripts/import_graph.py's ROLES)")
            continue
        for target in sorted(graph[module] | lazy[module]):
            up = role_of(target)
            if up is not None and up > rank:
                how = "" if target in graph[module] else " (inside a function)"
                problems.append(
                    f"upward import: {module} ({ROLES[rank][0]}) imports {target} ({ROLES[up][0]}){how}"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lazy", action="store_true", help="also list the imports made inside functions")
    parser.add_argument(
        "--src", type=Path, default=SRC, help="the source folder (default: this repository's src/)"
    )
    args = parser.parse_args(argv)
    graph, lazy = read_graph(args.src)
    for name in sorted(graph):
        line = f"{name} -> {', '.join(sorted(graph[name])) or '(none)'}"
        if args.lazy and lazy[name] - graph[name]:
            line += f"   [in functions: {', '.join(sorted(lazy[name] - graph[name]))}]"
        print(line)
    found = cycles(graph)
    for cycle in found:
        print("cycle: " + " -> ".join(cycle))
    problems = layering_problems(graph, lazy)
    for problem in problems:
        print(problem)
    print(
        f"{len(graph)} modules, {sum(map(len, graph.values()))} module-level imports, {len(found)} cycle(s), "
        f"{len(problems)} layering problem(s)"
    )
    return 1 if found or problems else 0


if __name__ == "__main__":
    sys.exit(main())
