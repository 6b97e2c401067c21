"""Single cells of simple solids (cylinder, sphere, torus) and the published
Spinverse targets built from them (:func:`published_phantoms`).
"""

import math
from dataclasses import replace

import numpy as np

from ...checks import check_positive
from .inputs import (
    as_floats,
    axial_coordinates,
    capped,
    shape_centre,
    unit_vector,
)
from .phantom import (
    single_cell,
)

__all__ = [
    "cylinder",
    "sphere",
    "torus",
    "published_phantoms",
]


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
    axis = unit_vector(axis)
    centre = shape_centre(grid, centre)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        return capped(rho - radius, along, length=length)

    params = dict(
        radius=radius, length=length, axis=as_floats(axis), centre=as_floats(centre)
    )
    return single_cell(
        grid, level, kappa=kappa, membership=membership, name="cylinder", params=params
    )


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
    centre = shape_centre(grid, centre)

    def level(points):
        return np.linalg.norm(grid.displacement(points, centre), axis=1) - radius

    params = dict(radius=radius, centre=as_floats(centre))
    return single_cell(
        grid, level, kappa=kappa, membership=membership, name="sphere", params=params
    )


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
    axis = unit_vector(axis)
    centre = shape_centre(grid, centre)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        return np.hypot(rho - major, along) - minor

    params = dict(
        major=major, minor=minor, axis=as_floats(axis), centre=as_floats(centre)
    )
    return single_cell(
        grid, level, kappa=kappa, membership=membership, name="torus", params=params
    )


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
