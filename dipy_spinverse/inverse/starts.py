"""The label search's starts: closed labellings to descend from.

The regions the thresholded face field suggests (:func:`face_field_starts`)
and the generic shapes of
:func:`~dipy_spinverse.inverse.shapes.shape_search` screened on a few
directions (:func:`screened_shapes`); the shapes screened at every
permeability are a reserve, descended from only when one beats the answer
(:func:`screen_reserve`).
"""

import numpy as np

from ..geometry.topology import barrier_regions, enclosed_cells, odd_depth_cells
from .moves import best_kappa, descend
from .shapes import shape_search_steps

__all__ = [
    "FACE_FIELD_REGIONS",
    "RESCREEN_MAX",
    "face_field_starts",
    "screened_shapes",
    "screen_reserve",
]

# Largest regions of the face field offered as starts (a field that walls
# off a corner of the box makes its enclosed set nearly everything, so each
# large region is also tried alone).
FACE_FIELD_REGIONS = 8

# At most this many screened shapes within the screen's noise of the best are
# ranked again on the search directions (at SNR 30 the true shape ranked
# 40th-184th of ~1,000 in the screen; doc/inversion_results.md).
RESCREEN_MAX = 256


def face_field_starts(grid, barrier, *, n_regions=FACE_FIELD_REGIONS):
    """Closed labellings the thresholded face field suggests.

    The cells it encloses, the cells at odd barrier depth, and each of its
    ``n_regions`` largest regions alone.

    Parameters
    ----------
    grid : TetGrid
    barrier : ndarray of bool (n_faces,)
        The thresholded face field.
    n_regions : int
        Largest regions offered alone.

    Returns
    -------
    ndarray of int (n, n_cells)
        Distinct 0/1 labellings, neither empty nor full.
    """
    region, outside = barrier_regions(grid, barrier)
    volume = np.bincount(region, weights=grid.cell_volumes)
    volume[outside] = 0
    largest = [r for r in np.argsort(volume)[::-1][:n_regions] if volume[r] > 0]
    candidates = [enclosed_cells(grid, barrier), odd_depth_cells(grid, barrier)]
    candidates += [region == r for r in largest]
    candidates = np.unique(np.array(candidates, dtype=int), axis=0)
    return candidates[(candidates.sum(1) > 0) & (candidates.sum(1) < grid.n_cells)]


def screened_shapes(grid, config, *, spread, kappas=None):
    """The ``search_starts`` generic shapes that best fit a voxel (generator).

    Shapes are screened on a few directions (the "screen" requests; see
    :mod:`~dipy_spinverse.inverse.search`) at two permeabilities (the
    smallest and the middle of ``search_kappas``). With
    noise, the few screening directions cannot rank shapes whose losses
    differ by less than the screen's own ``spread``: those are ranked again
    on the search directions. ``kappas``: screen at these instead.

    Parameters
    ----------
    grid : TetGrid
    config : InversionConfig
    spread : float
        The screen's own loss spread under the noise.
    kappas : array_like, optional
        Permeabilities to screen at (m/s).

    Returns
    -------
    ndarray of int (search_starts, n_cells)
        The best shapes, best first.
    """
    if kappas is None:
        kappas = np.asarray(config.search.kappas)
        pair = kappas[[0, len(kappas) // 2]]
    else:
        pair = np.asarray(kappas, dtype=float)
    steps = shape_search_steps(grid, RESCREEN_MAX)
    try:
        request = next(steps)
        while True:
            losses = (yield from best_kappa("screen", request, pair))[2].min(1)
            request = steps.send(losses)
    except StopIteration as stop:
        shapes, quick_losses = stop.value
    best = quick_losses[0] if len(quick_losses) else np.inf
    n_close = np.searchsorted(quick_losses, best + spread, "right")
    shapes = shapes[: max(config.search.starts, n_close)]
    if len(shapes) > config.search.starts:
        losses = (yield from best_kappa("search", shapes, pair))[2].min(1)
        shapes = shapes[np.argsort(losses, kind="stable")]
    return shapes[: config.search.starts]


def screen_reserve(grid, found, config, *, spread, min_gain, report):
    """The descent's answer, or a better one from a wider screen (generator).

    The screen that picks the descent's starts (:func:`screened_shapes`)
    scores shapes at the smallest and the middle of ``search_kappas`` only;
    a cell far from both can rank below shapes that mimic it there (the
    README demo's 1e-4 m/s cylinder came back at IoU 0.59, chi-square 137
    against the truth's 108). Screening at every permeability to pick the
    starts instead admitted starts that out-scored the right one before any
    descent (the published bent axon at SNR 100 was lost). So the shapes of
    the screen at every permeability are a reserve: they are descended from
    only when one of them, as screened, already fits better than the
    descent's answer by more than ``min_gain``, and the better of the two
    answers is kept. A descended answer that is right is rarely beaten by
    an undescended shape, so the reserve is seldom descended from.

    Parameters
    ----------
    grid : TetGrid
    found : tuple
        The descent's (labels, membrane row).
    config : InversionConfig
    spread : float
        The screen's own loss spread under the noise.
    min_gain : float
        A move, and the reserve, must lower the loss by more than this.
    report : callable
        ``report(step, loss)`` after every descent step.

    Returns
    -------
    tuple
        (labels, membrane row): the better answer.
    """
    kappas = np.asarray(config.search.kappas)
    labels, membrane = found
    reserve = yield from screened_shapes(grid, config, spread=spread, kappas=kappas)
    answer = (yield "search", labels[None], membrane[None])[0]
    _, _, losses = yield from best_kappa("search", reserve, kappas)
    if not losses.min() < answer - min_gain:
        return found
    other = yield from descend(grid, reserve, config, min_gain=min_gain, report=report)
    other_loss = (yield "search", other[0][None], other[1][None])[0]
    return other if other_loss < answer else found
