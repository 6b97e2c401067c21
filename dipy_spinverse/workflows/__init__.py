"""The command-line workflows: ``dipy_fit_spinverse`` (:mod:`.spinverse`)
its report figures (:mod:`.report`) and the console-script runner
(:mod:`.cli`). ``dipy_fit_tissue_maps`` is
:mod:`dipy_spinverse.tissue.workflow`.

The names below are imported on first use: the console scripts import
:mod:`.cli` first, so that it sets the thread policy before torch loads.
"""

from ..lazy import attach

_NAMES = {
    **dict.fromkeys(
        [
            "SpinverseFlow",
            "main",
            "parse_mesh_options",
            "METRICS",
            "DEFAULT_METRICS",
            "SMOOTH_MESH_FORMATS",
        ],
        "spinverse",
    ),
    **dict.fromkeys(["write_report", "write_posterior_report"], "report"),
    **dict.fromkeys(
        ["run_command", "dipy_fit_spinverse", "dipy_fit_tissue_maps"], "cli"
    ),
}

__all__ = list(_NAMES)
__getattr__, __dir__ = attach(__name__, _NAMES)
