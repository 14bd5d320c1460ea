"""The import graph of src/ksd is one-way: the layers contract holds and no module imports itself back.

``lint-imports`` (``make lint``) checks the layers of ``[tool.importlinter]`` in pyproject.toml; inside one
layer (a package such as ``ksd.optim``) it allows any import, so the cycle check below covers the whole
module graph: every import statement, those inside functions too (grimp reads them all), plus the imports
that :data:`ksd.optim.OPTIMIZERS` makes by name through importlib.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

from ksd.optim import OPTIMIZERS

REPO = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of ksd it imports, lazily or not, and the optimizer modules the registry loads."""
    graph = grimp.build_graph("ksd", cache_dir=None)
    edges = {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    edges["ksd.optim.registry"] |= {target.split(":")[0] for target in OPTIMIZERS.values()}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm; the graph has some fifty modules
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(edges.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or module in edges.get(module, ()):
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_back():
    edges = import_graph()
    assert "ksd.config" in edges and "ksd.optim.ksd" in edges["ksd.optim.registry"]
    assert cycles(edges) == []


def test_the_cycle_check_sees_lazy_imports():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    graph = grimp.build_graph("ksd", cache_dir=None)  # a function-local import counts as an import
    assert graph.direct_import_exists(importer="ksd.cli", imported="ksd.runner")


def test_layers_contract():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 broken" in result.stdout
