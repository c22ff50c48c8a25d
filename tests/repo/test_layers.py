"""The package's import layers (docs/architecture.md): no cycle, and no import from a lower layer to a higher one.

Every `import` and `from … import` of every module is read with `ast`, those inside functions (lazy
imports) included, so a deferred import cannot hide an upward edge or a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "igdrec"

# Lowest first. A module may import its own layer and those below it; each entry is a module or a package
# (its modules included). The package `igdrec` itself (its lazy `Recommender`) sits with the API on top.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "console", "options"),
    ("config",),  # the stage configs, over the option machinery that names no stage
    ("schema", "assets", "rundir", "sources", "prompt", "ig", "weighting", "dropout", "fused_lora", "modeling",
     "assistant", "beam", "distributed", "precision", "checkpoints", "flops", "schedule", "sft_data", "sft_loss",
     "training", "decoding", "search_errors", "seqrec", "metrics", "reranking", "explain", "listing", "tracking"),
    ("runner",),
    ("stages",),
    ("experiments.rows",),
    ("experiments.grid_config",),
    ("experiments.plan",),
    ("experiments.select", "experiments.cost"),
    ("experiments.dryrun", "experiments.figures"),
    ("experiments.report",),
    ("experiments.run", "experiments"),
    ("cli", "api", ""),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the igdrec modules it imports (names relative to the package; "" is the package)."""
    known = modules()

    def resolve(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in known.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from igdrec import config` names a module; `from igdrec.rundir import RunDir` a name in one
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target == "igdrec" or target.startswith("igdrec."):
                    edges.add(resolve(target.removeprefix("igdrec").removeprefix(".")))
        edges.discard(name)
        graph[name] = edges
    return graph


def layer(module: str) -> int:
    """The index of the module's layer: the longest declared entry that is the module or contains it."""
    best, found = -1, None
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or (entry and module.startswith(entry + "."))) and len(entry) > best:
                best, found = len(entry), index
    assert found is not None, f"igdrec.{module} is in no layer: add it to LAYERS"
    return found


def test_lazy_imports_are_part_of_the_graph():
    graph = import_graph()
    assert "experiments.run" in graph["cli"]  # imported inside `igdrec grid`'s function only
    assert "api" in graph[""]  # the package's lazy `Recommender`


def test_every_module_has_a_layer():
    for module in import_graph():
        layer(module)


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = [f"igdrec.{m or '(package)'} (layer {layer(m)}) imports igdrec.{d} (layer {layer(d)})"
              for m, deps in sorted(graph.items()) for d in sorted(deps) if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_stages_never_import_each_other():
    graph = import_graph()
    crossing = [f"igdrec.{m} imports igdrec.{d}" for m, deps in graph.items() if m.startswith("stages.")
                for d in deps if d.startswith("stages.")]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(f"igdrec.{m}" for m in cycle)


def test_the_option_machinery_and_the_stage_configs_import_no_heavy_library():
    """`igdrec --help` and a config error load neither torch nor polars (docs/architecture.md)."""
    code = ("import sys; sys.path.insert(0, %r); import igdrec.options, igdrec.config; "
            "heavy = [m for m in ('torch', 'polars', 'transformers', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy" % str(PACKAGE.parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
