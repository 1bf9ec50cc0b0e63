"""The import graph of the afmp sources, and its cycles: `python scripts/import_graph.py`.

Reads src/ with the ast module (nothing is imported, so it runs without torch). An edge
A -> B is an import of afmp module B by module A at module level; imports inside
functions (the lazy ones, made when a command runs) are listed apart with --lazy.
Exits 1 when the module-level graph has a cycle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(module-level, inside-function) afmp modules imported by ``path``."""
    top, lazy = set(), set()
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def inside_function(node) -> bool:  # or under `if __name__ == "__main__":`, run as a script only
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return True
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                return True
        return False

    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` needs the submodule; `from pkg import name` needs the package.
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = subs + ([node.module] if any(s not in modules for s in subs) else [])
        found = {n for n in names if n in modules}
        (lazy if inside_function(node) else top).update(found)
    me = module_name(path)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lazy", action="store_true", help="also list the imports made inside functions")
    args = parser.parse_args()
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph, lazy = {}, {}
    for f in files:
        graph[module_name(f)], lazy[module_name(f)] = imports(f, modules)
    for name in sorted(graph):
        line = f"{name} -> {', '.join(sorted(graph[name])) or '(none)'}"
        if args.lazy and lazy[name] - graph[name]:
            line += f"   [in functions: {', '.join(sorted(lazy[name] - graph[name]))}]"
        print(line)
    found = cycles(graph)
    for cycle in found:
        print("cycle: " + " -> ".join(cycle))
    print(
        f"{len(graph)} modules, {sum(map(len, graph.values()))} module-level imports, {len(found)} cycle(s)"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
