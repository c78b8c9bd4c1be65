"""The import graph of qllm_pipeline has no cycle: every import counted, at module level or inside a function
(a deferred import hides a cycle from Python, not from the reader)."""
import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "qllm_pipeline"
STAGES = REPO / "stages"


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1:  # from .x import y / from . import x
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module == package.name:
                deps |= {a.name for a in node.names}
            elif node.module and node.module.startswith(package.name + "."):
                deps.add(node.module.split(".")[1])
        graph[path.stem] = (deps & modules) - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_deferred_cycle(tmp_path):
    package = tmp_path / "qllm_pipeline"
    package.mkdir()
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    (package / "c.py").write_text("from qllm_pipeline.a import f\n")
    assert cycles(import_graph(package)) == [["a", "b"]]


def test_qllm_pipeline_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and graph["transforms"] >= {"hadamard", "reassembly", "transform_kinds"}
    assert cycles(graph) == []


def test_no_stage_imports_another_stage():
    """What several stages share lives in the library (weight_rounding's registry, model_writer, reassembly_inputs,
    BlockState.quant_block), not in a sibling stage: the registry in stages/__init__.py is the only importer."""
    stages = {p.stem for p in STAGES.glob("*.py")} - {"__init__"}
    for path in sorted(STAGES.glob("*.py")):
        if path.stem == "__init__":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qllm_pipeline.stages."):
                imported.add(node.module.split(".")[2])
        assert not imported & stages, f"stages/{path.name} imports {sorted(imported & stages)}"
