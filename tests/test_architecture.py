"""The package's import graph: one-way layers, no circles, no imports hidden inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sret"
# Lower layers never import higher ones (docs/architecture.md). Modules of one layer may import each
# other only where the graph stays acyclic; a package (kernels) is one module to the layers above.
LAYERS = (
    ("io", "runtime"),
    ("kernels",),
    ("data", "plots"),
    ("model",),
    ("checkpoint", "variants", "info", "anytime", "recursify"),
    ("evaluate", "export", "bench"),
    ("train",),
    ("ablate",),
    ("__init__", "cli", "__main__"),
)
LAZY = ("cli",)  # imports its commands' modules on use, so `sret --help` starts fast


def module_name(path: Path) -> str:
    """`kernels/ops.py` -> `kernels.ops`, `kernels/__init__.py` -> `kernels`, `__init__.py` stays."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {module_name(p) for p in SRC.rglob("*.py")}


def sret_imports(node: ast.AST) -> set[str]:
    """The sret modules an import statement names (`from sret.kernels import ops` names kernels.ops)."""
    if isinstance(node, ast.ImportFrom):
        if not (node.module or "").startswith("sret"):
            return set()
        package = node.module.removeprefix("sret").lstrip(".")
        names = {".".join(filter(None, (package, a.name))) for a in node.names}
        return {n if n in MODULES else package or "__init__" for n in names}
    names = (a.name for a in node.names if a.name.split(".")[0] == "sret")
    return {n.removeprefix("sret").lstrip(".") or "__init__" for n in names}


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Every module's sret imports, and those of them written inside functions or classes."""
    graph, nested = {}, {}
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        tree = ast.parse(path.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        everywhere = set().union(*(sret_imports(n) for n in imports)) - {name}
        top = set().union(*(sret_imports(n) for n in tree.body if n in imports)) - {name}
        graph[name], nested[name] = everywhere, everywhere - top
    return graph, nested


def layer_of(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_layer() -> None:
    graph, _ = import_graph()
    assert {layer_of(m) for m in graph} == {m for layer in LAYERS for m in layer}


def test_imports_go_down_the_layers_only() -> None:
    graph, _ = import_graph()
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = {(m, d) for m, deps in graph.items() for d in deps if level[layer_of(d)] > level[layer_of(m)]}
    assert not upward, f"modules importing a higher layer: {sorted(upward)}"


def test_no_import_circle() -> None:
    graph, _ = import_graph()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import circle: {' -> '.join([*path, module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in sorted(graph[module]):
            visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_no_sret_import_hides_inside_a_function() -> None:
    _, nested = import_graph()
    hidden = {m: sorted(deps) for m, deps in nested.items() if deps and m not in LAZY}
    assert not hidden, f"function-level imports of sret modules: {hidden}"


def test_every_zoo_model_has_a_written_out_constructor() -> None:
    from sret.model import MODEL_CONFIGS

    source = (SRC / "model.py").read_text()
    tree = ast.parse(source)
    registered = {
        f.name
        for f in tree.body
        if isinstance(f, ast.FunctionDef)
        and any(getattr(d, "id", "") == "register_model" for d in f.decorator_list)
    }
    assert registered == set(MODEL_CONFIGS)


def test_no_private_torch_api_and_no_autograd_function_in_the_model() -> None:
    """Speed paths live in sret.kernels and use public torch only; the model file is plain modules."""
    for path in SRC.rglob("*.py"):
        source = path.read_text()
        assert "_C._" not in source and "_python_dispatch" not in source, path
    assert "autograd.Function" not in (SRC / "model.py").read_text()


def test_the_doc_table_of_paths_is_the_table_in_code() -> None:
    """docs/architecture.md's "Which path runs" table is sret.kernels.PATHS, row for row: one
    description of what runs, which the code itself chooses by."""
    from sret import kernels

    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    section = doc.split("### Which path runs", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    cells = [tuple(cell.strip() for cell in line.strip("|").split(" | ")) for line in rows]
    assert cells == [(f"`{p.entry}`", p.runs, p.when, p.why) for p in kernels.PATHS]
