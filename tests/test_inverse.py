"""reconstruct(): configuration, schedule, determinism, shapes, bad input."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dipy_spinverse import Protocol, TetGrid, simulate
from dipy_spinverse.inverse import PRESETS, reconstruct

STAGES = (dict(iterations=6, sequences=(0,)), dict(iterations=6, sequences=(1,)))


@pytest.fixture(scope="module")
def problem():
    grid = TetGrid.bcc(8.0, 2)
    inside = np.linalg.norm(grid.cell_centroids - 4.0, axis=1) < 2.5
    truth = np.where(grid.interface_faces(inside), 1e-5, 0.1)
    bvals = np.array([0, 1000, 3000, 0, 1000, 3000], float)
    dirs = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]] * 2, float)
    prot = Protocol.pgse(bvals[:3], dirs[:3], small_delta=0.005, big_delta=0.04)
    prot = prot + Protocol.pgse(bvals[3:], dirs[3:], small_delta=0.005, big_delta=0.01)
    signal = simulate(grid, truth, prot).numpy()
    return grid, prot, signal


def test_shapes_history_and_determinism(problem):
    grid, prot, signal = problem
    batch = np.stack([signal, signal])
    a = reconstruct(grid, batch, prot, preset="paper", stages=STAGES, seed=3)
    b = reconstruct(grid, batch, prot, preset="paper", stages=STAGES, seed=3)
    assert a.permeability.shape == (2, grid.n_faces)
    assert a.barrier.dtype == bool and a.barrier.shape == (2, grid.n_faces)
    assert a.predicted.shape == (2, len(prot))
    assert a.labels is None and a.time_s > 0
    for key in ("data", "continuity", "manifold", "binarise", "area", "total", "lr"):
        assert len(a.history[key]) == 12
    assert_array_equal(a.permeability, b.permeability)
    lo, hi = PRESETS["paper"]["log_kappa_bounds"]
    assert np.all((a.permeability >= 10**lo) & (a.permeability <= 10**hi))


def test_raw_and_normalised_signals_agree(problem):
    """Each sequence is divided by its own b = 0 mean, so S0 does not matter."""
    grid, prot, signal = problem
    raw = 1234.5 * signal
    a = reconstruct(grid, signal, prot, stages=STAGES)
    b = reconstruct(grid, raw, prot, stages=STAGES)
    assert_allclose(a.permeability, b.permeability, rtol=1e-8)


def test_paper_learning_rate_schedule(problem):
    grid, prot, signal = problem
    stages = (dict(iterations=60, sequences=(0,)), dict(iterations=60, sequences=(1,)))
    result = reconstruct(
        grid, signal, prot, preset="paper", stages=stages, continuity=0.0, manifold=0.0
    )
    lr = result.history["lr"]
    # 50-iteration linear warm-up to 0.6, cosine decay towards 0.06, restarted.
    assert_allclose(lr[49], 0.6)
    assert_allclose(lr[0], 0.6 / 50)
    assert_allclose(lr[59], 0.06)
    assert_allclose(lr[60], 0.6 / 50)


def test_data_loss_decreases(problem):
    grid, prot, signal = problem
    stages = (dict(iterations=40, sequences="all"),)
    result = reconstruct(
        grid, signal, prot, preset="paper", stages=stages, continuity=0.0, manifold=0.0
    )
    data = result.history["data"]
    assert data[-1] < 0.2 * data[0]


def test_cell_parametrisation_returns_labels(problem):
    grid, prot, signal = problem
    result = reconstruct(grid, signal, prot, parametrisation="cell", stages=STAGES)
    assert result.labels.shape == (grid.n_cells,)
    assert set(np.unique(result.labels)) <= {0, 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="best"), "preset"),
        (dict(learning_rate=0.1), "Unknown option"),
        (dict(parametrisation="vertex"), "parametrisation"),
        (dict(noise="poisson"), "noise"),
        (dict(stages=(dict(iterations=2, sequences=(5,)),)), "rank"),
        (dict(log_kappa_bounds=(-1, -5)), "log_kappa_bounds"),
    ],
)
def test_bad_options(problem, kwargs, match):
    grid, prot, signal = problem
    with pytest.raises(ValueError, match=match):
        reconstruct(grid, signal, prot, **kwargs)


def test_bad_signal(problem):
    grid, prot, signal = problem
    with pytest.raises(ValueError, match="len\\(protocol\\)"):
        reconstruct(grid, signal[:-1], prot)
    bad = signal.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reconstruct(grid, bad, prot)


def test_result_does_not_depend_on_batch(problem):
    """Serial, chunked and parallel fits must agree voxel by voxel."""
    grid, prot, signal = problem
    other = 0.9 * signal + 0.1
    alone = reconstruct(grid, signal, prot, stages=STAGES, seed=1)
    batch = reconstruct(grid, np.stack([other, signal]), prot, stages=STAGES, seed=1)
    assert_allclose(batch.permeability[1], alone.permeability, rtol=1e-10)
