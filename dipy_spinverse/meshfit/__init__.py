"""Smooth cell surfaces below the grid's resolution: mesh-shape inversion.

A cell is a tetrahedral mesh (:mod:`.mesh`: built-in ball, tube and axon
templates); :mod:`.fem` simulates its diffusion signal with P1 finite
elements and the matrix formalism, differentiable with respect to the vertex
positions (ReMiDi's approach, with this package's protocols and noise model);
:mod:`.permeable` adds the water around the cell behind a permeable
membrane (differentiable in the permeability too); :mod:`.shape` is the
shape code (Laplace-Beltrami modes of the template's surface;
:mod:`.autoencoder` compresses it further, trained on axon families),
:mod:`.fit` optimises it (:func:`fit_mesh`; the axon family's own fit in
:mod:`.axonfit`, templates and their sizes in :mod:`.templates`, the result
in :mod:`.result`, a template fitted to a surface in :mod:`.surface`) and
:mod:`.refine`
starts it from a Spinverse label surface (:func:`refine_cell`, behind
``SpinverseModel(..., refine_mesh=True)``).
"""

from .autoencoder import (
    AutoencoderSettings,
    ShapeAutoencoder,
    load_or_train_autoencoder,
    train_autoencoder,
)
from .fem import MeshBasis, mesh_basis, mesh_signal
from .fit import fit_mesh
from .mesh import (
    TetMesh,
    axon_deformation,
    axon_mesh,
    ball_mesh,
    surface_tet_mesh,
    tube_mesh,
)
from .permeable import SplitMesh, permeable_signal, split_regions
from .refine import check_refine_options, refine_cell
from .result import MeshFit
from .shape import AxonShape, SpectralShape, axon_shape, spectral_shape
from .surface import fit_surface, surface_chamfer

__all__ = [
    "TetMesh",
    "ball_mesh",
    "tube_mesh",
    "axon_mesh",
    "axon_deformation",
    "surface_tet_mesh",
    "MeshBasis",
    "mesh_basis",
    "mesh_signal",
    "SplitMesh",
    "split_regions",
    "permeable_signal",
    "SpectralShape",
    "spectral_shape",
    "AxonShape",
    "axon_shape",
    "AutoencoderSettings",
    "ShapeAutoencoder",
    "train_autoencoder",
    "load_or_train_autoencoder",
    "MeshFit",
    "fit_mesh",
    "fit_surface",
    "surface_chamfer",
    "refine_cell",
    "check_refine_options",
]
