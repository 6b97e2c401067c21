"""Smooth cell surfaces below the grid's resolution: mesh-shape inversion.

A cell is a tetrahedral mesh (:mod:`.mesh`: built-in ball, tube and axon
templates); :mod:`.fem` simulates its diffusion signal with P1 finite
elements and the matrix formalism, differentiable with respect to the vertex
positions (ReMiDi's approach, with this package's protocols and noise model).
"""

from .fem import MeshBasis, mesh_basis, mesh_signal
from .mesh import TetMesh, axon_mesh, ball_mesh, tube_mesh

__all__ = [
    "TetMesh",
    "ball_mesh",
    "tube_mesh",
    "axon_mesh",
    "MeshBasis",
    "mesh_basis",
    "mesh_signal",
]
