"""Seeded random substrates: cells nobody hand-picked, for training and tests.

:func:`random_substrate` draws 1-4 (by default) cells of random kinds, sizes,
orientations and positions into any :class:`~dipy_spinverse.sim.grid.TetGrid`
(any size, resolution and wall) and returns a :class:`Substrate`: one label
per grid cell, one membrane permeability per cell, and the per-face
permeability field :func:`dipy_spinverse.simulate` takes. The same seed gives
the same substrate on every machine; :func:`random_substrates` draws many.

Cell kinds (:data:`KINDS`), each sized relative to the box and the lattice
(a characteristic radius ``r`` drawn log-uniformly between about
``max(0.6 spacing, 0.1 size)`` and ``0.35 size / n_cells**(1/3)``):

``"ellipsoid"``
    Three semi-axes drawn independently in ``[0.6 r, 1.7 r]`` (up to ~3:1),
    any orientation.
``"capsule"``
    A cylinder of radius ``0.6-1.0 r`` with hemispherical caps, axis length
    ``1-4 r``, any direction.
``"bent_tube"``
    A tube of radius ``0.5-0.8 r`` along a circular arc (curvature radius
    0.3-0.8 box sides, arc length 0.6-1.4 box sides, at most 3/4 of a
    circle) with hemispherical ends; often runs through the voxel.
``"beaded_tube"``
    A straight tube of length 0.6-1.5 box sides (flat ends) whose radius is
    modulated along the axis, ``r0 (1 + a cos(2 pi s / period + phase))``,
    ``a`` in ``[0.25, 0.5]``, a period of at least 2.5 lattice spacings.
``"fanning_tube"``
    A tube that widens along its length: a rounded cone whose radius grows
    1.6-2.5 fold from the root to the tip, or (half the draws) a root that
    splits into two widening branches diverging by 30-70 degrees.
``"torus"``
    A ring torus (tube radius ``0.45-0.7 r``, ring radius 1.6-2.5 tube
    radii), any orientation.
``"blob"``
    A smooth random blob: white noise on a regular 24^3 grid, smoothed by a
    Gaussian (scipy.ndimage), pulled down away from the centre, thresholded;
    the largest connected component is kept and its holes filled. Its
    signed distance (Euclidean distance transforms) is interpolated at the
    grid's cell centroids.

Placement and overlaps. Every kind is a level function of space (an exact or
approximate signed distance in um: negative inside). A grid cell takes the
label of the shape whose level is lowest at the cell's centroid, provided it
is negative (``"centroid"`` membership of :mod:`dipy_spinverse.geometry.phantoms`): a
nearest-level-set partition, so overlapping shapes become *touching* cells
(distinct labels with a membrane between them, packed against each other),
never overlapping ones. A shape cut into pieces by its neighbours keeps its
largest piece; the others go to the extracellular space. On periodic grids
every offset is the nearest periodic image (``TetGrid.displacement``), so
cells wrap through the box; a shape longer than half the box along a box axis
is cut where the nearest image flips. On walled grids cells that reach the
wall are closed by it.

A draw is rejected and redrawn (up to ``max_tries`` times) when a cell covers
less than ``min_cell_volume`` (an empty cell on a coarse grid), when less
than ``min_extracellular_fraction`` of the volume is left outside every cell
(a cell filling the box), or when the draw does not meet ``touching``. A
substrate is never returned with a lost or empty label.

Permeabilities. Each cell gets one membrane permeability drawn log-uniformly
in ``permeability_range`` (m/s = um/us). On a face between cell ``k`` and
the extracellular space the permeability is cell ``k``'s. Two touching cells
are separated by *two* membranes in series (each cell's own), so the face
between cells ``a`` and ``b`` carries ``1 / (1 / kappa_a + 1 / kappa_b)``;
every other face carries ``inf`` (no membrane). The outer wall is the
grid's (``grid.boundary``), not a membrane of the substrate.
"""

import math
import numbers
from collections import Counter
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..checks import check_int, check_number
from ..sim.grid import TetGrid
from ..sim.sections import SectionGrid
from .phantoms import Phantom, axial_coordinates
from .topology import graph_components

__all__ = [
    "Substrate",
    "KINDS",
    "PACKED_KINDS",
    "random_substrate",
    "random_substrates",
    "packed_substrate",
]

#: The cell kinds :func:`random_substrate` draws from.
KINDS = (
    "ellipsoid",
    "capsule",
    "bent_tube",
    "beaded_tube",
    "fanning_tube",
    "torus",
    "blob",
)

#: The kinds of :func:`packed_substrate`: finite cells, and fibres that run
#: through the periodic box (infinite cylinders of the tissue).
PACKED_KINDS = ("packed", "fibre")

#: Fibre directions of :func:`packed_substrate`: the 13 lattice directions of
#: the periodic box with entries in {-1, 0, 1}, along which a straight fibre
#: meets its own periodic image (3 axes, 6 face and 4 body diagonals).
FIBRE_DIRECTIONS = tuple(
    d
    for d in ((i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1))
    if any(d) and d[next(n for n in range(3) if d[n])] > 0
)

# Centroids closer than this (relative to the lattice spacing) to a surface
# count as outside, as in phantoms: BCC centroids sit on a rational lattice
# and exact ties are resolved the same way on every machine.
_TIE_TOL = 1e-9
# Proposals per cell for a position that touches (or avoids) earlier cells.
_PLACEMENT_TRIES = 8
# Regular grid of the blob's noise (points per side) and its smoothing.
_BLOB_POINTS = 24
_BLOB_SIGMA = 3.0
# Why a draw was rejected, and the advice that fixes it.
_REASONS = {
    "small": "a cell below min_cell_volume",
    "full": "too little extracellular space",
    "apart": "touching cells",
    "touch": "no touching cells",
}
_ADVICE = {
    "small": "lower min_cell_volume or use a finer grid (larger n in TetGrid.bcc)",
    "full": "draw fewer cells (n_cells) or lower min_extracellular_fraction",
    "apart": "allow touching cells (touching=None) or draw fewer cells (n_cells)",
    "touch": "use touching=None",
}


@dataclass(frozen=True, eq=False)
class Substrate:
    """Cells drawn into a grid, with their membranes.

    Built by :func:`random_substrate`; all arrays are read-only.

    Parameters
    ----------
    labels : ndarray of int (n_grid_cells,)
        0 outside every cell, ``k`` inside cell ``k`` (1 .. ``n_cells``,
        every label present).
    permeability : ndarray (n_cells,)
        Membrane permeability of each cell in m/s (= um/us); entry ``k - 1``
        is cell ``k``'s.
    face_permeability : ndarray (grid.n_faces,)
        Permeability of every interior face of the grid in m/s, ready for
        :func:`dipy_spinverse.simulate`: ``permeability[k - 1]`` between cell
        ``k`` and the extracellular space, ``1 / (1 / kappa_a + 1 / kappa_b)``
        (two membranes in series) between touching cells ``a`` and ``b``,
        ``inf`` (no membrane) elsewhere.
    volumes : ndarray (n_cells,)
        Volume of each cell in um^3 (sum of its grid cells' volumes).
    surface_areas : ndarray (n_cells,)
        Membrane area of each cell in um^2: the summed area of the interior
        faces between the cell and any other label. Where a cell meets the
        outer wall it is closed by the wall, which is not counted.
    kinds : tuple of str
        Kind of each cell (one of :data:`KINDS`).
    params : tuple of dict
        The geometry each cell was drawn with (um, radians, unit vectors).

    Attributes
    ----------
    n_cells : int
        Number of cells.
    inside : ndarray of bool (n_grid_cells,)
        Grid cells inside any cell.
    """

    labels: np.ndarray
    permeability: np.ndarray
    face_permeability: np.ndarray
    volumes: np.ndarray
    surface_areas: np.ndarray
    kinds: tuple
    params: tuple = field(repr=False)

    def __post_init__(self):
        n = len(self.kinds)
        for name in ("permeability", "volumes", "surface_areas"):
            if np.shape(getattr(self, name)) != (n,):
                raise ValueError(
                    f"{name} must have one value per cell ({n},), got shape "
                    f"{np.shape(getattr(self, name))}."
                )
        _check_contents(self, n)
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value = np.array(value)
                value.setflags(write=False)
                object.__setattr__(self, name, value)
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "params", tuple(dict(p) for p in self.params))

    @property
    def n_cells(self):
        """Number of cells."""
        return len(self.kinds)

    @property
    def inside(self):
        """Grid cells inside any cell (``labels > 0``)."""
        return self.labels > 0

    def phantom(self, *, name="random_substrate"):
        """The substrate as a :class:`~dipy_spinverse.geometry.phantoms.Phantom`.

        Parameters
        ----------
        name : str
            Name of the phantom.

        Returns
        -------
        Phantom
            With ``face_permeability`` and ``labels``; ``params`` holds the
            kinds, permeabilities and geometry.
        """
        params = dict(
            kinds=self.kinds,
            permeability=tuple(float(k) for k in self.permeability),
            cells=self.params,
        )
        return Phantom(self.face_permeability, self.labels, name=name, params=params)

    def __repr__(self):
        kappas = ", ".join(f"{k:.2g}" for k in self.permeability)
        return (
            f"Substrate(n_cells={self.n_cells}, kinds={self.kinds}, "
            f"permeability=[{kappas}] m/s, "
            f"inside_cells={int(self.inside.sum())})"
        )


def _check_contents(substrate, n):
    """What a :class:`Substrate` promises: labels 0 .. n with every cell
    present, kinds of :data:`KINDS`, membranes > 0 m/s, no face without a
    permeability, cells of positive volume."""
    labels = np.asarray(substrate.labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            "labels must be a 1-D integer array (one label per grid cell), got "
            f"dtype {labels.dtype} and shape {labels.shape}."
        )
    present = np.unique(labels)
    if present.min(initial=0) < 0 or not np.array_equal(
        present[present > 0], np.arange(1, n + 1)
    ):
        raise ValueError(
            f"labels must be 0 outside and 1 .. {n} (one per kind, every one "
            f"present), got the labels {present.tolist()[:10]}."
        )
    unknown = [k for k in substrate.kinds if k not in KINDS + PACKED_KINDS]
    if unknown:
        raise ValueError(
            f"kinds: {unknown} are not kinds; use some of {KINDS + PACKED_KINDS}."
        )
    checks = (
        ("permeability", substrate.permeability, "finite and > 0 m/s", np.isfinite),
        ("face_permeability", substrate.face_permeability, "> 0 m/s or inf", None),
        ("volumes", substrate.volumes, "finite and > 0 um^3", np.isfinite),
    )
    for name, values, what, finite in checks:
        values = np.asarray(values, dtype=float)
        good = values > 0
        if finite is not None:
            good &= finite(values)
        if not np.all(good):
            raise ValueError(f"{name} must be {what}, got {values[~good][:5]}.")


def random_substrate(
    grid,
    *,
    rng=None,
    n_cells=(1, 4),
    kinds=None,
    permeability_range=(1e-6, 1e-4),
    min_cell_volume=None,
    min_extracellular_fraction=0.05,
    touching=None,
    max_tries=200,
):
    """Draw random cells into a grid.

    See the module documentation for the cell kinds, the placement and the
    permeability rule.

    Parameters
    ----------
    grid : TetGrid
        Any grid and wall (``"reflecting"``, ``"periodic"``, ``"absorbing"``).
    rng : None, int or numpy.random.Generator
        Seed (a non-negative int) or generator; ``None`` draws fresh entropy
        (not reproducible). A generator is advanced.
    n_cells : int or (int, int)
        Number of cells, or the inclusive range it is drawn from uniformly.
    kinds : str or sequence of str, optional
        Kinds each cell is drawn from uniformly (a kind listed twice is drawn
        twice as often); default all of :data:`KINDS`.
    permeability_range : (float, float)
        Range ``(low, high)`` of the membrane permeabilities in m/s; each
        cell's is log-uniform in it (``low == high`` fixes it).
    min_cell_volume : float, optional
        Smallest volume of a cell in um^3; a draw with a smaller (or empty)
        cell is redrawn. Default: 4 mean grid-cell volumes.
    min_extracellular_fraction : float
        Smallest fraction of the grid's volume left outside every cell, in
        ``(0, 1)``; a draw that fills more is redrawn.
    touching : {None, True, False}
        ``True``: at least two cells, and some pair of them touches (shares
        a membrane); cells are placed against earlier ones. ``False``: no two
        cells share a face: cells are placed away from earlier ones where
        possible, and where two still meet, the grid cells on the side nearer
        its own surface go to the extracellular space. ``None``: either (half
        of the cells after the first are placed against an earlier one).
    max_tries : int
        Draws before giving up.

    Returns
    -------
    Substrate

    Raises
    ------
    ValueError
        On a bad argument, naming it, or when no valid substrate was drawn in
        ``max_tries`` draws, naming the argument to change.

    Examples
    --------
    >>> from dipy_spinverse import TetGrid
    >>> grid = TetGrid.bcc(80 / 3, 4)
    >>> sub = random_substrate(grid, rng=0, n_cells=2, touching=True)
    >>> sub.n_cells, sorted(set(sub.labels.tolist()))
    (2, [0, 1, 2])
    """
    options = _options(
        grid,
        n_cells=n_cells,
        kinds=kinds,
        permeability_range=permeability_range,
        min_cell_volume=min_cell_volume,
        min_extracellular_fraction=min_extracellular_fraction,
        touching=touching,
        max_tries=max_tries,
    )
    return _draw(grid, _generator(rng), options)


def random_substrates(
    grid,
    n,
    *,
    seed,
    n_cells=(1, 4),
    kinds=None,
    permeability_range=(1e-6, 1e-4),
    min_cell_volume=None,
    min_extracellular_fraction=0.05,
    touching=None,
    max_tries=200,
):
    """Draw ``n`` independent random substrates.

    Substrate ``i`` is drawn from the ``i``-th child of
    ``numpy.random.SeedSequence(seed)``, so it depends only on ``seed`` and
    ``i`` (not on ``n``): ``random_substrates(grid, 10, seed=s)[:3]`` equals
    ``random_substrates(grid, 3, seed=s)``.

    Parameters
    ----------
    grid : TetGrid
    n : int
        Number of substrates (>= 1).
    seed : int
        Non-negative seed.
    n_cells, kinds, permeability_range, min_cell_volume, \
min_extracellular_fraction, touching, max_tries
        As in :func:`random_substrate`.

    Returns
    -------
    list of Substrate
    """
    n = check_int(n, "n", 1)
    seed = _seed(seed, "seed")
    options = _options(
        grid,
        n_cells=n_cells,
        kinds=kinds,
        permeability_range=permeability_range,
        min_cell_volume=min_cell_volume,
        min_extracellular_fraction=min_extracellular_fraction,
        touching=touching,
        max_tries=max_tries,
    )
    children = np.random.SeedSequence(seed).spawn(n)
    return [_draw(grid, np.random.default_rng(child), options) for child in children]


def packed_substrate(
    grid,
    *,
    rng=None,
    n_cells=1,
    fraction=0.5,
    fibres=False,
    elongation=1.0,
    axis=None,
    size_spread=1.0,
    permeability_range=(1e-6, 1e-4),
):
    """Cells packed to a chosen restricted fraction, up to tissue densities.

    :func:`random_substrate`'s cells stay below a third of the volume; white
    matter and tumours hold 50-85 % of their water in cells. Here ``n_cells``
    seeds are placed in the box (at least half the mean seed distance apart
    where possible) and each grid cell belongs to its nearest seed, the
    distance scaled by a per-seed size factor (a multiplicatively weighted
    Voronoi partition, so cells differ in size). A grid cell is inside its
    seed's cell when that scaled distance is below a radius chosen so that
    the cells fill ``fraction`` of the volume: at low fractions the cells are
    spheres (ellipsoids, cylinders), at high ones they fill their Voronoi
    polygons and touch (two membranes in series, as in
    :func:`random_substrate`). On periodic grids distances are to the
    nearest of the 27 periodic images of each seed.

    On a :class:`~dipy_spinverse.sim.sections.SectionGrid` the cells are
    fibres along the grid's axis (``fibres=True``), packed in its periodic
    square: straight at any orientation, and simulated as the 2-D
    problem they are.

    Parameters
    ----------
    grid : TetGrid or SectionGrid
    rng : None, int or numpy.random.Generator
    n_cells : int
        Number of seeds (cells), >= 1.
    fraction : float
        Target restricted fraction in (0, 1); the substrate's own
        (``volumes.sum() / grid.volume``) differs by the discretisation and
        by pieces cut off cells (given to the extracellular space).
    fibres : bool
        Cells are fibres along ``axis`` (distances measured across it):
        straight cylinders that run through the box: on a periodic grid
        they meet their own periodic images, as axons do, and ``axis`` is
        one of :data:`FIBRE_DIRECTIONS`; in a walled box they run from wall
        to wall (the published phantoms' cylinders), along any axis.
        Default axis: drawn from :data:`FIBRE_DIRECTIONS`.
    elongation : float
        For finite cells, the ratio of the cells' length along ``axis`` to
        their width (>= 1; 1 gives round cells).
    axis : array_like (3,), optional
        Direction of the elongation or of the fibres (default: drawn).
    size_spread : float
        Size factors of the seeds are log-uniform in
        ``[1 / sqrt(size_spread), sqrt(size_spread)]`` (>= 1; 1: equal).
    permeability_range : (float, float)
        Each cell's membrane permeability, log-uniform, m/s.

    Returns
    -------
    Substrate
        With kinds ``"fibre"`` or ``"packed"`` (:data:`PACKED_KINDS`) and, in
        ``params``, each cell's seed, size factor, axis and elongation.

    Raises
    ------
    ValueError
        Naming the argument out of range, or when a cell ends up empty (too
        many cells for the grid's resolution: use fewer cells or a finer
        grid).
    """
    rng = _generator(rng)
    n = check_int(n_cells, "n_cells", 1)
    fraction = check_number(fraction, "fraction", minimum=0.0, maximum=1.0)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
    elongation = check_number(elongation, "elongation", minimum=1.0)
    size_spread = check_number(size_spread, "size_spread", minimum=1.0)
    low, high = _permeability_range(permeability_range)
    if isinstance(grid, SectionGrid):
        return _packed_section(
            grid, rng, n, fraction, fibres, axis, size_spread, low, high
        )
    if axis is None:
        axis = (
            np.asarray(FIBRE_DIRECTIONS[rng.integers(len(FIBRE_DIRECTIONS))], float)
            if fibres
            else _unit(rng)
        )
    axis = np.asarray(axis, dtype=float)
    if axis.shape != (3,) or not np.linalg.norm(axis) > 0:
        raise ValueError(f"axis must be a nonzero 3-vector, got {axis!r}.")
    axis = axis / np.linalg.norm(axis)
    # Metric: distances along the axis count 1/elongation (0 for fibres).
    squeeze = 1.0 if fibres else 1.0 - 1.0 / elongation
    metric = np.eye(3) - squeeze * np.outer(axis, axis)
    seeds = _spread_seeds(grid, rng, n, metric)
    factors = np.exp(rng.uniform(-0.5, 0.5, n) * np.log(size_spread))
    distance = _seed_distances(grid, seeds, metric) / factors[:, None]
    labels = _fill(grid, distance, fraction, n)
    kind = "fibre" if fibres else "packed"
    params = [
        dict(
            seed=_floats(seed),
            size=float(f),
            axis=_floats(axis),
            elongation=float(np.inf if fibres else elongation),
        )
        for seed, f in zip(seeds, factors, strict=True)
    ]
    kappa = _log_uniform(rng, (low, high), n)
    return _substrate(grid, labels, kappa, [kind] * n, params)


def _packed_section(grid, rng, n, fraction, fibres, axis, size_spread, low, high):
    """:func:`packed_substrate` on a section: the weighted Voronoi partition
    in the plane, fibres along the grid's axis."""
    if not fibres:
        raise ValueError(
            "a SectionGrid holds fibres along its axis: use fibres=True, or a "
            "TetGrid for finite cells."
        )
    if axis is not None:
        axis = np.asarray(axis, dtype=float)
        if axis.shape != (3,) or abs(abs(axis @ grid.axis) - np.linalg.norm(axis)) > (
            1e-9 * max(np.linalg.norm(axis), 1.0)
        ):
            raise ValueError(
                f"axis {axis!r} is not the section's axis {grid.axis}: a "
                "SectionGrid's fibres run along grid.axis; leave axis out."
            )
    seeds = _spread_seeds(grid, rng, n, np.eye(2))
    factors = np.exp(rng.uniform(-0.5, 0.5, n) * np.log(size_spread))
    images = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]) * grid.extent
    points = grid.section_positions
    distance = np.stack(
        [
            np.linalg.norm(points[None] - (seed + images)[:, None], axis=-1).min(0)
            for seed in seeds
        ]
    )
    labels = _fill(grid, distance / factors[:, None], fraction, n)
    params = [
        dict(
            seed=_floats(seed @ grid.plane),
            size=float(f),
            axis=_floats(grid.axis),
            elongation=float(np.inf),
        )
        for seed, f in zip(seeds, factors, strict=True)
    ]
    kappa = _log_uniform(rng, (low, high), n)
    return _substrate(grid, labels, kappa, ["fibre"] * n, params)


def _fill(grid, distance, fraction, n):
    """Labels of the cells within the radius that fills ``fraction``."""
    nearest = distance.min(axis=0)
    order = np.argsort(nearest)
    filled = np.cumsum(grid.cell_volumes[order]) / grid.volume
    radius = nearest[order[min(np.searchsorted(filled, fraction), len(order) - 1)]]
    labels = _partition(grid, distance - radius * (1 + 1e-9), apart=False)
    present = np.unique(labels[labels > 0])
    if len(present) < n:
        raise ValueError(
            f"{n - len(present)} of the {n} packed cells are empty on {grid!r}; "
            "use fewer cells (n_cells), a larger fraction or a finer grid."
        )
    return labels


def _spread_seeds(grid, rng, n, metric):
    """``n`` seed points in the box, each at least half the mean seed spacing
    (in the metric) from the others where a few hundred proposals allow;
    in the plane's coordinates on a section (``metric`` 2 x 2)."""
    dim = len(metric)
    box = grid.extent if dim == 2 else grid.size
    offset = grid.displacement2 if dim == 2 else grid.displacement
    side = float(np.sqrt(np.prod(box))) if dim == 2 else grid.size
    spacing = 0.5 * side / n ** (1 / dim)
    seeds = []
    for _ in range(n):
        best, best_gap = None, -1.0
        for _ in range(200):
            point = rng.uniform(0, box, dim)
            if not seeds:
                best = point
                break
            gap = np.min(_metric_norm(offset(np.array(seeds), point), metric))
            if gap > best_gap:
                best, best_gap = point, gap
            if gap >= spacing:
                break
        seeds.append(best)
    return np.array(seeds)


def _metric_norm(d, metric):
    return np.sqrt(np.einsum("...i,ij,...j->...", d, metric, d))


def _seed_distances(grid, seeds, metric):
    """(n_seeds, n_grid_cells) metric distance of each grid cell's centroid to
    each seed (the nearest of its periodic images on periodic grids)."""
    centroids = grid.cell_centroids
    if grid.periodic:
        offsets = grid.size * np.array(
            [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]
        )
    else:
        offsets = np.zeros((1, 3))
    out = np.empty((len(seeds), len(centroids)))
    for i, seed in enumerate(seeds):
        images = seed + offsets
        d = centroids[None, :, :] - images[:, None, :]
        out[i] = _metric_norm(d, metric).min(axis=0)
    return out


# -- options --------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    n_range: tuple
    kinds: tuple
    permeability_range: tuple
    min_cell_volume: float
    min_outside: float
    touching: object
    max_tries: int


def _options(
    grid,
    *,
    n_cells,
    kinds,
    permeability_range,
    min_cell_volume,
    min_extracellular_fraction,
    touching,
    max_tries,
):
    if not isinstance(grid, TetGrid):
        raise ValueError(
            f"grid must be a TetGrid (e.g. TetGrid.bcc(80 / 3, 4)), got "
            f"{type(grid).__name__}."
        )
    n_range = _n_range(n_cells)
    kinds = _kinds(kinds)
    permeability_range = _permeability_range(permeability_range)
    min_outside = check_number(
        min_extracellular_fraction,
        "min_extracellular_fraction",
        minimum=0,
        maximum=1,
        hint=" (a fraction of the grid's volume, e.g. 0.05)",
    )
    if not 0 < min_outside < 1:
        raise ValueError(
            "min_extracellular_fraction must be in (0, 1) (a fraction of the "
            f"grid's volume, e.g. 0.05), got {min_outside!r}."
        )
    if min_cell_volume is None:
        min_cell_volume = 4 * grid.volume / grid.n_cells
    else:
        min_cell_volume = check_number(
            min_cell_volume, "min_cell_volume", minimum=0, hint=" um^3"
        )
    if touching not in (None, True, False) or not (
        touching is None or isinstance(touching, bool)
    ):
        raise ValueError(f"touching must be None, True or False, got {touching!r}.")
    if touching is True:
        if n_range[1] < 2:
            raise ValueError(
                f"touching=True needs at least 2 cells, but n_cells={n_cells!r}; "
                "allow 2 or more cells (e.g. n_cells=(2, 4)) or use touching=None."
            )
        n_range = (max(n_range[0], 2), n_range[1])
    room = (1 - min_outside) * grid.volume
    if n_range[0] * min_cell_volume > room:
        raise ValueError(
            f"{n_range[0]} cell(s) of at least min_cell_volume={min_cell_volume:g} "
            f"um^3 do not fit in the {room:g} um^3 the grid leaves inside cells "
            f"with min_extracellular_fraction={min_outside:g}; lower "
            "min_cell_volume, n_cells or min_extracellular_fraction."
        )
    max_tries = check_int(max_tries, "max_tries", 1)
    return _Options(
        n_range,
        kinds,
        permeability_range,
        min_cell_volume,
        min_outside,
        touching,
        max_tries,
    )


def _n_range(n_cells):
    if isinstance(n_cells, (str, bytes)):
        raise ValueError(
            "n_cells must be an integer >= 1 or a range (low, high) of them, "
            f"got the string {n_cells!r}."
        )
    if isinstance(n_cells, numbers.Real) and not isinstance(n_cells, bool):
        n = check_int(n_cells, "n_cells", 1)
        return n, n
    try:
        low, high = n_cells
    except (TypeError, ValueError) as err:
        raise ValueError(
            "n_cells must be an integer >= 1 or a range (low, high) of them, "
            f"got {n_cells!r}."
        ) from err
    low, high = check_int(low, "n_cells[0]", 1), check_int(high, "n_cells[1]", 1)
    if low > high:
        raise ValueError(
            f"n_cells must be (low, high) with low <= high, got {n_cells!r}."
        )
    return low, high


def _kinds(kinds):
    if kinds is None:
        return KINDS
    if isinstance(kinds, Mapping):
        raise ValueError(
            f"kinds must be a kind or a sequence of kinds from {KINDS} (list a "
            f"kind twice to draw it twice as often), not a mapping: {kinds!r}."
        )
    if isinstance(kinds, (bytes, bytearray)):
        raise ValueError(f"kinds must be str, not bytes: {kinds!r}; decode it first.")
    names = (kinds,) if isinstance(kinds, str) else kinds
    if isinstance(names, AbstractSet):
        # The draw picks kinds by position, and a set's order changes with
        # the interpreter's string hashing: sorted, a seed reproduces.
        names = sorted(names, key=str)
    try:
        names = tuple(str(n) if isinstance(n, str) else n for n in names)
    except TypeError as err:
        raise ValueError(
            f"kinds must be None, a kind or a sequence of kinds from {KINDS}, got "
            f"{kinds!r}."
        ) from err
    if not names:
        raise ValueError(f"kinds must name at least one of {KINDS}, got {kinds!r}.")
    for name in names:
        if name not in KINDS:
            raise ValueError(f"kinds: {name!r} is not a kind; use some of {KINDS}.")
    return names


def _permeability_range(permeability_range):
    try:
        low, high = permeability_range
    except (TypeError, ValueError) as err:
        raise ValueError(
            "permeability_range must be (low, high) in m/s, e.g. (1e-6, 1e-4), "
            f"got {permeability_range!r}."
        ) from err
    hint = " m/s, e.g. (1e-6, 1e-4)"
    low = check_number(low, "permeability_range[0]", minimum=0, hint=hint)
    high = check_number(high, "permeability_range[1]", minimum=0, hint=hint)
    if not 0 < low <= high:
        raise ValueError(
            "permeability_range must be (low, high) with 0 < low <= high m/s, "
            f"e.g. (1e-6, 1e-4), got {permeability_range!r}."
        )
    return float(low), float(high)


def _seed(seed, name):
    ok = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    if not ok or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _generator(rng):
    if rng is None or isinstance(rng, np.random.Generator):
        return np.random.default_rng(rng)
    ok = isinstance(rng, numbers.Integral) and not isinstance(rng, bool)
    if not ok or rng < 0:
        raise ValueError(
            "rng must be None, a non-negative int seed or a numpy.random.Generator, "
            f"got {rng!r}."
        )
    return np.random.default_rng(int(rng))


# -- drawing ----------------------------------------------------------------------
def _draw(grid, rng, options):
    # The number of cells and their kinds are drawn once, so that they follow
    # the documented distributions whatever the rejections; only the geometry
    # is redrawn.
    n = int(rng.integers(options.n_range[0], options.n_range[1] + 1))
    kinds = [options.kinds[i] for i in rng.integers(len(options.kinds), size=n)]
    failures = Counter()
    for _ in range(options.max_tries):
        if options.touching is False:
            wants = ["apart"] * n
        elif options.touching is True:
            wants = ["touch"] * n
        else:
            wants = ["touch" if rng.random() < 0.5 else "free" for _ in range(n)]
        levels, params = _place(grid, rng, kinds, wants)
        labels = _partition(grid, levels, apart=options.touching is False)
        problem = _problem(grid, labels, n, options)
        if problem is not None:
            failures[problem] += 1
            continue
        # Log-uniform, written so that low == high gives low exactly and no
        # rounding leaves the range.
        kappa = _log_uniform(rng, options.permeability_range, n)
        return _substrate(grid, labels, kappa, kinds, params)
    worst = failures.most_common(1)[0][0]
    counts = ", ".join(f"{_REASONS[k]}: {v}" for k, v in failures.most_common())
    raise ValueError(
        f"no valid substrate of {n} cells ({', '.join(kinds)}) in "
        f"max_tries={options.max_tries} draws on {grid!r} (rejected: {counts}); "
        f"increase max_tries, or {_ADVICE[worst]}."
    )


def _log_uniform(rng, bounds, n):
    """``n`` values log-uniform in ``bounds``, exactly ``low`` where ``low ==
    high`` and never outside them. ``high / low`` overflows beyond about
    1e308 (bounds of 1e-300 and 1e10): the draw is then taken in
    logarithms, which would change the last bit of the other draws."""
    low, high = bounds
    u = rng.uniform(size=n)
    ratio = high / low
    if np.isfinite(ratio):
        values = low * ratio**u
    else:
        values = np.exp(np.log(low) + u * (np.log(high) - np.log(low)))
    return np.clip(values, low, high)


def _place(grid, rng, kinds, wants):
    """Level values at the centroids (n, n_grid_cells) and params per cell."""
    points = grid.cell_centroids
    n = len(kinds)
    scale_lo = max(0.6 * grid.spacing, 0.1 * grid.size)
    scale_hi = max(0.35 * grid.size / n ** (1 / 3), 1.25 * scale_lo)
    values, params = [], []
    for j, kind in enumerate(kinds):
        scale = math.exp(rng.uniform(math.log(scale_lo), math.log(scale_hi)))
        want = wants[j] if j > 0 else "free"
        best = None
        for _ in range(_PLACEMENT_TRIES):
            centre = _centre(grid, rng, values, scale, want)
            level, info = _BUILDERS[kind](grid, rng, centre, scale)
            value = level(points)
            best = (value, info)
            if want == "free" or _placed(grid, value, values, want):
                break
        values.append(best[0])
        params.append(dict(best[1], scale=scale))
    return np.stack(values), params


def _centre(grid, rng, values, scale, want):
    """A shape centre: anywhere, or just outside a random earlier cell."""
    if want == "touch" and values:
        # A centroid within ``scale`` outside the earlier cell (or inside it
        # when no centroid lies in that shell), jittered by half a spacing.
        near = values[int(rng.integers(len(values)))]
        band = np.flatnonzero((near > 0) & (near < scale))
        if len(band) == 0:
            band = np.flatnonzero(near < scale)
        if len(band):
            centre = grid.cell_centroids[band[int(rng.integers(len(band)))]]
            return grid.wrap(centre + rng.uniform(-0.5, 0.5, 3) * grid.spacing)
    if want == "apart" and values:
        # A centroid at least ``scale`` away from every earlier cell.
        far = np.flatnonzero(np.min(values, axis=0) > scale)
        if len(far):
            centre = grid.cell_centroids[far[int(rng.integers(len(far)))]]
            return grid.wrap(centre + rng.uniform(-0.5, 0.5, 3) * grid.spacing)
    if grid.periodic:
        return rng.uniform(0, grid.size, 3)
    # Walled grids: the cells fill the jagged middle of the box.
    return rng.uniform(0.25 * grid.size, 0.75 * grid.size, 3)


def _placed(grid, value, values, want):
    if not values:
        return True
    inside = value < 0
    others = np.min(values, axis=0)
    if want == "touch":
        return bool(np.any(inside & (others < 0)))
    return not np.any(inside & (others < grid.spacing))


def _partition(grid, levels, *, apart):
    """Nearest-level-set labels; pieces cut off a cell go to the outside.

    ``apart``: where two cells meet, the grid cell nearer its own surface (the
    higher level) goes to the extracellular space, so that no two cells share
    a face.
    """
    best = np.argmin(levels, axis=0)
    lowest = np.take_along_axis(levels, best[None], axis=0)[0]
    labels = np.where(lowest < -_TIE_TOL * grid.spacing, best + 1, 0)
    a, b = grid.face_cells.T
    if apart:
        contact = (labels[a] != labels[b]) & (labels[a] > 0) & (labels[b] > 0)
        a_out = lowest[a[contact]] >= lowest[b[contact]]
        labels[np.where(a_out, a[contact], b[contact])] = 0
    same = (labels[a] == labels[b]) & (labels[a] > 0)
    _, component = graph_components(grid.n_cells, a[same], b[same])
    volume = np.bincount(component, weights=grid.cell_volumes)
    for k in range(1, len(levels) + 1):
        mine = labels == k
        if not mine.any():
            continue
        pieces = np.unique(component[mine])
        if len(pieces) > 1:
            keep = pieces[np.argmax(volume[pieces])]
            labels[mine & (component != keep)] = 0
    return labels


def _problem(grid, labels, n, options):
    volumes = np.bincount(labels, weights=grid.cell_volumes, minlength=n + 1)
    if np.any(volumes[1:] < options.min_cell_volume) or np.any(volumes[1:] == 0):
        return "small"
    if volumes[0] < options.min_outside * grid.volume:
        return "full"
    a, b = labels[grid.face_cells.T]
    touching = np.any((a != b) & (a > 0) & (b > 0))
    if options.touching is True and not touching:
        return "touch"
    if options.touching is False and touching:
        return "apart"
    return None


def _substrate(grid, labels, kappa, kinds, params):
    n = len(kinds)
    a, b = labels[grid.face_cells.T]
    cell_kappa = np.concatenate([[np.inf], kappa])
    ka, kb = cell_kappa[a], cell_kappa[b]
    with np.errstate(divide="ignore"):
        series = 1.0 / (1.0 / ka + 1.0 / kb)
    face = np.where(a == b, np.inf, series)
    # Series with the extracellular "membrane" 1/inf = 0 is the cell's own.
    face = np.where((a == 0) & (b > 0), kb, face)
    face = np.where((b == 0) & (a > 0), ka, face)
    volumes = np.bincount(labels, weights=grid.cell_volumes, minlength=n + 1)
    differ = a != b
    areas = np.bincount(
        a[differ], weights=grid.face_areas[differ], minlength=n + 1
    ) + np.bincount(b[differ], weights=grid.face_areas[differ], minlength=n + 1)
    return Substrate(
        labels=labels.astype(np.int64),
        permeability=kappa,
        face_permeability=face,
        volumes=volumes[1:],
        surface_areas=areas[1:],
        kinds=tuple(kinds),
        params=tuple(params),
    )


# -- kinds ------------------------------------------------------------------------
def _unit(rng):
    v = rng.standard_normal(3)
    return v / max(np.linalg.norm(v), 1e-12)


def _rotation(rng):
    """Uniformly random rotation matrix (columns: the body axes)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / max(np.linalg.norm(q), 1e-12)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _normal_to(axis, rng):
    v = _unit(rng)
    v = v - (v @ axis) * axis
    norm = np.linalg.norm(v)
    if norm < 1e-6:
        v = np.eye(3)[np.argmin(np.abs(axis))]
        v = v - (v @ axis) * axis
        norm = np.linalg.norm(v)
    return v / norm


def _floats(values):
    return tuple(float(v) for v in np.ravel(values))


def _round_cone(d, a, b, r1, r2):
    """Exact signed distance to the rounded cone from ball (a, r1) to (b, r2).

    ``d`` are offsets (N, 3) in the frame of ``a`` and ``b``; needs
    ``|r1 - r2| < |b - a|``. (The convex hull of the two balls; a capsule
    when ``r1 == r2``.)
    """
    ba = b - a
    l2 = ba @ ba
    rr = r1 - r2
    a2 = l2 - rr * rr
    pa = d - a
    y = pa @ ba
    z = y - l2
    x2 = np.sum((pa * l2 - y[:, None] * ba) ** 2, axis=1)
    y2 = y * y * l2
    z2 = z * z * l2
    k = np.sign(rr) * rr * rr * x2
    out = (np.sqrt(x2 * a2 / l2) + y * rr) / l2 - r1
    out = np.where(np.sign(y) * a2 * y2 < k, np.sqrt(x2 + y2) / l2 - r1, out)
    return np.where(np.sign(z) * a2 * z2 > k, np.sqrt(x2 + z2) / l2 - r2, out)


def _ellipsoid(grid, rng, centre, scale):
    axes = scale * 2.0 ** rng.uniform(-0.75, 0.75, 3)
    rot = _rotation(rng)

    def level(points):
        x = grid.displacement(points, centre) @ rot
        k0 = np.linalg.norm(x / axes, axis=1)
        k1 = np.linalg.norm(x / axes**2, axis=1)
        # First-order distance k0 (k0 - 1) / k1 (exact on the surface).
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = k0 * (k0 - 1) / k1
        return np.where(k1 > 0, dist, -axes.min())

    return level, dict(
        kind="ellipsoid",
        centre=_floats(centre),
        semi_axes=_floats(axes),
        rotation=tuple(map(_floats, rot)),
    )


def _capsule(grid, rng, centre, scale):
    radius = scale * rng.uniform(0.6, 1.0)
    half = scale * rng.uniform(0.5, 2.0)
    axis = _unit(rng)

    def level(points):
        d = grid.displacement(points, centre)
        return _round_cone(d, -half * axis, half * axis, radius, radius)

    return level, dict(
        kind="capsule",
        centre=_floats(centre),
        radius=radius,
        length=2 * half,
        axis=_floats(axis),
    )


def _bent_tube(grid, rng, centre, scale):
    radius = scale * rng.uniform(0.5, 0.8)
    curvature = max(rng.uniform(0.3, 0.8) * grid.size, 1.5 * radius)
    arc_length = rng.uniform(0.6, 1.4) * grid.size
    half_angle = min(arc_length / (2 * curvature), 0.75 * math.pi)
    tangent = _unit(rng)
    bend = _normal_to(tangent, rng)
    binormal = np.cross(tangent, bend)
    ends = np.array(
        [
            curvature * (1 - math.cos(half_angle)) * bend
            + s * curvature * math.sin(half_angle) * tangent
            for s in (-1, 1)
        ]
    )

    def level(points):
        # Offsets from the arc's midpoint; the circle's centre is at
        # ``curvature * bend`` from it.
        q = grid.displacement(points, centre) - curvature * bend
        u, v, w = q @ -bend, q @ tangent, q @ binormal
        angle = np.arctan2(v, u)
        on_arc = np.hypot(np.hypot(u, v) - curvature, w)
        to_end = np.min(
            np.linalg.norm((q + curvature * bend)[:, None] - ends, axis=2), axis=1
        )
        return np.where(np.abs(angle) <= half_angle, on_arc, to_end) - radius

    return level, dict(
        kind="bent_tube",
        centre=_floats(centre),
        radius=radius,
        curvature_radius=curvature,
        half_angle=half_angle,
        tangent=_floats(tangent),
        bend=_floats(bend),
    )


def _beaded_tube(grid, rng, centre, scale):
    radius = scale * rng.uniform(0.5, 0.8)
    amplitude = rng.uniform(0.25, 0.5)
    low = max(2.5 * grid.spacing, 0.25 * grid.size)
    period = rng.uniform(low, max(0.8 * grid.size, 1.2 * low))
    phase = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.6, 1.5) * grid.size
    axis = _unit(rng)
    # The radius's slope bounds the level's gradient: divide by it for an
    # approximate distance comparable with the other kinds.
    slope = math.hypot(1.0, 2 * math.pi * amplitude * radius / period)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        local = radius * (1 + amplitude * np.cos(2 * np.pi * along / period + phase))
        return np.maximum((rho - local) / slope, np.abs(along) - length / 2)

    return level, dict(
        kind="beaded_tube",
        centre=_floats(centre),
        radius=radius,
        bead_amplitude=amplitude * radius,
        bead_period=period,
        phase=phase,
        length=length,
        axis=_floats(axis),
    )


def _fanning_tube(grid, rng, centre, scale):
    root_radius = scale * rng.uniform(0.35, 0.6)
    length = rng.uniform(0.6, 1.2) * grid.size
    axis = _unit(rng)
    root = -0.5 * length * axis
    branches = 1 if rng.random() < 0.5 else 2
    if branches == 1:
        tip_radius = min(root_radius * rng.uniform(1.6, 2.5), 1.2 * scale)
        tips = [0.5 * length * axis]
        spread = 0.0
    else:
        tip_radius = min(root_radius * rng.uniform(1.2, 1.8), scale)
        spread = math.radians(rng.uniform(15, 35))
        side = _normal_to(axis, rng)
        tips = [
            root + length * (math.cos(spread) * axis + s * math.sin(spread) * side)
            for s in (-1, 1)
        ]
    # The rounded cone needs |r1 - r2| < length (always true here).
    tip_radius = min(tip_radius, root_radius + 0.5 * length)

    def level(points):
        d = grid.displacement(points, centre)
        return np.min(
            [_round_cone(d, root, tip, root_radius, tip_radius) for tip in tips],
            axis=0,
        )

    return level, dict(
        kind="fanning_tube",
        centre=_floats(centre),
        root_radius=root_radius,
        tip_radius=tip_radius,
        length=length,
        axis=_floats(axis),
        branches=branches,
        half_spread=spread,
    )


def _torus(grid, rng, centre, scale):
    minor = scale * rng.uniform(0.45, 0.7)
    major = minor * rng.uniform(1.6, 2.5)
    axis = _unit(rng)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        return np.hypot(rho - major, along) - minor

    return level, dict(
        kind="torus",
        centre=_floats(centre),
        major=major,
        minor=minor,
        axis=_floats(axis),
    )


def _blob(grid, rng, centre, scale):
    extent = scale * rng.uniform(1.3, 2.0)
    m = _BLOB_POINTS
    ticks = np.linspace(-1.0, 1.0, m)
    r2 = sum(t**2 for t in np.meshgrid(ticks, ticks, ticks, indexing="ij"))
    noise = ndimage.gaussian_filter(rng.standard_normal((m, m, m)), _BLOB_SIGMA)
    noise /= max(noise.std(), 1e-12)
    mask = (1 + 0.8 * noise - 2 * r2 > 0) & (r2 < 1)
    mask[[0, -1]] = mask[:, [0, -1]] = mask[:, :, [0, -1]] = False
    parts, count = ndimage.label(mask)
    h = 2 * extent / (m - 1)
    if count == 0:
        # An empty blob: selects no grid cell, so the draw is redrawn.
        distance = np.full(mask.shape, 2 * extent)
    else:
        sizes = np.bincount(parts.ravel())[1:]
        mask = ndimage.binary_fill_holes(parts == 1 + int(np.argmax(sizes)))
        outside = h * ndimage.distance_transform_edt(~mask) - h / 2
        inside = h * ndimage.distance_transform_edt(mask) - h / 2
        distance = np.where(mask, -inside, outside)

    def level(points):
        index = (grid.displacement(points, centre) + extent) / h
        return ndimage.map_coordinates(
            distance, index.T, order=1, mode="constant", cval=2 * extent
        )

    return level, dict(
        kind="blob",
        centre=_floats(centre),
        extent=extent,
        voxels=int(mask.sum()),
        voxel_size=h,
    )


_BUILDERS = {
    "ellipsoid": _ellipsoid,
    "capsule": _capsule,
    "bent_tube": _bent_tube,
    "beaded_tube": _beaded_tube,
    "fanning_tube": _fanning_tube,
    "torus": _torus,
    "blob": _blob,
}
