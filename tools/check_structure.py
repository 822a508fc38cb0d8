"""Structure checks on the hahnet package: the layer order, import cycles, the import
depth, modules over 500 lines and functions over 60 lines. Prints findings; exits 1 if any.

    python tools/check_structure.py [src/hahnet]

The layers, lowest first, are LAYERS below (docs/architecture.md draws them): a module
may import modules of its own layer and of the layers below it, never above. Lazy
imports inside functions count like the others.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE, MAX_FUNCTION, MAX_DEPTH = 500, 60, 9

# (layer, the modules in it), lowest first. A name ending in "." is a subpackage (every
# module under it); the others are single modules.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("hahnet.config", "hahnet.io", "hahnet.errors")),
    ("nn", ("hahnet.nn.",)),
    ("data", ("hahnet.data.",)),
    ("training", ("hahnet.training.",)),
    ("eval", ("hahnet.eval.",)),
    ("reporting", ("hahnet.reporting.",)),
    ("experiments", ("hahnet.experiments.",)),
    ("cli", ("hahnet.cli.",)),
    ("entry", ("hahnet", "hahnet.__main__")),  # the public API and `python -m hahnet`
)


def module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The index in LAYERS of ``module``'s layer (None: in no layer)."""
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".") and
                                    (module + ".").startswith(member)):
                return index
    return None


def imports(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> dict[str, int]:
    """The modules of ``known`` that ``tree`` imports -> the line of the first such import.
    ``from pkg import mod`` counts as an import of ``pkg.mod`` (not of ``pkg``'s
    ``__init__``) when ``pkg.mod`` is a module."""
    found: dict[str, int] = {}

    def add(module: str, line: int) -> None:
        if module in known and module != name:
            found.setdefault(module, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            for module in submodules:
                add(module, node.lineno)
            if not all(module in known for module in submodules):
                add(base, node.lineno)
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
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


def longest_chain(graph: dict[str, dict[str, int]]) -> list[str]:
    """The longest import chain (a -> b: a imports b) of an acyclic graph; its number of
    imports, ``len - 1``, is the import depth."""
    memo: dict[str, list[str]] = {}

    def chain(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node]  # a cycle (reported separately) ends the chain here
            tails = [chain(nxt) for nxt in sorted(graph[node])]
            memo[node] = [node] + max(tails, key=len, default=[])
        return memo[node]

    return max((chain(node) for node in sorted(graph)), key=len, default=[])


def layer_problems(graph: dict[str, dict[str, int]], files: dict[str, Path]) -> list[str]:
    problems = []
    for name in sorted(graph):
        mine = layer_of(name)
        if mine is None:
            problems.append(f"{files[name]}: {name} is in no layer; add it to LAYERS in "
                            f"tools/check_structure.py (or move it into a layer's package)")
            continue
        for target, line in sorted(graph[name].items()):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                problems.append(f"{files[name]}:{line}: {name} ({LAYERS[mine][0]}) imports "
                                f"{target} ({LAYERS[theirs][0]}), a higher layer; a module "
                                f"may import only its own layer and those below: "
                                f"{' < '.join(n for n, _ in LAYERS)}")
    return problems


def size_problems(file: Path, text: str, tree: ast.AST) -> list[str]:
    problems = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE:
        problems.append(f"{file}: {lines} lines (> {MAX_MODULE})")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION:
                problems.append(f"{file}:{node.lineno}: {node.name} is {length} lines "
                                f"(> {MAX_FUNCTION})")
    return problems


def main(root: Path) -> int:
    problems, graph = [], {}
    files = {module_name(root, f): f for f in sorted(root.rglob("*.py"))}
    for name, file in files.items():
        text = file.read_text()
        tree = ast.parse(text)
        problems += size_problems(file, text, tree)
        graph[name] = imports(tree, name, file.name == "__init__.py", set(files))
    problems += layer_problems(graph, files)
    found = cycles(graph)
    problems += ["import cycle: " + " -> ".join(c) for c in found]
    chain = longest_chain(graph)
    depth = max(len(chain) - 1, 0)
    if depth > MAX_DEPTH and not found:
        problems.append(f"import depth {depth} (> {MAX_DEPTH}): {' -> '.join(chain)}")
    print("\n".join(problems) or f"ok: {len(files)} modules in {len(LAYERS)} layers, none "
                                 f"importing a higher layer, no cycles, import depth {depth} "
                                 f"(<= {MAX_DEPTH}), none over {MAX_MODULE} lines, no "
                                 f"function over {MAX_FUNCTION} lines")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "src/hahnet")))
