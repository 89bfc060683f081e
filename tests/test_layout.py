"""The package's shape: module and function sizes, no import cycle, no formatter escapes holding call chains."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "finetune"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(("finetune", *path.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


# STYLE.md: "split a module that passes ~500 lines or takes a second noun". The cap was 400, and RunParts, the Predictor
# and compare (one concept each) sat at 399-400 lines, shaped by it; a module splits by concept, not by line count.
MODULE_LINES, FUNCTION_LINES = 500, 60


def test_modules_and_functions_are_small() -> None:
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= MODULE_LINES, path
        assert "fmt: skip" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno - node.lineno + 1 <= FUNCTION_LINES, f"{path}:{node.lineno} {node.name}"


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


# The layers, lowest first, one folder each (the package's own top-level modules are the shared ground). A module
# may import only from its own layer or a lower one: eval/ never imports train/, nothing imports cli/.
ROOT_MODULES = [
    "errors",
    "allocator",
    "io",
    "precision",
    "labels",
    "console",
    "predictions",
    "distributed",
    "models",
    "mobilenet",
    "groups",
    "optim",
    "losses",
    "summary",
    "runfiles",
]
LAYERS = [
    ("shared ground", ROOT_MODULES),
    ("config", ["config"]),
    ("data", ["data"]),
    ("eval", ["eval"]),
    ("train", ["train"]),
    ("hooks", ["hooks"]),
    ("run directory", ["rundir"]),
    ("assembly", ["assembly"]),
    ("runs", ["runs"]),
    ("deploy", ["deploy"]),
    ("api", ["api"]),
    ("cli", ["cli", "__main__"]),
    ("package API", [""]),  # finetune/__init__.py: `from finetune import Predictor`, imported lazily
]


def test_one_folder_per_layer() -> None:
    """Every folder of the package is one layer, every top-level module is shared ground, and nothing else exists."""
    folders = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert folders == sorted(prefixes[0] for _, prefixes in LAYERS[1:-1])
    top = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert top == sorted(ROOT_MODULES)
    for name in _modules():
        rel = name.removeprefix("finetune").removeprefix(".")
        assert "." not in rel or rel.split(".")[0] in folders, name


def test_only_the_assembly_and_above_know_runparts() -> None:
    """Below the assembly, functions take plain typed arguments: no module there imports ``RunParts``."""
    below = {name for name, _ in LAYERS[: [n for n, _ in LAYERS].index("assembly")]}
    for name, tree in _modules().items():
        if LAYERS[_layer(name)][0] in below:
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune.assembly"):
                    raise AssertionError(f"{name} imports the assembly ({node.module})")


def _layer(module: str) -> int:
    """The layer of ``finetune.<module>``: the longest prefix listed in :data:`LAYERS` decides."""
    name = module.removeprefix("finetune").removeprefix(".")
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if p and (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    if name == "":
        return len(LAYERS) - 1
    assert rank is not None, f"{module}: in no layer of tests/test_layout.py LAYERS"
    return rank


def _imports(tree: ast.Module, modules: dict[str, ast.Module]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            for a in node.names:
                found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("finetune")}
    return {m for m in found if m in modules and m != "finetune"}


def test_layers_import_only_downward() -> None:
    modules = _modules()
    for name, tree in modules.items():
        for target in _imports(tree, modules):
            assert _layer(target) <= _layer(name), (
                f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]}), a higher layer"
            )


@pytest.mark.slow
def test_each_module_imports_alone() -> None:
    """Every module imports in a fresh interpreter on its own (no import order hides a cycle)."""
    import subprocess
    import sys

    names = [n for n in _modules() if n != "finetune.__main__"]
    code = (
        "import importlib, sys\n"
        "for n in sys.argv[1:]:\n"
        "    importlib.import_module(n)\n"
        "    [sys.modules.pop(m) for m in list(sys.modules) if m.startswith('finetune')]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_only_runfiles_spells_a_run_files_name() -> None:
    """Every name of a file in a run directory is spelled once, in ``finetune/runfiles.py``; the rest import it."""
    from finetune import runfiles

    names = {v for k, v in vars(runfiles).items() if k.isupper() and isinstance(v, str)}
    for name, tree in _modules().items():
        if name == "finetune.runfiles":
            continue
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                raise AssertionError(f"{name}:{node.lineno} spells {node.value!r}: use finetune.runfiles")


def test_the_package_api_names_what_it_says() -> None:
    import finetune
    from finetune.config import load_recipe
    from finetune.deploy.predictor import Predictor
    from finetune.runs.run import run_recipe

    assert (finetune.load_recipe, finetune.run_recipe, finetune.Predictor) == (load_recipe, run_recipe, Predictor)
    assert set(finetune.__all__) == {
        "Predictor",
        "Prediction",
        "__version__",
        "load_recipe",
        "run_recipe",
        "Run",
        "UserError",
        "train",
    }


ARCHITECTURE = PKG.parent / "docs" / "architecture.md"  # the layout table (the README links to it)
# report.json's keys, read by name only where the report is written (eval/report.py) and read (eval/run_report.py);
# everything else uses RunReport's properties. Predictions are attributes everywhere (finetune/predictions.py).
REPORT_KEYS = {"splits", "calibration", "honest", "probabilities", "reject", "sampler", "voc07_map", "per_class"}
PREDICTION_KEYS = {"probs", "targets"}
KEYED = {
    "finetune.eval.report": REPORT_KEYS,
    "finetune.eval.run_report": REPORT_KEYS,
    "finetune.eval.tables": {"per_class"},  # builds each split's record
    "finetune.deploy.card": {"splits"},  # the card's front matter: split sizes under its own key
}
# compare's own result files (.npz) hold arrays named probs and targets; the report's calibration has "targets" too.
NPZ_READERS = {"finetune.runs.compare", "finetune.eval.report", "finetune.eval.run_report"}


def _string_keys(tree: ast.Module) -> set[str]:
    """The string constants a module subscripts with (``x["k"]``) or looks up (``x.get("k")``)."""
    keys = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str):
            keys.add(n.slice.value)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and n.args:
            if isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str):
                keys.add(n.args[0].value)
    return keys


def test_reports_and_predictions_are_typed_across_modules() -> None:
    """No module reads report.json's keys or a prediction's arrays by string but the two that own them."""
    for name, tree in _modules().items():
        used = _string_keys(tree)
        report = used & REPORT_KEYS - KEYED.get(name, set())
        assert not report, f"{name} reads report keys {sorted(report)} by name: use finetune.eval.run_report.RunReport"
        if name not in NPZ_READERS:
            assert not used & PREDICTION_KEYS, f"{name} indexes predictions by name: use Predictions' attributes"


START, END = "<!-- layout: generated by `python tests/test_layout.py`; checked by the tests -->", "<!-- layout end -->"


def layout_table() -> str:
    """The layout table in docs/architecture.md: every module of the package with the first line of its docstring."""
    rows = ["| module | owns |", "|---|---|"]
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).as_posix()
        first = ast.get_docstring(ast.parse(path.read_text())).splitlines()[0].replace("|", "\\|")
        rows.append(f"| `{rel}` | {first} |")
    return "\n".join(rows)


def test_readme_layout_table_is_current() -> None:
    text = ARCHITECTURE.read_text()
    assert START in text and END in text, "docs/architecture.md lost its layout markers"
    shown = text.split(START)[1].split(END)[0].strip()
    assert shown == layout_table(), "docs/architecture.md layout table is stale: run `python tests/test_layout.py`"


if __name__ == "__main__":  # regenerate the layout table in docs/architecture.md
    text = ARCHITECTURE.read_text()
    head, rest = text.split(START)
    ARCHITECTURE.write_text(f"{head}{START}\n{layout_table()}\n{END}{rest.split(END)[1]}")
