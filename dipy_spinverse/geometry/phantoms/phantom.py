"""A :class:`Phantom` (labels and face permeabilities on a grid) and how a
shape becomes one: membership of the grid cells in a level function
(``"centroid"`` or ``"vertices"``) and the staircase error bound.
"""

import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Phantom",
    "MEMBERSHIPS",
    "from_function",
    "staircase_bound",
    "check_kappa",
    "single_cell",
    "multi_cell",
]

MEMBERSHIPS = ("centroid", "vertices")


# Points closer than this (relative to the lattice spacing) to a shape's
# surface count as outside. BCC centroids and vertices sit on a rational
# lattice, so exact ties are common (32 centroids of the published grid lie at
# exactly 10 um from the axis of the published 10 um cylinder); the tolerance
# resolves them the same way on every machine instead of by rounding noise.
_TIE_TOL = 1e-9


# Below this fraction of extracellular cells a phantom is suspicious: the
# signal then carries almost no information about the outside of the shape.
_MIN_OUTSIDE_FRACTION = 0.05


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
        kappa = check_kappa(kappa)
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


def check_kappa(kappa):
    """A membrane permeability, checked.

    Parameters
    ----------
    kappa : float
        Permeability in m/s.

    Returns
    -------
    float
        ``kappa``, finite and >= 0.
    """
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


def single_cell(grid, level, *, kappa, membership, name, params):
    """The phantom of one cell: the grid cells inside ``level``.

    Parameters
    ----------
    grid : TetGrid
        The grid.
    level : callable
        Level function of (n, 3) points in um, negative inside.
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}
        Which points of a grid cell must be inside.
    name : str
        The phantom's name.
    params : dict
        The shape's parameters, kept on the phantom.

    Returns
    -------
    Phantom
    """
    kappa = check_kappa(kappa)
    inside = _select(grid, level, membership)
    params = dict(params, kappa=kappa, membership=membership)
    return _finish(grid, inside.astype(np.int64), kappa, name, params)


def multi_cell(grid, levels, *, kappa, membership, name, params):
    """The phantom of several cells, one per level function (label k for
    the k-th); cells that overlap are refused.

    Parameters
    ----------
    grid : TetGrid
        The grid.
    levels : sequence of callable
        Level functions of (n, 3) points in um, negative inside.
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}
        Which points of a grid cell must be inside.
    name : str
        The phantom's name.
    params : dict
        The shapes' parameters, kept on the phantom.

    Returns
    -------
    Phantom
    """
    kappa = check_kappa(kappa)
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
