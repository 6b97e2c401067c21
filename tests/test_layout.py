"""The package's layout rule: data flow one way, no private imports.

Every module imports only modules above it in ``LAYERS`` (a package's
``__init__`` may re-export its own submodules), and never a name starting
with ``_`` from another module. doc/layout.md describes the layers.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dipy_spinverse"
LAYERS = [
    "checks",
    "files",
    "cli",
    "grid",
    "sequences",
    "operators",
    "solvers",
    "forward",
    "signals",
    "analytic",
    "compartments.acquisition",
    "compartments.fitting",
    "compartments.blocks",
    "compartments.peaks",
    "compartments.frames",
    "compartments.learned",
    "compartments.base",
    "compartments.models",
    "compartments",
    "phantoms",
    "interface",
    "substrates",
    "metrics",
    "data",
    "meshfit.mesh",
    "meshfit.fem",
    "meshfit.permeable",
    "meshfit.shape",
    "meshfit.autoencoder",
    "meshfit.fit",
    "meshfit.refine",
    "meshfit",
    "inverse.config",
    "inverse.facefit",
    "inverse.shapes",
    "inverse.proposal",
    "inverse.search",
    "inverse.approximation",
    "inverse.reconstruct",
    "inverse",
    "reconst.fit",
    "reconst.engines",
    "reconst.runner",
    "reconst.model",
    "reconst",
    "surfaces",
    "io",
    "workflows",
    "tissue.sequences",
    "tissue.simplex",
    "tissue.model",
    "tissue.data",
    "tissue.workflow",
    "tissue",
]


def _modules():
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name.removesuffix(".__init__").removesuffix("__init__")] = path
    return out


def _imports(name, path):
    """(imported module, imported name) pairs of the package's own modules."""
    modules = _modules()
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = here if is_package else here[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + (node.module.split(".") if node.module else []))
        for alias in node.names:
            full = f"{target}.{alias.name}" if target else alias.name
            yield (full if full in modules else target), alias.name


def test_every_module_has_a_layer():
    assert set(_modules()) - {""} == set(LAYERS)


@pytest.mark.parametrize("name", LAYERS)
def test_imports_flow_one_way(name):
    path = _modules()[name]
    rank = LAYERS.index(name)
    for target, imported in _imports(name, path):
        if target.startswith(name + "."):
            continue  # a package re-exporting its own submodules
        assert LAYERS.index(target) < rank, f"{name} imports {target} (upward)"
        if target != name and target in LAYERS and not imported.startswith("__"):
            assert not imported.startswith("_"), f"{name} imports {target}.{imported}"
