"""The inversion's prediction (inverse.prediction): why ``simulate``'s output
is divided by its own b = 0 signal once more."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from dipy_spinverse import TetGrid, simulate
from dipy_spinverse.inverse.prediction import predict_signal
from dipy_spinverse.sim.sequences import Protocol
from dipy_spinverse.sim.signals import normalise_b0


def _protocol():
    """Three timings, two b = 0 volumes and three b-values each."""
    bvals = [0, 0, 1000, 2500, 3000]
    bvecs = [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]]
    parts = [
        Protocol.pgse(bvals, bvecs, small_delta=sd, big_delta=bd)
        for sd, bd in [(0.002, 0.01), (0.005, 0.03), (0.01, 0.05)]
    ]
    return parts[0] + parts[1] + parts[2]


@pytest.mark.parametrize(
    "boundary, dtype, tol",
    [
        ("reflecting", torch.float64, 1e-9),
        ("periodic", torch.float64, 1e-9),
        ("reflecting", torch.float32, 1e-4),
    ],
)
def test_closed_box_b0_is_one_to_the_solver_tolerance(boundary, dtype, tol):
    """No magnetisation leaves a reflecting or periodic box: its b = 0 signal
    is 1 and the division changes the signal by the solver's error only."""
    grid = TetGrid.bcc(8.0, 2, boundary=boundary)
    protocol = _protocol()
    kappa = 10 ** np.random.default_rng(0).uniform(-5, -3, (3, grid.n_faces))
    raw = simulate(grid, kappa, protocol, dtype=dtype)
    sim = dict(diffusivity=2e-3, dtype=dtype, device="cpu")
    assert_allclose(predict_signal(grid, kappa, protocol, **sim), raw, atol=tol)


def test_absorbing_wall_needs_the_division():
    """An absorbing wall loses magnetisation during each echo time: the
    simulated b = 0 signals are far below 1 and differ between timings, so
    the prediction (each sequence over its own b = 0) is not ``simulate``'s
    output, and its b = 0 volumes are 1 as the data's are."""
    grid = TetGrid.bcc(8.0, 2, boundary="absorbing", wall_permeability=1e-4)
    protocol = _protocol()
    kappa = np.full((1, grid.n_faces), 1e-4)
    raw = simulate(grid, kappa, protocol)
    b0 = protocol.bvals == 0
    assert float(raw[0, b0].max()) < 0.5
    assert float(raw[0, b0].max() - raw[0, b0].min()) > 0.1
    sim = dict(diffusivity=2e-3, dtype=torch.float64, device="cpu")
    predicted = predict_signal(grid, kappa, protocol, **sim)
    assert_allclose(predicted, normalise_b0(raw, protocol))
    assert_allclose(predicted[0, b0], 1.0, rtol=1e-12)
