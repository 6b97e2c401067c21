"""The result of a mesh fit (:class:`MeshFit`): the fitted cell, its code,
its signal and loss history, its surface and sizes.

``MeshFit.save`` writes the surface through :mod:`dipy_spinverse.io.meshes`
(this module's only import of ``io``).
"""

from dataclasses import dataclass, field

import numpy as np

from .mesh import TetMesh
from .shape import (
    SpectralShape,
)
from .templates import (
    template_radius,
)

__all__ = [
    "MeshFit",
]


@dataclass(frozen=True, eq=False)
class MeshFit:
    """Result of :func:`fit_mesh`.

    Attributes
    ----------
    mesh : TetMesh
        The fitted cell (um).
    shape_code : ndarray (n_code,)
        Coefficients of the spectral shape (rms normal displacement, um).
    predicted_signal : ndarray (n_acquisitions,)
        b0-normalised signal of the fitted mesh.
    loss_history : ndarray (n_iterations,)
        Data loss (plus the code penalty) at each iteration.
    kind : str
        ``"ball"``, ``"tube"`` or ``"mesh"`` (a user template): what
        :attr:`radius` means.
    n_inverted : int
        Tetrahedra inverted at the solution (0 for a valid mesh; the best
        valid iterate is returned when one exists).
    latent_code : ndarray (n_latent,) or None
        The autoencoder's latent code of the solution (``code="latent"``).
    axon_parameters : dict or None
        With ``code="axon"``: the fitted family member as
        :func:`.mesh.axon_mesh`'s keywords (radius, curvature, bend_azimuth,
        beading_amplitude, beading_period, beading_phase, swelling,
        fanning); ``shape_code`` is then the :data:`.shape.AXON_CODE`.
    """

    mesh: TetMesh
    shape_code: np.ndarray
    predicted_signal: np.ndarray
    loss_history: np.ndarray
    kind: str = "mesh"
    n_inverted: int = 0
    shape: SpectralShape = field(default=None, repr=False)
    latent_code: np.ndarray = None
    axon_parameters: dict = None

    @property
    def vertices(self):
        """Vertex positions (V, 3), um."""
        return self.mesh.vertices

    @property
    def faces(self):
        """Outward boundary triangles (F, 3): the cell's surface."""
        return self.mesh.boundary_faces

    @property
    def surface_vertices(self):
        """The surface as (vertices, triangles) with only the surface vertices."""
        used = self.mesh.boundary_vertices
        renumber = np.full(self.mesh.n_vertices, -1, dtype=np.int64)
        renumber[used] = np.arange(len(used))
        return self.mesh.vertices[used], renumber[self.faces]

    @property
    def volume(self):
        """Cell volume, um^3."""
        return self.mesh.volume

    @property
    def surface_area(self):
        """Membrane area, um^2."""
        return self.mesh.surface_area

    @property
    def surface_to_volume(self):
        """Surface-to-volume ratio, 1/um."""
        return self.surface_area / self.volume

    @property
    def radius(self):
        """Equivalent radius (um): of the ball of the same volume for a ball,
        the mean distance of the side vertices from the mesh's principal axis
        for a tube, ``3 V / A`` otherwise."""
        return template_radius(self.mesh, self.kind)
