"""Geometry and incidence of the BCC grid."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import TetGrid


def test_published_grid_counts():
    grid = TetGrid.bcc(80 / 3, 4)
    a = 80 / 3 / 4
    assert (grid.n_cells, grid.n_faces, len(grid.boundary_faces)) == (576, 1008, 288)
    # Every BCC tetrahedron is congruent: volume a^3/12, faces a^2/(2 sqrt 2).
    assert_allclose(grid.cell_volumes, a**3 / 12, rtol=1e-12)
    assert_allclose(grid.face_areas, a**2 / (2 * np.sqrt(2)), rtol=1e-12)
    assert grid.face_cells.shape == (1008, 2)
    assert grid.faces.shape == (1008, 3)


@pytest.mark.parametrize("boundary", ["reflecting", "periodic", "absorbing"])
def test_well_centred_and_orthogonal(boundary):
    grid = TetGrid.bcc(10.0, 3, boundary=boundary)
    assert np.all(grid.face_distances > 0)
    # The segment between neighbouring circumcentres is normal to the face:
    # the cross product of (c_b - c_a) with the normal vanishes.
    ca, cb = grid.cell_circumcentres[grid.face_cells].transpose(1, 0, 2)
    d = cb - ca
    if grid.periodic:
        d -= grid.size * np.round(d / grid.size)
    assert_allclose(np.cross(d, grid.face_normals), 0, atol=1e-12)
    assert_allclose(
        np.einsum("fk,fk->f", d, grid.face_normals),
        grid.face_distances.sum(1),
        rtol=1e-12,
    )


def test_periodic_cell_tiles_the_box():
    grid = TetGrid.bcc(7.0, 3, boundary="periodic")
    assert grid.n_cells == 12 * 27 and grid.n_faces == 2 * grid.n_cells
    assert len(grid.boundary_faces) == 0
    assert_allclose(grid.volume, 7.0**3, rtol=1e-12)
    assert np.all((grid.face_centroids >= 0) & (grid.face_centroids < 7.0))
    # Every edge of a periodic BCC lattice meets 4 or 6 faces (no boundary).
    assert set(np.unique(grid.edge_face_counts)) == {4, 6}


def test_homogenised_diffusivity_is_isotropic():
    """NOTES.md trap: two-point fluxes through circumcentres on BCC are exact.

    The homogenised tensor sum_f w_f d_f d_f^T / V of the discrete operator
    must equal the identity (for D = 1) to rounding, in every direction.
    """
    grid = TetGrid.bcc(5.0, 2, boundary="periodic")
    dist = grid.face_distances.sum(1)
    w = grid.face_areas / dist
    d = dist[:, None] * grid.face_normals
    tensor = np.einsum("f,fi,fj->ij", w, d, d) / grid.volume
    assert_allclose(tensor, np.eye(3), atol=1e-13)


def test_incidence_arrays():
    grid = TetGrid.bcc(10.0, 3)
    # Each interior face has three edges; every listed face appears 3 times.
    listed = grid.edge_faces[grid.edge_faces >= 0]
    assert_array_equal(np.bincount(listed, minlength=grid.n_faces), 3)
    assert_array_equal(grid.edge_face_counts, (grid.edge_faces >= 0).sum(1))
    pairs = grid.face_pairs
    assert np.all(pairs[:, 0] < pairs[:, 1])
    # Cell adjacency agrees with face_cells.
    for cell in (0, 17, grid.n_cells - 1):
        faces = grid.cell_faces[cell][grid.cell_faces[cell] >= 0]
        assert np.all(np.any(grid.face_cells[faces] == cell, axis=1))


def test_interface_faces():
    grid = TetGrid.bcc(10.0, 3)
    inside = grid.cell_centroids[:, 0] < 5.0
    faces = grid.interface_faces(inside)
    a, b = grid.face_cells[faces].T
    assert np.all(inside[a] != inside[b])
    with pytest.raises(ValueError, match="one value per cell"):
        grid.interface_faces(inside[:-1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=-1, n=2), "size"),
        (dict(size=10, n=0), "n must"),
        (dict(size=10, n=1, boundary="periodic"), "n >= 2"),
        (dict(size=10, n=1), "n >= 2"),
        (dict(size=10, n=2, boundary="open"), "boundary"),
        (dict(size=10, n=2, boundary="absorbing", wall_permeability=0), "wall"),
        (dict(size="abc", n=2), "size must be a number in um"),
        (dict(size=10, n=np.nan), "n must be an integer"),
        (dict(size=10, n=None), "n must be an integer"),
        (dict(size=10, n=True), "n must be an integer"),
        (dict(size=10, n=1, boundary="bogus"), "Invalid boundary"),
        (dict(size=10, n=2, wall_permeability=np.nan), "wall_permeability"),
        (
            dict(size=10, n=2, boundary="absorbing", wall_permeability=np.inf),
            "wall_permeability must be a finite number",
        ),
    ],
)
def test_bad_grid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TetGrid.bcc(**kwargs)
