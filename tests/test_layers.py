"""How cogtune's packages layer: no import cycles, counting imports inside functions.

The CLI parses and reports; recipes (`RECIPES`, the ones docs/architecture.md names) assemble
building blocks; building blocks never import a recipe. Read from the source
with `ast`, so an import inside a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import collections
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cogtune"
ARCHITECTURE = ROOT.parent / "docs" / "architecture.md"

# The recipes (the ones docs/architecture.md names), and who besides the CLI may import them: other
# recipes (the demo runs training and sampling, the bench runner measures real runs) and the packages
# that re-export a recipe's entry point lazily.
RECIPES = {
    "cogtune.train.loop": {"cogtune.train", "cogtune.bench.measure", "cogtune.demo"},
    "cogtune.encode.run": {"cogtune.encode"},
    "cogtune.sample": {"cogtune.demo"},
    "cogtune.bench.run": set(),
    "cogtune.bench.measure": {"cogtune.bench.run"},
    "cogtune.demo": set(),
    "cogtune.data.prepare": set(),
    "cogtune.lora.merge": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every cogtune module `name` imports, anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cogtune")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("cogtune"):
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    found.add(submodule if submodule in MODULES else source)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def package_of(name: str) -> str:
    """The top-level unit a module belongs to: `cogtune.train`, `cogtune.sample`, ..."""
    return ".".join(name.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_two_packages_import_each_other():
    packages: dict[str, set[str]] = collections.defaultdict(set)
    for source, targets in GRAPH.items():
        for target in targets:
            if package_of(source) != package_of(target):
                packages[package_of(source)].add(package_of(target))
    assert cycles(packages) == []


def test_no_module_import_cycle():
    assert cycles(GRAPH) == []


def documented_recipes(text: str) -> set[str]:
    """The modules the layer diagram of docs/architecture.md lists under `recipes`: the first column of each
    line between `recipes` and `building blocks` (`bench/run.py, measure.py`: two modules of `bench/`)."""
    lines = text.split("```")[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("recipes"))
    end = next(i for i, line in enumerate(lines) if line.startswith("building blocks"))
    found = set()
    for line in lines[start + 1 : end]:
        listed = re.match(r"\s*([\w/]+\.py(,\s*[\w/]+\.py)*)", line)
        folder = ""
        for path in re.findall(r"[\w/]+\.py", listed.group(1) if listed else ""):
            if "/" in path:
                folder = path.rpartition("/")[0] + "/"
            else:
                path = folder + path
            found.add("cogtune." + path.removesuffix(".py").replace("/", "."))
    return found


def test_the_recipes_are_the_documented_ones():
    assert documented_recipes(ARCHITECTURE.read_text()) == set(RECIPES)
    assert set(RECIPES) <= set(MODULES)  # a renamed recipe is renamed here too


def recipe_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, recipe) for each import of a recipe outside the CLI and the importers `RECIPES` allows."""
    return {(source, recipe) for source, targets in graph.items() for recipe in RECIPES
            if recipe in targets and not source.startswith("cogtune.cli") and source not in RECIPES[recipe]}


def test_building_blocks_never_import_a_recipe():
    assert recipe_imports(GRAPH) == set()


def test_a_building_block_importing_any_recipe_is_caught():
    for recipe in RECIPES:
        graph = {**GRAPH, "cogtune.train.plan": GRAPH["cogtune.train.plan"] | {recipe}}
        assert recipe_imports(graph) == {("cogtune.train.plan", recipe)}


def test_sampling_does_not_reach_into_training():
    """The LoRA file format and video generation sit below both (`cogtune.lora`, `cogtune.generate`)."""
    for name in ("cogtune.sample", "cogtune.generate", "cogtune.lora.format"):
        assert not {target for target in GRAPH[name] if package_of(target) == "cogtune.train"}, name
