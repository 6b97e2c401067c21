"""Cells packed to a volume fraction, and fibres through the periodic box
or a section (:func:`packed_substrate`): seeds spread apart, each cell the
grid cells nearest its seed.
"""

import numpy as np

from ...checks import check_int, check_number
from ...sim.sections import SectionGrid
from ..phantoms.inputs import as_floats
from .substrate import (
    check_permeability_range,
    check_rng,
    log_uniform,
    partition,
    random_unit,
    substrate_from_labels,
)

__all__ = [
    "FIBRE_DIRECTIONS",
    "packed_substrate",
]

#: Fibre directions of :func:`packed_substrate`: the 13 lattice directions of
#: the periodic box with entries in {-1, 0, 1}, along which a straight fibre
#: meets its own periodic image (3 axes, 6 face and 4 body diagonals).
FIBRE_DIRECTIONS = tuple(
    d
    for d in ((i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1))
    if any(d) and d[next(n for n in range(3) if d[n])] > 0
)


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
    rng = check_rng(rng)
    n = check_int(n_cells, "n_cells", 1)
    fraction = check_number(fraction, "fraction", minimum=0.0, maximum=1.0)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
    elongation = check_number(elongation, "elongation", minimum=1.0)
    size_spread = check_number(size_spread, "size_spread", minimum=1.0)
    low, high = check_permeability_range(permeability_range)
    if isinstance(grid, SectionGrid):
        return _packed_section(
            grid, rng, n, fraction, fibres, axis, size_spread, low, high
        )
    if axis is None:
        axis = (
            np.asarray(FIBRE_DIRECTIONS[rng.integers(len(FIBRE_DIRECTIONS))], float)
            if fibres
            else random_unit(rng)
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
            seed=as_floats(seed),
            size=float(f),
            axis=as_floats(axis),
            elongation=float(np.inf if fibres else elongation),
        )
        for seed, f in zip(seeds, factors, strict=True)
    ]
    kappa = log_uniform(rng, (low, high), n=n)
    return substrate_from_labels(
        grid, labels, kappa=kappa, kinds=[kind] * n, params=params
    )


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
            seed=as_floats(seed @ grid.plane),
            size=float(f),
            axis=as_floats(grid.axis),
            elongation=float(np.inf),
        )
        for seed, f in zip(seeds, factors, strict=True)
    ]
    kappa = log_uniform(rng, (low, high), n=n)
    return substrate_from_labels(
        grid, labels, kappa=kappa, kinds=["fibre"] * n, params=params
    )


def _fill(grid, distance, fraction, n):
    """Labels of the cells within the radius that fills ``fraction``."""
    nearest = distance.min(axis=0)
    order = np.argsort(nearest)
    filled = np.cumsum(grid.cell_volumes[order]) / grid.volume
    radius = nearest[order[min(np.searchsorted(filled, fraction), len(order) - 1)]]
    labels = partition(grid, distance - radius * (1 + 1e-9), apart=False)
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
