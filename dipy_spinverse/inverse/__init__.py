"""Spinverse inversion: fit per-face permeabilities to measured signals.

Modules, in the order a reconstruction uses them:

``config``
    :class:`InversionConfig` (frozen, validated once) in four parts -- face
    fit, loss, label search, approximation error -- and the :data:`PRESETS`.
``facefit``
    The published face fit: parametrisations, priors, curriculum, Adam.
``shapes``
    Generic cell shapes, the label search's starting dictionary.
``proposal``
    The learned proposal: a network trained on simulated random
    substrates, cached on disk, whose occupancy seeds the label search.
``search``
    The label search: scorer, greedy moves, per-cell permeabilities, the
    uncertainty of the labellings within the noise.
``reconstruct``
    :func:`reconstruct`, which only orchestrates the above.

Data flow: this package calls :func:`dipy_spinverse.simulate`; the DIPY
layer (:mod:`dipy_spinverse.reconst`) calls :func:`reconstruct`.
"""

from .config import (
    PRESETS,
    ApproximationConfig,
    FaceFitConfig,
    InversionConfig,
    LossConfig,
    SearchConfig,
    Stage,
    resolve_config,
)
from .facefit import barrier_probability
from .proposal import ProposalSettings, load_or_train_proposal
from .reconstruct import Reconstruction, grid_error, prepare, reconstruct
from .search import learned_proposal

__all__ = [
    "reconstruct",
    "prepare",
    "grid_error",
    "Reconstruction",
    "InversionConfig",
    "FaceFitConfig",
    "LossConfig",
    "SearchConfig",
    "ApproximationConfig",
    "Stage",
    "PRESETS",
    "resolve_config",
    "barrier_probability",
    "learned_proposal",
    "load_or_train_proposal",
    "ProposalSettings",
]
