"""Labellings and their permeability fields.

A labelling gives each grid cell 0 (outside) or ``k`` (inside cell ``k``);
its membranes are the faces between different labels, each carrying the
permeability of the cells it bounds (one row of per-cell values). Every
module of the label search builds its fields here, so that a labelling
means the same field to the scorer, the cache and the refinement.
"""

import numpy as np

from ..geometry.topology import graph_components

__all__ = [
    "OPEN_KAPPA",
    "label_field",
    "cell_labels",
    "membrane_rows",
    "membrane_fields",
    "padded_rows",
    "barrier_faces",
]

# Permeability of the search's faces without a membrane (m/s): so high that
# such a face conducts as free water does (A kappa / (kappa R + 1) is within
# 1e-5 of A / R where kappa R > 1e5: R, the diffusive resistance across the
# face, is at least 786 us/um on the default 6.7 um grid at 3e-3 mm^2/s and
# about 120 on a 1 um one), and finite, so that fields stay finite arrays.
# The face fit's upper bound (0.1 m/s), used before, left every open face a
# faint membrane: the exact labelling of the demo's cylinders misfit their
# own signals by 0.0013 of S0 (a chi-square of 7 at SNR 200, 170 at 1,000).
OPEN_KAPPA = 1e3


def label_field(grid, labels, kappas, open_kappa):
    """The permeability field of a labelling with one permeability per cell.

    Parameters
    ----------
    grid : TetGrid
    labels : ndarray of int (n_cells,)
        0 outside, ``k`` in cell ``k``.
    kappas : array_like (n_labels,)
        Membrane permeability of cell ``k`` at entry ``k - 1``, m/s.
    open_kappa : float
        Permeability of faces without a membrane.

    Returns
    -------
    ndarray (n_faces,)
        ``kappas[k - 1]`` between cell ``k`` and the outside, the two
        membranes in series between touching cells (as
        :mod:`dipy_spinverse.geometry.substrates` builds them), ``open_kappa``
        elsewhere.
    """
    rows = np.asarray(kappas, float).reshape(1, -1)
    return membrane_fields(grid, np.asarray(labels)[None], rows, open_kappa)[0]


def cell_labels(grid, labels):
    """Canonical cell labels: every connected piece of a label is a cell.

    Pieces (connected through faces with the same label) are numbered 1, 2,
    ... by decreasing volume; 0 stays outside.

    Parameters
    ----------
    grid : TetGrid
    labels : ndarray of int (n_cells,)
        Any labelling (0 outside).

    Returns
    -------
    ndarray of int (n_cells,)
    """
    a, b = grid.face_cells.T
    same = (labels[a] == labels[b]) & (labels[a] > 0)
    _, piece = graph_components(grid.n_cells, a[same], b[same])
    inside = labels > 0
    parts = np.unique(piece[inside])
    volumes = np.array([grid.cell_volumes[piece == p].sum() for p in parts])
    out = np.zeros(grid.n_cells, int)
    for k, i in enumerate(np.argsort(-volumes, kind="stable"), start=1):
        out[piece == parts[i]] = k
    return out


def membrane_rows(candidates, membranes):
    """Membrane permeability per label, (n, width) with ``width >= max label``.

    ``membranes`` is one value per candidate (every cell of a labelling
    shares it) or already a row per candidate: entry ``k - 1`` is cell
    ``k``'s permeability (m/s); entries of labels a labelling does not use
    are ignored (NaN where rows of different widths are stacked).

    Parameters
    ----------
    candidates : ndarray of int (n, n_cells)
        Labellings.
    membranes : float, array_like (n,) or ndarray (n, width)
        One permeability per labelling, or a row per labelling.

    Returns
    -------
    ndarray (n, width)
    """
    membranes = np.asarray(membranes, dtype=float)
    if membranes.ndim == 2:
        return membranes
    width = max(1, int(np.max(candidates, initial=0)))
    shared = np.broadcast_to(membranes, (len(candidates),))
    return np.repeat(shared[:, None], width, axis=1)


def membrane_fields(grid, candidates, membranes, open_kappa):
    """Permeability fields (n, n_faces) of labellings with per-cell membranes.

    A face between cell ``k`` and the outside carries cell ``k``'s membrane,
    one between touching cells ``j`` and ``k`` both membranes in series (as
    :mod:`dipy_spinverse.geometry.substrates` builds them), every other face
    ``open_kappa``. ``membranes`` as in :func:`membrane_rows`.

    Parameters
    ----------
    grid : TetGrid
    candidates : ndarray of int (n, n_cells)
        Labellings.
    membranes : float, array_like (n,) or ndarray (n, width)
        As in :func:`membrane_rows`.
    open_kappa : float
        Permeability of faces without a membrane, m/s.

    Returns
    -------
    ndarray (n, n_faces)
    """
    rows = membrane_rows(candidates, membranes)
    resistance = np.concatenate([np.zeros((len(rows), 1)), 1 / rows], axis=1)
    a, b = candidates[:, grid.face_cells[:, 0]], candidates[:, grid.face_cells[:, 1]]
    series = np.take_along_axis(resistance, a, 1) + np.take_along_axis(resistance, b, 1)
    with np.errstate(divide="ignore"):  # outside-outside faces: masked below
        return np.where(a != b, 1 / series, open_kappa)


def padded_rows(rows):
    """2-D membrane rows of different widths, stacked and padded with NaN.

    Parameters
    ----------
    rows : sequence of ndarray (n_i, width_i)

    Returns
    -------
    ndarray (sum n_i, max width_i)
    """
    width = max(r.shape[1] for r in rows)
    return np.concatenate(
        [
            np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=np.nan)
            for r in rows
        ]
    )


def barrier_faces(grid, labels):
    """Faces between different labels, (n, n_faces) bool.

    Parameters
    ----------
    grid : TetGrid
    labels : ndarray of int (n, n_cells)

    Returns
    -------
    ndarray of bool (n, n_faces)
    """
    a, b = grid.face_cells.T
    return labels[:, a] != labels[:, b]
