"""Barrier meshes (orientation, topology, I/O) and recovery metrics."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import TetGrid
from dipy_spinverse.geometry import phantoms as ph
from dipy_spinverse.geometry.metrics import (
    aligned_overlap,
    all_metrics,
    cell_overlap,
    chamfer_distance,
    edge_degree_fraction,
    face_scores,
    grid_symmetries,
    hausdorff_distance,
    inversion_twin,
    n_components,
    volume_overlap,
)
from dipy_spinverse.geometry.topology import (
    InterfaceMesh,
    barrier_mesh,
    cell_table,
    enclosed_cells,
)


@pytest.fixture(scope="module")
def grid():
    return TetGrid.bcc(80 / 3, 4)


@pytest.fixture(scope="module")
def periodic():
    return TetGrid.bcc(30.0, 6, boundary="periodic")


@pytest.fixture(scope="module")
def published(grid):
    return ph.published_phantoms(grid)


def _brute_nearest(grid, a, b):
    d = a[:, None] - b[None]
    if grid.periodic:
        d -= grid.size * np.round(d / grid.size)
    return np.linalg.norm(d, axis=-1).min(axis=1)


# -- meshes ---------------------------------------------------------------------
@pytest.mark.parametrize("labelled", [True, False])
def test_sphere_mesh_closed_manifold_outward(grid, labelled):
    p = ph.sphere(grid, radius=10)
    mesh = barrier_mesh(grid, p.barrier, labels=p.labels if labelled else None)
    assert mesh.n_triangles == p.barrier.sum()
    assert mesh.is_closed and mesh.is_manifold
    assert mesh.n_components == 1 and mesh.euler_characteristic == 2
    # Signed volume of the staircase surface = volume of the inside cells.
    assert_allclose(mesh.volume, grid.cell_volumes[p.inside].sum(), rtol=1e-12)
    # Each normal points out of the inside cell of its face.
    cells = grid.face_cells[mesh.face_ids]
    inner = np.where(p.inside[cells[:, 0]], cells[:, 0], cells[:, 1])
    out = grid.face_centroids[mesh.face_ids] - grid.cell_centroids[inner]
    assert np.all(np.einsum("ti,ti->t", mesh.normals, out) > 0)
    # De-duplicated vertices, all on the grid.
    assert mesh.n_vertices == len(np.unique(grid.faces[p.barrier]))
    assert len(np.unique(mesh.vertices, axis=0)) == mesh.n_vertices


def test_capped_cylinder_needs_the_wall(grid, published):
    p = published["cylinder"]
    open_mesh = barrier_mesh(grid, p.barrier, labels=p.labels)
    assert not open_mesh.is_closed and not open_mesh.is_manifold
    assert open_mesh.euler_characteristic == 0  # a tube: an annulus
    for labels in (p.labels, p.inside, None):
        capped = barrier_mesh(grid, p.barrier, labels=labels, cap_wall=True)
        assert capped.is_closed and capped.is_manifold
        assert np.sum(capped.face_ids == -1) == 16
        assert_allclose(capped.volume, grid.cell_volumes[p.inside].sum())


def test_torus_topology_and_wall_pockets(grid, published):
    p = published["torus"]
    # The published torus touches the wall and traps four 2-cell pockets in
    # the box corners: enclosed, but not inside.
    enclosed = enclosed_cells(grid, p.barrier)
    assert enclosed.sum() == 72 and p.inside.sum() == 64
    assert np.all(enclosed[p.inside])
    capped = barrier_mesh(grid, p.barrier, cap_wall=True)
    assert capped.is_closed and capped.is_manifold
    assert capped.euler_characteristic == 0 and capped.n_components == 1
    assert_allclose(capped.volume, grid.cell_volumes[p.inside].sum())
    centroid = ph.torus(grid, major=10, minor=6)
    mesh = barrier_mesh(grid, centroid.barrier, labels=centroid.labels, cap_wall=True)
    assert mesh.is_manifold and mesh.euler_characteristic == 0


def test_enclosed_cells_match_published_labels(grid, published):
    for name in ("cylinder", "tilted_cylinder", "sphere"):
        p = published[name]
        assert_array_equal(enclosed_cells(grid, p.barrier), p.inside)
    assert not enclosed_cells(grid, np.zeros(grid.n_faces, bool)).any()


def test_periodic_mesh_unwrapped_across_the_box(periodic):
    # A sphere centred on a box corner is cut into 8 pieces by the box; the
    # mesh is one contiguous closed surface.
    p = ph.sphere(periodic, radius=8, centre=(0, 0, 0))
    mesh = barrier_mesh(periodic, p.barrier)
    assert mesh.is_closed and mesh.is_manifold and mesh.n_components == 1
    assert mesh.vertices.min() < 0
    assert_allclose(mesh.volume, periodic.cell_volumes[p.inside].sum())
    # Contiguous: no wider than the sphere's staircase (diameter 16 um + cells).
    assert np.ptp(mesh.vertices, axis=0).max() <= 20 + 1e-9


def test_periodic_tube_has_a_seam(periodic):
    p = ph.cylinder(periodic, radius=6)
    mesh = barrier_mesh(periodic, p.barrier, labels=p.labels)
    # Closed in the periodic box (a torus topologically) ...
    assert mesh.is_closed and mesh.is_manifold and mesh.euler_characteristic == 0
    # ... but its coordinates are cut along a seam of duplicated vertices.
    assert mesh.n_vertices > len(np.unique(mesh.vertex_ids))


def test_touching_cells_are_not_manifold(grid):
    c = grid.size / 2
    centres = [(c - 4.5, c, c), (c + 5.5, c, c)]
    p = ph.cells_of_sizes(grid, radii=[5, 5], shape="cube", centres=centres)
    mesh = barrier_mesh(grid, p.barrier, labels=p.labels)
    assert mesh.edge_degrees.max() == 3  # T-junctions where the walls meet
    assert not mesh.is_closed and not mesh.is_manifold


def test_empty_mesh(grid):
    mesh = barrier_mesh(grid, np.zeros(grid.n_faces, bool), cap_wall=True)
    assert mesh.n_triangles == 0 and mesh.n_vertices == 0
    assert not mesh.is_closed and not mesh.is_manifold
    assert mesh.n_components == 0 and mesh.area == 0 and mesh.volume == 0


def test_smoothing_is_for_display_only(grid, published):
    mesh = barrier_mesh(grid, published["sphere"].barrier)
    before = mesh.vertices.copy()
    taubin = mesh.smooth(10)
    laplace = mesh.smooth(10, method="laplacian")
    assert_array_equal(mesh.vertices, before)
    assert_array_equal(taubin.triangles, mesh.triangles)
    assert taubin.is_closed and taubin.is_manifold
    # Laplacian smoothing shrinks; Taubin's inflating steps largely do not.
    assert laplace.volume < 0.7 * mesh.volume
    assert abs(taubin.volume - mesh.volume) < abs(laplace.volume - mesh.volume)
    with pytest.raises(ValueError, match="method"):
        mesh.smooth(2, method="cubic")


def test_mesh_validation(grid):
    with pytest.raises(ValueError, match="vertices"):
        InterfaceMesh(np.zeros((2, 3)), [[0, 1, 2]])
    with pytest.raises(ValueError, match="barrier"):
        barrier_mesh(grid, np.zeros(5, bool))
    with pytest.raises(ValueError, match="boolean"):
        barrier_mesh(grid, np.full(grid.n_faces, 1e-5))
    with pytest.raises(ValueError, match="labels"):
        barrier_mesh(grid, np.zeros(grid.n_faces, bool), labels=np.zeros(3, int))


# -- metrics --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cylinder", "tilted_cylinder", "sphere", "torus"])
def test_perfect_recovery(grid, published, name):
    p = published[name]
    m = all_metrics(grid, p.barrier, p)
    for key in ("precision", "recall", "f1", "iou", "dice", "edge_degree2_fraction"):
        assert m[key] == 1.0, key
    assert m["chamfer_um"] == m["hausdorff_um"] == m["centred_chamfer_um"] == 0
    assert m["face_error"] == 0 and m["n_components"] == 1
    assert m["is_closed"] and m["is_manifold"]
    # The torus' wall pockets are outside by its labels.
    assert m["iou_labels"] == pytest.approx(64 / 72 if name == "torus" else 1.0)
    again = all_metrics(grid, p.barrier, true_barrier=p.barrier, true_labels=p.labels)
    assert again == m


@pytest.mark.parametrize("boundary", ["reflecting", "absorbing", "periodic"])
def test_inversion_twin_has_the_same_signal(boundary):
    """Magnitude signals cannot tell a field from its inversion x -> -x.

    The inverted field's magnetisation is the complex conjugate of the
    original's, for any gradient, so |S| agrees to round-off (float64). The
    twin of an off-centre ball is another ball, and the twin of the twin is
    the original.
    """
    from dipy_spinverse import Protocol, simulate

    grid = TetGrid.bcc(12.0, 3, boundary=boundary)
    ball = ph.sphere(grid, radius=3.5, centre=(7.5, 5.0, 6.8))
    mirrored = ph.sphere(grid, radius=3.5, centre=(4.5, 7.0, 5.2))
    twin = inversion_twin(grid, ball.barrier)
    assert_array_equal(twin, mirrored.barrier)
    assert not np.array_equal(twin, ball.barrier)
    assert_array_equal(inversion_twin(grid, twin), ball.barrier)
    dirs = np.array([[1, 0, 0], [0.6, 0.8, 0], [0.2, -0.3, 0.9], [0, 0, 1]])
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    prot = Protocol.pgse([0, 2000, 3000, 1000], dirs, small_delta=0.005, big_delta=0.03)
    a = simulate(grid, np.where(ball.barrier, 2e-5, np.inf), prot)
    b = simulate(grid, np.where(twin, 2e-5, np.inf), prot)
    assert_allclose(a, b, rtol=0, atol=1e-12)
    assert np.abs(a.numpy() - 1).max() > 0.05  # and the signal is not trivial
    # The metric can score the better of the two.
    m = all_metrics(grid, twin, ball, twin=True)
    assert m["twin"] and m["f1"] == 1.0
    assert all_metrics(grid, twin, ball)["f1"] < 1.0


def test_inversion_twin_needs_a_symmetric_grid():
    grid = TetGrid.bcc(12.0, 3)
    keep = grid.cell_centroids[:, 0] < 9.5  # cut one side off: not symmetric
    lopsided = TetGrid(
        vertices=grid.vertices,
        tets=grid.tets[keep],
        size=grid.size,
        boundary="reflecting",
        wall_permeability=0.1,
        spacing=grid.spacing,
        tet_coords=grid.tet_coords[keep],
    )
    with pytest.raises(ValueError, match="inversion"):
        inversion_twin(lopsided, np.zeros(lopsided.n_faces, bool))


def test_eroded_recovery(periodic):
    true = ph.sphere(periodic, radius=9)
    eroded = ph.sphere(periodic, radius=6)
    assert np.all(true.inside[eroded.inside])
    m = all_metrics(periodic, eroded.barrier, true)
    v = periodic.cell_volumes
    ratio = v[eroded.inside].sum() / v[true.inside].sum()
    assert_allclose(m["iou"], ratio)
    assert_allclose(m["dice"], 2 * ratio / (1 + ratio))
    tp = np.sum(eroded.barrier & true.barrier)
    assert_allclose(m["precision"], tp / eroded.barrier.sum())
    assert_allclose(m["recall"], tp / true.barrier.sum())
    a = periodic.face_centroids[eroded.barrier]
    b = periodic.face_centroids[true.barrier]
    d_ab, d_ba = _brute_nearest(periodic, a, b), _brute_nearest(periodic, b, a)
    assert_allclose(m["chamfer_um"], 0.5 * (d_ab.mean() + d_ba.mean()))
    assert_allclose(m["hausdorff_um"], max(d_ab.max(), d_ba.max()))
    # About the 3 um difference in radius, within the 2.5 um lattice spacing.
    assert 0.5 < m["chamfer_um"] < 5.5
    assert np.isnan(m["centred_chamfer_um"])


def test_shifted_recovery(periodic):
    # A shift by one lattice vector moves the staircase surface exactly.
    shift = np.array([periodic.spacing, 0, 0])
    true = ph.sphere(periodic, radius=8)
    moved = ph.sphere(periodic, radius=8, centre=periodic.size / 2 + shift)
    assert moved.barrier.sum() == true.barrier.sum()
    inter = np.sum(true.inside & moved.inside)
    union = np.sum(true.inside | moved.inside)
    m = all_metrics(periodic, moved.barrier, true)
    assert_allclose(m["iou"], inter / union)  # equal cell volumes
    assert m["f1"] < 1
    # Every point of one surface has a partner exactly `shift` away.
    assert 0 < m["chamfer_um"] <= m["hausdorff_um"] <= periodic.spacing + 1e-9
    a = periodic.face_centroids[moved.barrier]
    b = periodic.face_centroids[true.barrier]
    d_ab, d_ba = _brute_nearest(periodic, a, b), _brute_nearest(periodic, b, a)
    assert_allclose(m["chamfer_um"], 0.5 * (d_ab.mean() + d_ba.mean()))
    assert_allclose(m["hausdorff_um"], max(d_ab.max(), d_ba.max()))


def test_centred_chamfer_is_blind_to_shifts(grid):
    c = grid.size / 2
    true = ph.sphere(grid, radius=8, centre=(c, c, c))
    moved = ph.sphere(grid, radius=8, centre=(c + grid.spacing / 2,) * 3)
    assert chamfer_distance(grid, moved.barrier, true.barrier) > 1
    assert_allclose(
        chamfer_distance(grid, moved.barrier, true.barrier, centre=True), 0, atol=1e-9
    )


def test_empty_barriers(grid, published):
    none = np.zeros(grid.n_faces, bool)
    p = published["sphere"]
    m = all_metrics(grid, none, p)
    assert m["precision"] == m["recall"] == m["f1"] == 0
    assert m["iou"] == m["dice"] == 0
    assert m["chamfer_um"] == m["hausdorff_um"] == np.inf
    assert np.isnan(m["edge_degree2_fraction"]) and m["n_components"] == 0
    assert not m["is_closed"]
    assert hausdorff_distance(grid, p.barrier, none) == np.inf
    assert chamfer_distance(grid, none, none) == 0
    assert face_scores(none, none)["f1"] == 1
    assert volume_overlap(grid, none, np.zeros(grid.n_cells, bool))["iou"] == 1


def test_open_sheet_edges(grid, published):
    # Half of a sphere's membrane: open, with degree-1 edges along the cut.
    p = published["sphere"]
    half = p.barrier & (grid.face_centroids[:, 2] < grid.size / 2)
    frac = edge_degree_fraction(grid, half)
    assert 0 < frac < 1
    assert n_components(grid, half) >= 1
    assert not enclosed_cells(grid, half).any()


def test_metric_validation(grid, published):
    p = published["sphere"]
    with pytest.raises(ValueError, match="either"):
        all_metrics(grid, p.barrier, p, true_barrier=p.barrier)
    with pytest.raises(ValueError, match="true_barrier"):
        all_metrics(grid, p.barrier)
    with pytest.raises(ValueError, match="boolean"):
        face_scores(p.permeability, p.barrier)
    with pytest.raises(ValueError, match="shape"):
        face_scores(p.barrier[:10], p.barrier)


def test_cell_table_reads_nested_membranes_whatever_the_numbering():
    """Slabs along x: wall | cell 2 | cell 3 | cell 1 | outside. Cell 2 touches
    only cell 3, which is numbered after it; the series rule still gives each
    cell its own membrane (it gave NaN for cell 2 before).
    """
    from dipy_spinverse.inverse.fields import label_field

    grid = TetGrid.bcc(16.0, 4)
    x = grid.cell_centroids[:, 0]
    labels = np.select([x < 4, x < 6, x < 12], [2, 3, 1], 0)
    kappa = np.array([1e-5, 3e-5, 5e-5])
    table = cell_table(grid, labels, label_field(grid, labels, kappa, 0.1))
    assert_allclose(table["permeability"], kappa, rtol=1e-12)
    assert_allclose(table["volume"], np.bincount(labels, grid.cell_volumes)[1:])


def _ball(grid, centre, radius):
    d = grid.displacement(grid.cell_centroids, np.asarray(centre, dtype=float))
    return np.linalg.norm(d, axis=1) < radius


def test_aligned_overlap_forgives_lattice_translations_and_inversion():
    """On a periodic BCC grid a cell moved by a lattice vector (here the half
    body diagonal plus a cube edge) and inverted scores aligned IoU 1 while
    its plain IoU is near 0; a shift that is not a lattice vector is not
    forgiven. 2 x 4^3 translations x 2 (inversion) maps."""
    grid = TetGrid.bcc(16.0, 4, boundary="periodic")
    maps, names = grid_symmetries(grid)
    assert len(maps) == 2 * 2 * 4**3 and names[0] == "identity"
    assert np.all(np.sort(maps, axis=1) == np.arange(grid.n_cells))  # bijections
    h = grid.spacing
    truth = _ball(grid, (3.0, 5.0, 6.0), 3.5)
    moved_centre = np.array([3.0, 5.0, 6.0]) + h / 2 + np.array([h, 0, 0])
    found = _ball(grid, grid.wrap(16.0 - moved_centre), 3.5)
    assert cell_overlap(grid, found, truth)["iou"] < 0.2
    aligned = aligned_overlap(grid, found, truth)
    assert aligned["iou"] == pytest.approx(1.0)
    assert "inversion" in aligned["symmetry"]
    off_lattice = _ball(grid, (3.0 + h / 3, 5.0, 6.0), 3.5)
    assert aligned_overlap(grid, off_lattice, truth)["iou"] < 0.95


def test_aligned_overlap_on_a_walled_grid_forgives_inversion_only():
    grid = TetGrid.bcc(16.0, 4)
    maps, names = grid_symmetries(grid)
    assert names == ["identity", "inversion"]
    truth = _ball(grid, (5.0, 6.0, 7.0), 3.0)
    assert aligned_overlap(grid, truth[maps[1]], truth)["iou"] == pytest.approx(1.0)
    shifted = _ball(grid, (5.0 + grid.spacing, 6.0, 7.0), 3.0)
    assert aligned_overlap(grid, shifted, truth)["iou"] < 1.0
