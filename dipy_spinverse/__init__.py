"""dipy_spinverse: permeability-aware microstructure imaging for DIPY.

Data flows one way: ``grid`` (geometry) -> ``operators`` (finite-volume
Bloch-Torrey operators) -> ``solvers`` (time integration) -> ``forward``
(:func:`simulate`), with ``sequences`` describing the acquisitions.
"""

from .forward import simulate
from .grid import TetGrid
from .sequences import (
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
]
