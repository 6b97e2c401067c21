"""Cross-sections of straight fibres: a periodic triangular grid.

Tissue that does not change along an axis ``a`` (straight axons, dendrites,
any bundle of parallel tubes) has a Bloch-Torrey solution that factorises:
with ``M(x, t) = exp(-i k_a(t) s) m(y, t)``, ``s = x . a`` and ``y`` the
position in the plane normal to ``a``, the along-axis part is free diffusion
and the signal is

    S(TE) / S(0) = exp(-D b (g . a)^2) S_section(g - (g . a) a),

exactly, for a diffusivity ``D`` the same in every cell (Callaghan's
cylinder, SpinDoctor's 2-D cross-sections and MCMRSimulator's straight
fibres all use it). With a diffusivity per cell ``D(y)`` (intra- and
extra-axonal water apart, myelin) the factorisation holds cell by cell: the
section's magnetisation obeys its own equation plus a decay ``D(y)
k_a(t)^2``, ``k_a = gamma int g . a``, which the simulator integrates with
the section (:func:`~dipy_spinverse.sim.forward.simulate`). ``S_section`` is
a 2-D problem: on the periodic patch of
this module a few hundred triangles, where the tetrahedral patch of the same
spacing has thousands of cells, and the fibre is straight at any
orientation, where a tetrahedral grid holds it as a staircase (on the
resolution-6 BCC patch of a 1.4 um patch, the staircase slows diffusion
along the axis by about 6 %).

A :class:`SectionGrid` is the 2-D analogue of
:meth:`~dipy_spinverse.sim.grid.TetGrid.bcc`'s periodic grid: the
triangular lattice (equilateral up to a few per cent of stretch, which
makes the patch square), whose circumcentres lie inside their triangles
(well centred), so the two-point flux through circumcentres is
consistent. Its arrays carry the names and
meanings of :class:`~dipy_spinverse.sim.grid.TetGrid`'s, per um of fibre:
a cell's "volume" is its area times 1 um, a face's "area" is its edge's
length times 1 um, and positions are 3-D, in the plane normal to ``axis``;
:mod:`~dipy_spinverse.sim.operators` and the solvers then apply unchanged.
"""

import copy
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..checks import check_int, check_positive
from .grid import CellGrid, cell_adjacency

__all__ = ["SectionGrid", "fibre_frame"]

# The arrays that hold 3-D points or directions in the section's plane.
_EMBEDDED = ("cell_centroids", "cell_circumcentres", "face_centroids", "face_normals")
# Edge midpoints of the lattice sit on multiples of a / 4 along x and of
# h / 2 along y (h the row height): scaled and rounded, they identify the
# edges shared by two triangles, across periodic wraps too.
_X_KEYS, _Y_KEYS = 4, 2


@dataclass(frozen=True, repr=False, eq=False)
class SectionGrid(CellGrid):
    """A periodic triangular grid of the cross-section of straight fibres.

    Build one with :meth:`SectionGrid.triangular`. Lengths in um; "volumes"
    and "areas" are per um of fibre (um^2 and um): ``volume`` is the
    patch's area, ``n_faces`` its edges.

    Attributes
    ----------
    axis : ndarray (3,)
        Unit vector along the fibres.
    plane : ndarray (2, 3)
        Orthonormal in-plane axes: the section's point ``(u, v)`` is
        ``u plane[0] + v plane[1]``.
    extent : ndarray (2,)
        Sides of the periodic square along ``plane[0]`` and ``plane[1]``.
    size : float
        Side of the square (um).
    spacing : float
        Length of the triangles' edges along ``plane[0]`` (their base).
    row_height : float
        Height of a row of triangles along ``plane[1]``.
    boundary : str
        ``"periodic"``.
    cell_volumes, cell_centroids, cell_circumcentres : ndarray
        Per triangle (areas x 1 um; 3-D points, wrapped into the square).
    faces : ndarray (n_faces, 2)
        Vertex indices of every edge (all are interior on a periodic grid);
        a permeability field is one value per row.
    face_cells, face_areas, face_centroids, face_normals, face_distances :
    ndarray
        As :class:`~dipy_spinverse.sim.grid.TetGrid`'s, per edge (normals
        in the plane, from ``face_cells[:, 0]`` to ``face_cells[:, 1]``).
    cell_faces, cell_neighbours : ndarray (n_cells, 3)
        Edges of each triangle and the triangle across each.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    extent: np.ndarray
    axis: np.ndarray
    plane: np.ndarray
    spacing: float
    row_height: float
    tri_coords: np.ndarray = field(repr=False)
    boundary: str = "periodic"
    cell_volumes: np.ndarray = field(init=False)
    cell_centroids: np.ndarray = field(init=False)
    cell_circumcentres: np.ndarray = field(init=False)
    faces: np.ndarray = field(init=False)
    face_cells: np.ndarray = field(init=False)
    face_areas: np.ndarray = field(init=False)
    face_centroids: np.ndarray = field(init=False)
    face_normals: np.ndarray = field(init=False)
    face_distances: np.ndarray = field(init=False)
    cell_faces: np.ndarray = field(init=False)
    cell_neighbours: np.ndarray = field(init=False)

    def __post_init__(self):
        coords = self.tri_coords  # (n, 3, 2), unwrapped, counter-clockwise
        areas = _signed_areas(coords)
        if np.any(areas <= 0):
            raise ValueError("triangles must be counter-clockwise, non-degenerate.")
        circ = _circumcentres(coords)
        _set(self, "cell_volumes", areas)  # x 1 um of fibre
        _set(self, "cell_centroids", self._embed(self.wrap2(coords.mean(1))))
        _set(self, "cell_circumcentres", self._embed(self.wrap2(circ)))
        self._build_faces(coords, circ)
        self._build_adjacency()
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)

    @classmethod
    def triangular(cls, size, n, *, axis=(0.0, 0.0, 1.0)):
        """The triangular lattice of a square periodic patch.

        The square of side ``size`` um is cut into ``2 r`` rows of ``n``
        triangle edges, ``r = round(n / sqrt 3)`` (the lattice is periodic
        only over an even number of rows), so the triangles are isosceles,
        equilateral up to a stretch of the rows by ``n / (sqrt 3 r)``
        (0.87-1.15 for n = 3-9, within 1 +- 0.06 from n = 10): all their
        angles stay acute (53-68 degrees at worst), so they are well
        centred. The patch is the same square
        at every ``n``, so one tissue can be drawn at two resolutions. It
        holds ``4 n r`` triangles.

        Parameters
        ----------
        size : float
            Side of the square patch in um.
        n : int
            Triangle edges across it (>= 3).
        axis : array_like (3,)
            Direction of the fibres, any orientation (normalised here).

        Returns
        -------
        SectionGrid

        Examples
        --------
        >>> grid = SectionGrid.triangular(4.0, 12)
        >>> grid.n_cells, grid.n_faces
        (336, 504)
        """
        size = check_positive(size, "size", "um", example="4.0")
        n = check_int(n, "n", 3)
        axis = _unit_axis(axis)
        vertices, triangles, coords, rows = _triangular_lattice(size, n)
        return cls(
            vertices=vertices,
            triangles=triangles,
            extent=np.array([size, size]),
            axis=axis,
            plane=fibre_frame(axis)[:2],
            spacing=size / n,
            row_height=size / rows,
            tri_coords=coords,
        )

    # -- sizes ----------------------------------------------------------------
    @property
    def n_cells(self):
        """Number of triangles."""
        return len(self.triangles)

    @property
    def size(self):
        """Side of the square patch (um)."""
        return float(self.extent[0])

    @property
    def periodic(self):
        """Always True: the section is a periodic patch."""
        return True

    @cached_property
    def section_positions(self):
        """Circumcentres in the plane's coordinates ``(u, v)`` (n_cells, 2)."""
        return self.cell_circumcentres @ self.plane.T

    def oriented(self, axis):
        """The same lattice with its fibres along ``axis``: only the
        embedding of the in-plane points and normals changes (cheaper than
        building the lattice again).

        Parameters
        ----------
        axis : array_like (3,)

        Returns
        -------
        SectionGrid
        """
        axis = _unit_axis(axis)
        frame = fibre_frame(axis)
        turn = self.plane.T @ frame[:2]  # old 3-D -> in-plane -> new 3-D
        out = copy.copy(self)
        out.__dict__.pop("section_positions", None)
        object.__setattr__(out, "axis", axis)
        object.__setattr__(out, "plane", frame[:2])
        for name in _EMBEDDED:
            value = np.ascontiguousarray(getattr(self, name) @ turn)
            value.setflags(write=False)
            object.__setattr__(out, name, value)
        return out

    def __repr__(self):
        return (
            f"SectionGrid(extent={self.extent[0]:g} x {self.extent[1]:g} um, "
            f"n_cells={self.n_cells}, axis={np.round(self.axis, 4).tolist()})"
        )

    # -- coordinates ------------------------------------------------------------
    def wrap2(self, points):
        """In-plane points ``(..., 2)`` mapped into the square."""
        return np.mod(points, self.extent)

    def displacement2(self, points, centre):
        """In-plane ``points - centre`` to the nearest periodic image."""
        d = np.asarray(points) - centre
        return d - self.extent * np.round(d / self.extent)

    def _embed(self, points):
        return points @ self.plane

    # -- internals ------------------------------------------------------------
    def _build_faces(self, coords, circ):
        a = self.spacing
        h = self.row_height
        pairs = np.array([[1, 2], [2, 0], [0, 1]])  # edge j is opposite corner j
        mid = 0.5 * (coords[:, pairs[:, 0]] + coords[:, pairs[:, 1]])  # (n, 3, 2)
        mid = self.wrap2(mid)
        keys = np.rint(mid / [a / _X_KEYS, h / _Y_KEYS]).astype(np.int64)
        keys %= np.rint(self.extent / [a / _X_KEYS, h / _Y_KEYS]).astype(np.int64)
        flat = keys.reshape(-1, 2)
        _, first, inverse = np.unique(
            flat, axis=0, return_index=True, return_inverse=True
        )
        inverse = inverse.ravel()
        counts = np.bincount(inverse)
        if np.any(counts != 2):
            raise RuntimeError("every edge of a periodic lattice has two triangles.")
        order = np.argsort(inverse, kind="stable")
        cells = (order // 3).reshape(-1, 2)  # the two triangles of each edge
        local = (order % 3).reshape(-1, 2)
        tri = self.triangles
        _set(self, "faces", tri[cells[:, 0, None], pairs[local[:, 0]]])
        _set(self, "face_cells", cells)
        ends = coords[cells[:, 0, None], pairs[local[:, 0]]]  # (n_faces, 2, 2)
        _set(self, "face_areas", np.linalg.norm(ends[:, 1] - ends[:, 0], axis=1))
        centre = mid.reshape(-1, 2)[first]  # in key order, as the edges
        _set(self, "face_centroids", self._embed(centre))
        # From circumcentre 0 to circumcentre 1 through the edge: the two
        # segments are normal to it on a well-centred grid.
        to_edge0 = self.displacement2(centre, circ[cells[:, 0]])
        to_edge1 = self.displacement2(circ[cells[:, 1]], centre)
        normal = to_edge0 + to_edge1
        length = np.linalg.norm(normal, axis=1)
        if np.any(length <= 0):
            raise RuntimeError("triangles are not well centred.")
        unit = normal / length[:, None]
        distances = np.stack(
            [
                np.einsum("ij,ij->i", to_edge0, unit),
                np.einsum("ij,ij->i", to_edge1, unit),
            ],
            axis=1,
        )
        _set(self, "face_normals", self._embed(unit))
        _set(self, "face_distances", distances)

    def _build_adjacency(self):
        faces, neighbours = cell_adjacency(self.face_cells, self.n_cells, 3)
        _set(self, "cell_faces", faces)
        _set(self, "cell_neighbours", neighbours)


def _unit_axis(axis):
    axis = np.asarray(axis, dtype=float)
    norm = np.linalg.norm(axis) if axis.shape == (3,) else 0.0
    if not (np.isfinite(norm) and norm > 0):
        raise ValueError(
            f"axis must be a nonzero 3-vector (the fibres' direction), got {axis!r}."
        )
    return axis / norm


def _set(obj, name, value):
    object.__setattr__(obj, name, np.ascontiguousarray(value))


def _signed_areas(coords):
    e1 = coords[:, 1] - coords[:, 0]
    e2 = coords[:, 2] - coords[:, 0]
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])


def _circumcentres(coords):
    p0 = coords[:, 0]
    e = coords[:, 1:] - p0[:, None]  # (n, 2, 2)
    rhs = 0.5 * np.einsum("cij,cij->ci", e, e)
    return p0 + np.linalg.solve(e, rhs[..., None])[..., 0]


def fibre_frame(axis):
    """The right-handed frame (3, 3) of a unit fibre direction: two unit
    vectors spanning the section's plane, then ``axis``."""
    helper = np.eye(3)[int(np.argmin(np.abs(axis)))]
    first = np.cross(axis, helper)
    first /= np.linalg.norm(first)
    return np.stack([first, np.cross(axis, first), axis])


def _triangular_lattice(size, n):
    """Vertices, triangles, unwrapped coordinates and rows of the lattice."""
    a = size / n
    rows = 2 * max(1, int(round(n / np.sqrt(3))))
    h = size / rows  # the row height: equilateral would be a sqrt(3) / 2
    i, j = np.meshgrid(np.arange(n), np.arange(rows), indexing="ij")
    i, j = i.ravel(), j.ravel()
    vertices = np.stack([(i + 0.5 * (j % 2)) * a, j * h], axis=1)

    def vid(ii, jj):
        return (ii % n) * rows + (jj % rows)

    def xy(ii, jj):  # unwrapped
        return np.stack([(ii + 0.5 * (jj % 2)) * a, jj * h], axis=-1)

    even = j % 2 == 0
    # Counter-clockwise corners of the two triangles over each vertex (i, j):
    # rows of even j sit a / 2 left of the rows above them, odd ones right.
    flag = even[:, None, None]
    up = np.where(flag, [[0, 0], [1, 0], [0, 1]], [[0, 0], [1, 0], [1, 1]])
    down = np.where(flag, [[1, 0], [1, 1], [0, 1]], [[0, 0], [1, 1], [0, 1]])
    corners = np.concatenate([up, down])  # (2 n rows, 3, 2): (di, dj) offsets
    ii = np.concatenate([i, i])[:, None] + corners[..., 0]
    jj = np.concatenate([j, j])[:, None] + corners[..., 1]
    triangles = vid(ii, jj)
    coords = xy(ii, jj)  # rows is even: a wrapped row keeps its parity
    return vertices, triangles, coords, rows
