"""Several cells in one grid: parallel cylinders packed in a section
(:func:`packed_cylinders`) and cells of given sizes (:func:`cells_of_sizes`).
"""

import numpy as np

from ...checks import check_positive
from .inputs import (
    as_floats,
    axial_coordinates,
    capped,
    check_points,
    check_radii,
    normal_frame,
    unit_vector,
)
from .phantom import (
    multi_cell,
)

__all__ = [
    "CELL_SHAPES",
    "packed_cylinders",
    "cells_of_sizes",
]

CELL_SHAPES = ("sphere", "cube")


def packed_cylinders(
    grid,
    *,
    radii,
    centres=None,
    axis=(0, 0, 1),
    gap=None,
    length=None,
    kappa=1e-5,
    membership="centroid",
):
    """Several parallel cylinders, each a labelled cell.

    Faces between two different cylinders carry a membrane too (the labels
    differ there).

    Parameters
    ----------
    grid : TetGrid
    radii : array_like (k,)
        Radii in um; cylinder ``i`` gets label ``i + 1``.
    centres : array_like (k, 3), optional
        A point on each axis (um). Default: automatic non-overlapping
        placement in the plane normal to ``axis`` through the box centre --
        largest first, each at the lowest, then leftmost free position of a
        fine candidate lattice (a bottom-left packing heuristic) -- keeping
        ``gap`` between cylinders and from the box faces, then centred in the
        box. Raises when they do not fit.
    axis : array_like (3,)
        Common direction of the axes.
    gap : float, optional
        Smallest distance between cylinder surfaces and from the box faces in
        automatic placement (default: half a lattice spacing, which leaves
        extracellular cells between neighbours).
    length : float, optional
        Capped length in um; ``None`` runs through the voxel.
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radii = check_radii(radii)
    axis = unit_vector(axis)
    gap = 0.5 * grid.spacing if gap is None else float(gap)
    if not gap >= 0:
        raise ValueError(f"gap must be >= 0 um, got {gap!r}.")
    length = None if length is None else check_positive(length, "length", "um")
    e1, e2 = normal_frame(axis)
    if centres is None:
        half = grid.size / 2 - gap
        uv = _pack_discs(radii, half=half, gap=gap)
        centres = grid.size / 2 + uv[:, :1] * e1 + uv[:, 1:] * e2
    else:
        centres = check_points("centres", centres, len(radii))
        # Only the offsets normal to the common axis matter for overlap.
        rel = centres - centres.mean(axis=0)
        uv = np.stack([rel @ e1, rel @ e2], axis=1)
        _check_disjoint(uv, radii)

    def level_of(k):
        def level(points):
            along, rho = axial_coordinates(grid, points, centres[k], axis)
            return capped(rho - radii[k], along, length=length)

        return level

    params = dict(
        radii=as_floats(radii),
        centres=tuple(map(as_floats, centres)),
        axis=as_floats(axis),
        gap=gap,
        length=length,
    )
    levels = [level_of(k) for k in range(len(radii))]
    return multi_cell(
        grid,
        levels,
        kappa=kappa,
        membership=membership,
        name="packed_cylinders",
        params=params,
    )


def cells_of_sizes(
    grid,
    *,
    radii,
    shape="sphere",
    direction=(1, 0, 0),
    centres=None,
    gap=None,
    kappa=1e-5,
    membership="centroid",
):
    """Cells of different sizes side by side.

    Parameters
    ----------
    grid : TetGrid
    radii : array_like (k,)
        Radius (sphere) or half-side (axis-aligned cube) of each cell in um;
        cell ``i`` gets label ``i + 1``.
    shape : {"sphere", "cube"} or sequence of them
        One shape for all cells or one per cell.
    direction : array_like (3,)
        Line along which the cells are placed side by side (default
        placement).
    centres : array_like (k, 3), optional
        Centres in um. Default: along ``direction`` through the box centre,
        ``gap`` apart, the row centred in the box.
    gap : float, optional
        Distance between neighbouring cells in the default placement, and
        (halved) from the row's ends to the walls (default: half a lattice
        spacing).
    kappa : float
        Membrane permeability in m/s.
    membership : {"centroid", "vertices"}

    Returns
    -------
    Phantom
    """
    radii = check_radii(radii)
    shapes = [shape] * len(radii) if isinstance(shape, str) else list(shape)
    if len(shapes) != len(radii):
        raise ValueError(
            f"shape must be one name or one per cell ({len(radii)}), got {shape!r}."
        )
    for s in shapes:
        if s not in CELL_SHAPES:
            raise ValueError(f"shape {s!r} is not supported; use one of {CELL_SHAPES}.")
    gap = 0.5 * grid.spacing if gap is None else float(gap)
    if not gap >= 0:
        raise ValueError(f"gap must be >= 0 um, got {gap!r}.")
    if centres is None:
        direction = unit_vector(direction)
        # Along the row a cube reaches as far as a sphere of the same radius
        # only when the row is axis-aligned; use the cube's extent along it.
        reach = np.array(
            [
                r * (np.abs(direction).sum() if s == "cube" else 1.0)
                for r, s in zip(radii, shapes, strict=True)
            ]
        )
        total = 2 * reach.sum() + gap * (len(radii) - 1)
        # The line through the box centre crosses the box over this length.
        span = grid.size / np.abs(direction).max()
        if total + gap > span + 1e-9 * grid.spacing:
            raise ValueError(
                f"cells of total extent {total:g} um plus a gap of {gap:g} um to the "
                f"walls do not fit in the {span:g} um the box spans along "
                f"{as_floats(direction)}; use smaller radii or a smaller gap."
            )
        starts = -total / 2 + np.concatenate([[0], np.cumsum(2 * reach + gap)[:-1]])
        centres = grid.size / 2 + (starts + reach)[:, None] * direction
    else:
        centres = check_points("centres", centres, len(radii))

    def level_of(k):
        def level(points):
            d = grid.displacement(points, centres[k])
            if shapes[k] == "cube":
                return np.abs(d).max(axis=1) - radii[k]
            return np.linalg.norm(d, axis=1) - radii[k]

        return level

    params = dict(
        radii=as_floats(radii),
        shape=tuple(shapes),
        centres=tuple(map(as_floats, centres)),
        gap=gap,
    )
    levels = [level_of(k) for k in range(len(radii))]
    return multi_cell(
        grid,
        levels,
        kappa=kappa,
        membership=membership,
        name="cells_of_sizes",
        params=params,
    )


def _check_disjoint(uv, radii):
    k = len(radii)
    for i in range(k):
        for j in range(i + 1, k):
            dist = np.linalg.norm(uv[i] - uv[j])
            if dist < radii[i] + radii[j]:
                raise ValueError(
                    f"cylinders {i + 1} and {j + 1} overlap: axes {dist:.3g} um "
                    f"apart, radii {radii[i]:g} + {radii[j]:g} um."
                )


def _pack_discs(radii, *, half, gap, resolution=121):
    """Bottom-left greedy placement of discs in the square ``[-half, half]^2``.

    Returns in-plane centres (k, 2), re-centred so that the discs' bounding
    box is centred on the origin.
    """
    order = np.argsort(-radii, kind="stable")
    placed = np.zeros((len(radii), 2))
    done = []
    for i in order:
        reach = half - radii[i]
        if reach < 0:
            raise ValueError(
                f"a cylinder of radius {radii[i]:g} um with gap {gap:g} um does not "
                f"fit in a box of side {2 * (half + gap):g} um."
            )
        ticks = np.linspace(-reach, reach, resolution)
        # Rows first (v), then columns (u): the lowest, then leftmost free spot.
        v, u = np.meshgrid(ticks, ticks, indexing="ij")
        candidates = np.stack([u.ravel(), v.ravel()], axis=1)
        free = np.ones(len(candidates), dtype=bool)
        for j in done:
            dist = np.linalg.norm(candidates - placed[j], axis=1)
            free &= dist >= radii[i] + radii[j] + gap
        if not free.any():
            raise ValueError(
                f"cannot place {len(radii)} cylinders of radii {radii.tolist()} um "
                f"with gap {gap:g} um in the box; use smaller radii, a smaller gap, "
                "fewer cylinders, or explicit centres."
            )
        placed[i] = candidates[np.argmax(free)]
        done.append(i)
    lo = (placed - radii[:, None]).min(axis=0)
    hi = (placed + radii[:, None]).max(axis=0)
    return placed - (lo + hi) / 2
