"""A template fitted to a given surface (:func:`fit_surface`, the start of
a refinement from a label surface) and the symmetric surface distance
(:func:`surface_chamfer`).
"""

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..checks import (
    check_choice,
    check_int,
)
from .mesh import TetMesh
from .shape import (
    spectral_shape,
)
from .templates import (
    TEMPLATES,
)

__all__ = [
    "surface_points",
    "surface_chamfer",
    "fit_surface",
]


def surface_points(vertices, triangles):
    """Vertices and triangle centroids of a surface: points to compare.

    Parameters
    ----------
    vertices : array_like (V, 3)
        The surface's vertices.
    triangles : array_like of int (F, 3)
        Its triangles, as vertex indices.

    Returns
    -------
    ndarray (V + F, 3)
        The vertices, then the triangle centroids.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    return np.concatenate([vertices, vertices[np.asarray(triangles)].mean(1)])


def surface_chamfer(vertices_a, triangles_a, vertices_b, triangles_b):
    """Symmetric mean nearest-point distance between two surfaces (um).

    Both surfaces are sampled at their vertices and triangle centroids; the
    distance is the mean of the two one-sided means (no centring).

    Parameters
    ----------
    vertices_a : array_like (V, 3)
        The first surface's vertices (um).
    triangles_a : array_like of int (F, 3)
        Its triangles.
    vertices_b : array_like (V', 3)
        The second surface's vertices (um).
    triangles_b : array_like of int (F', 3)
        Its triangles.

    Returns
    -------
    float
        The distance, um.
    """
    a = surface_points(vertices_a, triangles_a)
    b = surface_points(vertices_b, triangles_b)
    there = cKDTree(b).query(a)[0].mean()
    back = cKDTree(a).query(b)[0].mean()
    return float(0.5 * (there + back))


def fit_surface(
    vertices, triangles, *, template="ball", n_modes=12, directions="xyz", max_iter=150
):
    """Shape code whose surface best matches a given surface (a start).

    The template is moved to the surface's centroid, then its code fitted by
    Adam to a one-sided-each-way Chamfer loss (nearest points recomputed each
    iteration): the refinement start from a Spinverse label surface
    (:func:`dipy_spinverse.geometry.topology.barrier_mesh` of a fitted labelling).

    Parameters
    ----------
    vertices : array_like (V, 3)
        Target surface vertices (um).
    triangles : array_like of int (F, 3)
    template : {"ball", "tube"} or TetMesh
    n_modes : int
    directions : {"normal", "xyz"}
    max_iter : int

    Returns
    -------
    shape : SpectralShape
        The moved template's shape code (pass as ``template`` to
        :func:`fit_mesh`).
    code : ndarray (n_code,)
        The fitted code (pass as ``start``).
    """
    target = surface_points(vertices, triangles)
    if len(target) < 4:
        raise ValueError("the target surface needs at least 4 points.")
    max_iter = check_int(max_iter, "max_iter", 1)
    mesh = (
        TEMPLATES[check_choice(template, "template", tuple(TEMPLATES))]()
        if (isinstance(template, str))
        else template
    )
    if not isinstance(mesh, TetMesh):
        raise ValueError(f"template must be a name or a TetMesh, got {template!r}.")
    mesh = mesh.moved(mesh.vertices - mesh.vertices.mean(0) + target.mean(0))
    shape = spectral_shape(mesh, n_modes=n_modes, directions=directions)
    surface = mesh.boundary_vertices
    tree = cKDTree(target)
    target_t = torch.tensor(target)
    code = torch.zeros(shape.n_code, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([code], lr=0.2)
    for _ in range(max_iter):
        points = shape.vertices(code)[surface]
        current = points.detach().numpy()
        nearest_target = target_t[tree.query(current)[1]]
        nearest_points = points[cKDTree(current).query(target)[1]]
        loss = ((points - nearest_target) ** 2).sum(1).mean() + (
            (nearest_points - target_t) ** 2
        ).sum(1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if shape.n_inverted(code.detach().numpy()):
            with torch.no_grad():
                code.mul_(0.9)
    return shape, code.detach().numpy()
