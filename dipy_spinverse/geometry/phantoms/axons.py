"""Axon-like single cells: tubes along a circular arc (:func:`bent_axon`) and
tubes with a modulated radius (:func:`beaded_axon`).
"""

import math

import numpy as np

from ...checks import check_positive
from .inputs import (
    as_floats,
    axial_coordinates,
    capped,
    normal_frame,
    shape_centre,
    unit_vector,
)
from .phantom import (
    single_cell,
)

__all__ = [
    "circular_arc",
    "bent_axon",
    "beaded_axon",
]

# Points per chunk times polyline segments in the tube distance (memory bound).
_CHUNK = 2**20


def circular_arc(*, centre, curvature_radius, axis=(0, 0, 1), bend=None, half_angle):
    """A circular arc as a curve for :func:`bent_axon`.

    The arc passes through ``centre`` tangent to ``axis`` and bends towards
    ``bend``.

    Parameters
    ----------
    centre : array_like (3,)
        Midpoint of the arc (um).
    curvature_radius : float
        Radius of the circle (um).
    axis : array_like (3,)
        Tangent at the midpoint.
    bend : array_like (3,), optional
        Direction the arc bends towards (made normal to ``axis``); default the
        box axis least aligned with ``axis``, made normal to it (x for an
        axis along z).
    half_angle : float
        Half the angle the arc subtends (radians, in ``(0, pi]``).

    Returns
    -------
    callable
        ``curve(t)`` for ``t`` in ``[0, 1]``, returning (len(t), 3) points.
    """
    radius = check_positive(curvature_radius, "curvature_radius", "um")
    if not 0 < half_angle <= math.pi:
        raise ValueError(f"half_angle must be in (0, pi], got {half_angle!r}.")
    axis = unit_vector(axis)
    centre = np.asarray(centre, dtype=float)
    normal = normal_frame(axis)[0] if bend is None else unit_vector(bend)
    normal = normal - (normal @ axis) * axis
    if np.linalg.norm(normal) < 1e-9:
        raise ValueError("bend must not be parallel to axis.")
    normal = normal / np.linalg.norm(normal)

    def curve(t):
        theta = (2 * np.asarray(t, dtype=float) - 1) * half_angle
        return (
            centre
            + radius * np.sin(theta)[:, None] * axis
            + radius * (1 - np.cos(theta))[:, None] * normal
        )

    return curve


def bent_axon(
    grid,
    *,
    radius,
    curve=None,
    axis=(0, 0, 1),
    bend=None,
    centre=None,
    curvature_radius=None,
    n_samples=256,
    kappa=1e-5,
    membership="centroid",
):
    """A tube of constant radius along a smooth curve.

    Parameters
    ----------
    grid : TetGrid
    radius : float
        Tube radius in um.
    curve : callable or array_like (M, 3), optional
        The centre line: ``curve(t)`` for ``t`` in ``[0, 1]`` returning
        (len(t), 3) points in um (sampled at ``n_samples`` points), or the
        points of a polyline. The tube ends in hemispherical caps at the two
        ends of the curve, so a curve leaving the box gives an axon running
        through the voxel. Default: a gentle circular arc (half a circle of
        curvature radius ``curvature_radius``) through ``centre`` tangent to
        ``axis`` (see :func:`circular_arc`).
    axis : array_like (3,)
        Tangent of the default arc at ``centre``.
    bend : array_like (3,), optional
        Direction the default arc bends towards (default: x for an axis along
        z, see :func:`circular_arc`).
    centre : array_like (3,), optional
        Midpoint of the default arc (default: the box centre).
    curvature_radius : float, optional
        Curvature radius of the default arc in um (default: the box side,
        which bends the tube by ~0.13 box sides between the centre and the
        wall).
    n_samples : int
        Samples of a callable curve.
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radius = check_positive(radius, "radius", "um")
    if int(n_samples) != n_samples or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}.")
    centre = shape_centre(grid, centre)
    params = dict(radius=radius)
    if curve is None:
        curvature = grid.size if curvature_radius is None else curvature_radius
        curvature = check_positive(curvature, "curvature_radius", "um")
        if curvature <= radius:
            raise ValueError(
                f"curvature_radius ({curvature:g} um) must exceed the tube radius "
                f"({radius:g} um), or the tube overlaps itself."
            )
        curve = circular_arc(
            centre=centre,
            curvature_radius=curvature,
            axis=axis,
            bend=bend,
            half_angle=np.pi / 2,
        )
        params.update(
            curve="circular_arc",
            curvature_radius=curvature,
            axis=as_floats(unit_vector(axis)),
            centre=as_floats(centre),
        )
    elif callable(curve):
        params.update(curve=getattr(curve, "__name__", "callable"))
    else:
        params.update(curve="polyline")
    line = curve(np.linspace(0, 1, int(n_samples))) if callable(curve) else curve
    line = np.asarray(line, dtype=float)
    if line.ndim != 2 or line.shape[1] != 3 or len(line) < 2:
        raise ValueError(
            f"curve must give (M >= 2, 3) points in um, got shape {line.shape}."
        )
    if not np.all(np.isfinite(line)):
        raise ValueError("curve points must be finite.")
    # Minimum-image offsets are taken from the curve's midpoint on periodic
    # grids; elsewhere this is the identity.
    anchor = line[len(line) // 2]

    def level(points):
        d = grid.displacement(points, anchor)
        return _polyline_distance(d, line - anchor) - radius

    return single_cell(
        grid, level, kappa=kappa, membership=membership, name="bent_axon", params=params
    )


def beaded_axon(
    grid,
    *,
    radius,
    bead_amplitude,
    bead_period,
    axis=(0, 0, 1),
    centre=None,
    phase=0.0,
    length=None,
    kappa=1e-5,
    membership="centroid",
):
    """A straight axon whose radius varies sinusoidally along its length.

    The radius at axial position ``s`` (um from ``centre``) is
    ``radius + bead_amplitude * cos(2 pi s / bead_period + phase)``, so by
    default a bead sits at the centre.

    Parameters
    ----------
    grid : TetGrid
    radius : float
        Mean radius in um.
    bead_amplitude : float
        Amplitude of the radius variation in um, in ``[0, radius)``.
    bead_period : float
        Distance between beads in um.
    axis : array_like (3,)
    centre : array_like (3,), optional
        A point on the axis (default: the box centre).
    phase : float
        Phase of the beads in radians.
    length : float, optional
        Capped length in um; ``None`` runs through the voxel.
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radius = check_positive(radius, "radius", "um")
    period = check_positive(bead_period, "bead_period", "um")
    amplitude = float(bead_amplitude)
    if not 0 <= amplitude < radius:
        raise ValueError(
            f"bead_amplitude must be in [0, radius={radius:g}) um, got {amplitude!r}."
        )
    length = None if length is None else check_positive(length, "length", "um")
    axis = unit_vector(axis)
    centre = shape_centre(grid, centre)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        local = radius + amplitude * np.cos(2 * np.pi * along / period + phase)
        return capped(rho - local, along, length=length)

    params = dict(
        radius=radius,
        bead_amplitude=amplitude,
        bead_period=period,
        phase=float(phase),
        length=length,
        axis=as_floats(axis),
        centre=as_floats(centre),
    )
    return single_cell(
        grid,
        level,
        kappa=kappa,
        membership=membership,
        name="beaded_axon",
        params=params,
    )


def _polyline_distance(points, line):
    """Distance from each point to a polyline (exact, chunked over points)."""
    a, b = line[:-1], line[1:]
    ab = b - a
    ab2 = np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-300)
    step = max(1, _CHUNK // len(a))
    out = np.empty(len(points))
    for start in range(0, len(points), step):
        p = points[start : start + step, None]
        t = np.clip(np.einsum("pij,ij->pi", p - a, ab) / ab2, 0, 1)
        closest = a + t[..., None] * ab
        out[start : start + step] = np.linalg.norm(p - closest, axis=-1).min(axis=1)
    return out
