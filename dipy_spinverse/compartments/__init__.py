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
- :mod:`.models`: DIPY ``ReconstModel`` / ``ReconstFit`` pairs.

Units: public API as DIPY (mm^2/s, s, s/mm^2; diameters in um); internally
um and us, where diffusivities and b-values keep their numbers.
"""

from . import blocks, learned, peaks
from .acquisition import Acquisition
from .base import FIT_METHODS, CompartmentFit, CompartmentModel
from .fitting import Bound, levenberg_marquardt, nnls
from .learned import LearnedOptions
from .models import (
    ActiveAxFit,
    ActiveAxModel,
    ExchangeFit,
    ExchangeModel,
    IvimFit,
    IvimModel,
    NoddiFit,
    NoddiModel,
    ZcdFit,
    ZcdModel,
)
from .peaks import csd_peaks

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
    "IvimModel",
    "IvimFit",
    "ExchangeModel",
    "ExchangeFit",
]
