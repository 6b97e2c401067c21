"""The package's layout rule: data flow one way, no private imports.

Every module imports only modules above it in ``LAYERS`` (a package's
``__init__`` may re-export its own submodules), and never a name starting
with ``_`` from another module. Folders are layers too: each folder's
modules are one block of ``LAYERS``, in the order of ``FOLDERS``, and a
folder imports only the folders before it, so that no two folders import
each other (a module-level order alone allows ``io.meshes`` low and
``io.surfaces`` high, the folder then both below and above ``reconst``).
doc/layout.md describes the layers.
"""

import pathlib
import re

import pytest

from dipy_spinverse.provenance import package_imports

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dipy_spinverse"
LAYERS = [
    "lazy",
    "checks",
    "masked",
    "files",
    "provenance",
    "clusters",
    "sim.grid",
    "sim.sections",
    "sim.pools",
    "sim.waveforms",
    "sim.sequences",
    "sim.operators",
    "sim.solvers",
    "sim.modes",
    "sim.forward",
    "sim.signals",
    "sim.analytic",
    "sim.limits",
    "sim",
    "compartments.acquisition",
    "compartments.fitting",
    "compartments.blocks.gaussian",
    "compartments.blocks.restricted",
    "compartments.blocks.watson",
    "compartments.blocks.watson_table",
    "compartments.blocks.zonal",
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
    "tissue.sequences",
    "tissue.simplex",
    "tissue.model",
    "tissue.data",
    "tissue",
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
    "geometry.substrates.bundle",
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
    "inverse.noise",
    "inverse.prediction",
    "inverse.facefit",
    "inverse.shapes",
    "inverse.proposal",
    "inverse.fields",
    "inverse.cache",
    "inverse.scorer",
    "inverse.uncertainty",
    "inverse.moves",
    "inverse.refine",
    "inverse.starts",
    "inverse.search",
    "inverse.bootstrap",
    "inverse.approximation",
    "inverse.reconstruct",
    "inverse",
    "posterior.shipped",
    "posterior.targets",
    "posterior.checkpoint",
    "posterior.simulator",
    "posterior.noise",
    "posterior.envelope",
    "posterior.prior",
    "posterior.white_matter",
    "posterior.mixture",
    "posterior.library",
    "posterior.mixture_prior",
    "posterior.calibration",
    "posterior.support",
    "posterior.estimator",
    "posterior.training",
    "posterior.cache",
    "posterior.predictive",
    "posterior.protocol_free.design",
    "posterior.protocol_free.tokens",
    "posterior.protocol_free.shells",
    "posterior.protocol_free.estimator",
    "posterior.protocol_free.training",
    "posterior.protocol_free.shipped",
    "posterior.protocol_free.__main__",
    "posterior.protocol_free",
    "posterior.shipping",
    "posterior.__main__",
    "posterior",
    "reconst.codes",
    "reconst.plausibility",
    "reconst.noise",
    "reconst.gate",
    "reconst.descriptions",
    "reconst.voxels",
    "reconst.fit_metrics",
    "reconst.fit_meshes",
    "reconst.fit_prediction",
    "reconst.fit",
    "reconst.posterior",
    "reconst.search_settings",
    "reconst.status",
    "reconst.surfaces",
    "reconst.resume",
    "reconst.progress",
    "reconst.refinement",
    "reconst.parallel",
    "reconst.runner",
    "reconst.posterior_model",
    "reconst.protocol_free_model",
    "reconst.search_model",
    "reconst.methods",
    "reconst.model",
    "reconst",
    "io.camino",
    "io.gradients",
    "io.datasets",
    "io.meshes",
    "io.surfaces",
    "io.specs",
    "io.fits",
    "io.checkpoint",
    "io.maps",
    "io",
    "data",
    "workflows.cli",
    "workflows.report",
    "workflows.outputs",
    "workflows.dataset",
    "workflows.flags",
    "workflows.spinverse",
    "workflows.tissue",
    "workflows",
]


#: The folders (packages, and the top-level modules, each its own) in the
#: order their imports put them: each imports only folders before it.
FOLDERS = [
    "lazy",
    "checks",
    "masked",
    "files",
    "provenance",
    "clusters",
    "sim",
    "compartments",
    "tissue",
    "geometry",
    "meshfit",
    "inverse",
    "posterior",
    "reconst",
    "io",
    "data",
    "workflows",
]


def _folder(module):
    """The folder (top package, or top-level module) of a module name."""
    return module.split(".")[0]


def _modules():
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name.removesuffix(".__init__").removesuffix("__init__")] = path
    return out


def test_every_module_has_a_layer():
    assert set(_modules()) - {""} == set(LAYERS)


@pytest.mark.parametrize("name", LAYERS)
def test_imports_flow_one_way(name):
    rank = LAYERS.index(name)
    for target, imported in package_imports(name):
        if target.startswith(name + "."):
            continue  # a package re-exporting its own submodules
        assert LAYERS.index(target) < rank, f"{name} imports {target} (upward)"
        if target != name and target in LAYERS and not imported.startswith("__"):
            assert not imported.startswith("_"), f"{name} imports {target}.{imported}"


def test_folders_are_blocks_of_the_layers_in_their_order():
    """Each folder's modules are consecutive in ``LAYERS``, folders in the
    order of ``FOLDERS``."""
    blocks = [_folder(name) for name in LAYERS]
    order = [f for i, f in enumerate(blocks) if i == 0 or blocks[i - 1] != f]
    assert order == FOLDERS, "a folder split in LAYERS, or FOLDERS out of order"


def _folder_imports():
    """{folder: {folder it imports: a module import that does it}}."""
    found = {}
    for name in _modules():
        if not name:
            continue  # the package's own __init__: names imported on first use
        for target, _ in package_imports(name):
            if _folder(target) != _folder(name):
                found.setdefault(_folder(name), {}).setdefault(
                    _folder(target), f"{name} -> {target}"
                )
    return found


def test_no_import_cycle_between_folders():
    """The folder graph is acyclic: every folder imports only folders before
    it in ``FOLDERS`` (a cycle is reported with the imports that make it)."""
    graph = _folder_imports()
    assert set(graph) <= set(FOLDERS), set(graph) - set(FOLDERS)

    def cycle(start, path):
        for nxt in graph.get(path[-1], {}):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle(start, path + [nxt])
                if found:
                    return found
        return None

    for folder in graph:
        loop = cycle(folder, [folder]) or []
        edges = [graph[a][b] for a, b in zip(loop[:-1], loop[1:], strict=True)]
        assert not loop, f"folders import each other: {edges}"
    for folder, targets in graph.items():
        for target, example in targets.items():
            assert FOLDERS.index(target) < FOLDERS.index(folder), (
                f"{folder} imports {target}, a folder after it ({example})"
            )


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
        for target, _ in package_imports(name):
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


def test_io_reexports_its_modules_public_names():
    """``dipy_spinverse.io`` re-exports each of its modules' ``__all__``,
    imported plainly (nothing below io imports it, so nothing needs hiding)."""
    import importlib

    io = importlib.import_module("dipy_spinverse.io")
    subs = sorted(m for m in _modules() if m.startswith("io."))
    names = []
    for sub in subs:
        module = importlib.import_module(f"dipy_spinverse.{sub}")
        names += module.__all__
        for name in module.__all__:
            assert getattr(io, name) is getattr(module, name), f"io.{name}"
    assert sorted(io.__all__) == sorted(names)
    assert len(names) == len(set(names)), "two io modules export one name"
    assert "__getattr__" not in vars(io), "io re-exports lazily"


def test_workflows_reexport_their_modules_public_names_lazily():
    """``dipy_spinverse.workflows`` re-exports each listed module's
    ``__all__`` (read from its source: no name list repeated) and imports a
    module only when one of its names is asked for: the console scripts
    import :mod:`.cli` first, to set the thread policy before torch loads."""
    import subprocess
    import sys

    code = (
        "import sys, importlib\n"
        "import dipy_spinverse.workflows as pkg\n"
        "assert 'dipy_spinverse.workflows.spinverse' not in sys.modules\n"
        "names = []\n"
        "for sub in ('spinverse', 'report', 'cli'):\n"
        "    names += importlib.import_module(pkg.__name__ + '.' + sub).__all__\n"
        "assert pkg.__all__ == names, (pkg.__all__, names)\n"
        "assert all(getattr(pkg, n) is not None for n in names)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
