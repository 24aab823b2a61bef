"""The package's shape: every import (inside functions too) points to the module's own layer or one below
(`mnist_diff.LAYERS`), no imports go round in a cycle, and the heavy libraries stay in their one place."""

import ast
from pathlib import Path

import mnist_diff

PACKAGE = Path(mnist_diff.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names: relative ones resolved, `from a import b` as a.b when b is
    a module of ours."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(mnist_diff.LAYERS) if top in names), -1)


def test_every_module_is_in_a_layer():
    assert [m for m in graph() if m != "mnist_diff" and layer(m) < 0] == []


def test_imports_point_down_only():
    upward = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph().items()
        for d in deps
        if m != "mnist_diff" and layer(d) > layer(m)
    ]
    assert upward == []


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    return next((c for n in sorted(edges) if n not in state and (c := visit(n))), None)


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_one():  # so that the test above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def importers_of(library: str) -> set[str]:
    return {
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if any(m == library or m.startswith(library + ".") for m in imports_of(p))
    }


def test_each_heavy_library_is_imported_in_one_place():
    assert importers_of("mlflow") == {"mnist_diff.tracking.mlflow_store", "mnist_diff.tracking.mlflow_model"}
    assert {m.rpartition(".")[0] for m in importers_of("optuna")} == {"mnist_diff.study"}
    assert importers_of("click") <= {m for m in graph() if m.startswith("mnist_diff.cli")}
