"""The command-line workflows: ``dipy_fit_spinverse`` (:mod:`.spinverse`)
its report figures (:mod:`.report`) and the console-script runner
(:mod:`.cli`). ``dipy_fit_tissue_maps`` is :mod:`.tissue` (imported by its
module path: its ``main`` is not this package's).

Their public names (each module's ``__all__``) are imported on first use:
the console scripts import :mod:`.cli` first, so that it sets the thread
policy before torch loads.
"""

from ..lazy import attach_all

__all__, __getattr__, __dir__ = attach_all(__name__, ["spinverse", "report", "cli"])
