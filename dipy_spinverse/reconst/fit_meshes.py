"""The meshes a label search's fit derives from its parameters: each
voxel's barrier surface (an :class:`~dipy_spinverse.geometry.topology.InterfaceMesh`)
and, with ``refine_mesh=True``, its smooth cell mesh and that mesh's
volume, area and radius. :mod:`dipy_spinverse.io.surfaces` writes them.
"""

import numpy as np

from ..geometry.topology import barrier_mesh
from ..meshfit.mesh import TetMesh, signed_volumes, triangle_areas
from ..meshfit.templates import axis_radius

__all__ = ["interface_mesh", "smooth_meshes", "mesh_measures"]


def interface_mesh(grid, barriers, labels):
    """One voxel's barrier faces as a wall-capped mesh (um).

    Parameters
    ----------
    grid : TetGrid
    barriers : ndarray of bool (n_faces,)
    labels : ndarray (n_cells,) or None
        Unused where any is -1 (a voxel not fitted).

    Returns
    -------
    InterfaceMesh
    """
    if labels is not None and np.any(labels < 0):
        labels = None
    return barrier_mesh(grid, barriers, labels=labels, cap_wall=True)


def smooth_meshes(vertices, tets, refined, shape, rows):
    """The smooth meshes of a volume: an object array of ``shape``, a
    :class:`~dipy_spinverse.meshfit.TetMesh` where the voxel's mesh was
    refined, None elsewhere.

    Parameters
    ----------
    vertices : ndarray (n_mask, V, 3)
    tets : ndarray (T, 4)
        The meshes' tetrahedra (the model's ``mesh_tets``).
    refined : ndarray of bool (n_mask,)
    shape : tuple
    rows : ndarray of int, ``shape``
        The row of each voxel among the mask's, -1 outside
        (:func:`~dipy_spinverse.masked.mask_rows`).

    Returns
    -------
    ndarray of object, ``shape``
    """
    meshes = np.empty(shape, dtype=object)
    for index in zip(*np.nonzero(rows >= 0), strict=True):
        if refined[rows[index]]:
            meshes[index] = TetMesh(vertices[rows[index]], tets)
    return meshes


def mesh_measures(vertices, tets, faces, refined, template):
    """(volume um^3, area um^2, radius um, area / volume 1/um) of each
    refined mesh, NaN elsewhere.

    The radius is the ball's of the same volume (``template="ball"``), or
    the mean distance of the side from the principal axis (``"tube"``).

    Parameters
    ----------
    vertices : ndarray (n, V, 3)
    tets : ndarray (T, 4)
    faces : ndarray (F, 3)
        The outward surface triangles.
    refined : ndarray of bool (n,)
    template : {"ball", "tube"}

    Returns
    -------
    ndarray (n, 4)
    """
    out = np.full((len(refined), 4), np.nan)
    for row in np.flatnonzero(refined):
        v = vertices[row]
        volume = signed_volumes(v, tets).sum()
        if template == "tube":
            radius = axis_radius(TetMesh(v, tets))
        else:
            radius = (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)
        area = triangle_areas(v, faces).sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            out[row] = volume, area, radius, area / volume
    return out
