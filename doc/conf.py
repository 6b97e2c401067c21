"""Sphinx configuration of the dipy_spinverse documentation.

Build (from the repository root, after ``pip install -e ".[doc]"``)::

    sphinx-build -W -b html doc doc/_build/html

``-D plot_gallery=0`` shows the examples without running any of them.
"""

import os
import sys

import dipy_spinverse

# gallery_args.py (the examples' --out) sits beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# torch's OpenMP pool and the gallery's matplotlib share the machine's cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

project = "dipy_spinverse"
author = "the dipy_spinverse developers"
copyright = "2026, " + author
version = release = dipy_spinverse.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "**.ipynb_checkpoints",
    # the raw table benchmarks/tissue_maps.py writes; tissue_maps.md quotes it
    "validation/tissue_maps_table.md",
]
root_doc = "index"

# -- API reference --------------------------------------------------------
autosummary_generate = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"
# No autodoc_mock_imports: the optional back ends (ray, dask, nilearn) are
# imported lazily, so autodoc never needs them.

# numpydoc renders the docstrings; the class member tables are left to
# autodoc (numpydoc's own would list every member a second time).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks = set()
numpydoc_xref_param_type = False

# -- Markdown pages (validation, layout) ------------------------------------
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# -- Gallery --------------------------------------------------------------
# Examples that finish within about a minute on 2 CPU cores are executed;
# the others are shown with their code only. Standalone times (2 cores beside
# other jobs, load 7): simulate_permeable_shapes 34 s, tissue_maps 14 s;
# reconstruct_one_voxel 243 s, learned_noddi 260 s (training its network),
# fit_phantom_dataset 541 s, compare_compartment_models > 600 s (250 s on a
# quiet machine). An executed example sees __doc__ == "" (sphinx-gallery's
# rule): it must not index into its docstring.
FAST_EXAMPLES = ["simulate_permeable_shapes", "tissue_maps"]


sphinx_gallery_conf = {
    "examples_dirs": os.path.join(os.pardir, "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": "/(" + "|".join(FAST_EXAMPLES) + r")\.py$",
    "reset_argv": "gallery_args.example_argv",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "within_subsection_order": "FileNameSortKey",
}

# -- HTML -----------------------------------------------------------------
html_theme = "alabaster"
html_title = "dipy_spinverse"
html_static_path = []
