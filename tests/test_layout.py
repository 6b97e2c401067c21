"""The package's layout rule: data flow one way, no private imports.

Every module imports only modules above it in ``LAYERS`` (a package's
``__init__`` may re-export its own submodules), and never a name starting
with ``_`` from another module. doc/layout.md describes the layers.
"""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dipy_spinverse"
LAYERS = [
    "lazy",
    "checks",
    "files",
    "io.meshes",
    "sim.grid",
    "sim.sections",
    "sim.sequences",
    "sim.operators",
    "sim.solvers",
    "sim.modes",
    "sim.forward",
    "sim.signals",
    "sim.analytic",
    "sim.limits",
    "sim",
    "io.gradients",
    "io.datasets",
    "compartments.acquisition",
    "compartments.fitting",
    "compartments.blocks.gaussian",
    "compartments.blocks.restricted",
    "compartments.blocks.watson",
    "compartments.blocks.watson_table",
    "compartments.blocks.karger",
    "compartments.blocks",
    "compartments.peaks",
    "compartments.frames",
    "compartments.learned",
    "compartments.chunks",
    "compartments.starts",
    "compartments.counts",
    "compartments.amortised",
    "compartments.base",
    "compartments.options",
    "compartments.fibres",
    "compartments.noddi",
    "compartments.activeax",
    "compartments.zcd",
    "compartments.ivim",
    "compartments.exchange",
    "compartments",
    "geometry.phantoms.inputs",
    "geometry.phantoms.phantom",
    "geometry.phantoms.solids",
    "geometry.phantoms.axons",
    "geometry.phantoms.packings",
    "geometry.phantoms",
    "geometry.topology",
    "geometry.substrates.substrate",
    "geometry.substrates.kinds",
    "geometry.substrates.random_cells",
    "geometry.substrates.packed",
    "geometry.substrates",
    "geometry.metrics",
    "geometry.descriptors",
    "geometry",
    "meshfit.mesh",
    "meshfit.fem",
    "meshfit.permeable",
    "meshfit.shape",
    "meshfit.autoencoder",
    "meshfit.templates",
    "meshfit.result",
    "meshfit.surface",
    "meshfit.axonfit",
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
    "posterior.targets",
    "posterior.checkpoint",
    "posterior.prior",
    "posterior.calibration",
    "posterior.estimator",
    "posterior",
    "data",
    "reconst.fit",
    "reconst.plausibility",
    "reconst.posterior",
    "reconst.engines",
    "reconst.runner",
    "reconst.model",
    "reconst",
    "io.surfaces",
    "io.store",
    "io",
    "workflows.cli",
    "workflows.report",
    "workflows.spinverse",
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


def _documented_layout():
    """(module, imports) rows of doc/layout.md's table, in the page's order."""
    text = (PACKAGE.parent / "doc" / "layout.md").read_text()
    rows = re.findall(r"^\| `([\w.]+)` \| .* \| (.*) \|$", text, re.M)
    return [(name, set(imports.split(", ")) - {"--"}) for name, imports in rows]


def _imported_by(row):
    """What a documented row imports; the compartments row is its package."""
    modules = _modules()
    members = [m for m in modules if m == row or m.startswith(row + ".")]
    members = members if row == "compartments" else [row]
    package = row.rsplit(".", 1)[0] + "." if "." in row else None
    found = set()
    for name in members:
        for target, _ in _imports(name, modules[name]):
            if target in members or target == row or target.startswith(row + "."):
                continue
            # doc/layout.md names a sibling in the same package by its short name
            short = target.removeprefix(package) if package else target
            found.add(short)
    return found


def test_doc_layout_lists_the_layers_and_their_imports():
    rows = _documented_layout()
    names = [name for name, _ in rows]
    assert names == [name for name in LAYERS if name in names]
    for name, imports in rows:
        assert imports == _imported_by(name), name


def test_import_loads_neither_compartments_nor_tissue_nor_sets_the_environment():
    """``import dipy_spinverse`` is light and has no side effect; the names
    it exports load their module on first use."""
    import subprocess
    import sys

    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None)\n"
        "import dipy_spinverse\n"
        "loaded = [m for m in sys.modules if m.startswith('dipy_spinverse.')]\n"
        "assert loaded == ['dipy_spinverse.lazy'], loaded\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'OMP_WAIT_POLICY' not in os.environ\n"
        "from dipy_spinverse import SpinverseModel, TetGrid\n"
        "assert 'dipy_spinverse.compartments' not in sys.modules\n"
        "assert 'dipy_spinverse.tissue' not in sys.modules\n"
        "from dipy_spinverse import NoddiModel\n"
        "assert NoddiModel.__module__.startswith('dipy_spinverse.compartments')\n"
        "assert set(dipy_spinverse.__all__) <= set(dir(dipy_spinverse))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tests_mirror_the_packages():
    """Each folder of tests/ is named for the package whose tests it holds."""
    tests = pathlib.Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name[0] != "_"}
    folders -= {"__pycache__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders <= packages, folders - packages
    assert all(any((tests / f).glob("test_*.py")) for f in folders)


def test_packages_reexport_their_modules_public_names_lazily():
    """``dipy_spinverse.io`` and ``.workflows`` re-export each listed
    module's ``__all__`` (read from its source: no name list repeated) and
    import a module only when one of its names is asked for."""
    import subprocess
    import sys

    code = (
        "import sys, importlib\n"
        "import dipy_spinverse.io as io\n"
        "assert 'dipy_spinverse.io.store' not in sys.modules\n"
        "io_subs = ('store', 'surfaces', 'meshes', 'gradients', 'datasets')\n"
        "for pkg, subs in ((io, io_subs),\n"
        "        (importlib.import_module('dipy_spinverse.workflows'),\n"
        "         ('spinverse', 'report', 'cli'))):\n"
        "    names = []\n"
        "    for sub in subs:\n"
        "        names += importlib.import_module(pkg.__name__ + '.' + sub).__all__\n"
        "    assert pkg.__all__ == names, (pkg.__all__, names)\n"
        "    assert all(getattr(pkg, n) is not None for n in names)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
