"""Structure checks: import cycles among hahnet modules, modules over 500 lines,
functions over 60 lines. Prints findings; exits 1 if any.

    python tools/check_structure.py [src/hahnet]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE, MAX_FUNCTION = 500, 60


def module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def main(root: Path) -> int:
    problems, graph = [], {}
    files = sorted(root.rglob("*.py"))
    names = {module_name(root, f): f for f in files}
    for name, file in names.items():
        text = file.read_text()
        tree = ast.parse(text)
        lines = len(text.splitlines())
        if lines > MAX_MODULE:
            problems.append(f"{file}: {lines} lines (> {MAX_MODULE})")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    problems.append(f"{file}:{node.lineno}: {node.name} is {length} lines "
                                    f"(> {MAX_FUNCTION})")
        graph[name] = {m for m in imports(tree, name, file.name == "__init__.py")
                       if m in names and m != name}
    problems += ["import cycle: " + " -> ".join(c) for c in cycles(graph)]
    print("\n".join(problems) or f"ok: {len(files)} modules, no cycles, none over "
                                 f"{MAX_MODULE} lines, no function over {MAX_FUNCTION} lines")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "src/hahnet")))
