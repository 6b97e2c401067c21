"""Random substrates: determinism, validity of every draw, the face rule."""

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import TetGrid, simulate
from dipy_spinverse.geometry.substrates import (
    KINDS,
    Substrate,
    random_substrate,
    random_substrates,
)
from dipy_spinverse.geometry.topology import graph_components
from dipy_spinverse.sim.sequences import Protocol


@pytest.fixture(scope="module")
def published_grid():
    return TetGrid.bcc(80 / 3, 4)


@pytest.fixture(scope="module")
def small_grid():
    return TetGrid.bcc(12.0, 3)


@pytest.fixture(scope="module")
def periodic_grid():
    return TetGrid.bcc(12.0, 3, boundary="periodic")


def _check_valid(grid, sub):
    """Every invariant a returned substrate must satisfy."""
    n = sub.n_cells
    assert isinstance(sub, Substrate)
    assert sub.labels.shape == (grid.n_cells,)
    assert sub.face_permeability.shape == (grid.n_faces,)
    assert len(sub.kinds) == len(sub.params) == len(sub.permeability) == n >= 1
    # Contiguous labels 0..n, none lost, extracellular space left.
    assert_array_equal(np.unique(sub.labels), np.arange(n + 1))
    # Every cell is one connected region of the grid (through its own faces).
    a, b = grid.face_cells.T
    same = (sub.labels[a] == sub.labels[b]) & (sub.labels[a] > 0)
    _, component = graph_components(grid.n_cells, a[same], b[same])
    for k in range(1, n + 1):
        assert len(np.unique(component[sub.labels == k])) == 1
    assert np.all(sub.volumes > 0) and np.all(sub.surface_areas > 0)
    assert not sub.labels.flags.writeable


def _touching(grid, labels):
    a, b = labels[grid.face_cells.T]
    return bool(np.any((a != b) & (a > 0) & (b > 0)))


def test_deterministic_given_a_seed(published_grid):
    grid = published_grid
    first = random_substrates(grid, 4, seed=7)
    again = random_substrates(grid, 4, seed=7)
    for s, t in zip(first, again, strict=True):
        assert_array_equal(s.labels, t.labels)
        assert_array_equal(s.permeability, t.permeability)
        assert_array_equal(s.face_permeability, t.face_permeability)
        assert s.kinds == t.kinds and s.params == t.params
    # Substrate i depends on the seed and i only, not on how many are drawn.
    assert_array_equal(random_substrates(grid, 2, seed=7)[1].labels, first[1].labels)
    # An int seed and a generator from it give the same draw.
    s = random_substrate(grid, rng=3)
    t = random_substrate(grid, rng=np.random.default_rng(3))
    assert_array_equal(s.labels, t.labels)
    assert_array_equal(s.permeability, t.permeability)


def test_different_seeds_differ(published_grid):
    grid = published_grid
    a = random_substrates(grid, 3, seed=1)
    b = random_substrates(grid, 3, seed=2)
    for s, t in zip(a, b, strict=True):
        assert not np.array_equal(s.permeability, t.permeability)
    # Within one call the substrates differ too.
    assert not np.array_equal(a[0].labels, a[1].labels)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["published", "small"])
def test_every_kind_is_a_proper_cell(kind, which, published_grid, small_grid):
    grid = published_grid if which == "published" else small_grid
    for sub in random_substrates(grid, 3, seed=11, kinds=kind, n_cells=1):
        _check_valid(grid, sub)
        assert sub.kinds == (kind,) and sub.params[0]["kind"] == kind
        inside = int(sub.inside.sum())
        assert 0 < inside < grid.n_cells


def test_all_kinds_appear_when_requested(small_grid):
    subs = random_substrates(small_grid, 12, seed=5, n_cells=4)
    seen = {kind for sub in subs for kind in sub.kinds}
    assert seen == set(KINDS)
    two = random_substrates(small_grid, 6, seed=5, kinds=("torus", "blob"))
    assert {kind for sub in two for kind in sub.kinds} <= {"torus", "blob"}


@pytest.mark.parametrize("boundary", ["reflecting", "periodic", "absorbing"])
def test_every_boundary(boundary):
    grid = TetGrid.bcc(12.0, 3, boundary=boundary)
    subs = random_substrates(grid, 8, seed=3)
    for sub in subs:
        _check_valid(grid, sub)
    assert {sub.n_cells for sub in subs} <= {1, 2, 3, 4}
    assert len({sub.n_cells for sub in subs}) > 1


def test_cells_wrap_through_the_periodic_box(periodic_grid):
    grid = periodic_grid
    wraps = False
    for sub in random_substrates(grid, 8, seed=2):
        x = grid.cell_centroids
        for k in range(1, sub.n_cells + 1):
            mine = x[sub.labels == k]
            low = np.any(mine < grid.spacing, axis=0)
            high = np.any(mine > grid.size - grid.spacing, axis=0)
            wraps |= bool(np.any(low & high))
    # Each label is connected (checked in _check_valid), so a cell on both
    # sides of the box is connected through the periodic faces.
    assert wraps


@pytest.mark.parametrize("which", ["published", "small"])
def test_touching(which, published_grid, small_grid):
    grid = published_grid if which == "published" else small_grid
    for sub in random_substrates(grid, 6, seed=4, touching=True):
        _check_valid(grid, sub)
        assert sub.n_cells >= 2
        assert _touching(grid, sub.labels)
    for sub in random_substrates(grid, 6, seed=4, touching=False, n_cells=(2, 4)):
        _check_valid(grid, sub)
        assert not _touching(grid, sub.labels)


def test_face_permeability_rule(published_grid):
    grid = published_grid
    for sub in random_substrates(grid, 4, seed=8, touching=True, n_cells=(3, 4)):
        kappa = sub.permeability
        expected = []
        for a, b in grid.face_cells:
            la, lb = sub.labels[a], sub.labels[b]
            if la == lb:
                expected.append(np.inf)
            elif la == 0 or lb == 0:
                expected.append(kappa[max(la, lb) - 1])
            else:  # two membranes in series
                expected.append(1.0 / (1.0 / kappa[la - 1] + 1.0 / kappa[lb - 1]))
        assert_array_equal(sub.face_permeability, expected)
        # It is also a valid phantom with exactly these faces and labels.
        phantom = sub.phantom()
        assert_array_equal(phantom.permeability, sub.face_permeability)
        assert_array_equal(phantom.barrier, grid.interface_faces(sub.labels))


def test_volumes_and_areas(published_grid):
    grid = published_grid
    for sub in random_substrates(grid, 4, seed=9, touching=True):
        assert_allclose(sub.volumes.sum(), grid.cell_volumes[sub.inside].sum())
        a, b = sub.labels[grid.face_cells.T]
        for k in range(1, sub.n_cells + 1):
            volume = grid.cell_volumes[sub.labels == k].sum()
            area = grid.face_areas[(a == k) != (b == k)].sum()
            assert_allclose(sub.volumes[k - 1], volume)
            assert_allclose(sub.surface_areas[k - 1], area)
        outer = grid.face_areas[(a != b) & ((a == 0) | (b == 0))].sum()
        shared = grid.face_areas[(a != b) & (a > 0) & (b > 0)].sum()
        assert_allclose(sub.surface_areas.sum(), outer + 2 * shared)


def test_permeability_is_log_uniform(small_grid):
    subs = random_substrates(small_grid, 100, seed=12, n_cells=4, kinds="ellipsoid")
    logs = np.log10(np.concatenate([sub.permeability for sub in subs]))
    assert len(logs) == 400
    assert np.all((logs >= -6) & (logs <= -4))
    # log10 kappa is uniform on [-6, -4]: standard deviation 2 / sqrt(12) =
    # 0.577, so the mean of 400 draws has a standard error of 0.029; 0.15 is
    # over 5 standard errors (a false failure has probability < 1e-6, and the
    # seed is fixed anyway). A log-uniform draw's linear mean would be
    # 2.1e-5 (log10 -4.67), far outside the band, as would a uniform one's.
    assert abs(logs.mean() + 5) < 0.15
    # Same argument for the spread: the sample std of 400 uniform draws has a
    # standard error of about 0.577 * 0.045 = 0.014 (0.07 is 5 of them).
    assert abs(logs.std() - 2 / math.sqrt(12)) < 0.07
    # Both halves of the log range are populated about equally.
    assert 0.4 < np.mean(logs < -5) < 0.6
    # low == high fixes the permeability exactly, and no draw leaves the
    # range by rounding (4.4e-5 came back as 4.399999999999995e-05 once).
    for value in (3e-5, 4.4e-5):
        fixed = random_substrate(small_grid, rng=0, permeability_range=(value,) * 2)
        assert np.all(fixed.permeability == value)
    kappa = np.concatenate([sub.permeability for sub in subs])
    assert kappa.min() >= 1e-6 and kappa.max() <= 1e-4
    # Bounds whose ratio overflows (above about 1e308) are still drawn
    # log-uniformly, not all at high.
    for bounds in ((1e-300, 1e10), (5e-324, 1e-4)):
        wide = random_substrates(
            small_grid,
            8,
            seed=3,
            n_cells=1,
            kinds="ellipsoid",
            permeability_range=bounds,
        )
        logs = np.log10([sub.permeability[0] for sub in wide])
        assert np.all((logs >= np.log10(bounds[0])) & (logs <= np.log10(bounds[1])))
        assert len(np.unique(logs)) == 8 and np.ptp(logs) > 50


def test_simulate_runs(small_grid):
    protocol = Protocol.pgse(
        [0.0, 1000.0, 3000.0],
        [[1, 0, 0], [1, 0, 0], [0, 0.6, 0.8]],
        small_delta=0.005,
        big_delta=0.015,
    )
    subs = random_substrates(small_grid, 2, seed=1, touching=True)
    for sub in subs:
        signal = simulate(small_grid, sub.face_permeability, protocol)
        signal = np.asarray(signal)
        assert signal.shape == (3,)
        assert np.all(np.isfinite(signal))
        assert np.all((signal > 0) & (signal <= 1 + 1e-9))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rng=-1), "rng"),
        (dict(rng=1.5), "rng"),
        (dict(rng="seed"), "rng"),
        (dict(n_cells=0), "n_cells"),
        (dict(n_cells=(3, 2)), "n_cells"),
        (dict(n_cells=(0, 2)), "n_cells"),
        (dict(n_cells="many"), "n_cells"),
        (dict(n_cells=True), "n_cells"),
        (dict(kinds="cube"), "kinds"),
        (dict(kinds=()), "kinds"),
        (dict(kinds=5), "kinds"),
        (dict(kinds={"torus": 1}), "kinds.*not a mapping"),
        (dict(kinds=b"torus"), "kinds must be str, not bytes"),
        (dict(n_cells="12"), "n_cells.*string '12'"),
        (dict(permeability_range=(1e-4, 1e-6)), "permeability_range"),
        (dict(permeability_range=(0, 1e-4)), "permeability_range"),
        (dict(permeability_range=(1e-6, np.inf)), "permeability_range"),
        (dict(permeability_range=1e-5), "permeability_range"),
        (dict(min_cell_volume=-1.0), "min_cell_volume"),
        (dict(min_cell_volume="big"), "min_cell_volume"),
        (dict(min_cell_volume=1e9), "min_cell_volume"),
        (dict(min_extracellular_fraction=0), "min_extracellular_fraction"),
        (dict(min_extracellular_fraction=1.5), "min_extracellular_fraction"),
        (dict(min_extracellular_fraction=0.999), "or min_extracellular_fraction"),
        (dict(touching="yes"), "touching"),
        (dict(touching=1), "touching"),
        (dict(touching=True, n_cells=1), "n_cells"),
        (dict(max_tries=0), "max_tries"),
    ],
)
def test_bad_arguments(small_grid, kwargs, name):
    with pytest.raises(ValueError, match=name):
        random_substrate(small_grid, **kwargs)


def test_bad_grid_and_batch_arguments(small_grid):
    with pytest.raises(ValueError, match="grid"):
        random_substrate("grid")
    with pytest.raises(ValueError, match="n must"):
        random_substrates(small_grid, 0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        random_substrates(small_grid, 2, seed=None)
    with pytest.raises(ValueError, match="seed"):
        random_substrates(small_grid, 2, seed=-3)
    with pytest.raises(ValueError, match="kinds"):
        random_substrates(small_grid, 2, seed=1, kinds=["ellipsoid", "cube"])


def test_impossible_draw_names_the_fix(small_grid):
    # Four cells of a fifth of the grid each are (almost) never drawn: the
    # draw must fail loudly, naming the arguments to change.
    big = 0.2 * small_grid.volume
    with pytest.raises(ValueError, match="max_tries=3.*min_cell_volume"):
        random_substrate(small_grid, rng=0, n_cells=4, min_cell_volume=big, max_tries=3)


def test_kinds_are_plain_strings(small_grid):
    """Kinds given as a numpy array come back as plain str, as listed."""
    sub = random_substrate(small_grid, rng=0, n_cells=1, kinds=np.array(["ellipsoid"]))
    assert sub.kinds == ("ellipsoid",) and type(sub.kinds[0]) is str


def test_a_set_of_kinds_draws_as_its_sorted_list(small_grid):
    """A set has no order (its iteration order changes with string hashing
    between runs): it is sorted, so a seed gives the same substrate."""
    kinds = {"torus", "blob", "capsule", "ellipsoid"}
    as_set = random_substrate(small_grid, rng=0, n_cells=2, kinds=kinds)
    as_list = random_substrate(small_grid, rng=0, n_cells=2, kinds=sorted(kinds))
    assert as_set.kinds == as_list.kinds
    assert_array_equal(as_set.labels, as_list.labels)


def test_substrate_contents_are_checked(small_grid):
    """The constructor refuses what a Substrate promises not to hold."""
    good = random_substrate(small_grid, rng=0, n_cells=2)
    fields = dict(
        labels=good.labels,
        permeability=good.permeability,
        face_permeability=good.face_permeability,
        volumes=good.volumes,
        surface_areas=good.surface_areas,
        kinds=good.kinds,
        params=good.params,
    )
    assert_array_equal(Substrate(**fields).labels, good.labels)
    gapped = np.where(good.labels == 2, 3, good.labels)
    for change, match in (
        (dict(labels=good.labels.astype(float)), "integer array"),
        (dict(labels=gapped), r"1 \.\. 2"),
        (dict(labels=np.where(good.labels == 1, -1, good.labels)), r"1 \.\. 2"),
        (dict(kinds=("cube", good.kinds[1])), "not kinds"),
        (dict(permeability=np.array([-1.0, 1e-5])), "permeability must be finite"),
        (dict(permeability=np.array([np.nan, 1e-5])), "permeability must be finite"),
        (dict(face_permeability=np.full(small_grid.n_faces, np.nan)), "face_perm"),
        (dict(volumes=np.array([-2.0, 1.0])), "volumes"),
    ):
        with pytest.raises(ValueError, match=match):
            Substrate(**{**fields, **change})
