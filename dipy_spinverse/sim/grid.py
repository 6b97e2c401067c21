"""Tetrahedral grids of one voxel-scale box of tissue.

A :class:`TetGrid` is fixed geometry: vertices, tetrahedra (the *cells*, one
unknown each in the finite-volume simulator), the faces between cells (each of
which carries a membrane permeability), and the incidence arrays that the
simulator and the geometric priors need. Everything is a numpy array computed
once at construction; the grid never changes afterwards.

Lengths are in micrometres. The body-centred-cubic (BCC) lattice built by
:meth:`TetGrid.bcc` is *well centred*: every circumcentre lies strictly inside
its tetrahedron and the segment joining two neighbouring circumcentres is
normal to their shared face, which makes the two-point flux through
circumcentres a consistent (and, for the homogenised diffusivity, exact)
discretisation of the diffusion operator. See ``doc/validation/discretisation.md``.
"""

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..checks import check_choice, check_int, check_number, check_positive

__all__ = ["TetGrid", "CellGrid", "BOUNDARIES", "signed_volumes", "cell_adjacency"]

BOUNDARIES = ("reflecting", "periodic", "absorbing")

# Geometric keys: BCC vertices sit on multiples of a/2, so face centroids sit
# on multiples of a/6 and edge midpoints on multiples of a/4. Rounding scaled
# positions to integers identifies shared entities exactly, including across
# periodic wraps, without relying on vertex-index triples.
_FACE_KEY_SCALE = 6
_EDGE_KEY_SCALE = 4


class CellGrid:
    """What every grid of cells and faces offers (:class:`TetGrid`, and the
    sections of :mod:`~dipy_spinverse.sim.sections`): sizes and the faces
    between differently labelled cells."""

    @property
    def n_faces(self):
        """Number of interior faces (length of a permeability field)."""
        return len(self.faces)

    @property
    def volume(self):
        """Total volume of the cells (um^3)."""
        return float(self.cell_volumes.sum())

    def interface_faces(self, labels):
        """Interior faces whose two cells carry different labels.

        Parameters
        ----------
        labels : array_like (n_cells,)
            Any per-cell labels (bool or int), e.g. inside/outside a shape.

        Returns
        -------
        ndarray of bool (n_faces,)
        """
        labels = np.asarray(labels)
        if labels.shape != (self.n_cells,):
            raise ValueError(
                f"labels must have one value per cell ({self.n_cells},), got "
                f"shape {labels.shape}."
            )
        return labels[self.face_cells[:, 0]] != labels[self.face_cells[:, 1]]


@dataclass(frozen=True, repr=False, eq=False)
class TetGrid(CellGrid):
    """A fixed tetrahedral grid with per-face membrane permeabilities.

    Build one with :meth:`TetGrid.bcc`. All arrays are read-only numpy arrays;
    lengths in um, areas in um^2, volumes in um^3.

    Attributes
    ----------
    vertices : ndarray (V, 3)
        Vertex positions (wrapped into ``[0, size)`` for periodic grids).
    tets : ndarray (n_cells, 4)
        Vertex indices of each tetrahedron (positively oriented).
    size : float
        Side of the box (um).
    boundary : str
        ``"reflecting"``, ``"periodic"`` or ``"absorbing"``.
    wall_permeability : float
        Permeability of the outer wall for ``boundary="absorbing"`` (m/s).
    spacing : float
        Lattice spacing (the side of one BCC cube, um).
    faces : ndarray (n_faces, 3)
        Vertex indices of the interior faces; a permeability field is one
        value per row.
    face_cells : ndarray (n_faces, 2)
        The two cells of each interior face; ``face_normals`` point from the
        first to the second.
    face_areas, face_centroids, face_normals : ndarray
        Per interior face.
    face_distances : ndarray (n_faces, 2)
        Distance from each cell's circumcentre to the face (both > 0 on a
        well-centred grid).
    cell_volumes, cell_centroids, cell_circumcentres : ndarray
        Per cell (centroids and circumcentres wrapped for periodic grids).
    boundary_faces, boundary_cells, boundary_areas, boundary_distances :
    ndarray
        The outer faces (none on a periodic grid).
    edges : ndarray (n_edges, 2)
        Vertex indices of every grid edge.
    edge_faces : ndarray (n_edges, k_max)
        Interior faces meeting at each edge, padded with -1.
    edge_face_counts : ndarray (n_edges,)
        Number of interior faces at each edge.
    cell_faces : ndarray (n_cells, 4)
        Interior faces of each cell, padded with -1 (boundary sides).
    cell_neighbours : ndarray (n_cells, 4)
        The cell across each of ``cell_faces`` (the cell itself on padding).
    """

    vertices: np.ndarray
    tets: np.ndarray
    size: float
    boundary: str
    wall_permeability: float
    spacing: float
    tet_coords: np.ndarray = field(repr=False)
    cell_volumes: np.ndarray = field(init=False)
    cell_centroids: np.ndarray = field(init=False)
    cell_circumcentres: np.ndarray = field(init=False)
    faces: np.ndarray = field(init=False)
    face_cells: np.ndarray = field(init=False)
    face_areas: np.ndarray = field(init=False)
    face_centroids: np.ndarray = field(init=False)
    face_normals: np.ndarray = field(init=False)
    face_distances: np.ndarray = field(init=False)
    boundary_faces: np.ndarray = field(init=False)
    boundary_cells: np.ndarray = field(init=False)
    boundary_areas: np.ndarray = field(init=False)
    boundary_distances: np.ndarray = field(init=False)
    edges: np.ndarray = field(init=False)
    edge_faces: np.ndarray = field(init=False)
    edge_face_counts: np.ndarray = field(init=False)
    cell_neighbours: np.ndarray = field(init=False)
    cell_faces: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.boundary not in BOUNDARIES:
            raise ValueError(
                f"boundary={self.boundary!r} is not supported; use one of {BOUNDARIES}."
            )
        coords = self.tet_coords
        volumes = signed_volumes(coords)
        if np.any(volumes <= 0):
            raise ValueError("tets must be positively oriented and non-degenerate.")
        circ = _circumcentres(coords)
        _set(self, "cell_volumes", volumes)
        _set(self, "cell_centroids", self.wrap(coords.mean(axis=1)))
        _set(self, "cell_circumcentres", self.wrap(circ))
        face_tri = self._build_faces(coords, circ)
        self._build_edges(coords, face_tri)
        self._build_cell_adjacency()
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)

    # -- construction -----------------------------------------------------
    @classmethod
    def bcc(cls, size, n, *, boundary="reflecting", wall_permeability=0.1):
        """Body-centred-cubic tetrahedral grid of a cubic box.

        The box ``[0, size]^3`` is divided into ``n^3`` cubes. Every pair of
        face-adjacent cube centres spans an octahedron with the four corners
        of their shared square; the octahedron is split into four congruent
        tetrahedra around the centre-centre axis.

        Parameters
        ----------
        size : float
            Side of the box in um.
        n : int
            Cubes per side.
        boundary : {"reflecting", "periodic", "absorbing"}
            ``"reflecting"``: an impermeable outer wall. Only whole octahedra
            are kept (as in the published Spinverse grid), so the wall is the
            jagged surface of the octahedra, not the flat box, and the cells
            fill 3/4 of the box. ``"periodic"``: a periodic unit cell of
            tissue, no wall at all; the cells tile the box exactly.
            ``"absorbing"``: the jagged wall of ``"reflecting"`` with the
            Robin condition ``D dM/dn = -wall_permeability M`` of the
            published reference implementation.
        wall_permeability : float
            Wall permeability in m/s (um/us) for ``"absorbing"``.

        Returns
        -------
        TetGrid

        Examples
        --------
        >>> grid = TetGrid.bcc(80 / 3, 4)
        >>> grid.n_cells, grid.n_faces
        (576, 1008)
        """
        size = check_positive(size, "size", "um", example="80 / 3")
        n = check_int(n, "n", 1)
        check_choice(boundary, "boundary", BOUNDARIES)
        wall_permeability = check_number(
            wall_permeability, "wall_permeability", minimum=0.0, hint=" m/s"
        )
        periodic = boundary == "periodic"
        if n < 2:
            # Periodic: a cube would meet its own image. With a wall only
            # whole octahedra are kept, and one cube per side holds none.
            raise ValueError(
                f"A {boundary!r} BCC grid needs n >= 2 cubes per side, got {n}."
            )
        if boundary == "absorbing" and not wall_permeability > 0:
            raise ValueError(
                "wall_permeability must be > 0 m/s for an absorbing wall; use "
                "boundary='reflecting' for an impermeable one."
            )
        vertices, tets, coords = _bcc_lattice(size, n, periodic)
        return cls(
            vertices=vertices,
            tets=tets,
            size=size,
            boundary=boundary,
            wall_permeability=wall_permeability,
            spacing=size / n,
            tet_coords=coords,
        )

    # -- sizes ------------------------------------------------------------
    @property
    def n_cells(self):
        """Number of tetrahedra."""
        return len(self.tets)

    @property
    def periodic(self):
        """True for a periodic unit cell."""
        return self.boundary == "periodic"

    @cached_property
    def face_pairs(self):
        """Pairs of interior faces that share a grid edge, shape (P, 2)."""
        pairs = []
        k_max = self.edge_faces.shape[1]
        for i in range(k_max):
            for j in range(i + 1, k_max):
                both = (self.edge_faces[:, i] >= 0) & (self.edge_faces[:, j] >= 0)
                pairs.append(self.edge_faces[both][:, [i, j]])
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=int)
        return np.unique(np.sort(pairs, axis=1), axis=0)

    def __repr__(self):
        return (
            f"TetGrid(size={self.size:g} um, n_cells={self.n_cells}, "
            f"n_faces={self.n_faces}, boundary={self.boundary!r})"
        )

    # -- coordinates ----------------------------------------------------------
    def wrap(self, points):
        """Points mapped into the box on a periodic grid (unchanged otherwise)."""
        return np.mod(points, self.size) if self.periodic else points

    def displacement(self, points, centre):
        """``points - centre``, to the nearest periodic image on periodic grids."""
        d = points - centre
        if self.periodic:
            d = d - self.size * np.round(d / self.size)
        return d

    # -- internals ----------------------------------------------------------

    def _keys(self, points, scale):
        keys = np.rint(points * scale / self.spacing).astype(np.int64)
        if self.periodic:
            keys %= scale * int(round(self.size / self.spacing))
        return keys

    def _build_faces(self, coords, circ):
        # Face j of a tet is the face opposite its local vertex j.
        local = np.array([[1, 2, 3], [0, 3, 2], [0, 1, 3], [0, 2, 1]])
        tri = coords[:, local]  # (cells, 4, 3 vertices, 3)
        centroid = tri.mean(axis=2)
        cross = np.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
        area = 0.5 * np.linalg.norm(cross, axis=-1)
        # Local ordering is chosen so that ``cross`` points out of the tet.
        normal = cross / (2 * area[..., None])
        dist = np.einsum("cfk,cfk->cf", tri[:, :, 0] - circ[:, None], normal)
        if np.any(dist <= 1e-12 * self.size):
            raise ValueError(
                "The grid is not well centred (a circumcentre lies on or "
                "outside its tetrahedron); the two-point flux scheme needs a "
                "well-centred grid such as TetGrid.bcc."
            )
        keys = self._keys(centroid.reshape(-1, 3), _FACE_KEY_SCALE)
        _, inverse, counts = np.unique(
            keys, axis=0, return_inverse=True, return_counts=True
        )
        inverse = inverse.ravel()
        if counts.max() > 2:
            raise ValueError("A face is shared by more than two tetrahedra.")
        slot = np.arange(len(inverse))
        order = np.argsort(inverse, kind="stable")
        first = np.ones(len(inverse), dtype=bool)
        first[order[1:]] = inverse[order[1:]] != inverse[order[:-1]]
        # For each unique face: its first (and second, if interior) slot.
        owner = np.full(len(counts), -1)
        other = np.full(len(counts), -1)
        owner[inverse[slot[first]]] = slot[first]
        other[inverse[slot[~first]]] = slot[~first]
        interior = counts == 2
        s0, s1 = owner[interior], other[interior]
        cell0, loc0 = np.divmod(s0, 4)
        cell1, loc1 = np.divmod(s1, 4)
        tet_faces = self.tets[:, local]
        _set(self, "faces", tet_faces[cell0, loc0])
        _set(self, "face_cells", np.stack([cell0, cell1], axis=1))
        _set(self, "face_areas", area[cell0, loc0])
        _set(self, "face_centroids", self.wrap(centroid[cell0, loc0]))
        _set(self, "face_normals", normal[cell0, loc0])
        _set(
            self, "face_distances", np.stack([dist[cell0, loc0], dist[cell1, loc1]], 1)
        )
        sb = owner[~interior]
        cellb, locb = np.divmod(sb, 4)
        _set(self, "boundary_faces", tet_faces[cellb, locb])
        _set(self, "boundary_cells", cellb)
        _set(self, "boundary_areas", area[cellb, locb])
        _set(self, "boundary_distances", dist[cellb, locb])
        return tri[cell0, loc0]

    def _build_edges(self, coords, face_tri):
        pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
        mid = 0.5 * (coords[:, pairs[:, 0]] + coords[:, pairs[:, 1]])
        keys = self._keys(mid.reshape(-1, 3), _EDGE_KEY_SCALE)
        ukeys, first, inverse = np.unique(
            keys, axis=0, return_index=True, return_inverse=True
        )
        inverse = inverse.ravel()
        cell, local = np.divmod(first, 6)
        _set(self, "edges", self.tets[cell[:, None], pairs[local]])
        # Edges of each interior face, identified by the same midpoint keys.
        fmid = 0.5 * (face_tri[:, [0, 1, 2]] + face_tri[:, [1, 2, 0]])
        fkeys = self._keys(fmid.reshape(-1, 3), _EDGE_KEY_SCALE)
        lookup = {tuple(k): i for i, k in enumerate(ukeys)}
        face_edge = np.array([lookup[tuple(k)] for k in fkeys]).reshape(-1, 3)
        edge_of = face_edge.ravel()
        face_of = np.repeat(np.arange(self.n_faces), 3)
        order = np.argsort(edge_of, kind="stable")
        edge_of, face_of = edge_of[order], face_of[order]
        counts = np.bincount(edge_of, minlength=len(ukeys))
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(len(edge_of)) - start[edge_of]
        table = np.full((len(ukeys), max(counts.max(), 1)), -1)
        table[edge_of, rank] = face_of
        _set(self, "edge_faces", table)
        _set(self, "edge_face_counts", counts)

    def _build_cell_adjacency(self):
        faces, neighbours = cell_adjacency(self.face_cells, self.n_cells, 4)
        _set(self, "cell_faces", faces)
        _set(self, "cell_neighbours", neighbours)


def cell_adjacency(face_cells, n_cells, width):
    """The interior faces of each cell and the cell across each.

    Parameters
    ----------
    face_cells : ndarray (n_faces, 2)
    n_cells : int
    width : int
        Faces of a cell (4 for a tetrahedron, 3 for a triangle).

    Returns
    -------
    cell_faces : ndarray (n_cells, width)
        Padded with -1 where a side is on the outer wall.
    cell_neighbours : ndarray (n_cells, width)
        The cell itself on padding.
    """
    n_faces = len(face_cells)
    cells = face_cells.ravel()
    faces = np.repeat(np.arange(n_faces), 2)
    across = face_cells[:, ::-1].ravel()
    order = np.argsort(cells, kind="stable")
    cells, faces, across = cells[order], faces[order], across[order]
    counts = np.bincount(cells, minlength=n_cells)
    rank = np.arange(len(cells)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[cells]
    cell_faces = np.full((n_cells, width), -1)
    neighbours = np.tile(np.arange(n_cells)[:, None], (1, width))
    cell_faces[cells, rank] = faces
    neighbours[cells, rank] = across
    return cell_faces, neighbours


def _set(obj, name, value):
    object.__setattr__(obj, name, np.ascontiguousarray(value))


def signed_volumes(coords):
    """Signed volumes ``det(b - a, c - a, d - a) / 6`` of tetrahedra.

    Parameters
    ----------
    coords : ndarray (n, 4, 3)
        Corner coordinates of each tetrahedron.

    Returns
    -------
    volumes : ndarray (n,)
        Positive for a positively oriented tetrahedron.
    """
    e = coords[:, 1:] - coords[:, :1]
    return np.linalg.det(e) / 6.0


def _circumcentres(coords):
    p0 = coords[:, 0]
    e = coords[:, 1:] - p0[:, None]
    rhs = 0.5 * np.einsum("cij,cij->ci", e, e)
    return p0 + np.linalg.solve(e, rhs[..., None])[..., 0]


def _bcc_lattice(size, n, periodic):
    """Vertices, tets and unwrapped per-tet coordinates of a BCC lattice."""
    a = size / n
    m = n if periodic else n + 1  # corner lattice points per side

    def corner_id(i, j, k):
        if periodic:
            i, j, k = i % n, j % n, k % n
        return (i * m + j) * m + k

    def centre_id(i, j, k):
        return m**3 + ((i % n) * n + (j % n)) * n + (k % n)

    idx = np.arange(m)
    corners = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"), -1).reshape(-1, 3)
    cidx = np.arange(n)
    cubes = np.stack(np.meshgrid(cidx, cidx, cidx, indexing="ij"), -1).reshape(-1, 3)
    vertices = np.concatenate([corners * a, (cubes + 0.5) * a])

    tets, coords = [], []
    for axis in range(3):
        u, v = [ax for ax in range(3) if ax != axis]
        last = n if periodic else n - 1
        sel = cubes[cubes[:, axis] < last]
        c1 = (sel + 0.5) * a
        c2 = c1.copy()
        c2[:, axis] += a
        # Corners of the shared square, in cyclic order around the axis.
        base = sel.copy()
        base[:, axis] += 1
        offsets = [(0, 0), (1, 0), (1, 1), (0, 1)]
        square = []
        for du, dv in offsets:
            corner = base.copy()
            corner[:, u] += du
            corner[:, v] += dv
            square.append(corner)
        for p in range(4):
            q = (p + 1) % 4
            ids = np.stack(
                [
                    centre_id(*sel.T),
                    centre_id(*(sel + np.eye(3, dtype=int)[axis]).T),
                    corner_id(*square[p].T),
                    corner_id(*square[q].T),
                ],
                axis=1,
            )
            xyz = np.stack([c1, c2, square[p] * a, square[q] * a], axis=1)
            tets.append(ids)
            coords.append(xyz)
    tets = np.concatenate(tets)
    coords = np.concatenate(coords)
    # Orient every tet positively (swap the two corners where needed).
    flip = signed_volumes(coords) < 0
    tets[flip] = tets[flip][:, [0, 1, 3, 2]]
    coords[flip] = coords[flip][:, [0, 1, 3, 2]]
    return vertices, tets, coords
