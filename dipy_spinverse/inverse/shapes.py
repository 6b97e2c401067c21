"""Generic cell shapes on a grid: the label search's starting dictionary.

A shape is the set of cells within a radius of a *core*: a point (ball), a
line (tube), a segment (finite cylinder), a circle (ring) or an arc (bent
tube). :func:`shape_search` scores every distinct ball, tube, cylinder and
ring about the box centre, then moves the best ones through a beam search
(centre, radius, bending), and returns the best labellings found.

The sizes below are in lattice spacings (``grid.spacing``); on a lattice,
radii a fixed step apart skip whole shells of cells, so radii are taken as
the distinct shells of each core, not on a fixed step.
"""

from typing import NamedTuple

import numpy as np

from ..geometry.phantoms import axial_coordinates

__all__ = [
    "shape_search",
    "shape_search_steps",
    "run_steps",
    "shape_families",
    "Core",
    "descriptor_starts",
]

# Largest radius of a generic shape, 1.6 spacings: the published cells (radius
# 10 um = 1.5 spacings of the 26.7 um grid) fit, and a larger cell would leave
# the box with almost no extracellular water.
MAX_RADIUS = 1.6
# Half-lengths of the finite cylinders, between a ball and a tube through the
# box. No move changes a length (a length move was tried and did not help;
# doc/inversion_results.md).
HALF_LENGTHS = (1.0, 1.5)
# Ring (torus) radii from one spacing (the smallest ring with a hole) to 1.75
# (the largest that leaves the box room for its tube); the published torus is
# 1.5. Rings are here because no other start has a hole and label moves
# cannot open one.
RING_RADII = (1.0, 1.25, 1.5, 1.75)
# A ring's tube radius is at most this fraction of the ring radius, so the
# hole stays open.
RING_TUBE = 0.7
# Curvature radii of arcs (bent tubes), in spacings: from a tight bend (2) to
# one barely distinguishable from a straight tube across the box (4.5); the
# published bent axon (20 um = 3 spacings) is one of them.
ARC_RADII = (2.0, 3.0, 4.5)
# Centre moves of the beam search: a quarter spacing per step, at most 4
# steps (one spacing) from the box centre along each axis.
CENTRE_STEP = 0.25
MAX_STEPS = 4
# Families kept in the beam, and rounds at most (it stops earlier when its
# leaders no longer change; 12 rounds let a centre travel its whole range
# along all three axes).
BEAM = 4
ROUNDS = 12


def shape_search(grid, screened, n_best):
    """Generic shapes that fit the data: a dictionary, then a beam search.

    Runs :func:`shape_search_steps` with ``screened(labels) -> losses``.

    Parameters
    ----------
    grid : TetGrid
        The grid the shapes are drawn on.
    screened : callable
        ``screened(labels) -> losses``: losses (n,) of labellings
        (n, n_cells).
    n_best : int
        How many of the best shapes to return.

    Returns
    -------
    labels : ndarray of int (n, n_cells)
        The best shapes seen, best first (n <= ``n_best``).
    losses : ndarray (n,)
        Their losses.
    """
    return run_steps(shape_search_steps(grid, n_best), screened)


def run_steps(steps, score):
    """Run a search written as a generator of score requests.

    ``steps`` yields candidates to score and receives their losses; ``score``
    answers each request. Returns what the generator returns. (The label
    search drives many voxels' generators at once instead, scoring all their
    requests in shared simulator calls.)

    Parameters
    ----------
    steps : generator
        Yields requests to score and receives their scores.
    score : callable
        ``score(request) -> losses``, sent back to ``steps``.

    Returns
    -------
    object
        The generator's return value.
    """
    try:
        request = next(steps)
        while True:
            request = steps.send(score(request))
    except StopIteration as stop:
        return stop.value


def shape_search_steps(grid, n_best):
    """Generic shapes that fit the data, as a generator of score requests.

    Yields labellings (n, n_cells) to score and receives their losses (n,).

    The dictionary holds every distinct ball, tube, finite cylinder and ring
    (see :func:`shape_families`) about the box centre: all radii up to
    ``MAX_RADIUS`` spacings, because on a lattice radii a fixed step apart
    skip whole shells. All are scored.
    Then a beam search: the best shape of each of the ``BEAM`` best families
    moves its centre by ``CENTRE_STEP`` spacings along an axis (keeping its
    radius or taking one of the two shells either side) or its radius by up
    to two shells, and a tube may bend into one of its arcs, while the
    leaders change (at most ``ROUNDS`` rounds); this reaches cells off the
    centre and bent axons. Returns the labels (n, n_cells) of the ``n_best``
    best shapes seen, and their losses (n,), best first.

    Parameters
    ----------
    grid : TetGrid
        The grid the shapes are drawn on.
    n_best : int
        How many of the best shapes to return.

    Yields
    ------
    ndarray of int (n, n_cells)
        Labellings to score; the losses (n,) are sent back.

    Returns
    -------
    labels : ndarray of int (n, n_cells)
        The best shapes seen, best first (n <= ``n_best``).
    losses : ndarray (n,)
        Their losses.
    """
    origin = np.full(3, grid.size / 2)  # the phantoms' default centre
    step = CENTRE_STEP * grid.spacing
    families, bends = shape_families(grid)

    def distance(family, offset):
        centre = origin + step * np.array(offset)
        return _core_distance(grid, centre, families[family])

    def shells(family, offset):
        d = distance(family, offset)
        return np.unique(np.round(d[d <= families[family].top], 6))

    seen = {}  # labels -> (loss, shape)

    def score(shapes):
        fresh = {}
        for shape in shapes:
            labels = (distance(shape[0], shape[1]) <= shape[2] + 1e-6).astype(int)
            key = labels.tobytes()
            if 0 < labels.sum() < grid.n_cells and key not in seen:
                fresh.setdefault(key, (labels, shape))
        if fresh:
            losses = yield np.array([labels for labels, _ in fresh.values()])
            for (key, (_, shape)), loss in zip(fresh.items(), losses, strict=True):
                seen[key] = (float(loss), shape)

    def best(n):
        return sorted(seen.items(), key=lambda item: item[1][0])[:n]

    def leaders():
        """The best shape of each of the ``BEAM`` best families."""
        beam = {}
        for key, (_, shape) in best(len(seen)):
            beam.setdefault(shape[0], (key, shape))
            if len(beam) == BEAM:
                break
        return list(beam.values())

    centred = [f for f, core in enumerate(families) if core.kind != "arc"]
    yield from score([(f, (0, 0, 0), r) for f in centred for r in shells(f, (0, 0, 0))])
    beam = leaders()
    for _ in range(ROUNDS):
        moves = []
        for _, (family, offset, radius) in beam:
            for axis in range(3):
                for sign in (1, -1):
                    moved = list(offset)
                    moved[axis] += sign
                    if abs(moved[axis]) <= MAX_STEPS:
                        # Moving keeps the radius or takes a shell near it.
                        there = shells(family, tuple(moved))
                        for r in [radius, *_neighbours(there, radius, 2)]:
                            moves.append((family, tuple(moved), r))
            radii = shells(family, offset)
            moves += [(family, offset, r) for r in _neighbours(radii, radius, 2)]
            for arc in bends.get(family, ()):  # a tube may bend
                there = shells(arc, offset)
                near = [radius, *_neighbours(there, radius)]
                moves += [(arc, offset, r) for r in near]
        yield from score(moves)
        beam, previous = leaders(), beam
        if beam == previous:
            break
    found = best(n_best)
    labels = [np.frombuffer(key, dtype=int) for key, _ in found]
    labels = np.array(labels, dtype=int).reshape(-1, grid.n_cells)
    return labels, np.array([loss for _, (loss, _) in found])


class Core(NamedTuple):
    """The core of a generic shape; the shape is the cells within a radius.

    ``kind``: ``"ball"`` (a point), ``"tube"`` (a line along ``axis``),
    ``"cylinder"`` (a segment of half-length ``size`` along ``axis``),
    ``"ring"`` (a circle of radius ``size`` about ``axis``) or ``"arc"`` (a
    circle of radius ``size`` through the centre, tangent to ``axis`` there
    and bending towards ``bend``). ``top``: the largest radius (um).
    """

    kind: str
    top: float
    axis: np.ndarray | None = None
    size: float | None = None
    bend: np.ndarray | None = None


def shape_families(grid):
    """Cores of the generic shapes (:class:`Core`), and the bends of tubes.

    Balls; tubes along the 13 lattice directions (axes, face and body
    diagonals; tubes through the voxel); finite cylinders of half-length
    ``HALF_LENGTHS`` spacings with flat caps; rings of radius
    ``RING_RADII`` spacings about the 7 axes and body diagonals, with tube
    radii up to ``RING_TUBE`` of it so the ring keeps its hole (tori; no
    other start has a hole, and the label moves cannot open one); and arcs
    (bent tubes) of curvature radius ``ARC_RADII`` spacings bending towards
    each lattice direction normal to a tube's axis (up to sign: an arc and
    its point inversion give the same signal, see
    :func:`~dipy_spinverse.geometry.metrics.inversion_twin`).

    Returns the list of cores and ``{tube index: [arc indices]}``; arcs are
    reached from their tube in the beam search, not in the dictionary.
    """
    h, top = grid.spacing, MAX_RADIUS * grid.spacing
    steps = np.array(
        [[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], float
    )
    axes = [d / np.linalg.norm(d) for d in steps if tuple(d) > (0, 0, 0)]
    cores, bends = [Core("ball", top)], {}
    for axis in axes:
        cores.append(Core("tube", top, axis))
        cores += [Core("cylinder", top, axis, half * h) for half in HALF_LENGTHS]
    for axis in axes:
        if np.count_nonzero(axis) != 2:  # axes and body diagonals
            cores += [
                Core("ring", min(top, RING_TUBE * r * h), axis, r * h)
                for r in RING_RADII
            ]
    for tube, core in enumerate(list(cores)):
        if core.kind == "tube":
            normal = [d for d in axes if abs(d @ core.axis) < 1e-9]
            arcs = [
                Core("arc", top, core.axis, r * h, bend)
                for r in ARC_RADII
                for bend in normal
            ]
            bends[tube] = range(len(cores), len(cores) + len(arcs))
            cores += arcs
    return cores, bends


def _core_distance(grid, centre, core):
    """Distance of the cell centroids to the core of a shape (:class:`Core`).

    Offsets are the phantoms' (nearest periodic image on periodic grids).
    """
    x = grid.cell_centroids
    if core.kind == "ball":
        return np.linalg.norm(grid.displacement(x, centre), axis=1)
    if core.kind in ("tube", "cylinder"):
        along, across = axial_coordinates(grid, x, centre, core.axis)
        if core.kind == "tube":
            return across
        return np.where(np.abs(along) < core.size, across, np.inf)
    axis, middle = core.axis, centre
    if core.kind == "arc":  # the circle's centre is off to the bend side
        axis, middle = np.cross(core.axis, core.bend), centre + core.size * core.bend
    along, across = axial_coordinates(grid, x, middle, axis)
    return np.hypot(across - core.size, along)


def _neighbours(values, value, n=1):
    """The ``n`` entries of sorted ``values`` just below and just above ``value``."""
    i = np.searchsorted(values, value - 1e-6)
    j = np.searchsorted(values, value + 1e-6)
    return [
        values[k]
        for k in range(i - n, j + n)
        if 0 <= k < len(values) and (k < i or k >= j)
    ]


# -- starts from tissue descriptors ---------------------------------------------
# The anisotropy at most taken from a draw: 0.95 is a spheroid 4.9 times as
# long as wide, already a tube through the box for most cells.
MAX_ANISOTROPY = 0.95
# Scales of a cell's semi-axes tried to meet its volume on the grid's cells
# (a labelling is whole tetrahedra, so the nominal ellipsoid's is not).
VOLUME_SCALES = np.linspace(0.6, 1.6, 21)


def descriptor_starts(grid, draws, *, n_positions=4, seed=0):
    """Start labellings consistent with tissue descriptors.

    Each draw (one posterior sample, say) becomes ``n_cells`` prolate
    spheroids of equal volume holding its restricted fraction of the box,
    whose second moments have its anisotropy (the fractional anisotropy of
    a spheroid of axis ratio ``r`` is ``(r^2 - 1) / sqrt(r^4 + 2)``), their
    long axes along its orientation. A cell is the tetrahedra whose
    centroids lie inside its spheroid, scaled to the volume it should hold
    on this grid. One cell is placed at the box centre and ``n_positions -
    1`` random centres within a spacing of it; several cells at
    ``n_positions`` random places that keep them apart.

    Parameters
    ----------
    grid : TetGrid
    draws : dict of ndarray
        ``restricted_fraction``, ``n_cells``, ``anisotropy`` (n,) and
        ``orientation`` (n, 3) (:data:`~dipy_spinverse.geometry.DESCRIPTORS`).
    n_positions : int
        Placements per draw.
    seed : int
        Seed of the placements.

    Returns
    -------
    ndarray of int (m, n_cells)
        Distinct labellings, cells numbered 1, 2, ...; empty and full ones
        dropped.
    """
    rng = np.random.default_rng(seed)
    fractions = np.asarray(draws["restricted_fraction"], dtype=float)
    counts = np.rint(np.asarray(draws["n_cells"], dtype=float))
    anisotropy = np.clip(np.asarray(draws["anisotropy"], float), 0, MAX_ANISOTROPY)
    axes = np.asarray(draws["orientation"], dtype=float)
    starts = []
    for fraction, count, fa, axis in zip(
        fractions, counts, anisotropy, axes, strict=True
    ):
        if not (fraction > 0 and count >= 1 and np.all(np.isfinite(axis))):
            continue
        count = int(count)
        volume = fraction * grid.volume / count
        semi = _spheroid_axes(volume, _axis_ratio(fa))
        frame = _frame(axis / np.linalg.norm(axis))
        for position in range(n_positions):
            centres = _centres(grid, count, semi.max(), rng, first=position == 0)
            labels = np.zeros(grid.n_cells, int)
            for k, centre in enumerate(centres, start=1):
                free = labels == 0
                labels[_spheroid_cells(grid, centre, frame, semi, volume, free)] = k
            starts.append(labels)
    if not starts:
        return np.zeros((0, grid.n_cells), int)
    starts = np.unique(np.array(starts), axis=0)
    filled = (starts > 0).sum(1)
    return starts[(filled > 0) & (filled < grid.n_cells)]


def _axis_ratio(anisotropy):
    """Long over short axis of the spheroid of this fractional anisotropy:
    the root >= 1 of ``(q - 1)^2 = FA^2 (q^2 + 2)`` in ``q = r^2``."""
    f2 = anisotropy**2
    q = (1 + np.sqrt(1 - (f2 - 1) * (2 * f2 - 1))) / (1 - f2)
    return float(np.sqrt(q))


def _spheroid_axes(volume, ratio):
    """Semi-axes (long, short, short) of a prolate spheroid of ``volume``."""
    short = np.cbrt(3 * volume / (4 * np.pi * ratio))
    return np.array([ratio * short, short, short])


def _frame(axis):
    """Rows: ``axis`` and two unit vectors perpendicular to it and each other."""
    helper = np.eye(3)[np.argmin(np.abs(axis))]
    second = np.cross(axis, helper)
    second /= np.linalg.norm(second)
    return np.array([axis, second, np.cross(axis, second)])


def _centres(grid, count, radius, rng, *, first):
    """``count`` cell centres: the box centre first (one cell, first
    placement), else random; several cells ``2 radius`` apart and, in a
    walled box, ``radius`` from its walls, where the box allows."""
    middle = np.full(3, grid.size / 2)
    if count == 1:
        if first:
            return middle[None]
        return (middle + rng.uniform(-grid.spacing, grid.spacing, 3))[None]
    margin = 0.0 if grid.periodic else min(radius, grid.size / 2)
    centres = []
    for _ in range(50 * count):
        point = rng.uniform(margin, grid.size - margin, 3)
        apart = all(
            np.linalg.norm(grid.displacement(point, c)) >= 2 * radius for c in centres
        )
        if apart:
            centres.append(point)
        if len(centres) == count:
            break
    while len(centres) < count:  # no room: the rest anywhere
        centres.append(rng.uniform(0, grid.size, 3))
    return np.array(centres)


def _spheroid_cells(grid, centre, frame, semi, volume, free):
    """The ``free`` cells whose centroids lie in the spheroid about
    ``centre``, scaled so that their volume is nearest ``volume``."""
    local = grid.displacement(grid.cell_centroids, centre) @ frame.T
    radius = np.linalg.norm(local / semi, axis=1)
    best, best_gap = None, np.inf
    for scale in VOLUME_SCALES:
        inside = free & (radius <= scale)
        gap = abs(grid.cell_volumes[inside].sum() - volume)
        if gap < best_gap:
            best, best_gap = inside, gap
    return best
