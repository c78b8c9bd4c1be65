"""The import graph of qllm_pipeline has no cycle: every import counted, at module level or inside a function
(a deferred import hides a cycle from Python, not from the reader)."""
import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "qllm_pipeline"
STAGES = REPO / "stages"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module (dotted name below the package, e.g. "core.cache") -> the package's modules it imports."""
    def name(path: Path) -> str:
        return ".".join(path.relative_to(package).with_suffix("").parts)

    modules = {name(p) for p in package.rglob("*.py")}
    graph = {}
    for path in package.rglob("*.py"):
        here = name(path).split(".")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:  # relative: from .x import y / from . import x
                base = here[:len(here) - node.level] + (node.module.split(".") if node.module else [])
            elif node.module == package.name or (node.module or "").startswith(package.name + "."):
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from pkg.sub import mod` names a module; `from pkg.sub.mod import f` does not
                deps.add(".".join(base + [alias.name]) if ".".join(base + [alias.name]) in modules else ".".join(base))
        graph[name(path)] = (deps & modules) - {name(path)}
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
    (package / "sub").mkdir()
    (package / "a.py").write_text("from .sub.b import f\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (package / "c.py").write_text("from qllm_pipeline.a import f\n")
    (package / "sub" / "d.py").write_text("from qllm_pipeline.sub import b\n")
    assert cycles(import_graph(package)) == [["a", "sub.b"]]
    assert import_graph(package)["sub.d"] == {"sub.b"}


def test_qllm_pipeline_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and graph["quantized.transforms"] >= {"quantized.hadamard", "quantized.channel_map",
                                                                 "quantized.transform_kinds"}
    assert cycles(graph) == []


# The subpackages in layers (each subpackage's docstring says the same): a module imports from its own layer or the
# layers below, never above, and methods, data, evaluation and export do not import one another. The foundation is
# the part of core that everything uses; the rest of core (the stage contract, runner, plan, CLI) sits on top.
FOUNDATION = {"core.errors", "core.settings", "core.identity", "core.cache", "core.memory", "core.distributed",
              "core.scratch"}
LAYERS = [{"foundation"}, {"model"}, {"quantized"}, {"methods", "data", "evaluation", "export"}, {"core"}]


def layer_of(module: str) -> tuple[int, str]:
    unit = "foundation" if module in FOUNDATION else module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if unit in layer), unit


def test_subpackages_import_only_the_layers_below():
    graph = import_graph(PACKAGE)
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == {"core", "model", "quantized", "methods", "data", "evaluation", "export"}
    assert not {m for m in graph if "." not in m} - {"__init__", "__main__"}, "a module left outside the subpackages"
    wrong = []
    for module, deps in sorted(graph.items()):
        if "." not in module:
            continue
        (level, unit) = layer_of(module)
        for dep in deps:
            dep_level, dep_unit = layer_of(dep)
            if dep_level > level or (dep_level == level and dep_unit != unit):
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    package = tmp_path / "qllm_pipeline"
    for sub in ("model", "core"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "model" / "arch.py").write_text("from qllm_pipeline.core.runner import run\n")
    (package / "core" / "runner.py").write_text("def run(): pass\n")
    graph = import_graph(package)
    assert graph["model.arch"] == {"core.runner"}
    assert layer_of("model.arch")[0] < layer_of("core.runner")[0] and layer_of("core.errors")[0] == 0


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
