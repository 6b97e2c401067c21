"""The maps a label search's fit derives from its parameters, one function
each, over the rows of a mask (``(n_mask, ...)``, see
:mod:`~dipy_spinverse.reconst.voxels`): barriers, surface-to-volume,
membrane permeability, enclosed compartments and per-cell tables.
:class:`~dipy_spinverse.reconst.fit.SpinverseFit` spreads them over its
volume.
"""

import numpy as np

from ..geometry.topology import barrier_regions, cell_table

__all__ = [
    "CELL_COLUMNS",
    "barrier",
    "surface_to_volume",
    "membrane_permeability",
    "compartments",
    "cell_tables",
]

#: The per-cell columns of :func:`~dipy_spinverse.geometry.topology.cell_table`.
CELL_COLUMNS = ("volume", "surface_area", "permeability")


def barrier(permeability, threshold):
    """Faces below the barrier ``threshold`` (m/s): the membranes (NaN: none).

    Parameters
    ----------
    permeability : ndarray (..., n_faces)
    threshold : float

    Returns
    -------
    ndarray of bool (..., n_faces)
    """
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(permeability, nan=np.inf) < threshold


def surface_to_volume(grid, barriers):
    """Barrier area per box volume (1/um) of each row of ``barriers``
    (..., n_faces) on ``grid``.

    Parameters
    ----------
    grid : TetGrid
        The grid (its face areas, um^2, and volume, um^3).
    barriers : array_like (..., n_faces)
        Barrier indicators (or weights) per interior face.

    Returns
    -------
    ndarray (...)
        The surface-to-volume ratio of each row, 1/um.
    """
    return (barriers @ grid.face_areas) / grid.volume


def membrane_permeability(permeability, barriers):
    """Mean permeability over each row's barrier faces (m/s; NaN without any).

    Parameters
    ----------
    permeability : ndarray (n, n_faces)
    barriers : ndarray of bool (n, n_faces)

    Returns
    -------
    ndarray (n,)
    """
    count = barriers.sum(-1)
    total = np.where(barriers, permeability, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def compartments(grid, permeability, labels, fitted, threshold):
    """(restricted fraction, enclosed compartments) of each fitted row.

    With labels, the volume fraction of the labelled cells and their count;
    without, the regions the barriers close off from the largest region at
    the wall (extracellular pockets included).

    Parameters
    ----------
    grid : TetGrid
    permeability : ndarray (n, n_faces)
    labels : ndarray (n, n_cells) or None
    fitted : ndarray of bool (n,)
        The rows with outputs; the others are NaN.
    threshold : float
        The barrier threshold (m/s).

    Returns
    -------
    ndarray (n, 2)
    """
    out = np.full((len(permeability), 2), np.nan)
    for row in np.flatnonzero(fitted):
        if labels is not None:
            # The labels say which side is inside; the regions below guess
            # it (the largest region at the wall is the outside, wrong for a
            # cell larger than its extracellular space).
            inside = labels[row] > 0
            out[row] = (
                grid.cell_volumes[inside].sum() / grid.volume,
                labels[row].max(initial=0),
            )
            continue
        region, outside = barrier_regions(grid, barrier(permeability[row], threshold))
        enclosed = region != outside
        out[row] = (
            grid.cell_volumes[enclosed].sum() / grid.volume,
            len(np.unique(region[enclosed])),
        )
    return out


def cell_tables(grid, labels, permeability, fitted):
    """Each fitted row's :func:`~dipy_spinverse.geometry.topology.cell_table`.

    Parameters
    ----------
    grid : TetGrid
    labels : ndarray (n, n_cells)
    permeability : ndarray (n, n_faces)
    fitted : ndarray of bool (n,)

    Returns
    -------
    dict of ndarray (n, max cells)
        One per :data:`CELL_COLUMNS`, NaN past a row's cells.
    """
    n = int(np.max(labels[fitted], initial=0)) if fitted.any() else 0
    out = {k: np.full((len(labels), n), np.nan) for k in CELL_COLUMNS}
    for row in np.flatnonzero(fitted):
        table = cell_table(grid, labels[row], permeability[row])
        for name, values in table.items():
            out[name][row, : len(values)] = values
    return out
