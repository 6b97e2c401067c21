"""Running the package's DIPY workflows as console scripts."""

import importlib
import importlib.metadata
import os
import sys

import dipy
from dipy.workflows.flow_runner import run_flow
from nibabel.filebasedimages import ImageFileError

__all__ = ["run_command", "dipy_fit_spinverse", "dipy_fit_tissue_maps"]


def _passive_threads():
    """Passive OpenMP waiting for the commands (set before torch loads).

    Spin-waiting OpenMP threads (torch's default) starve when another thread
    pool shares the cores -- numpy/scipy's OpenBLAS, or DIPY's joblib/dask/ray
    workers -- and every small torch kernel then costs ~20 ms. Passive
    waiting costs nothing measurable alone. Set for the package's commands
    only, never on ``import dipy_spinverse``; export the variable yourself
    to choose otherwise.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _command(path):
    """Run the workflow class ``"module:Class"`` as this process's command.

    The module is loaded by name after :func:`_passive_threads`, so that the
    setting precedes torch's first import (this module sits below the
    workflows and never imports them itself).
    """
    _passive_threads()
    module, name = path.split(":")
    flow = getattr(importlib.import_module(module), name)
    return run_command(flow())


def dipy_fit_spinverse():
    """Console script ``dipy_fit_spinverse``."""
    return _command("dipy_spinverse.workflows.spinverse:SpinverseFlow")


def dipy_fit_tissue_maps():
    """Console script ``dipy_fit_tissue_maps``."""
    return _command("dipy_spinverse.workflows.tissue:TissueMapsFlow")


def run_command(flow):
    """Run a DIPY workflow from the command line, as ``run_flow`` does.

    Two differences: ``--version`` prints this package's version (DIPY's
    parser alone would print DIPY's), and a user's mistake -- a
    ``ValueError``, whose message names the argument and the fix, a file
    that is missing or cannot be read (``OSError``), or one that is not an
    image nibabel reads -- ends the command with that message and exit
    status 2, as argparse does, instead of a traceback. Ctrl-C ends it with
    one line (and the flow's ``on_interrupt`` text, if it has one) and exit
    status 130.

    Parameters
    ----------
    flow : dipy.workflows.workflow.Workflow

    Returns
    -------
    int or None
        0 after ``--version``, else what ``run_flow`` returns.
    """
    if "--version" in sys.argv[1:]:
        version = importlib.metadata.version("dipy_spinverse")
        print(f"dipy_spinverse {version} (DIPY {dipy.__version__})")
        return 0
    name = os.path.basename(sys.argv[0])
    try:
        return run_flow(flow)
    except (ValueError, OSError, ImageFileError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a failure to debug: one line
        # (the flow's ``on_interrupt`` says what was kept), the shell's 130.
        hint = getattr(flow, "on_interrupt", "")
        print(f"{name}: interrupted{'; ' + hint if hint else ''}.", file=sys.stderr)
        sys.exit(130)
