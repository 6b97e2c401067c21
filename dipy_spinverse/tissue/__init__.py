"""Tissue probability maps through a differentiable MR signal model.

BMapEst-style (Gupta et al.): grey matter, white matter and CSF proportions
set each voxel's T1, T2 and proton density; steady-state formulas of the
known clinical sequences predict the images; the proportions are fitted to
the measured images. Independent of the diffusion code (imports only
:mod:`dipy_spinverse.checks`).
"""

from .model import GAINS, MIXINGS, TISSUE_DEFAULTS, TissueMapFit, TissueMapModel
from .sequences import (
    SEQUENCES,
    Flash,
    InversionRecovery,
    Mprage,
    SpinEcho,
    kspace_sample,
    sequence_from_string,
)
from .simplex import nonneg_lstsq, project_simplex, simplex_lstsq

__all__ = [
    "Flash",
    "SpinEcho",
    "InversionRecovery",
    "Mprage",
    "SEQUENCES",
    "sequence_from_string",
    "kspace_sample",
    "TissueMapModel",
    "TissueMapFit",
    "TISSUE_DEFAULTS",
    "MIXINGS",
    "GAINS",
    "simplex_lstsq",
    "nonneg_lstsq",
    "project_simplex",
]
