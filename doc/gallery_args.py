"""Command-line arguments the gallery gives the examples it executes.

Each example writes its figures and files under ``--out``; the gallery
points that at a scratch folder, not at the source tree. Named in
``conf.py`` by its qualified name, so the Sphinx configuration stays
picklable.
"""

import os
import tempfile

OUT = tempfile.mkdtemp(prefix="dipy_spinverse-gallery-")


def example_argv(gallery_conf, script_vars):
    """``--out <scratch>/<example name>`` for one executed example."""
    name = os.path.splitext(os.path.basename(script_vars["src_file"]))[0]
    return ["--out", os.path.join(OUT, name)]
