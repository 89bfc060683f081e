"""The package's shape: module and function sizes, no import cycle, no formatter escapes holding call chains."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "finetune"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(("finetune", *path.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def test_modules_and_functions_are_small() -> None:
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 400, path
        assert "fmt: skip" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 60, f"{path}:{node.lineno} {node.name}"


def test_every_module_says_what_it_owns() -> None:
    for name, tree in _modules().items():
        assert ast.get_docstring(tree), name


def test_no_import_cycle() -> None:
    """Every ``finetune`` import, at the top or inside a function, forms an acyclic graph."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("finetune")]
            graph[name] |= {t for t in targets if t in modules and t != name and t != "finetune"}

    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in graph[node]:
            assert seen.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in seen:
                visit(nxt, [*path, node])
        seen[node] = 2

    for name in graph:
        if name not in seen:
            visit(name, [])
