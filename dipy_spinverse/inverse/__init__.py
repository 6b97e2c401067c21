"""Spinverse inversion: fit per-face permeabilities to measured signals.

Modules, in the order a reconstruction uses them:

``config``
    :class:`InversionConfig` (frozen, validated once) in four parts -- face
    fit, loss, label search, approximation error -- and the :data:`PRESETS`.
``noise``
    :class:`Noise`, the one form the noise reaches every loss in: the
    relative level and each acquisition's precision.
``prediction``
    A field's signal in the data's terms (each sequence over its own
    simulated b = 0).
``facefit``
    The published face fit: parametrisations, priors, curriculum, Adam.
``shapes``
    Generic cell shapes, the label search's starting dictionary.
``proposal``
    The learned proposal: a network trained on simulated random
    substrates, cached on disk, whose occupancy seeds the label search.
``fields``
    Labellings and their permeability fields (per-cell membranes).
``cache``
    The process-wide store of simulated signals the searches share.
``scorer``
    Data loss of labellings, batched across voxels; the driver of the
    voxels' searches.
``uncertainty``
    The labellings scored within the noise: inside probability, spread,
    ambiguity.
``moves``
    The descent: label and permeability moves, greedy steps, kicks.
``refine``
    Each cell's membrane permeability refined on every acquisition.
``starts``
    The descent's starts: face-field regions, screened generic shapes.
``search``
    :func:`search_labels`, the label search's orchestration.
``bootstrap``
    The label search repeated on wild-bootstrap replicates.
``approximation``
    The fit grid's approximation error (bias and spread of its signals).
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
from .noise import Noise
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
    "Noise",
    "barrier_probability",
    "learned_proposal",
    "load_or_train_proposal",
    "ProposalSettings",
]
