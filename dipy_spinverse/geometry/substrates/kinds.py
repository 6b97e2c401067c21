"""The level functions of the cell kinds :func:`random_substrate` draws
(:data:`BUILDERS`, one per kind of :data:`KINDS`): ellipsoid, capsule, bent,
beaded and fanning tubes, torus and smooth random blob.
"""

import math

import numpy as np
from scipy import ndimage

from ..phantoms import axial_coordinates
from ..phantoms.inputs import as_floats
from .substrate import (
    random_unit,
)

__all__ = [
    "BUILDERS",
]

# Regular grid of the blob's noise (points per side) and its smoothing.
_BLOB_POINTS = 24


_BLOB_SIGMA = 3.0


def _rotation(rng):
    """Uniformly random rotation matrix (columns: the body axes)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / max(np.linalg.norm(q), 1e-12)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _normal_to(axis, rng):
    v = random_unit(rng)
    v = v - (v @ axis) * axis
    norm = np.linalg.norm(v)
    if norm < 1e-6:
        v = np.eye(3)[np.argmin(np.abs(axis))]
        v = v - (v @ axis) * axis
        norm = np.linalg.norm(v)
    return v / norm


def _round_cone(d, a, b, r1, r2):
    """Exact signed distance to the rounded cone from ball (a, r1) to (b, r2).

    ``d`` are offsets (N, 3) in the frame of ``a`` and ``b``; needs
    ``|r1 - r2| < |b - a|``. (The convex hull of the two balls; a capsule
    when ``r1 == r2``.)
    """
    ba = b - a
    l2 = ba @ ba
    rr = r1 - r2
    a2 = l2 - rr * rr
    pa = d - a
    y = pa @ ba
    z = y - l2
    x2 = np.sum((pa * l2 - y[:, None] * ba) ** 2, axis=1)
    y2 = y * y * l2
    z2 = z * z * l2
    k = np.sign(rr) * rr * rr * x2
    out = (np.sqrt(x2 * a2 / l2) + y * rr) / l2 - r1
    out = np.where(np.sign(y) * a2 * y2 < k, np.sqrt(x2 + y2) / l2 - r1, out)
    return np.where(np.sign(z) * a2 * z2 > k, np.sqrt(x2 + z2) / l2 - r2, out)


def _ellipsoid(grid, rng, centre, scale):
    axes = scale * 2.0 ** rng.uniform(-0.75, 0.75, 3)
    rot = _rotation(rng)

    def level(points):
        x = grid.displacement(points, centre) @ rot
        k0 = np.linalg.norm(x / axes, axis=1)
        k1 = np.linalg.norm(x / axes**2, axis=1)
        # First-order distance k0 (k0 - 1) / k1 (exact on the surface).
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = k0 * (k0 - 1) / k1
        return np.where(k1 > 0, dist, -axes.min())

    return level, dict(
        kind="ellipsoid",
        centre=as_floats(centre),
        semi_axes=as_floats(axes),
        rotation=tuple(map(as_floats, rot)),
    )


def _capsule(grid, rng, centre, scale):
    radius = scale * rng.uniform(0.6, 1.0)
    half = scale * rng.uniform(0.5, 2.0)
    axis = random_unit(rng)

    def level(points):
        d = grid.displacement(points, centre)
        return _round_cone(d, -half * axis, half * axis, radius, radius)

    return level, dict(
        kind="capsule",
        centre=as_floats(centre),
        radius=radius,
        length=2 * half,
        axis=as_floats(axis),
    )


def _bent_tube(grid, rng, centre, scale):
    radius = scale * rng.uniform(0.5, 0.8)
    curvature = max(rng.uniform(0.3, 0.8) * grid.size, 1.5 * radius)
    arc_length = rng.uniform(0.6, 1.4) * grid.size
    half_angle = min(arc_length / (2 * curvature), 0.75 * math.pi)
    tangent = random_unit(rng)
    bend = _normal_to(tangent, rng)
    binormal = np.cross(tangent, bend)
    ends = np.array(
        [
            curvature * (1 - math.cos(half_angle)) * bend
            + s * curvature * math.sin(half_angle) * tangent
            for s in (-1, 1)
        ]
    )

    def level(points):
        # Offsets from the arc's midpoint; the circle's centre is at
        # ``curvature * bend`` from it.
        q = grid.displacement(points, centre) - curvature * bend
        u, v, w = q @ -bend, q @ tangent, q @ binormal
        angle = np.arctan2(v, u)
        on_arc = np.hypot(np.hypot(u, v) - curvature, w)
        to_end = np.min(
            np.linalg.norm((q + curvature * bend)[:, None] - ends, axis=2), axis=1
        )
        return np.where(np.abs(angle) <= half_angle, on_arc, to_end) - radius

    return level, dict(
        kind="bent_tube",
        centre=as_floats(centre),
        radius=radius,
        curvature_radius=curvature,
        half_angle=half_angle,
        tangent=as_floats(tangent),
        bend=as_floats(bend),
    )


def _beaded_tube(grid, rng, centre, scale):
    radius = scale * rng.uniform(0.5, 0.8)
    amplitude = rng.uniform(0.25, 0.5)
    low = max(2.5 * grid.spacing, 0.25 * grid.size)
    period = rng.uniform(low, max(0.8 * grid.size, 1.2 * low))
    phase = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.6, 1.5) * grid.size
    axis = random_unit(rng)
    # The radius's slope bounds the level's gradient: divide by it for an
    # approximate distance comparable with the other kinds.
    slope = math.hypot(1.0, 2 * math.pi * amplitude * radius / period)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        local = radius * (1 + amplitude * np.cos(2 * np.pi * along / period + phase))
        return np.maximum((rho - local) / slope, np.abs(along) - length / 2)

    return level, dict(
        kind="beaded_tube",
        centre=as_floats(centre),
        radius=radius,
        bead_amplitude=amplitude * radius,
        bead_period=period,
        phase=phase,
        length=length,
        axis=as_floats(axis),
    )


def _fanning_tube(grid, rng, centre, scale):
    root_radius = scale * rng.uniform(0.35, 0.6)
    length = rng.uniform(0.6, 1.2) * grid.size
    axis = random_unit(rng)
    root = -0.5 * length * axis
    branches = 1 if rng.random() < 0.5 else 2
    if branches == 1:
        tip_radius = min(root_radius * rng.uniform(1.6, 2.5), 1.2 * scale)
        tips = [0.5 * length * axis]
        spread = 0.0
    else:
        tip_radius = min(root_radius * rng.uniform(1.2, 1.8), scale)
        spread = math.radians(rng.uniform(15, 35))
        side = _normal_to(axis, rng)
        tips = [
            root + length * (math.cos(spread) * axis + s * math.sin(spread) * side)
            for s in (-1, 1)
        ]
    # The rounded cone needs |r1 - r2| < length (always true here).
    tip_radius = min(tip_radius, root_radius + 0.5 * length)

    def level(points):
        d = grid.displacement(points, centre)
        return np.min(
            [_round_cone(d, root, tip, root_radius, tip_radius) for tip in tips],
            axis=0,
        )

    return level, dict(
        kind="fanning_tube",
        centre=as_floats(centre),
        root_radius=root_radius,
        tip_radius=tip_radius,
        length=length,
        axis=as_floats(axis),
        branches=branches,
        half_spread=spread,
    )


def _torus(grid, rng, centre, scale):
    minor = scale * rng.uniform(0.45, 0.7)
    major = minor * rng.uniform(1.6, 2.5)
    axis = random_unit(rng)

    def level(points):
        along, rho = axial_coordinates(grid, points, centre, axis)
        return np.hypot(rho - major, along) - minor

    return level, dict(
        kind="torus",
        centre=as_floats(centre),
        major=major,
        minor=minor,
        axis=as_floats(axis),
    )


def _blob(grid, rng, centre, scale):
    extent = scale * rng.uniform(1.3, 2.0)
    m = _BLOB_POINTS
    ticks = np.linspace(-1.0, 1.0, m)
    r2 = sum(t**2 for t in np.meshgrid(ticks, ticks, ticks, indexing="ij"))
    noise = ndimage.gaussian_filter(rng.standard_normal((m, m, m)), _BLOB_SIGMA)
    noise /= max(noise.std(), 1e-12)
    mask = (1 + 0.8 * noise - 2 * r2 > 0) & (r2 < 1)
    mask[[0, -1]] = mask[:, [0, -1]] = mask[:, :, [0, -1]] = False
    parts, count = ndimage.label(mask)
    h = 2 * extent / (m - 1)
    if count == 0:
        # An empty blob: selects no grid cell, so the draw is redrawn.
        distance = np.full(mask.shape, 2 * extent)
    else:
        sizes = np.bincount(parts.ravel())[1:]
        mask = ndimage.binary_fill_holes(parts == 1 + int(np.argmax(sizes)))
        outside = h * ndimage.distance_transform_edt(~mask) - h / 2
        inside = h * ndimage.distance_transform_edt(mask) - h / 2
        distance = np.where(mask, -inside, outside)

    def level(points):
        index = (grid.displacement(points, centre) + extent) / h
        return ndimage.map_coordinates(
            distance, index.T, order=1, mode="constant", cval=2 * extent
        )

    return level, dict(
        kind="blob",
        centre=as_floats(centre),
        extent=extent,
        voxels=int(mask.sum()),
        voxel_size=h,
    )


BUILDERS = {
    "ellipsoid": _ellipsoid,
    "capsule": _capsule,
    "bent_tube": _bent_tube,
    "beaded_tube": _beaded_tube,
    "fanning_tube": _fanning_tube,
    "torus": _torus,
    "blob": _blob,
}
