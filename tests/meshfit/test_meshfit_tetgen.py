"""Meshing an arbitrary closed surface with TetGen (optional ``tetgen``)."""

import numpy as np
import pytest

from dipy_spinverse.meshfit import ball_mesh, mesh_signal, surface_tet_mesh
from dipy_spinverse.meshfit.mesh import triangle_areas
from dipy_spinverse.sim.sequences import Protocol

pytest.importorskip("tetgen")


def _ellipsoid_surface():
    """A closed ellipsoid surface (semi-axes 3, 4, 5 um), not a template."""
    ball = ball_mesh(1.0, resolution=3)
    used = ball.boundary_vertices
    renumber = np.full(ball.n_vertices, -1)
    renumber[used] = np.arange(len(used))
    return ball.vertices[used] * [3.0, 4.0, 5.0], renumber[ball.boundary_faces]


def _enclosed_volume(vertices, triangles):
    p = vertices[triangles]
    return np.einsum("fd,fd->f", p[:, 0], np.cross(p[:, 1], p[:, 2])).sum() / 6.0


def test_surface_tet_mesh_fills_the_surface():
    vertices, triangles = _ellipsoid_surface()
    mesh = surface_tet_mesh(vertices, triangles, max_volume=2.0)
    # TetGen keeps the boundary (points it adds lie on the facets): the
    # volume and area are the surface's own, to round-off.
    assert mesh.volume == pytest.approx(_enclosed_volume(vertices, triangles), 1e-9)
    assert mesh.surface_area == pytest.approx(
        triangle_areas(vertices, triangles).sum(), 1e-9
    )
    assert np.all(mesh.volumes > 0) and mesh.volumes.max() <= 2.0 + 1e-9
    # A smaller bound, more tetrahedra; the simulator runs on the result.
    finer = surface_tet_mesh(vertices, triangles, max_volume=0.5)
    assert finer.n_tets > mesh.n_tets
    protocol = Protocol.pgse(
        [0.0, 1000.0], [[0, 0, 0], [1, 0, 0]], small_delta=0.01, big_delta=0.03
    )
    signal = mesh_signal(mesh, protocol).numpy()
    assert signal[0] == pytest.approx(1.0) and 0 < signal[1] < 1
    with pytest.raises(ValueError, match="vertices must be"):
        surface_tet_mesh(vertices[:3], triangles)
