"""dipy_spinverse: permeability-aware microstructure imaging for DIPY.

The packages are the layers, and data flows one way: ``sim`` (grid ->
operators -> solvers -> :func:`simulate`, with the acquisitions in
``sim.sequences``) -> ``geometry`` (cells on a grid, their surfaces and
descriptors) -> the estimators (``inverse``, ``meshfit``, ``posterior``,
``compartments``, ``tissue``) -> ``reconst`` (the DIPY layer) -> ``io`` (every
file format: meshes, Camino schemes, fits and checkpoints, NIfTI maps) ->
``workflows`` (the commands).
"""

import importlib.metadata

from .lazy import attach

try:
    # One version, setup.cfg's, read from the installed package's metadata.
    __version__ = importlib.metadata.version("dipy_spinverse")
except importlib.metadata.PackageNotFoundError:  # a source tree not installed
    __version__ = "0+unknown"

# Public names and the module that defines each. They are imported on first
# use (PEP 562), so that ``import dipy_spinverse`` loads neither torch nor
# the compartment models nor the tissue maps until they are asked for.
_NAMES = {
    "TetGrid": "sim.grid",
    "simulate": "sim.forward",
    "Protocol": "sim.sequences",
    "PGSE": "sim.waveforms",
    "DoublePGSE": "sim.waveforms",
    "CosineOGSE": "sim.waveforms",
    "SineOGSE": "sim.waveforms",
    "PiecewiseConstant": "sim.waveforms",
    "SpinEcho": "sim.waveforms",
    "published_protocol": "sim.sequences",
    "hcp_protocol": "sim.sequences",
    "reconstruct": "inverse",
    "Reconstruction": "inverse",
    "Phantom": "geometry.phantoms",
    "published_phantoms": "geometry.phantoms",
    "InterfaceMesh": "geometry.topology",
    "barrier_mesh": "geometry.topology",
    "load_mesh": "io.meshes",
    "save_mesh": "io.meshes",
    "all_metrics": "geometry.metrics",
    "cell_overlap": "geometry.metrics",
    "SpinverseModel": "reconst",
    "SpinverseFit": "reconst",
    "NoddiModel": "compartments",
    "ActiveAxModel": "compartments",
    "ZcdModel": "compartments",
    "IvimCompartmentModel": "compartments",
    "ExchangeModel": "compartments",
}

__all__ = list(_NAMES)
__getattr__, __dir__ = attach(__name__, _NAMES)
