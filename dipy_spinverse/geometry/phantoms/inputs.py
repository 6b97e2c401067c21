"""The shape builders' checked inputs and coordinates: centres, axes and
their normal frames, radii and points, the coordinates along an axis
(nearest periodic image on periodic grids) and flat caps of tubes.
"""

import numpy as np

__all__ = [
    "as_floats",
    "unit_vector",
    "normal_frame",
    "shape_centre",
    "check_points",
    "check_radii",
    "axial_coordinates",
    "capped",
]


def as_floats(values):
    """Plain Python floats, for readable ``params``.

    Parameters
    ----------
    values : array_like
        Numbers of any shape.

    Returns
    -------
    tuple of float
        The flattened values.
    """
    return tuple(float(v) for v in np.ravel(values))


def unit_vector(vector):
    """A direction given by the user, normalised.

    Parameters
    ----------
    vector : array_like, shape (3,)
        A finite, non-zero vector.

    Returns
    -------
    ndarray, shape (3,)
        Its unit vector.
    """
    v = np.asarray(vector, dtype=float)
    if v.shape != (3,) or not np.all(np.isfinite(v)) or np.linalg.norm(v) == 0:
        raise ValueError(f"expected a non-zero 3-vector, got {vector!r}.")
    return v / np.linalg.norm(v)


def normal_frame(axis):
    """Unit vectors ``e1, e2`` with ``(e1, e2, axis)`` right-handed.

    ``e1`` is the box axis least aligned with ``axis``, made normal to it:
    x for an axis along z.

    Parameters
    ----------
    axis : ndarray, shape (3,)
        A unit vector.

    Returns
    -------
    e1, e2 : ndarray, shape (3,)
    """
    helper = np.eye(3)[np.argmin(np.abs(axis))]
    e1 = helper - (helper @ axis) * axis
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(axis, e1)


def shape_centre(grid, centre):
    """A shape's centre, the box centre by default.

    Parameters
    ----------
    grid : TetGrid
        The grid whose box it lies in.
    centre : array_like, shape (3,), or None
        Coordinates in um; None for the box centre.

    Returns
    -------
    ndarray, shape (3,)
    """
    if centre is None:
        return np.full(3, grid.size / 2)
    c = np.asarray(centre, dtype=float)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise ValueError(f"centre must be 3 finite coordinates in um, got {centre!r}.")
    return c


def check_points(name, points, k):
    """``k`` points in um, checked.

    Parameters
    ----------
    name : str
        The argument's name, for the error message.
    points : array_like, shape (k, 3)
        Finite coordinates in um.
    k : int
        How many there must be.

    Returns
    -------
    ndarray, shape (k, 3)
    """
    p = np.asarray(points, dtype=float)
    if p.shape != (k, 3) or not np.all(np.isfinite(p)):
        raise ValueError(
            f"{name} must be ({k}, 3) finite coordinates in um, got shape {p.shape}."
        )
    return p


def check_radii(radii):
    """One or more radii in um, checked.

    Parameters
    ----------
    radii : float or array_like
        Positive lengths in um.

    Returns
    -------
    ndarray, shape (n,)
    """
    r = np.atleast_1d(np.asarray(radii, dtype=float))
    if r.ndim != 1 or len(r) == 0 or not np.all(np.isfinite(r) & (r > 0)):
        raise ValueError(f"radii must be one or more positive lengths, got {radii!r}.")
    return r


def axial_coordinates(grid, points, centre, axis):
    """Coordinate along a unit ``axis`` through ``centre`` and distance from it.

    Offsets from ``centre`` are :meth:`TetGrid.displacement`'s (nearest
    periodic image on periodic grids).

    Parameters
    ----------
    grid : TetGrid
        The grid whose box (and periodicity) the points lie in.
    points : ndarray, shape (n, 3)
        Coordinates in um.
    centre : ndarray, shape (3,)
        A point of the axis, in um.
    axis : ndarray, shape (3,)
        A unit vector.

    Returns
    -------
    along, across : ndarray, shape (n,)
        Signed coordinate along the axis and distance from it, in um.
    """
    d = grid.displacement(points, centre)
    along = d @ axis
    return along, np.linalg.norm(d - along[:, None] * axis, axis=1)


def capped(level, along, *, length):
    """Cut a tube's level function with flat caps at +-length/2.

    Parameters
    ----------
    level : ndarray
        The tube's level values (negative inside).
    along : ndarray
        The points' coordinates along the tube's axis, in um.
    length : float or None
        The tube's length in um; None for no caps.

    Returns
    -------
    ndarray
        The capped level values.
    """
    if length is None:
        return level
    return np.maximum(level, np.abs(along) - length / 2)
