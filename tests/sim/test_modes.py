"""The matrix formalism (``simulate(..., method="modes")``) against references.

The references are the Chebyshev engine (exact in time to its 1e-11
truncation, on the same grid: what differs is only the modal truncation)
and the Gaussian phase approximation of an impermeable sphere. The engine
returns the signals of 2K modes once they differ from K modes' by at most
``tol``; where the expansion converges (geometrically, by a factor of 3-10
a doubling on these grids: doc/validation/modes.md) the returned signals'
error is below ``tol``, asserted within 2 ``tol``.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from dipy_spinverse import Protocol, TetGrid, simulate
from dipy_spinverse.sim import analytic as an
from dipy_spinverse.sim.modes import lowest_modes
from dipy_spinverse.sim.operators import diffusion_operator
from dipy_spinverse.sim.sequences import fibonacci_sphere

D = 2e-3
TOL = 1e-4


def _protocol():
    directions = fibonacci_sphere(6, hemisphere=True)
    parts = [
        Protocol.pgse(
            np.r_[0.0, np.repeat([1000.0, 3000.0], 6)],
            np.vstack([[0, 0, 0], directions, directions]),
            small_delta=small,
            big_delta=big,
        )
        for small, big in ((0.005, 0.01), (0.01, 0.04))
    ]
    return Protocol.concatenate(*parts)


def _sphere(grid, radius, kappa):
    inside = np.linalg.norm(grid.cell_centroids - grid.size / 2, axis=1) < radius
    return inside, np.where(grid.interface_faces(inside), kappa, np.inf)


@pytest.mark.parametrize("kappa", [0.0, 1e-5, np.inf])
@pytest.mark.parametrize("resolution", [4, 6])
def test_modes_match_the_chebyshev_engine(kappa, resolution):
    """A permeable sphere in an 8 um reflecting box, 768 cells (dense modes)
    and 2,592 cells (Lanczos), two diffusion times up to b = 3000."""
    grid = TetGrid.bcc(8.0, resolution)
    _, permeability = _sphere(grid, 3.0, kappa)
    prot = _protocol()
    reference = simulate(grid, permeability, prot).numpy()
    modes = simulate(grid, permeability, prot, method="modes", tol=TOL).numpy()
    assert_allclose(modes, reference, atol=2 * TOL, rtol=0)
    assert np.ptp(reference) > 0.1  # a signal that decays, not a flat one


def test_modes_with_relaxation_an_absorbing_wall_and_a_compartment():
    """T2 per cell, a sink at the wall and the signal of one compartment."""
    grid = TetGrid.bcc(8.0, 4, boundary="absorbing", wall_permeability=1e-5)
    inside, permeability = _sphere(grid, 3.0, 2e-5)
    t2 = np.where(inside, 0.05, 0.08)
    prot = _protocol()
    options = dict(t2=t2, initial=inside)
    reference = simulate(grid, permeability, prot, **options).numpy()
    modes = simulate(grid, permeability, prot, method="modes", **options).numpy()
    assert_allclose(modes, reference, atol=2e-4, rtol=0)


@pytest.mark.slow
def test_modes_of_a_batch_and_in_float32():
    grid = TetGrid.bcc(8.0, 4)
    fields = np.stack([_sphere(grid, r, 1e-5)[1] for r in (2.5, 3.5)])
    prot = _protocol()
    reference = simulate(grid, fields, prot).numpy()
    modes = simulate(grid, fields, prot, method="modes", dtype=torch.float32)
    assert modes.dtype == torch.float32 and modes.shape == reference.shape
    # The modes are computed in float64; float32 rounds the result (6e-8).
    assert_allclose(modes.numpy(), reference, atol=2 * TOL, rtol=0)


def test_modes_of_an_impermeable_sphere_against_the_gpa():
    """Low b: the Gaussian phase approximation of a sphere (R = 5 um) is
    exact to < 0.1 %; the grid's staircase surface (a = 1.5 um, 12 um box)
    errs by +4.2 %, the Chebyshev engine's measured error
    (tests/sim/test_validation.py, within 5 %). The two engines' signals
    agree within 2 ``tol``."""
    grid = TetGrid.bcc(12.0, 8)
    inside, permeability = _sphere(grid, 5.0, 0.0)
    delta, Delta, b = 0.01, 0.03, 100.0
    prot = Protocol.pgse([b], [[1, 0, 0]], small_delta=delta, big_delta=Delta)
    gpa = an.sphere_adc_gpa(delta * 1e6, Delta * 1e6, 5.0, D)
    signals = [
        simulate(grid, permeability, prot, initial=inside, method=method).item()
        for method in ("chebyshev", "modes")
    ]
    assert abs(-np.log(signals[1]) / b / gpa - 1) < 0.05
    assert abs(signals[1] - signals[0]) < 2 * TOL


def test_lowest_modes_are_the_operators_eigenpairs():
    """Lanczos (shift-invert) and LAPACK give the same lowest modes."""
    grid = TetGrid.bcc(8.0, 6)
    _, permeability = _sphere(grid, 3.0, 1e-5)
    op = diffusion_operator(
        grid,
        torch.as_tensor(permeability)[None],
        torch.full((1, grid.n_cells), D, dtype=torch.float64),
    )
    values, vectors = lowest_modes(op, 0, 20)
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(values) >= -1e-15)
    assert_allclose(vectors.T @ vectors, np.eye(20), atol=1e-10)
    dense = np.linalg.eigvalsh(_dense(op))
    assert_allclose(values, dense[:20], rtol=1e-8, atol=1e-14)


def _dense(op):
    n = op.diag.shape[-1]
    matrix = np.diag(op.diag[0].numpy())
    for slot in range(op.weights.shape[-1]):
        matrix[np.arange(n), op.neighbours[:, slot].numpy()] -= op.weights[
            0, :, slot
        ].numpy()
    return matrix


def test_modes_refuse_what_they_do_not_serve():
    periodic = TetGrid.bcc(8.0, 2, boundary="periodic")
    prot = Protocol.pgse([0, 1000], [[1, 0, 0]] * 2, small_delta=0.005, big_delta=0.02)
    with pytest.raises(ValueError, match="periodic grid.*chebyshev"):
        simulate(periodic, np.full(periodic.n_faces, np.inf), prot, method="modes")
    grid = TetGrid.bcc(8.0, 2)
    kappa = torch.full((grid.n_faces,), 1e-5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        simulate(grid, kappa, prot, method="modes")
