"""Multi-compartment models beside Spinverse: NODDI, ActiveAx, ZCD, IVIM, Karger.

Three layers, data flowing one way:

- :mod:`.blocks`: compartment signals in torch (stick, ball, zeppelin, dot,
  restricted cylinder and sphere in the Gaussian phase approximation with
  finite pulses, Watson-dispersed stick and zeppelin, Karger exchange),
  differentiable and batched over voxels, evaluated on an
  :class:`~.acquisition.Acquisition`;
- :mod:`.fitting`: batched NNLS and variable-projection Levenberg-Marquardt;
- :mod:`.models`: DIPY ``ReconstModel`` / ``ReconstFit`` pairs.

Units: public API as DIPY (mm^2/s, s, s/mm^2; diameters in um); internally
um and us, where diffusivities and b-values keep their numbers.
"""

from . import blocks
from .acquisition import Acquisition
from .base import CompartmentFit, CompartmentModel
from .fitting import Bound, levenberg_marquardt, nnls
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

__all__ = [
    "blocks",
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
