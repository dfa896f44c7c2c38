"""The package's import layers: every ``layerflow`` module imports only from layers below its own.

The order is written down once, in :data:`LAYERS`, and checked against the ``import`` statements
of every module (read with ``ast``, so imports inside functions and ``TYPE_CHECKING`` blocks count
too). Modules of one layer that are named apart (``models`` and ``sampling``) do not import each
other; a package's modules may import one another, as long as no module imports itself back
through a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "sat" / "layerflow"

# Low to high. Each entry is one layer: the top-level modules and packages of ``layerflow`` in it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "geometry"),  # the config error and the named sizes: they import nothing of layerflow
    ("tasks",),  # the layout table of every task (names the geometry)
    ("io",),  # files: pixels, readers, writers, sample-folder names, manifests' lines, atomic writes
    ("runtime",),  # devices, ranks, attention kernels, one video over several ranks
    ("models", "sampling", "scores"),  # the networks, the sampler, the layer-consistency scores
    ("config",),  # the validated YAML (it names the models' sizes and the runtime's choices)
    ("weights",),  # which files, loading them, and the one builder of every model
    ("pipeline", "training"),  # one sample's generation; training on layered clips
    ("batch",),  # many samples: manifests, given files, sample folders, resumable sharded runs
    ("tools",),  # layer tools for editors: compose, inspect
    ("serve",),  # the local web page: its HTTP server, uploads, job queue and results
    ("cli",),  # the entry points
)
LAYER_OF = {name: index for index, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> list[tuple[str, int]]:
    """Every ``layerflow`` name an ``import`` of the module names (the module, and module.member), with its line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return [(target, line) for target, line in found if target == "layerflow" or target.startswith("layerflow.")]


def import_edges() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line}, counting the packages Python runs on the way
    (``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__``), except the importer's own."""
    known = modules()
    edges: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        targets: dict[str, int] = {}
        for target, line in imported_names(path, name):
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                candidate = ".".join(parts[:depth])
                own_package = name == candidate or name.startswith(candidate + ".")
                if candidate in known and not own_package:
                    targets.setdefault(candidate, line)
        edges[name] = targets
    return edges


def layer_index(module: str) -> int | None:
    """The layer of ``layerflow.<top>...``; the package root (the version) sits below every layer."""
    parts = module.split(".")
    return -1 if len(parts) == 1 else LAYER_OF.get(parts[1])


def test_every_module_has_a_layer_and_every_layer_exists():
    top_level = {name.split(".")[1] for name in modules() if "." in name}
    assert sorted(top_level - set(LAYER_OF)) == [], "add these modules to LAYERS"
    assert sorted(set(LAYER_OF) - top_level) == [], "LAYERS names modules that do not exist"


def test_no_module_imports_a_layer_above_its_own_or_a_peer():
    wrong = []
    for module, targets in import_edges().items():
        for target, line in targets.items():
            if module.split(".")[:2] == target.split(".")[:2]:
                continue  # inside one top-level module or package
            if layer_index(target) >= layer_index(module):
                wrong.append(f"{module} (line {line}) imports {target}")
    assert wrong == [], "imports against the layer order (tests/test_import_layers.py, LAYERS):\n" + "\n".join(wrong)


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str]:
    """One import loop as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for target in sorted(edges.get(node, {})):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state:
                loop = visit(target)
                if loop:
                    return loop
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(edges):
        if node not in state:
            loop = visit(node)
            if loop:
                return loop
    return []


def test_no_import_cycle_between_modules():
    loop = find_cycle(import_edges())
    assert loop == [], "import loop: " + " -> ".join(loop)


@pytest.mark.parametrize(
    ("edges", "loop"),
    [
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {}}, []),
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}, ["a", "b", "c", "a"]),
        ({"a": {"b": 1}, "b": {"b": 1}}, ["b", "b"]),
    ],
)
def test_the_cycle_search_finds_loops(edges, loop):
    assert find_cycle(edges) == loop


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "layerflow" / "io" / "example.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from . import pixels\n"
        "def f():\n"
        "    from layerflow.config import load_config\n"
        "    import layerflow.batch.runner\n",
        encoding="utf-8",
    )
    names = {target for target, _ in imported_names(source, "layerflow.io.example")}
    assert {"layerflow.io.pixels", "layerflow.config", "layerflow.config.load_config"} <= names
    assert "layerflow.batch.runner" in names
