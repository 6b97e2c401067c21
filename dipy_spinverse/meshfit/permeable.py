"""Finite-element signals of regions joined by a permeable membrane: a cell
and the water around it in the voxel.

The mesh covers every region (a cell and its surroundings, conforming at the
membrane); each tetrahedron carries a region label. Vertices on a membrane
are duplicated, one copy per region, so the magnetisation may jump there,
and the membrane's flux ``D du/dn = kappa (u_other - u)`` enters the weak
form as ``kappa int_membrane (u_a - u_b)(v_a - v_b)``:

    (D K + kappa J) for K the P1 stiffness of the split mesh and J the
    membrane matrix (per triangle of area A: A / 12 (1 + delta_ij) on the
    jumps of its three vertex pairs).

The rest is :mod:`.fem`'s matrix formalism: modes of ``K + (kappa / D) J``
in the mass metric below the length-scale cut-off, held fixed; the tracked
matrices (vertices, ``kappa``, ``D``) projected on them; Chebyshev
propagators. Derivatives with respect to the vertices, ``kappa`` and ``D``
are those of the reduced model (the basis held fixed, as in :mod:`.fem`).
The outer boundary of the mesh reflects (a reflecting voxel), and the signal
is normalised by the whole volume (uniform magnetisation in every region at
the start).

Limits (tested): ``kappa = 0`` gives the volume-weighted sum of the regions'
own signals, ``kappa -> inf`` the signal of the unsplit mesh; between them
the grid simulator on the same tetrahedra agrees within its discretisation.

Units: um, us; ``kappa`` in m/s (= um/us), ``D`` in mm^2/s (= um^2/us).
"""

from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

from ..checks import check_number
from ..sim.sequences import as_protocol
from .fem import (
    CHEBYSHEV_TOL,
    DEFAULT_LENGTH_SCALE,
    assemble,
    laplace_modes,
    orthonormal_system,
    reduced_operators,
    reduced_signal,
    scalar_diffusivity,
)
from .mesh import TetMesh

__all__ = ["SplitMesh", "split_regions", "membrane_matrix", "permeable_signal"]


@dataclass(frozen=True, eq=False)
class SplitMesh:
    """A mesh whose membrane vertices are duplicated, one copy per region.

    Attributes
    ----------
    mesh : TetMesh
        The split mesh (its tetrahedra in the original order).
    source : ndarray of int (V',)
        Original vertex of each split vertex.
    membrane : ndarray of int (F, 2, 3)
        Each membrane triangle's three vertices on either side (split
        indices; the same original vertex in each column).
    n_source : int
        Vertices of the original mesh.
    """

    mesh: TetMesh
    source: np.ndarray
    membrane: np.ndarray
    n_source: int

    def vertices(self, vertices):
        """Split vertex positions (V', 3) from the original (V, 3) ones."""
        return vertices[torch.as_tensor(self.source)]


def split_regions(mesh, regions):
    """Duplicate the vertices that regions share.

    Parameters
    ----------
    mesh : TetMesh
        Covers every region, conforming where they meet.
    regions : array_like of int (n_tets,)
        Region of each tetrahedron (any integers).

    Returns
    -------
    SplitMesh
    """
    if not isinstance(mesh, TetMesh):
        raise TypeError(f"mesh must be a TetMesh, got {type(mesh).__name__}.")
    regions = np.asarray(regions)
    if regions.shape != (mesh.n_tets,) or not np.issubdtype(regions.dtype, np.integer):
        raise ValueError(
            f"regions must be {mesh.n_tets} integers, one per tetrahedron, got "
            f"{regions.dtype} of shape {regions.shape}."
        )
    _, region = np.unique(regions, return_inverse=True)
    n_regions = int(region.max()) + 1
    # One split vertex per (vertex, region) pair in use.
    pairs = mesh.tets * n_regions + region[:, None]
    keys, split_tets = np.unique(pairs, return_inverse=True)
    split_tets = split_tets.reshape(mesh.tets.shape)
    source = keys // n_regions
    faces = np.sort(mesh.tets[:, _FACES], axis=2).reshape(-1, 3)  # (4T, 3)
    owner = np.repeat(np.arange(mesh.n_tets), 4)
    order = np.lexsort(faces.T[::-1])
    faces, owner = faces[order], owner[order]
    shared = np.flatnonzero(np.all(faces[1:] == faces[:-1], axis=1))
    a, b = owner[shared], owner[shared + 1]
    across = region[a] != region[b]
    triangles = faces[shared[across]]
    sides = np.stack([region[a[across]], region[b[across]]], axis=1)
    lookup = np.searchsorted(keys, triangles[:, None, :] * n_regions + sides[..., None])
    split = TetMesh(vertices=mesh.vertices[source], tets=split_tets)
    return SplitMesh(split, source, lookup, mesh.n_vertices)


# The four faces of a tetrahedron (vertex positions in it).
_FACES = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


def membrane_matrix(split, vertices=None):
    """Sparse membrane matrix J (V', V') of a split mesh (scipy CSR).

    Parameters
    ----------
    split : SplitMesh
        The mesh split along its membrane (``split.membrane``: (F, 2, 3)
        vertex indices of each membrane triangle on its two sides).
    vertices : array_like (V', 3), optional
        Vertex positions to use; None: ``split.mesh.vertices``.

    Returns
    -------
    scipy.sparse.csr_matrix (V', V')
        The membrane matrix J.
    """
    if vertices is None:
        vertices = split.mesh.vertices
    tri = split.membrane  # (F, 2, 3)
    points = torch.tensor(np.asarray(vertices, dtype=np.float64)[tri[:, 0]])
    area = _areas(points).numpy()
    local = area[:, None, None] / 12.0 * (1.0 + np.eye(3))  # (F, 3, 3)
    rows, cols, data = [], [], []
    for s, t, sign in ((0, 0, 1.0), (1, 1, 1.0), (0, 1, -1.0), (1, 0, -1.0)):
        rows.append(np.repeat(tri[:, s], 3, axis=1).ravel())
        cols.append(np.tile(tri[:, t], (1, 3)).ravel())
        data.append(sign * local.ravel())
    n = split.mesh.n_vertices
    return scipy.sparse.coo_matrix(
        (np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, n),
    ).tocsr()


def _basis(split, vertices, kappa, diffusivity, length_scale):
    """Modes of ``K + (kappa / D) J`` of the split mesh at these split
    vertex positions (V', 3)."""
    moved = split.mesh.moved(vertices.detach().numpy())
    stiffness, mass = assemble(moved)
    ratio = float(kappa) / float(diffusivity)
    stiffness = stiffness + ratio * membrane_matrix(split, moved.vertices)
    return laplace_modes(stiffness, mass, length_scale=length_scale)


def _areas(points):
    """Areas (F,) of triangles (F, 3, 3)."""
    cross = torch.linalg.cross(points[:, 1] - points[:, 0], points[:, 2] - points[:, 0])
    return 0.5 * cross.norm(dim=1)


def _reduced_membrane(vertices, membrane, modes):
    """``Phi^T J Phi`` (m, m) for split vertex positions (V', 3)."""
    tri = torch.as_tensor(membrane)
    area = _areas(vertices[tri[:, 0]])
    jump = modes[tri[:, 0]] - modes[tri[:, 1]]  # (F, 3, m)
    total = jump.sum(1)  # (F, m)
    w = (area / 12.0)[:, None]
    flat = jump.reshape(-1, jump.shape[-1])
    node = (area / 12.0).repeat_interleave(3)[:, None]
    return (total * w).T @ total + (flat * node).T @ flat


def permeable_signal(
    split,
    protocol,
    *,
    permeability,
    vertices=None,
    diffusivity=2e-3,
    basis=None,
    length_scale=DEFAULT_LENGTH_SCALE,
    tol=CHEBYSHEV_TOL,
):
    """Normalised signal of regions joined by a permeable membrane.

    Parameters
    ----------
    split : SplitMesh
        From :func:`split_regions`.
    protocol : Protocol or dipy.core.gradients.GradientTable
    permeability : float or Tensor
        Membrane permeability in m/s (>= 0); may require grad.
    vertices : Tensor (V, 3), optional
        Positions of the *original* (unsplit) vertices in um; may require
        grad. Default: the mesh's.
    diffusivity : float or Tensor
        Intrinsic diffusivity in mm^2/s, the same in every region; may
        require grad.
    basis : MeshBasis, optional
        Fixed modes of the split mesh (default: of ``K + (kappa / D) J`` at
        the given vertices, permeability and diffusivity).
    length_scale : float
        Cut-off of the modes when ``basis`` is computed here (um).
    tol : float
        Truncation tolerance of each Chebyshev propagator.

    Returns
    -------
    Tensor (n_acquisitions,)
        ``|S(TE)| / S(0)`` of the whole mesh, in protocol order (float64).
    """
    if not isinstance(split, SplitMesh):
        raise TypeError(
            f"split must be a SplitMesh (split_regions), got {type(split).__name__}."
        )
    protocol = as_protocol(protocol)
    tol = check_number(tol, "tol", minimum=1e-15, maximum=1e-2)
    n_original = split.n_source
    if vertices is None:
        vertices = torch.tensor(split.mesh.vertices, dtype=torch.float64)
    else:
        if tuple(vertices.shape) != (n_original, 3):
            raise ValueError(
                f"vertices must be the {n_original} original (unsplit) vertex "
                f"positions, shape ({n_original}, 3), got {tuple(vertices.shape)}."
            )
        vertices = split.vertices(vertices)
    dtype = vertices.dtype
    try:
        kappa = torch.as_tensor(permeability, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        kappa = None  # e.g. a string
    if kappa is None or kappa.ndim or not torch.isfinite(kappa) or kappa < 0:
        raise ValueError(
            f"permeability must be a finite scalar >= 0 (m/s), got {permeability!r}."
        )
    diffusivity = scalar_diffusivity(diffusivity, dtype)
    if basis is None:
        basis = _basis(split, vertices, kappa, diffusivity, length_scale)
    if basis.modes.shape[0] != split.mesh.n_vertices:
        raise ValueError("basis was computed for a mesh with another vertex count.")
    modes = torch.tensor(basis.modes, dtype=dtype)
    tets = torch.tensor(split.mesh.tets)
    stiffness, mass, moments, load = reduced_operators(vertices, tets, modes)
    membrane = _reduced_membrane(vertices, split.membrane, modes)
    system = orthonormal_system(
        stiffness + (kappa / diffusivity) * membrane, mass, moments, load
    )
    return reduced_signal(system, protocol, diffusivity, basis, vertices, tol)
