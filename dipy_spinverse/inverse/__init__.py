"""Spinverse inversion: fit per-face permeabilities to measured signals.

Modules, in the order a reconstruction uses them:

``config``
    :class:`InversionConfig` (frozen, validated once) and the :data:`PRESETS`.
``facefit``
    The published face fit: parametrisations, priors, curriculum, Adam.
``shapes``
    Generic cell shapes, the label search's starting dictionary.
``search``
    The label search: scorer, greedy moves, permeability refinement.
``reconstruct``
    :func:`reconstruct`, which only orchestrates the above.

Data flow: this package calls :func:`dipy_spinverse.simulate`; the DIPY
layer (:mod:`dipy_spinverse.reconst`) calls :func:`reconstruct`.
"""

from .config import PRESETS, InversionConfig, Stage, resolve_config
from .facefit import barrier_probability
from .reconstruct import Reconstruction, reconstruct

__all__ = [
    "reconstruct",
    "Reconstruction",
    "InversionConfig",
    "Stage",
    "PRESETS",
    "resolve_config",
    "barrier_probability",
]
