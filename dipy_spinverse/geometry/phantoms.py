"""Ground-truth substrates placed in a fixed tetrahedral grid.

A :class:`Phantom` is what the inversion tries to recover: one permeability
per interior face of a :class:`~dipy_spinverse.sim.grid.TetGrid` (membrane faces
carry ``kappa``, every other face ``inf``, i.e. no membrane) and one label per
cell (0 for the extracellular space, ``k`` for the k-th cell).

Shapes are placed by *membership*: a grid cell belongs to a shape when its
centroid lies inside (``membership="centroid"``, the default) or when all four
of its vertices do (``membership="vertices"``, which reproduces the published
Spinverse targets: 48-112 inside cells of 576 on the 80/3 um grid, see
:func:`published_phantoms`). The membrane is then exactly the set of faces
between cells of different labels, so it is always a closed staircase surface
made of grid faces (closed by the outer wall where a shape runs into it).

Coordinates are in um in the grid's box ``[0, size]^3``; the default centre
is the box centre. On periodic grids a point is tested with its
minimum-image displacement from the shape's centre, so a shape that crosses
the box wraps around, and a straight cylinder along a box axis running through
the voxel is the periodic infinite cylinder; a shape larger than half the box
(or not aligned with the lattice, such as a tilted or bent tube running through
the voxel) is cut where the minimum image flips.

Staircase error: a cell whose membership differs from the exact partition of
space lies within ``delta`` of the shape's surface, ``delta`` being the
largest distance from a cell's centroid to its vertices (``"centroid"``;
``sqrt(5)/4 * spacing`` on BCC grids) or the largest cell diameter
(``"vertices"``; one spacing). So ``|V_cells - V_shape| <= area * delta`` to
first order (:func:`staircase_bound`). With centroid membership the errors on
the two sides of the surface largely cancel (a few per cent once a shape is
several cells across); ``"vertices"`` keeps only cells entirely inside and
always underestimates the volume.
"""

import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from ..checks import check_positive

__all__ = [
    "Phantom",
    "MEMBERSHIPS",
    "from_function",
    "cylinder",
    "sphere",
    "torus",
    "bent_axon",
    "circular_arc",
    "beaded_axon",
    "packed_cylinders",
    "cells_of_sizes",
    "published_phantoms",
    "staircase_bound",
    "axial_coordinates",
]

MEMBERSHIPS = ("centroid", "vertices")
CELL_SHAPES = ("sphere", "cube")

# Points closer than this (relative to the lattice spacing) to a shape's
# surface count as outside. BCC centroids and vertices sit on a rational
# lattice, so exact ties are common (32 centroids of the published grid lie at
# exactly 10 um from the axis of the published 10 um cylinder); the tolerance
# resolves them the same way on every machine instead of by rounding noise.
_TIE_TOL = 1e-9
# Below this fraction of extracellular cells a phantom is suspicious: the
# signal then carries almost no information about the outside of the shape.
_MIN_OUTSIDE_FRACTION = 0.05
# Points per chunk times polyline segments in the tube distance (memory bound).
_CHUNK = 2**20


@dataclass(frozen=True, eq=False)
class Phantom:
    """A ground-truth membrane configuration on a grid.

    Parameters
    ----------
    permeability : ndarray (n_faces,)
        Permeability of every interior face of the grid in m/s (= um/us):
        the membrane permeability on membrane faces, ``inf`` (no membrane)
        elsewhere. Ready for :func:`dipy_spinverse.simulate`.
    labels : ndarray of int (n_cells,)
        0 outside every cell, ``k`` inside the k-th cell (1-based).
    name : str
        Short name of the shape.
    params : dict
        The arguments the shape was built from (for reports).

    Attributes
    ----------
    barrier : ndarray of bool (n_faces,)
        Membrane faces (finite permeability).
    inside : ndarray of bool (n_cells,)
        Cells inside any cell of the phantom.
    n_labels : int
        Number of cells of the phantom.
    """

    permeability: np.ndarray
    labels: np.ndarray
    name: str = "phantom"
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        kappa = np.array(self.permeability, dtype=float)
        labels = np.asarray(self.labels)
        if kappa.ndim != 1 or labels.ndim != 1:
            raise ValueError(
                "permeability must be one value per interior face and labels one "
                f"value per cell (1-D), got shapes {kappa.shape} and {labels.shape}."
            )
        if np.any(np.isnan(kappa)) or np.any(kappa < 0):
            raise ValueError("permeability must be >= 0 (inf for no membrane).")
        if labels.size and (
            not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
        ):
            raise ValueError("labels must be non-negative integers.")
        labels = labels.astype(np.int64)
        kappa.setflags(write=False)
        labels.setflags(write=False)
        object.__setattr__(self, "permeability", kappa)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "params", dict(self.params))

    @property
    def barrier(self):
        """Membrane faces: those with a finite permeability."""
        return np.isfinite(self.permeability)

    @property
    def inside(self):
        """Cells inside any cell of the phantom (``labels > 0``)."""
        return self.labels > 0

    @property
    def n_labels(self):
        """Number of cells of the phantom."""
        return int(self.labels.max(initial=0))

    @classmethod
    def from_labels(cls, grid, labels, *, kappa=1e-5, name="phantom", params=None):
        """Phantom with a membrane between every two differently labelled cells.

        Parameters
        ----------
        grid : TetGrid
        labels : array_like of int (n_cells,)
            0 outside, ``k`` inside the k-th cell.
        kappa : float
            Membrane permeability in m/s, in ``[0, inf)``.
        name : str
        params : dict, optional

        Returns
        -------
        Phantom
        """
        kappa = _check_kappa(kappa)
        labels = np.asarray(labels)
        membrane = grid.interface_faces(labels)
        permeability = np.where(membrane, kappa, np.inf)
        return cls(permeability, labels, name=name, params=dict(params or {}))

    def __repr__(self):
        return (
            f"Phantom(name={self.name!r}, n_labels={self.n_labels}, "
            f"inside_cells={int(self.inside.sum())}, "
            f"membrane_faces={int(self.barrier.sum())})"
        )


# -- generic construction ---------------------------------------------------
def from_function(
    grid, inside, *, kappa=1e-5, membership="centroid", name="custom", params=None
):
    """Phantom from any inside test.

    Parameters
    ----------
    grid : TetGrid
    inside : callable
        ``inside(points)`` with ``points`` of shape (N, 3) in um (absolute,
        wrapped into the box on periodic grids) returns N bools (one cell) or
        N non-negative ints (0 outside, ``k`` in the k-th cell).
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}
        A cell takes the label of its centroid, or (``"vertices"``) the label
        its four vertices share (0 when they differ).
    name : str
    params : dict, optional

    Returns
    -------
    Phantom
    """
    if not callable(inside):
        raise ValueError("inside must be a callable mapping (N, 3) points to labels.")
    points = _membership_points(grid, membership)
    n, k = points.shape[:2]
    points = points.reshape(-1, 3)
    if grid.periodic:
        # Tet vertices are stored unwrapped; the callable sees the box.
        points = np.mod(points, grid.size)
    values = np.asarray(inside(points))
    if values.shape != (n * k,):
        raise ValueError(
            f"inside returned shape {values.shape} for {n * k} points; expected "
            "one label per point."
        )
    values = values.astype(np.int64).reshape(n, k)
    if np.any(values < 0):
        raise ValueError("inside must return non-negative labels.")
    labels = np.where(np.all(values == values[:, :1], axis=1), values[:, 0], 0)
    return _finish(grid, labels, kappa, name, dict(params or {}))


def staircase_bound(grid, *, area, membership="centroid"):
    """Upper bound on the volume error of a shape placed by membership.

    Every cell whose membership differs from the exact partition lies within
    ``delta`` of the shape's surface, ``delta`` being the largest distance
    from a cell's membership point to its vertices (``"centroid"``) or the
    largest cell diameter (``"vertices"``); the error is thus at most
    ``area * delta`` to first order in the surface curvature.

    Parameters
    ----------
    grid : TetGrid
    area : float
        Surface area of the shape inside the grid (um^2).
    membership : {"centroid", "vertices"}

    Returns
    -------
    float
        Volume bound in um^3.
    """
    _check_membership(membership)
    coords = grid.tet_coords
    if membership == "centroid":
        spread = coords - coords.mean(axis=1, keepdims=True)
        delta = np.linalg.norm(spread, axis=-1).max()
    else:
        diff = coords[:, :, None] - coords[:, None]
        delta = np.linalg.norm(diff, axis=-1).max()
    return float(area * delta)


# -- single cells --------------------------------------------------------------
def cylinder(
    grid,
    *,
    radius,
    length=None,
    axis=(0, 0, 1),
    centre=None,
    kappa=1e-5,
    membership="centroid",
):
    """A straight cylinder, running through the voxel or capped.

    Parameters
    ----------
    grid : TetGrid
    radius : float
        Radius in um.
    length : float, optional
        Length in um between flat caps centred on ``centre``. ``None``: an
        infinite cylinder running through the voxel (closed by the outer wall
        on non-periodic grids; a length beyond the box does the same).
    axis : array_like (3,)
        Direction of the axis (normalised here).
    centre : array_like (3,), optional
        A point on the axis in um (default: the box centre).
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radius = check_positive(radius, "radius", "um")
    length = None if length is None else check_positive(length, "length", "um")
    axis = _unit(axis)
    centre = _centre(grid, centre)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        return _capped(rho - radius, along, length)

    params = dict(
        radius=radius, length=length, axis=_floats(axis), centre=_floats(centre)
    )
    return _single(grid, level, kappa, membership, "cylinder", params)


def sphere(grid, *, radius, centre=None, kappa=1e-5, membership="centroid"):
    """A sphere.

    Parameters
    ----------
    grid : TetGrid
    radius : float
        Radius in um.
    centre : array_like (3,), optional
        Centre in um (default: the box centre).
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radius = check_positive(radius, "radius", "um")
    centre = _centre(grid, centre)

    def level(points):
        return np.linalg.norm(grid.displacement(points, centre), axis=1) - radius

    params = dict(radius=radius, centre=_floats(centre))
    return _single(grid, level, kappa, membership, "sphere", params)


def torus(
    grid,
    *,
    major,
    minor,
    axis=(0, 0, 1),
    centre=None,
    kappa=1e-5,
    membership="centroid",
):
    """A ring torus.

    Parameters
    ----------
    grid : TetGrid
    major : float
        Distance from the centre to the centre line of the tube (um).
    minor : float
        Radius of the tube (um), smaller than ``major``.
    axis : array_like (3,)
        Symmetry axis (normal to the plane of the ring).
    centre : array_like (3,), optional
        Centre in um (default: the box centre).
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    major = check_positive(major, "major", "um")
    minor = check_positive(minor, "minor", "um")
    if minor >= major:
        raise ValueError(
            f"minor ({minor:g} um) must be smaller than major ({major:g} um) for a "
            "ring torus with a hole."
        )
    axis = _unit(axis)
    centre = _centre(grid, centre)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        return np.hypot(rho - major, along) - minor

    params = dict(major=major, minor=minor, axis=_floats(axis), centre=_floats(centre))
    return _single(grid, level, kappa, membership, "torus", params)


def circular_arc(*, centre, curvature_radius, axis=(0, 0, 1), bend=None, half_angle):
    """A circular arc as a curve for :func:`bent_axon`.

    The arc passes through ``centre`` tangent to ``axis`` and bends towards
    ``bend``.

    Parameters
    ----------
    centre : array_like (3,)
        Midpoint of the arc (um).
    curvature_radius : float
        Radius of the circle (um).
    axis : array_like (3,)
        Tangent at the midpoint.
    bend : array_like (3,), optional
        Direction the arc bends towards (made normal to ``axis``); default the
        box axis least aligned with ``axis``, made normal to it (x for an
        axis along z).
    half_angle : float
        Half the angle the arc subtends (radians, in ``(0, pi]``).

    Returns
    -------
    callable
        ``curve(t)`` for ``t`` in ``[0, 1]``, returning (len(t), 3) points.
    """
    radius = check_positive(curvature_radius, "curvature_radius", "um")
    if not 0 < half_angle <= math.pi:
        raise ValueError(f"half_angle must be in (0, pi], got {half_angle!r}.")
    axis = _unit(axis)
    centre = np.asarray(centre, dtype=float)
    normal = _frame(axis)[0] if bend is None else _unit(bend)
    normal = normal - (normal @ axis) * axis
    if np.linalg.norm(normal) < 1e-9:
        raise ValueError("bend must not be parallel to axis.")
    normal = normal / np.linalg.norm(normal)

    def curve(t):
        theta = (2 * np.asarray(t, dtype=float) - 1) * half_angle
        return (
            centre
            + radius * np.sin(theta)[:, None] * axis
            + radius * (1 - np.cos(theta))[:, None] * normal
        )

    return curve


def bent_axon(
    grid,
    *,
    radius,
    curve=None,
    axis=(0, 0, 1),
    bend=None,
    centre=None,
    curvature_radius=None,
    n_samples=256,
    kappa=1e-5,
    membership="centroid",
):
    """A tube of constant radius along a smooth curve.

    Parameters
    ----------
    grid : TetGrid
    radius : float
        Tube radius in um.
    curve : callable or array_like (M, 3), optional
        The centre line: ``curve(t)`` for ``t`` in ``[0, 1]`` returning
        (len(t), 3) points in um (sampled at ``n_samples`` points), or the
        points of a polyline. The tube ends in hemispherical caps at the two
        ends of the curve, so a curve leaving the box gives an axon running
        through the voxel. Default: a gentle circular arc (half a circle of
        curvature radius ``curvature_radius``) through ``centre`` tangent to
        ``axis`` (see :func:`circular_arc`).
    axis : array_like (3,)
        Tangent of the default arc at ``centre``.
    bend : array_like (3,), optional
        Direction the default arc bends towards (default: x for an axis along
        z, see :func:`circular_arc`).
    centre : array_like (3,), optional
        Midpoint of the default arc (default: the box centre).
    curvature_radius : float, optional
        Curvature radius of the default arc in um (default: the box side,
        which bends the tube by ~0.13 box sides between the centre and the
        wall).
    n_samples : int
        Samples of a callable curve.
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radius = check_positive(radius, "radius", "um")
    if int(n_samples) != n_samples or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}.")
    centre = _centre(grid, centre)
    params = dict(radius=radius)
    if curve is None:
        curvature = grid.size if curvature_radius is None else curvature_radius
        curvature = check_positive(curvature, "curvature_radius", "um")
        if curvature <= radius:
            raise ValueError(
                f"curvature_radius ({curvature:g} um) must exceed the tube radius "
                f"({radius:g} um), or the tube overlaps itself."
            )
        curve = circular_arc(
            centre=centre,
            curvature_radius=curvature,
            axis=axis,
            bend=bend,
            half_angle=np.pi / 2,
        )
        params.update(
            curve="circular_arc",
            curvature_radius=curvature,
            axis=_floats(_unit(axis)),
            centre=_floats(centre),
        )
    elif callable(curve):
        params.update(curve=getattr(curve, "__name__", "callable"))
    else:
        params.update(curve="polyline")
    line = curve(np.linspace(0, 1, int(n_samples))) if callable(curve) else curve
    line = np.asarray(line, dtype=float)
    if line.ndim != 2 or line.shape[1] != 3 or len(line) < 2:
        raise ValueError(
            f"curve must give (M >= 2, 3) points in um, got shape {line.shape}."
        )
    if not np.all(np.isfinite(line)):
        raise ValueError("curve points must be finite.")
    # Minimum-image offsets are taken from the curve's midpoint on periodic
    # grids; elsewhere this is the identity.
    anchor = line[len(line) // 2]

    def level(points):
        d = grid.displacement(points, anchor)
        return _polyline_distance(d, line - anchor) - radius

    return _single(grid, level, kappa, membership, "bent_axon", params)


def beaded_axon(
    grid,
    *,
    radius,
    bead_amplitude,
    bead_period,
    axis=(0, 0, 1),
    centre=None,
    phase=0.0,
    length=None,
    kappa=1e-5,
    membership="centroid",
):
    """A straight axon whose radius varies sinusoidally along its length.

    The radius at axial position ``s`` (um from ``centre``) is
    ``radius + bead_amplitude * cos(2 pi s / bead_period + phase)``, so by
    default a bead sits at the centre.

    Parameters
    ----------
    grid : TetGrid
    radius : float
        Mean radius in um.
    bead_amplitude : float
        Amplitude of the radius variation in um, in ``[0, radius)``.
    bead_period : float
        Distance between beads in um.
    axis : array_like (3,)
    centre : array_like (3,), optional
        A point on the axis (default: the box centre).
    phase : float
        Phase of the beads in radians.
    length : float, optional
        Capped length in um; ``None`` runs through the voxel.
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radius = check_positive(radius, "radius", "um")
    period = check_positive(bead_period, "bead_period", "um")
    amplitude = float(bead_amplitude)
    if not 0 <= amplitude < radius:
        raise ValueError(
            f"bead_amplitude must be in [0, radius={radius:g}) um, got {amplitude!r}."
        )
    length = None if length is None else check_positive(length, "length", "um")
    axis = _unit(axis)
    centre = _centre(grid, centre)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        local = radius + amplitude * np.cos(2 * np.pi * along / period + phase)
        return _capped(rho - local, along, length)

    params = dict(
        radius=radius,
        bead_amplitude=amplitude,
        bead_period=period,
        phase=float(phase),
        length=length,
        axis=_floats(axis),
        centre=_floats(centre),
    )
    return _single(grid, level, kappa, membership, "beaded_axon", params)


# -- several cells ----------------------------------------------------------
def packed_cylinders(
    grid,
    *,
    radii,
    centres=None,
    axis=(0, 0, 1),
    gap=None,
    length=None,
    kappa=1e-5,
    membership="centroid",
):
    """Several parallel cylinders, each a labelled cell.

    Faces between two different cylinders carry a membrane too (the labels
    differ there).

    Parameters
    ----------
    grid : TetGrid
    radii : array_like (k,)
        Radii in um; cylinder ``i`` gets label ``i + 1``.
    centres : array_like (k, 3), optional
        A point on each axis (um). Default: automatic non-overlapping
        placement in the plane normal to ``axis`` through the box centre --
        largest first, each at the lowest, then leftmost free position of a
        fine candidate lattice (a bottom-left packing heuristic) -- keeping
        ``gap`` between cylinders and from the box faces, then centred in the
        box. Raises when they do not fit.
    axis : array_like (3,)
        Common direction of the axes.
    gap : float, optional
        Smallest distance between cylinder surfaces and from the box faces in
        automatic placement (default: half a lattice spacing, which leaves
        extracellular cells between neighbours).
    length : float, optional
        Capped length in um; ``None`` runs through the voxel.
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radii = _radii(radii)
    axis = _unit(axis)
    gap = 0.5 * grid.spacing if gap is None else float(gap)
    if not gap >= 0:
        raise ValueError(f"gap must be >= 0 um, got {gap!r}.")
    length = None if length is None else check_positive(length, "length", "um")
    e1, e2 = _frame(axis)
    if centres is None:
        half = grid.size / 2 - gap
        uv = _pack_discs(radii, half=half, gap=gap)
        centres = grid.size / 2 + uv[:, :1] * e1 + uv[:, 1:] * e2
    else:
        centres = _points3("centres", centres, len(radii))
        # Only the offsets normal to the common axis matter for overlap.
        rel = centres - centres.mean(axis=0)
        uv = np.stack([rel @ e1, rel @ e2], axis=1)
        _check_disjoint(uv, radii)

    def level_of(k):
        def level(points):
            along, rho = axial_coordinates(grid, points, centres[k], axis)
            return _capped(rho - radii[k], along, length)

        return level

    params = dict(
        radii=_floats(radii),
        centres=tuple(map(_floats, centres)),
        axis=_floats(axis),
        gap=gap,
        length=length,
    )
    levels = [level_of(k) for k in range(len(radii))]
    return _multi(grid, levels, kappa, membership, "packed_cylinders", params)


def cells_of_sizes(
    grid,
    *,
    radii,
    shape="sphere",
    direction=(1, 0, 0),
    centres=None,
    gap=None,
    kappa=1e-5,
    membership="centroid",
):
    """Cells of different sizes side by side.

    Parameters
    ----------
    grid : TetGrid
    radii : array_like (k,)
        Radius (sphere) or half-side (axis-aligned cube) of each cell in um;
        cell ``i`` gets label ``i + 1``.
    shape : {"sphere", "cube"} or sequence of them
        One shape for all cells or one per cell.
    direction : array_like (3,)
        Line along which the cells are placed side by side (default
        placement).
    centres : array_like (k, 3), optional
        Centres in um. Default: along ``direction`` through the box centre,
        ``gap`` apart, the row centred in the box.
    gap : float, optional
        Distance between neighbouring cells in the default placement, and
        (halved) from the row's ends to the walls (default: half a lattice
        spacing).
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radii = _radii(radii)
    shapes = [shape] * len(radii) if isinstance(shape, str) else list(shape)
    if len(shapes) != len(radii):
        raise ValueError(
            f"shape must be one name or one per cell ({len(radii)}), got {shape!r}."
        )
    for s in shapes:
        if s not in CELL_SHAPES:
            raise ValueError(f"shape {s!r} is not supported; use one of {CELL_SHAPES}.")
    gap = 0.5 * grid.spacing if gap is None else float(gap)
    if not gap >= 0:
        raise ValueError(f"gap must be >= 0 um, got {gap!r}.")
    if centres is None:
        direction = _unit(direction)
        # Along the row a cube reaches as far as a sphere of the same radius
        # only when the row is axis-aligned; use the cube's extent along it.
        reach = np.array(
            [
                r * (np.abs(direction).sum() if s == "cube" else 1.0)
                for r, s in zip(radii, shapes, strict=True)
            ]
        )
        total = 2 * reach.sum() + gap * (len(radii) - 1)
        # The line through the box centre crosses the box over this length.
        span = grid.size / np.abs(direction).max()
        if total + gap > span + 1e-9 * grid.spacing:
            raise ValueError(
                f"cells of total extent {total:g} um plus a gap of {gap:g} um to the "
                f"walls do not fit in the {span:g} um the box spans along "
                f"{_floats(direction)}; use smaller radii or a smaller gap."
            )
        starts = -total / 2 + np.concatenate([[0], np.cumsum(2 * reach + gap)[:-1]])
        centres = grid.size / 2 + (starts + reach)[:, None] * direction
    else:
        centres = _points3("centres", centres, len(radii))

    def level_of(k):
        def level(points):
            d = grid.displacement(points, centres[k])
            if shapes[k] == "cube":
                return np.abs(d).max(axis=1) - radii[k]
            return np.linalg.norm(d, axis=1) - radii[k]

        return level

    params = dict(
        radii=_floats(radii),
        shape=tuple(shapes),
        centres=tuple(map(_floats, centres)),
        gap=gap,
    )
    levels = [level_of(k) for k in range(len(radii))]
    return _multi(grid, levels, kappa, membership, "cells_of_sizes", params)


def published_phantoms(grid, *, kappa=1e-5, membership="vertices"):
    """The single-cell targets of the published Spinverse experiments.

    Cylinder of radius 10 um and length 40 um (longer than the 26.7 um box,
    so capped by the wall), cylinder of radius 8 um and length 22 um tilted by
    45 degrees from z towards x, sphere of radius 10 um, and torus of radii
    10 and 6 um (axis z), all centred in the box.

    Parameters
    ----------
    grid : TetGrid
        Normally ``TetGrid.bcc(80 / 3, 4)``, the published grid.
    kappa : float
        Membrane permeability in m/s (the published targets use 1e-5).
    membership : {"vertices", "centroid"}
        ``"vertices"`` (cells entirely inside) gives 112, 48, 48 and 64
        inside cells of 576 on the published grid, matching the published
        range of 48-112; ``"centroid"`` gives 280, 176, 168 and 216.

    Returns
    -------
    dict of str to Phantom
        Keys ``"cylinder"``, ``"tilted_cylinder"``, ``"sphere"``, ``"torus"``.

    Examples
    --------
    >>> from dipy_spinverse import TetGrid
    >>> targets = published_phantoms(TetGrid.bcc(80 / 3, 4))
    >>> {name: int(p.inside.sum()) for name, p in targets.items()}
    {'cylinder': 112, 'tilted_cylinder': 48, 'sphere': 48, 'torus': 64}
    """
    tilt = (math.sin(math.pi / 4), 0.0, math.cos(math.pi / 4))
    common = dict(kappa=kappa, membership=membership)
    tilted = cylinder(grid, radius=8.0, length=22.0, axis=tilt, **common)
    return {
        "cylinder": cylinder(grid, radius=10.0, length=40.0, **common),
        "tilted_cylinder": replace(tilted, name="tilted_cylinder"),
        "sphere": sphere(grid, radius=10.0, **common),
        "torus": torus(grid, major=10.0, minor=6.0, **common),
    }


# -- internals ------------------------------------------------------------------
def _check_kappa(kappa):
    kappa = float(kappa)
    if not (np.isfinite(kappa) and kappa >= 0):
        raise ValueError(
            f"kappa must be a finite permeability >= 0 m/s, got {kappa!r} "
            "(inf would mean no membrane at all)."
        )
    return kappa


def _check_membership(membership):
    if membership not in MEMBERSHIPS:
        raise ValueError(
            f"membership={membership!r} is not supported; use one of {MEMBERSHIPS}."
        )


def _floats(values):
    """Plain Python floats, for readable ``params``."""
    return tuple(float(v) for v in np.ravel(values))


def _unit(vector):
    v = np.asarray(vector, dtype=float)
    if v.shape != (3,) or not np.all(np.isfinite(v)) or np.linalg.norm(v) == 0:
        raise ValueError(f"expected a non-zero 3-vector, got {vector!r}.")
    return v / np.linalg.norm(v)


def _frame(axis):
    """Unit vectors ``e1, e2`` with ``(e1, e2, axis)`` right-handed.

    ``e1`` is the box axis least aligned with ``axis``, made normal to it:
    x for an axis along z.
    """
    helper = np.eye(3)[np.argmin(np.abs(axis))]
    e1 = helper - (helper @ axis) * axis
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(axis, e1)


def _centre(grid, centre):
    if centre is None:
        return np.full(3, grid.size / 2)
    c = np.asarray(centre, dtype=float)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise ValueError(f"centre must be 3 finite coordinates in um, got {centre!r}.")
    return c


def _points3(name, points, k):
    p = np.asarray(points, dtype=float)
    if p.shape != (k, 3) or not np.all(np.isfinite(p)):
        raise ValueError(
            f"{name} must be ({k}, 3) finite coordinates in um, got shape {p.shape}."
        )
    return p


def _radii(radii):
    r = np.atleast_1d(np.asarray(radii, dtype=float))
    if r.ndim != 1 or len(r) == 0 or not np.all(np.isfinite(r) & (r > 0)):
        raise ValueError(f"radii must be one or more positive lengths, got {radii!r}.")
    return r


def axial_coordinates(grid, points, centre, axis):
    """Coordinate along a unit ``axis`` through ``centre`` and distance from it.

    Offsets from ``centre`` are :meth:`TetGrid.displacement`'s (nearest
    periodic image on periodic grids). Returns ``(along, across)``.
    """
    d = grid.displacement(points, centre)
    along = d @ axis
    return along, np.linalg.norm(d - along[:, None] * axis, axis=1)


def _capped(level, along, length):
    """Cut a tube's level function with flat caps at +-length/2 (None: none)."""
    if length is None:
        return level
    return np.maximum(level, np.abs(along) - length / 2)


def _membership_points(grid, membership):
    _check_membership(membership)
    if membership == "centroid":
        return grid.cell_centroids[:, None]
    return grid.tet_coords


def _select(grid, level, membership):
    points = _membership_points(grid, membership)
    n, k = points.shape[:2]
    values = level(points.reshape(-1, 3)).reshape(n, k)
    return np.all(values < -_TIE_TOL * grid.spacing, axis=1)


def _single(grid, level, kappa, membership, name, params):
    kappa = _check_kappa(kappa)
    inside = _select(grid, level, membership)
    params = dict(params, kappa=kappa, membership=membership)
    return _finish(grid, inside.astype(np.int64), kappa, name, params)


def _multi(grid, levels, kappa, membership, name, params):
    kappa = _check_kappa(kappa)
    labels = np.zeros(grid.n_cells, dtype=np.int64)
    for k, level in enumerate(levels, start=1):
        inside = _select(grid, level, membership)
        clash = inside & (labels > 0)
        if clash.any():
            raise ValueError(
                f"{name}: cell {k} overlaps cell {labels[clash][0]} "
                f"({int(clash.sum())} grid cells); move them apart."
            )
        labels[inside] = k
    params = dict(params, kappa=kappa, membership=membership)
    return _finish(grid, labels, kappa, name, params)


def _finish(grid, labels, kappa, name, params):
    if labels.shape != (grid.n_cells,):
        raise ValueError(f"expected {grid.n_cells} labels, got {labels.shape}.")
    n_labels = int(labels.max(initial=0))
    if n_labels == 0:
        raise ValueError(
            f"{name} selects no grid cell (by {params.get('membership', 'its')} "
            f"membership); it is smaller than the {grid.spacing:g} um lattice or "
            "outside the box. Make it larger, move it, or use a finer grid."
        )
    counts = np.bincount(labels, minlength=n_labels + 1)
    empty = np.flatnonzero(counts[1:] == 0) + 1
    if len(empty):
        raise ValueError(
            f"{name}: cells {empty.tolist()} select no grid cell; make them larger "
            "or use a finer grid."
        )
    if counts[0] == 0:
        raise ValueError(
            f"{name} fills every grid cell: no extracellular space is left. Make it "
            "smaller."
        )
    if counts[0] < _MIN_OUTSIDE_FRACTION * grid.n_cells:
        warnings.warn(
            f"{name} leaves only {counts[0]} of {grid.n_cells} grid cells outside; "
            "there is almost no extracellular space.",
            UserWarning,
            stacklevel=3,
        )
    return Phantom.from_labels(grid, labels, kappa=kappa, name=name, params=params)


def _polyline_distance(points, line):
    """Distance from each point to a polyline (exact, chunked over points)."""
    a, b = line[:-1], line[1:]
    ab = b - a
    ab2 = np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-300)
    step = max(1, _CHUNK // len(a))
    out = np.empty(len(points))
    for start in range(0, len(points), step):
        p = points[start : start + step, None]
        t = np.clip(np.einsum("pij,ij->pi", p - a, ab) / ab2, 0, 1)
        closest = a + t[..., None] * ab
        out[start : start + step] = np.linalg.norm(p - closest, axis=-1).min(axis=1)
    return out


def _check_disjoint(uv, radii):
    k = len(radii)
    for i in range(k):
        for j in range(i + 1, k):
            dist = np.linalg.norm(uv[i] - uv[j])
            if dist < radii[i] + radii[j]:
                raise ValueError(
                    f"cylinders {i + 1} and {j + 1} overlap: axes {dist:.3g} um "
                    f"apart, radii {radii[i]:g} + {radii[j]:g} um."
                )


def _pack_discs(radii, *, half, gap, resolution=121):
    """Bottom-left greedy placement of discs in the square ``[-half, half]^2``.

    Returns in-plane centres (k, 2), re-centred so that the discs' bounding
    box is centred on the origin.
    """
    order = np.argsort(-radii, kind="stable")
    placed = np.zeros((len(radii), 2))
    done = []
    for i in order:
        reach = half - radii[i]
        if reach < 0:
            raise ValueError(
                f"a cylinder of radius {radii[i]:g} um with gap {gap:g} um does not "
                f"fit in a box of side {2 * (half + gap):g} um."
            )
        ticks = np.linspace(-reach, reach, resolution)
        # Rows first (v), then columns (u): the lowest, then leftmost free spot.
        v, u = np.meshgrid(ticks, ticks, indexing="ij")
        candidates = np.stack([u.ravel(), v.ravel()], axis=1)
        free = np.ones(len(candidates), dtype=bool)
        for j in done:
            dist = np.linalg.norm(candidates - placed[j], axis=1)
            free &= dist >= radii[i] + radii[j] + gap
        if not free.any():
            raise ValueError(
                f"cannot place {len(radii)} cylinders of radii {radii.tolist()} um "
                f"with gap {gap:g} um in the box; use smaller radii, a smaller gap, "
                "fewer cylinders, or explicit centres."
            )
        placed[i] = candidates[np.argmax(free)]
        done.append(i)
    lo = (placed - radii[:, None]).min(axis=0)
    hi = (placed + radii[:, None]).max(axis=0)
    return placed - (lo + hi) / 2
