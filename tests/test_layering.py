"""The layering of ``../shared/DESIGN.md`` holds: no module imports from a higher layer, no import circle.

Every import counts, function-level ones too (they hide circles, they do not
remove them); only ``if TYPE_CHECKING:`` blocks are left out, since they never
run.  A new module must be placed in ``LAYERS`` (the test says so).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mct_fx"

# DESIGN.md's layer table: module (or package prefix) -> layer
LAYERS = {
    "mct_fx.graph_utils": 0, "mct_fx.data": 0, "mct_fx.datasets": 0, "mct_fx._extension": 0, "mct_fx.demo": 0,
    "mct_fx.meta": 0, "mct_fx.stages": 0,
    "mct_fx.kernels": 1,
    "mct_fx.quantizers.params": 2, "mct_fx.quantizers.search": 2, "mct_fx.quantizers.histogram": 2,
    "mct_fx.quantizers": 3,  # modules, trainable, lut, clamp and the package's re-exports
    "mct_fx.tpc": 4, "mct_fx.trace": 4, "mct_fx.config": 4,
    "mct_fx.passes": 5, "mct_fx.channel_sections": 5,
    "mct_fx.hessian": 6, "mct_fx.resources": 6, "mct_fx.mixed_precision": 6, "mct_fx.tensorboard": 6,
    "mct_fx.measure": 6,
    "mct_fx.prepare": 7, "mct_fx.ptq": 7, "mct_fx.gptq": 7, "mct_fx.qat": 7, "mct_fx.pruning": 7,
    "mct_fx.datagen": 7, "mct_fx.export": 7, "mct_fx.export_check": 7, "mct_fx.export_imx500": 7,
    "mct_fx.convert_imx500": 7, "mct_fx.report": 7, "mct_fx.quant_summary": 7, "mct_fx.troubleshoot": 7,
    "mct_fx.troubleshoot_types": 7, "mct_fx.troubleshoot_verify": 7, "mct_fx.report_html": 7,
    "mct_fx": 8, "mct_fx.cli": 8, "mct_fx.cli_demo": 8,
}


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int | None:
    """The layer of ``module``: its own entry, else its longest listed package prefix."""
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> set[str]:
    """The ``mct_fx`` modules that ``module`` imports anywhere in its code, outside TYPE_CHECKING blocks."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "mct_fx")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                     else []))
            if base.split(".")[0] == "mct_fx":
                for a in node.names:  # ``from mct_fx import tpc`` imports the submodule
                    sub = f"{base}.{a.name}"
                    out.add(sub if sub in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(module)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer(m) is None)
    assert not missing, f"place these modules in DESIGN.md's layer table (and LAYERS here): {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
    own = layer(module)
    upward = sorted(f"{m} (layer {layer(m)})" for m in GRAPH[module] if layer(m) is not None and layer(m) > own)
    assert not upward, f"{module} (layer {own}) imports from above: {upward}"


def test_no_import_circle():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in MODULES:
        if v not in index:
            connect(v)
    assert not circles, f"import circles: {circles}"


def test_the_reader_sees_function_level_imports():
    """The reader itself: a known function-level import is found, a TYPE_CHECKING one is not."""
    assert "mct_fx.report_html" in GRAPH["mct_fx.troubleshoot_types"]
    assert "mct_fx.troubleshoot_types" not in GRAPH["mct_fx.report_html"]
    assert "mct_fx.mixed_precision.search" not in GRAPH["mct_fx.quant_summary"]  # imported for typing only
