"""Seeded random substrates of a few cells of random kinds
(:func:`random_substrate`, :func:`random_substrates`): options checked once,
cells placed to touch or avoid each other, draws rejected and redrawn.
"""

import math
import numbers
from collections import Counter
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

from ...checks import check_int, check_number
from ...sim.grid import TetGrid
from .kinds import (
    BUILDERS,
)
from .substrate import (
    KINDS,
    check_permeability_range,
    check_rng,
    log_uniform,
    partition,
    substrate_from_labels,
)

__all__ = [
    "random_substrate",
    "random_substrates",
]

# Proposals per cell for a position that touches (or avoids) earlier cells.
_PLACEMENT_TRIES = 8


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
    return _draw(grid, check_rng(rng), options)


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
    permeability_range = check_permeability_range(permeability_range)
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


def _seed(seed, name):
    ok = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
    if not ok or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}.")
    return int(seed)


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
        labels = partition(grid, levels, apart=options.touching is False)
        problem = _problem(grid, labels, n, options)
        if problem is not None:
            failures[problem] += 1
            continue
        # Log-uniform, written so that low == high gives low exactly and no
        # rounding leaves the range.
        kappa = log_uniform(rng, options.permeability_range, n=n)
        return substrate_from_labels(
            grid, labels, kappa=kappa, kinds=kinds, params=params
        )
    worst = failures.most_common(1)[0][0]
    counts = ", ".join(f"{_REASONS[k]}: {v}" for k, v in failures.most_common())
    raise ValueError(
        f"no valid substrate of {n} cells ({', '.join(kinds)}) in "
        f"max_tries={options.max_tries} draws on {grid!r} (rejected: {counts}); "
        f"increase max_tries, or {_ADVICE[worst]}."
    )


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
            level, info = BUILDERS[kind](grid, rng, centre, scale)
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
