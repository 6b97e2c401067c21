"""dipy_spinverse: permeability-aware microstructure imaging for DIPY.

Data flows one way: ``grid`` (geometry) -> ``operators`` (finite-volume
Bloch-Torrey operators) -> ``solvers`` (time integration) -> ``forward``
(:func:`simulate`), with ``sequences`` describing the acquisitions.
"""

import os

# Spin-waiting OpenMP threads (torch's default) starve when another thread
# pool shares the cores -- numpy/scipy's OpenBLAS, or DIPY's joblib/dask/ray
# workers -- and every small torch kernel then costs ~20 ms. Passive waiting
# costs nothing measurable alone and avoids that. Only effective when set
# before torch is first imported; set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .compartments import (  # noqa: E402
    ActiveAxModel,
    ExchangeModel,
    IvimModel,
    NoddiModel,
    ZcdModel,
)
from .forward import simulate  # noqa: E402
from .grid import TetGrid  # noqa: E402
from .interface import InterfaceMesh, barrier_mesh, load_mesh  # noqa: E402
from .inverse import Reconstruction, reconstruct  # noqa: E402
from .metrics import all_metrics, cell_overlap  # noqa: E402
from .phantoms import Phantom, published_phantoms  # noqa: E402
from .reconst import SpinverseFit, SpinverseModel  # noqa: E402
from .sequences import (  # noqa: E402
    PGSE,
    CosineOGSE,
    DoublePGSE,
    PiecewiseConstant,
    Protocol,
    SineOGSE,
    published_protocol,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "TetGrid",
    "simulate",
    "Protocol",
    "PGSE",
    "DoublePGSE",
    "CosineOGSE",
    "SineOGSE",
    "PiecewiseConstant",
    "published_protocol",
    "reconstruct",
    "Reconstruction",
    "Phantom",
    "published_phantoms",
    "InterfaceMesh",
    "barrier_mesh",
    "load_mesh",
    "all_metrics",
    "cell_overlap",
    "SpinverseModel",
    "SpinverseFit",
    "NoddiModel",
    "ActiveAxModel",
    "ZcdModel",
    "IvimModel",
    "ExchangeModel",
]
