"""dipy_spinverse: permeability-aware microstructure imaging for DIPY.

Data flows one way: ``grid`` (geometry) -> ``operators`` (finite-volume
Bloch-Torrey operators) -> ``solvers`` (time integration) -> ``forward``
(:func:`simulate`), with ``sequences`` describing the acquisitions.
"""

import importlib

__version__ = "0.1.0.dev0"

# Public names and the module that defines each. They are imported on first
# use (PEP 562), so that ``import dipy_spinverse`` loads neither torch nor
# the compartment models nor the tissue maps until they are asked for.
_NAMES = {
    "TetGrid": "grid",
    "simulate": "forward",
    "Protocol": "sequences",
    "PGSE": "sequences",
    "DoublePGSE": "sequences",
    "CosineOGSE": "sequences",
    "SineOGSE": "sequences",
    "PiecewiseConstant": "sequences",
    "published_protocol": "sequences",
    "reconstruct": "inverse",
    "Reconstruction": "inverse",
    "Phantom": "phantoms",
    "published_phantoms": "phantoms",
    "InterfaceMesh": "interface",
    "barrier_mesh": "interface",
    "load_mesh": "interface",
    "all_metrics": "metrics",
    "cell_overlap": "metrics",
    "SpinverseModel": "reconst",
    "SpinverseFit": "reconst",
    "NoddiModel": "compartments",
    "ActiveAxModel": "compartments",
    "ZcdModel": "compartments",
    "IvimModel": "compartments",
    "ExchangeModel": "compartments",
}

__all__ = list(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
