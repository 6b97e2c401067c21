"""A low-dimensional shape code: a template deformed by a spectral basis.

The template's surface is deformed along its normals by the lowest
Laplace-Beltrami eigenfunctions of that surface (cotangent Laplacian, lumped
area mass, scipy), and the displacement is extended into the interior as a
harmonic field (the template's own P1 stiffness, solved once with a sparse
LU). The vertices are therefore a *linear* function of the code,
``vertices = template + sum_k code_k field_k``: no remeshing during a fit, and
the derivative of anything with respect to the code is the derivative with
respect to the vertices contracted with the fields.

Each eigenfunction is scaled to unit root-mean-square over the surface, so a
coefficient is the rms normal displacement in um. Mode 0 (constant) is a
uniform swelling.

:class:`AxonShape` is the other code: the eight parameters of the axon
family of :func:`.mesh.axon_deformation` (radius, bend, beading, swelling,
fanning) applied to a straight tube template, in torch. It is a strong prior
(only family members are representable) with few coefficients, each of which
the signal sees.
"""

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch

from ..checks import check_choice, check_int
from .fem import assemble
from .mesh import TetMesh, signed_volumes, triangle_areas

__all__ = [
    "SpectralShape",
    "spectral_shape",
    "surface_laplacian",
    "DIRECTIONS",
    "AxonShape",
    "axon_shape",
    "AXON_CODE",
]

#: Directions of the surface displacement: along the template's normals, or
#: each eigenfunction along x, y and z (three coefficients per mode; moves
#: the surface tangentially too, which bends a tube without distorting its
#: section).
DIRECTIONS = ("normal", "xyz")


@dataclass(frozen=True, eq=False)
class SpectralShape:
    """A template mesh and the displacement fields of its shape code.

    Attributes
    ----------
    template : TetMesh
    fields : ndarray (n_code, V, 3)
        Vertex displacement (um) per unit coefficient.
    eigenvalues : ndarray (n_modes,)
        Laplace-Beltrami eigenvalues (1/um^2) of the modes.
    directions : str
        ``"normal"`` or ``"xyz"``.
    """

    template: TetMesh
    fields: np.ndarray
    eigenvalues: np.ndarray
    directions: str

    @property
    def n_code(self):
        """Number of coefficients."""
        return self.fields.shape[0]

    def vertices(self, code):
        """Vertex positions (V, 3) for a code (n_code,), numpy or torch."""
        if isinstance(code, torch.Tensor):
            fields = torch.as_tensor(self.fields, dtype=code.dtype)
            base = torch.tensor(self.template.vertices, dtype=code.dtype)
            return base + torch.einsum("k,kvd->vd", code, fields)
        code = np.asarray(code, dtype=np.float64)
        if code.shape != (self.n_code,):
            raise ValueError(
                f"the shape code must have shape ({self.n_code},), got {code.shape}."
            )
        return self.template.vertices + np.einsum("k,kvd->vd", code, self.fields)

    def n_inverted(self, code):
        """Number of tetrahedra with volume <= 0 for a code."""
        vertices = self.vertices(np.asarray(code, dtype=np.float64))
        return int(np.sum(signed_volumes(vertices, self.template.tets) <= 0))

    def mesh(self, code):
        """The deformed :class:`TetMesh` (raises if a tetrahedron inverts)."""
        return self.template.moved(self.vertices(code))


def surface_laplacian(vertices, triangles):
    """Cotangent Laplacian and lumped (one third of the areas) mass.

    Parameters
    ----------
    vertices : ndarray (V, 3)
    triangles : ndarray of int (F, 3)

    Returns
    -------
    stiffness : scipy.sparse.csr_matrix (V, V)
        Positive semi-definite: ``sum (cot a + cot b) / 2`` off the diagonal
        with the sign flipped.
    mass : ndarray (V,)
        Lumped vertex areas (um^2).
    """
    p = np.asarray(vertices)[triangles]
    n = len(vertices)
    rows, cols, vals = [], [], []
    for i in range(3):
        j, k = (i + 1) % 3, (i + 2) % 3
        u, v = p[:, j] - p[:, i], p[:, k] - p[:, i]
        cot = np.einsum("fd,fd->f", u, v) / np.linalg.norm(np.cross(u, v), axis=1)
        # The angle at i weighs the opposite edge (j, k).
        for a, b in ((j, k), (k, j)):
            rows.append(triangles[:, a])
            cols.append(triangles[:, b])
            vals.append(-0.5 * cot)
    rows, cols, vals = map(np.concatenate, (rows, cols, vals))
    off = scipy.sparse.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    stiffness = off - scipy.sparse.diags(np.asarray(off.sum(axis=1)).ravel())
    areas = triangle_areas(vertices, triangles)
    mass = np.bincount(triangles.ravel(), np.repeat(areas / 3.0, 3), minlength=n)
    return stiffness.tocsr(), mass


def spectral_shape(template, *, n_modes=16, directions="normal"):
    """Shape code of a template: Laplace-Beltrami modes, harmonic interior.

    Parameters
    ----------
    template : TetMesh
    n_modes : int
        Surface eigenfunctions kept (the lowest; mode 0 is constant).
    directions : {"normal", "xyz"}
        See :data:`DIRECTIONS`.

    Returns
    -------
    SpectralShape
    """
    if not isinstance(template, TetMesh):
        raise TypeError(f"template must be a TetMesh, got {type(template).__name__}.")
    directions = check_choice(directions, "directions", DIRECTIONS)
    faces = template.boundary_faces
    surface = template.boundary_vertices
    local = np.full(template.n_vertices, -1, dtype=np.int64)
    local[surface] = np.arange(len(surface))
    n_modes = min(check_int(n_modes, "n_modes", 1), len(surface) - 1)
    stiffness, mass = surface_laplacian(template.vertices[surface], local[faces])
    values, modes = scipy.linalg.eigh(
        stiffness.toarray(), np.diag(mass), subset_by_index=[0, n_modes - 1]
    )
    # Unit rms over the surface: sum(mass * phi^2) = area; mode 0 positive, so
    # that a positive first coefficient swells the cell.
    modes = _canonical_modes(values, modes, mass) * np.sqrt(mass.sum())
    modes[:, 0] *= np.sign(modes[:, 0].sum())
    normals = _vertex_normals(template.vertices[surface], local[faces])
    if directions == "normal":
        boundary = modes.T[:, :, None] * normals[None]  # (K, S, 3)
    else:
        eye = np.eye(3)
        boundary = (modes.T[:, None, :, None] * eye[None, :, None, :]).reshape(
            -1, len(surface), 3
        )
    fields = _harmonic_extension(template, surface, boundary)
    return SpectralShape(
        template=template,
        fields=fields,
        eigenvalues=np.maximum(values, 0.0),
        directions=directions,
    )


def _canonical_modes(values, modes, mass, *, rtol=1e-6):
    """Eigenfunctions made independent of the eigensolver's choices.

    Within an eigenvalue of multiplicity k (a tube's or a ball's symmetric
    modes) LAPACK returns any orthonormal basis of the eigenspace, and any
    sign for a simple one; which one depends on the LAPACK build, and with
    it the shape code and what an autoencoder learns over it. Each
    eigenspace's basis is rotated to the orthogonal factor of its
    mass-weighted projection onto fixed reference functions (seeded), so
    the same template gives the same modes everywhere.
    """
    modes = modes.copy()
    reference = np.random.default_rng(0).standard_normal((len(mass), modes.shape[1]))
    start = 0
    while start < len(values):
        stop = start + 1
        scale = max(abs(values[start]), 1.0)
        while stop < len(values) and values[stop] - values[start] < rtol * scale:
            stop += 1
        block = modes[:, start:stop]
        overlap = block.T @ (mass[:, None] * reference[:, start:stop])  # (k, k)
        u, _, vt = np.linalg.svd(overlap)
        modes[:, start:stop] = block @ (u @ vt)
        start = stop
    return modes


def _vertex_normals(vertices, triangles):
    p = vertices[triangles]
    face = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])  # area-weighted
    normals = np.zeros_like(vertices)
    for i in range(3):
        np.add.at(normals, triangles[:, i], face)
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def _harmonic_extension(template, surface, boundary):
    """Interior displacement solving the Laplace equation, boundary given."""
    stiffness, _ = assemble(template)
    interior = np.setdiff1d(np.arange(template.n_vertices), surface)
    fields = np.zeros((len(boundary), template.n_vertices, 3))
    fields[:, surface] = boundary
    if len(interior):
        k_ii = stiffness[interior][:, interior].tocsc()
        k_ib = stiffness[interior][:, surface]
        rhs = -(k_ib @ boundary.transpose(1, 0, 2).reshape(len(surface), -1))
        solved = scipy.sparse.linalg.splu(k_ii).solve(np.asarray(rhs))
        fields[:, interior] = solved.reshape(len(interior), len(boundary), 3).transpose(
            1, 0, 2
        )
    return fields


#: Coefficients of :class:`AxonShape`, in order. The bend is the curvature
#: vector across the axis (``curvature * (cos, sin)(bend_azimuth)``, 1/um) and
#: the beading its cosine and sine parts (``beading_amplitude * (cos, sin)
#: (beading_phase)``): smooth through a straight, unbeaded tube, where the
#: polar forms' angles are undefined.
AXON_CODE = (
    "radius",
    "bend_x",
    "bend_y",
    "beading_cos",
    "beading_sin",
    "beading_period",
    "swelling",
    "fanning",
)
# Below this squared curvature (1/um^2) the arc's functions are evaluated by
# their Taylor series (exact to ~1e-16 relative for |z| <= 50 um).
_STRAIGHT_K2 = 1e-10


@dataclass(frozen=True, eq=False)
class AxonShape:
    """A straight tube template deformed by the axon family's parameters.

    ``vertices(code)`` is :func:`.mesh.axon_deformation` of the template
    scaled to ``radius`` (the same map as :func:`.mesh.axon_mesh`), in torch
    so that a fit can differentiate it; ``code`` holds :data:`AXON_CODE`.

    Attributes
    ----------
    template : TetMesh
        A straight tube along z centred at z = 0 (:func:`.mesh.tube_mesh`).
    length : float
        Its length along z (um): the family's profiles span it; not fitted.
    template_radius : float
        Its mean side radius (um).
    """

    template: TetMesh
    length: float
    template_radius: float

    @property
    def n_code(self):
        """Number of coefficients (8)."""
        return len(AXON_CODE)

    def code(
        self,
        *,
        radius,
        curvature=0.0,
        bend_azimuth=0.0,
        beading_amplitude=0.0,
        beading_period=10.0,
        beading_phase=0.0,
        swelling=0.0,
        fanning=0.0,
    ):
        """The code of :func:`.mesh.axon_mesh`'s keywords (ndarray (8,))."""
        return np.array(
            [
                radius,
                curvature * np.cos(bend_azimuth),
                curvature * np.sin(bend_azimuth),
                beading_amplitude * np.cos(beading_phase),
                beading_amplitude * np.sin(beading_phase),
                beading_period,
                swelling,
                fanning,
            ],
            dtype=np.float64,
        )

    def parameters(self, code):
        """:func:`.mesh.axon_mesh`'s keywords of a code (dict of floats)."""
        r, bx, by, bc, bs, period, swelling, fanning = np.asarray(code, float)
        return dict(
            radius=float(r),
            curvature=float(np.hypot(bx, by)),
            bend_azimuth=float(np.arctan2(by, bx)),
            beading_amplitude=float(np.hypot(bc, bs)),
            beading_period=float(period),
            beading_phase=float(np.arctan2(bs, bc)),
            swelling=float(swelling),
            fanning=float(fanning),
        )

    def vertices(self, code):
        """Vertex positions (V, 3) for a code (8,), numpy or torch."""
        as_numpy = not isinstance(code, torch.Tensor)
        if as_numpy:
            code = np.asarray(code, dtype=np.float64)
            if code.shape != (self.n_code,):
                raise ValueError(
                    f"the axon code must have shape ({self.n_code},), got {code.shape}."
                )
            code = torch.as_tensor(code)
        r, bx, by, bc, bs, period, swelling, fanning = code.unbind()
        x, y, z = torch.tensor(self.template.vertices, dtype=code.dtype).unbind(1)
        s = 2.0 * z / self.length
        theta = 2.0 * np.pi * z / period
        scale = (r / self.template_radius) * (
            1.0 + bc * torch.cos(theta) - bs * torch.sin(theta) + swelling * (1 - s * s)
        )
        scale = scale * (1.0 + fanning * s)
        x, y = x * scale, y * scale
        # The arc of axon_deformation written with the curvature vector k:
        # (x, y) += k (1 - k.p) f, z' = (1 - k.p) g, f = (1 - cos kz) / k^2,
        # g = sin(kz) / k: even in |k|, so smooth through a straight tube.
        k2 = bx * bx + by * by
        straight = k2 < _STRAIGHT_K2
        k2_safe = torch.where(straight, torch.ones_like(k2), k2)
        k = torch.sqrt(k2_safe)
        f = torch.where(
            straight, z * z / 2 - k2 * z**4 / 24, (1 - torch.cos(k * z)) / k2_safe
        )
        g = torch.where(straight, z - k2 * z**3 / 6, torch.sin(k * z) / k)
        along = 1.0 - (bx * x + by * y)
        out = torch.stack([x + bx * along * f, y + by * along * f, along * g], dim=1)
        return out.numpy() if as_numpy else out

    def n_inverted(self, code):
        """Number of tetrahedra with volume <= 0 for a code."""
        return int(np.sum(signed_volumes(self.vertices(code), self.template.tets) <= 0))

    def mesh(self, code):
        """The deformed :class:`TetMesh` (raises if a tetrahedron inverts)."""
        return self.template.moved(self.vertices(code))


def axon_shape(template):
    """The axon code (:class:`AxonShape`) of a straight tube template.

    Parameters
    ----------
    template : TetMesh
        A straight tube along z, centred at z = 0, e.g. :func:`.mesh.tube_mesh`.

    Returns
    -------
    AxonShape
    """
    if not isinstance(template, TetMesh):
        raise TypeError(f"template must be a TetMesh, got {type(template).__name__}.")
    points = template.vertices[template.boundary_vertices]
    z = points[:, 2]
    length = float(z.max() - z.min())
    radial = np.hypot(points[:, 0], points[:, 1])
    side = (z > z.min() + 0.05 * length) & (z < z.max() - 0.05 * length)
    spread = radial[side].std() / radial[side].mean() if side.any() else np.inf
    centred = abs(z.max() + z.min()) < 1e-6 * length
    if not centred or spread > 0.05 or length < 2 * radial[side].mean():
        raise ValueError(
            "the axon code needs a straight tube along z centred at z = 0 (the "
            "'tube' template or meshfit.tube_mesh); got a template that is not."
        )
    return AxonShape(
        template=template, length=length, template_radius=float(radial[side].mean())
    )
