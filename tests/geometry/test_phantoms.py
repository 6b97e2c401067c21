"""Ground-truth phantoms: cell selection, membranes, validation."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from dipy_spinverse import TetGrid
from dipy_spinverse.geometry import phantoms as ph


@pytest.fixture(scope="module")
def published_grid():
    return TetGrid.bcc(80 / 3, 4)


@pytest.fixture(scope="module")
def fine_grid():
    # Periodic, so that cells tile the box exactly and shapes are not cut by
    # a jagged wall: 3 um lattice, 12,000 cells.
    return TetGrid.bcc(30.0, 10, boundary="periodic")


def _builders():
    return {
        "cylinder": lambda g: ph.cylinder(g, radius=8),
        "capped_cylinder": lambda g: ph.cylinder(g, radius=6, length=14),
        "sphere": lambda g: ph.sphere(g, radius=9),
        "torus": lambda g: ph.torus(g, major=8, minor=4.5),
        "bent_axon": lambda g: ph.bent_axon(g, radius=5),
        "beaded_axon": lambda g: ph.beaded_axon(
            g, radius=6, bead_amplitude=2, bead_period=80 / 6
        ),
        "packed_cylinders": lambda g: ph.packed_cylinders(g, radii=[4, 3.5, 3]),
        "cells_of_sizes": lambda g: ph.cells_of_sizes(g, radii=[3.5, 5.5]),
    }


def test_published_inside_counts(published_grid):
    """The published range 48-112 of 576 comes from all-vertices membership."""
    counts = {
        name: int(p.inside.sum())
        for name, p in ph.published_phantoms(published_grid).items()
    }
    assert counts == dict(cylinder=112, tilted_cylinder=48, sphere=48, torus=64)
    centroid = ph.published_phantoms(published_grid, membership="centroid")
    counts = {name: int(p.inside.sum()) for name, p in centroid.items()}
    assert counts == dict(cylinder=280, tilted_cylinder=176, sphere=168, torus=216)


@pytest.mark.parametrize("name", list(_builders()))
def test_membrane_is_exactly_the_interface(published_grid, name):
    grid = published_grid
    p = _builders()[name](grid)
    assert p.permeability.shape == (grid.n_faces,)
    assert p.labels.shape == (grid.n_cells,)
    assert_array_equal(p.barrier, grid.interface_faces(p.labels))
    assert np.all(p.permeability[p.barrier] == 1e-5)
    assert np.all(np.isinf(p.permeability[~p.barrier]))
    # Every label present, extracellular space left around the cells.
    assert set(np.unique(p.labels)) == set(range(p.n_labels + 1))
    assert 0 < p.inside.sum() < grid.n_cells


def _tube_volume(radius, length):
    return math.pi * radius**2 * length


@pytest.mark.parametrize(
    "name, build, volume, area",
    [
        (
            "sphere",
            lambda g: ph.sphere(g, radius=8),
            4 / 3 * math.pi * 8**3,
            4 * math.pi * 8**2,
        ),
        (
            "cylinder",
            lambda g: ph.cylinder(g, radius=6),
            _tube_volume(6, 30),
            2 * math.pi * 6 * 30,
        ),
        (
            "capped_tilted",
            lambda g: ph.cylinder(g, radius=5, length=14, axis=(1, 1, 1)),
            _tube_volume(5, 14),
            2 * math.pi * 5 * 14 + 2 * math.pi * 25,
        ),
        (
            "torus",
            lambda g: ph.torus(g, major=9, minor=4),
            2 * math.pi**2 * 9 * 4**2,
            4 * math.pi**2 * 9 * 4,
        ),
        (
            # Two whole bead periods: mean of (r + a cos)^2 is r^2 + a^2 / 2.
            "beaded",
            lambda g: ph.beaded_axon(g, radius=6, bead_amplitude=2, bead_period=15),
            math.pi * (36 + 2) * 30,
            2 * math.pi * 6 * 30 * 1.05,
        ),
        (
            # A capped arc inside the box: Pappus plus two hemispheres.
            "bent",
            lambda g: ph.bent_axon(
                g,
                radius=4,
                curve=ph.circular_arc(
                    centre=(15, 15, 15), curvature_radius=20, half_angle=0.4
                ),
            ),
            _tube_volume(4, 16) + 4 / 3 * math.pi * 4**3,
            2 * math.pi * 4 * 16 + 4 * math.pi * 16,
        ),
    ],
)
def test_volume_within_staircase_error(fine_grid, name, build, volume, area):
    p = build(fine_grid)
    cells = fine_grid.cell_volumes[p.inside].sum()
    # Rigorous first-order bound, and the few per cent measured in practice.
    assert abs(cells - volume) <= ph.staircase_bound(fine_grid, area=area)
    assert abs(cells - volume) <= 0.08 * volume, name


def test_vertices_membership_is_a_subset(fine_grid):
    loose = ph.sphere(fine_grid, radius=8)
    strict = ph.sphere(fine_grid, radius=8, membership="vertices")
    assert np.all(loose.inside[strict.inside])
    assert fine_grid.cell_volumes[strict.inside].sum() < 4 / 3 * math.pi * 8**3


def test_periodic_shapes_wrap(fine_grid):
    # Moving the centre by lattice vectors (here to a box corner) moves the
    # selection with it, wrapped across the faces of the box.
    centred = ph.sphere(fine_grid, radius=7)
    corner = ph.sphere(fine_grid, radius=7, centre=(0, 0, 0))
    assert centred.inside.sum() == corner.inside.sum()
    assert corner.inside[np.argmin(fine_grid.cell_centroids.sum(1))]


def test_ties_resolved_outside(published_grid):
    # 32 centroids lie at exactly 10 um from the axis; they count as outside.
    p = ph.cylinder(published_grid, radius=10, membership="centroid")
    assert p.inside.sum() == 280
    assert ph.cylinder(published_grid, radius=10 + 1e-6).inside.sum() == 312


def test_packed_cylinders_placement(published_grid):
    grid = published_grid
    p = ph.packed_cylinders(grid, radii=[4, 3.5, 3])
    assert p.n_labels == 3
    centres = np.array(p.params["centres"])
    radii = np.array(p.params["radii"])
    gap = p.params["gap"]
    for i in range(3):
        for j in range(i + 1, 3):
            dist = np.linalg.norm(centres[i, :2] - centres[j, :2])
            assert dist >= radii[i] + radii[j] + gap - 1e-9
    assert np.all(np.abs(centres[:, :2] - grid.size / 2) <= grid.size / 2 - gap)


def test_touching_cells_share_a_membrane(published_grid):
    grid = published_grid
    c = grid.size / 2
    # Two cubes meeting at x = c + 0.5 (off the lattice planes: no ties).
    centres = [(c - 4.5, c, c), (c + 5.5, c, c)]
    p = ph.cells_of_sizes(grid, radii=[5, 5], shape="cube", centres=centres)
    l0, l1 = p.labels[grid.face_cells].T
    between = (l0 > 0) & (l1 > 0) & (l0 != l1)
    assert between.sum() == 8
    assert np.all(p.barrier[between])
    with pytest.raises(ValueError, match="overlap"):
        ph.packed_cylinders(grid, radii=[5, 5], centres=[(c - 4, c, c), (c + 4, c, c)])
    with pytest.raises(ValueError, match="cannot place"):
        ph.packed_cylinders(grid, radii=[6, 6, 6, 6])


def test_cells_of_sizes(published_grid):
    grid = published_grid
    p = ph.cells_of_sizes(grid, radii=[3.5, 5.5])
    assert_array_equal(np.bincount(p.labels), [540, 4, 32])
    cubes = ph.cells_of_sizes(grid, radii=[2.5, 4], shape=["cube", "sphere"])
    assert cubes.params["shape"] == ("cube", "sphere")
    with pytest.raises(ValueError, match="do not fit"):
        ph.cells_of_sizes(grid, radii=[6, 8])
    with pytest.raises(ValueError, match="shape"):
        ph.cells_of_sizes(grid, radii=[3, 5], shape="cone")


def test_bent_and_beaded_axons(published_grid, fine_grid):
    bent = ph.bent_axon(fine_grid, radius=5)
    # The default arc (curvature radius = box side) bends towards +x by
    # 30 (1 - cos 30 deg) = 4 um at the walls.
    c = fine_grid.cell_centroids[bent.inside]
    z = np.abs(c[:, 2] - 15)
    assert c[z > 10, 0].mean() - c[z < 5, 0].mean() > 2
    assert abs(c[:, 1].mean() - 15) < 0.1
    grid = published_grid
    beads = ph.beaded_axon(grid, radius=6, bead_amplitude=3, bead_period=40 / 3)
    straight = ph.cylinder(grid, radius=6)
    assert beads.inside.sum() != straight.inside.sum()
    polyline = ph.bent_axon(grid, radius=5, curve=[(13.3, 13.3, -5), (13.3, 13.3, 30)])
    assert polyline.params["curve"] == "polyline"


def test_generic_constructors(published_grid):
    grid = published_grid
    labels = (grid.cell_centroids[:, 0] < 10).astype(int)
    p = ph.Phantom.from_labels(grid, labels, kappa=2e-5, name="slab")
    assert_array_equal(p.barrier, grid.interface_faces(labels))
    assert np.all(p.permeability[p.barrier] == 2e-5)
    q = ph.from_function(grid, lambda x: x[:, 0] < 10, name="slab")
    assert_array_equal(q.labels, labels)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "other"
    with pytest.raises(ValueError):
        p.labels[0] = 3


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda g: ph.sphere(g, radius=-1), "radius"),
        (lambda g: ph.sphere(g, radius=float("nan")), "radius"),
        (lambda g: ph.sphere(g, radius=5, kappa=-1), "kappa"),
        (lambda g: ph.sphere(g, radius=5, kappa=np.inf), "kappa"),
        (lambda g: ph.sphere(g, radius=5, membership="any"), "membership"),
        (lambda g: ph.sphere(g, radius=5, centre=(1, 2)), "centre"),
        (lambda g: ph.sphere(g, radius=0.5, centre=(0.1, 0.1, 0.1)), "no grid cell"),
        (lambda g: ph.sphere(g, radius=100), "fills every"),
        (lambda g: ph.cylinder(g, radius=5, axis=(0, 0, 0)), "3-vector"),
        (lambda g: ph.torus(g, major=4, minor=5), "minor"),
        (
            lambda g: ph.beaded_axon(g, radius=3, bead_amplitude=3, bead_period=5),
            "bead",
        ),
        (lambda g: ph.bent_axon(g, radius=5, curvature_radius=4), "curvature"),
        (lambda g: ph.bent_axon(g, radius=5, curve=np.zeros((3, 2))), "curve"),
        (lambda g: ph.packed_cylinders(g, radii=[]), "radii"),
        (lambda g: ph.from_function(g, "inside"), "callable"),
    ],
)
def test_bad_arguments(published_grid, call, match):
    with pytest.raises(ValueError, match=match):
        call(published_grid)


def test_little_extracellular_space_warns(published_grid):
    with pytest.warns(UserWarning, match="extracellular"):
        ph.cylinder(published_grid, radius=14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ph.sphere(published_grid, radius=8)
