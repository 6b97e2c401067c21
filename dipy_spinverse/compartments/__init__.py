"""Multi-compartment models beside Spinverse: NODDI, ActiveAx, ZCD, IVIM, Karger.

Three layers, data flowing one way:

- :mod:`.blocks`: compartment signals in torch (stick, ball, zeppelin, dot,
  restricted cylinder and sphere in the Gaussian phase approximation with
  finite pulses, Watson-dispersed stick and zeppelin, Karger exchange),
  differentiable and batched over voxels, evaluated on an
  :class:`~.acquisition.Acquisition`;
- :mod:`.fitting`: batched NNLS and variable-projection Levenberg-Marquardt;
- :mod:`.peaks`: fibre directions per voxel from DIPY's CSD (starts and
  fibre counts of ``fibres="auto"``);
- :mod:`.frames`: each voxel's signals resampled in its own frame (the
  learned estimators' inputs);
- :mod:`.learned`: MLP estimators trained on simulated signals
  (``fit_method="learned"``), cached on disk;
- :mod:`.base`: the DIPY ``ReconstModel`` / ``ReconstFit`` contract every
  model shares, fitted by variable projection (volume fractions by exact
  NNLS, the rest by multi-start, grid-initialised, bounded
  Levenberg-Marquardt, for all voxels of a chunk at once), with
  :mod:`.options` (the shared constructor options) and :mod:`.fibres` (the
  fibre populations of the multi-fibre models);
- one module per model: :mod:`.noddi`, :mod:`.activeax`, :mod:`.zcd`,
  :mod:`.ivim`, :mod:`.exchange`.

Units: public API as DIPY (mm^2/s, s, s/mm^2; diameters in um); internally
um and us, where diffusivities and b-values keep their numbers.
"""

from . import blocks, learned, peaks
from .acquisition import Acquisition
from .activeax import ActiveAxFit, ActiveAxModel
from .base import FIT_METHODS, CompartmentFit, CompartmentModel
from .exchange import ExchangeFit, ExchangeModel
from .fitting import Bound, levenberg_marquardt, nnls
from .ivim import IvimCompartmentFit, IvimCompartmentModel
from .learned import LearnedOptions
from .noddi import NoddiFit, NoddiModel
from .peaks import csd_peaks
from .zcd import ZcdFit, ZcdModel

__all__ = [
    "blocks",
    "learned",
    "peaks",
    "csd_peaks",
    "LearnedOptions",
    "FIT_METHODS",
    "Acquisition",
    "Bound",
    "nnls",
    "levenberg_marquardt",
    "CompartmentModel",
    "CompartmentFit",
    "NoddiModel",
    "NoddiFit",
    "ActiveAxModel",
    "ActiveAxFit",
    "ZcdModel",
    "ZcdFit",
    "IvimCompartmentModel",
    "IvimCompartmentFit",
    "ExchangeModel",
    "ExchangeFit",
]
