import os

# Set before torch is imported anywhere (see dipy_spinverse/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from dipy.core.gradients import gradient_table  # noqa: E402

from dipy_spinverse import Protocol, SpinverseModel, TetGrid, simulate  # noqa: E402
from dipy_spinverse.posterior import TissuePrior  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def problem():
    """A 48-cell grid, a ball of 1e-5 m/s membrane, two 3-volume sequences."""
    grid = TetGrid.bcc(8.0, 2)
    inside = np.linalg.norm(grid.cell_centroids - 4.0, axis=1) < 2.5
    # No membrane off the ball's surface (inf: free water).
    truth = np.where(grid.interface_faces(inside), 1e-5, np.inf)
    bvals = np.array([0, 1000, 3000, 0, 1000, 3000], float)
    dirs = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]] * 2, float)
    prot = Protocol.pgse(bvals[:3], dirs[:3], small_delta=0.005, big_delta=0.04)
    prot = prot + Protocol.pgse(bvals[3:], dirs[3:], small_delta=0.005, big_delta=0.01)
    signal = simulate(grid, truth, prot).numpy()
    return grid, prot, signal


# -- the DIPY layer (tests/test_reconst.py, tests/test_io.py) ------------------
BVALS = np.array([0, 1000, 3000, 0, 1000, 3000], float)
# Directions along x, y and z (x, y in one sequence, z, x in the other): a
# protocol whose directions span a plane cannot determine the membranes
# (status UNDERDETERMINED, reconst.plausibility).
BVECS = np.array(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]], float
)
BIG = np.array([0.04] * 3 + [0.01] * 3)
SMALL = 0.005
# Longer echo time, more T2 decay: the two sequences have different b=0.
T2_WEIGHT = np.array([0.6] * 3 + [0.9] * 3)
#: make_phantom_dataset options of a tiny demo: a 2-cube grid and the old
#: small protocol (2 timings, 2 shells, one b = 0 each; 14 volumes), fast;
#: without the tissue voxels (3 x 2 x 1), whose finer patches cost seconds.
SMALL_DEMO = dict(
    grid_size=12.0,
    grid_resolution=2,
    n_directions=3,
    timings=((0.010, 0.060), (0.010, 0.020)),
    bvals=(1000.0, 2500.0),
    n_b0=1,
    tissue_voxels=False,
)
# The published face fit, 4 iterations: the DIPY layer is tested fast; the
# label search has a smoke test in test_reconst.py (and tests/test_search.py).
FAST = dict(preset="paper", max_iter=4)


@pytest.fixture(scope="module")
def grid():
    return TetGrid.bcc(8.0, 2)


@pytest.fixture(scope="module")
def gtab():
    return gradient_table(BVALS, bvecs=BVECS, big_delta=BIG, small_delta=SMALL)


@pytest.fixture(scope="module")
def truth(grid):
    inside = np.linalg.norm(grid.cell_centroids - 4.0, axis=1) < 2.5
    permeability = np.where(grid.interface_faces(inside), 1e-5, np.inf)
    return inside, permeability


@pytest.fixture(scope="module")
def signal(grid, gtab, truth):
    """b0-normalised signal of the truth."""
    return simulate(grid, truth[1], gtab).numpy()


@pytest.fixture(scope="module")
def model(grid, gtab):
    # float64: the checks below compare re-simulations to 1e-8.
    return SpinverseModel(gtab, grid=grid, dtype="float64", **FAST)


@pytest.fixture(scope="module")
def volume(signal):
    s0 = np.array([[500.0, 800.0], [650.0, 1000.0]])[..., None, None]
    data = s0 * T2_WEIGHT * signal
    mask = np.ones((2, 2, 1), bool)
    mask[1, 1, 0] = False
    return data, mask


@pytest.fixture(scope="module")
def volume_fit(model, volume):
    data, mask = volume
    return model.fit(data, mask=mask)


# -- operators and solvers (tests/test_operators.py, tests/test_solvers.py) ---
def jittered_grid(boundary="reflecting", jitter=0.04):
    """A 2 x 2 x 2-cube BCC grid with its vertices jittered by up to
    ``jitter`` lattice spacings: still well centred, but every cell has its
    own volume and distances (on the exact BCC lattice all tets are
    congruent, which would hide any mistake in the volume weighting)."""
    bcc = TetGrid.bcc(8.0, 2, boundary=boundary, wall_permeability=0.05)
    if jitter == 0:
        return bcc
    rng = np.random.default_rng(42)
    delta = jitter * bcc.spacing * rng.uniform(-1, 1, bcc.vertices.shape)
    return TetGrid(
        vertices=bcc.vertices + delta,
        tets=bcc.tets,
        size=bcc.size,
        boundary=bcc.boundary,
        wall_permeability=bcc.wall_permeability,
        spacing=bcc.spacing,
        tet_coords=bcc.tet_coords + delta[bcc.tets],
    )


def shells_gtab(timings, *, n_dirs=30, n_b0=3):
    """A multi-shell gradient table with per-volume timing.

    For each ``(small_delta, big_delta, shells)``: ``n_b0`` b = 0 volumes,
    then ``n_dirs`` Fibonacci directions per shell (s/mm^2).
    """
    from dipy_spinverse.sim.sequences import fibonacci_sphere

    dirs = fibonacci_sphere(n_dirs)
    bvals, bvecs, small, big = [], [], [], []
    for delta, Delta, shells in timings:
        bvals += [0.0] * n_b0
        bvecs += [[1.0, 0.0, 0.0]] * n_b0
        for b in shells:
            bvals += [float(b)] * n_dirs
            bvecs += list(dirs)
        n = n_b0 + n_dirs * len(shells)
        small += [delta] * n
        big += [Delta] * n
    return gradient_table(
        np.array(bvals),
        bvecs=np.array(bvecs),
        small_delta=np.array(small),
        big_delta=np.array(big),
    )


@pytest.fixture(scope="module")
def gtab_shells():
    """Three timings, five shells, 20 directions each (the learned and
    polished compartment estimators' tests)."""
    timings = [
        (0.008, 0.02, (1000, 2500)),
        (0.008, 0.05, (1000, 3000)),
        (0.008, 0.1, (500,)),
    ]
    return shells_gtab(timings, n_dirs=20, n_b0=2)


@pytest.fixture(scope="module")
def gtab_ivim():
    """Thirteen b-values up to 1000 s/mm^2 along x (IVIM)."""
    b = np.array([0, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500, 700, 1000], float)
    return gradient_table(b, bvecs=np.tile([1.0, 0, 0], (b.size, 1)), b0_threshold=0)


#: Large cells on a coarse periodic grid: 60 ms a simulation, so that the
#: tests train a (poor, small) posterior in seconds (tests/posterior,
#: tests/reconst/test_surface_check.py with a closed box).
SMALL_PRIOR = TissuePrior(
    resolution=2,
    cell_diameter=(8.0, 25.0),
    n_cells=(1, 2),
    families=("packed", "fibre"),
    min_spacings=1.0,
)
#: A poor, small posterior trained in seconds (tests/posterior,
#: tests/reconst/test_surface_check.py): plumbing, not calibration, which
#: benchmarks/posterior_calibration.py measures at scale.
SMALL_TRAINING = dict(
    n_simulations=160,
    epochs=15,
    hidden=32,
    embedding=16,
    transforms=2,
    batch_size=32,
    n_calibration=32,
)


# -- the README demo's protocol, whose default posterior ships ---------------
@pytest.fixture(scope="session")
def demo_gradients(tmp_path_factory):
    """The README demo's gradient table (99 volumes, three diffusion times)
    and a fresh cache folder: the default prior's estimator for it ships,
    so a posterior fit trains nothing."""
    from dipy_spinverse.data import make_phantom_dataset
    from dipy_spinverse.io.gradients import read_gradients

    folder = tmp_path_factory.mktemp("demo")
    paths = make_phantom_dataset(folder / "demo", tissue_voxels=False)
    table = read_gradients(
        paths["bvals"], paths["bvecs"], n_volumes=99, timing_file=paths["timing"]
    )
    return table, folder / "cache"


#: The data's b = 0 signal and noise in its units (SNR 50) of the demo
#: posterior tests.
DEMO_S0, DEMO_SIGMA = 300.0, 6.0


@pytest.fixture(scope="module")
def demo_posterior(demo_gradients):
    """The default posterior on the README demo's protocol (its shipped
    estimator read, never trained), noise ``DEMO_SIGMA``; one per module."""
    import dipy_spinverse.posterior as posterior

    table, cache = demo_gradients
    model = SpinverseModel(
        table, fit_method="posterior", sigma=DEMO_SIGMA, cache_dir=cache
    )
    model.estimator  # noqa: B018 -- read here, so that the check below holds
    assert model.estimator_path.parent == posterior.SHIPPED, "would train"
    return model


#: One myelinated bundle's settings (``axon_bundle``), shared by the bundle
#: tests and the white-matter fault tests.
BUNDLE_SETTINGS = dict(
    n_axons=12,
    mean_diameter=2.0,
    shape=4.0,
    g_ratio=(0.6, 0.8),
    fibre_fraction=0.7,
    permeability=(1e-5, 1e-4),
)
