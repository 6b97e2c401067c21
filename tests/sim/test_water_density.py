"""A water density per cell (myelin holds about half the water of the
axons and the space between them): ``simulate(..., density=)``.

References are independent of the simulator: the two-site exchange
(Karger / Bloch-McConnell) 2x2 exponential with pools of unequal water,
the water-free limit (a compartment of vanishing density is a closed,
empty annulus), uniform rescaling, the dense engine, and central finite
differences. Tolerances are stated per test.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from scipy.linalg import expm

from dipy_spinverse import Protocol, TetGrid, simulate
from dipy_spinverse.sim import analytic as an
from dipy_spinverse.sim.sections import SectionGrid

AXIS = np.array([1.0, 2.0, 2.0]) / 3.0


def _radius(grid):
    offset = grid.displacement2(grid.section_positions, grid.extent / 2)
    return np.linalg.norm(offset, axis=1)


def _sheathed(grid, inner, outer):
    """An axon of radius ``inner`` in a sheath out to ``outer`` (um)."""
    r = _radius(grid)
    return r < inner, (r >= inner) & (r < outer)


def _membranes(grid, kappa, *regions):
    """``kappa`` on the boundary of every region, no membrane elsewhere."""
    faces = np.zeros(grid.n_faces, dtype=bool)
    for region in regions:
        faces |= grid.interface_faces(region)
    return np.where(faces, kappa, np.inf)


@pytest.mark.parametrize("rho_in, rho_out", [(0.4, 1.0), (1.0, 0.5)])
def test_exchange_between_pools_of_unequal_water(rho_in, rho_out):
    """b = 0, T2 of 30 ms inside a disc (R = 2.5 um) and 300 ms outside,
    barrier-limited exchange: the signal is the two-site exchange model with
    pools of water W_c = rho_c V_c, the membrane passing kappa rho_max P
    (m_1 - m_2) (P its length per um of fibre): k12 = kappa rho_max P / W_1,
    k21 = kappa rho_max P / W_2, which holds detailed balance (k12 W_1 =
    k21 W_2): at rest nothing flows. The exchange moves the signal by 0.07
    and 0.10; the simulation differs from the model by 1.0 % of that in
    both cases (measured; 0.74 % at equal density,
    ``test_exchange_rate_through_the_fibre_membrane``: the finite mixing
    time within each pool). Tolerance 2 %."""
    grid = SectionGrid.triangular(8.0, 16, axis=AXIS)
    inside = _radius(grid) < 2.5
    kappa = 1e-5
    perimeter = grid.face_areas[grid.interface_faces(inside)].sum()
    water = np.array(
        [
            rho_in * grid.cell_volumes[inside].sum(),
            rho_out * grid.cell_volumes[~inside].sum(),
        ]
    )
    t2 = np.where(inside, 0.03, 0.3)
    density = np.where(inside, rho_in, rho_out)
    prot = Protocol.pgse([0], [[1, 0, 0]], small_delta=0.005, big_delta=0.1)
    te = prot.echo_times[0] * 1e6
    field = _membranes(grid, kappa, inside)
    sim = simulate(grid, field, prot, t2=t2, density=density).item()
    k12, k21 = an.exchange_rates(kappa * max(rho_in, rho_out), perimeter, *water)
    rates = np.diag([1 / 0.03e6, 1 / 0.3e6]) + [[k12, -k21], [-k12, k21]]
    pools = water / water.sum()
    two_site = (expm(-rates * te) @ pools).sum()
    no_exchange = (np.exp(-te / np.array([0.03e6, 0.3e6])) * pools).sum()
    assert no_exchange - two_site > 1e-3  # the exchange is seen
    assert_allclose(no_exchange - sim, no_exchange - two_site, rtol=0.02)


def _sheath_case(n=24):
    grid = SectionGrid.triangular(6.0, n, axis=AXIS)
    axon, sheath = _sheathed(grid, 1.2, 1.9)
    across = np.cos(0.4) * grid.plane[0] + np.sin(0.4) * grid.plane[1]
    prot = Protocol.pgse(
        [0, 1500, 3000, 3000],
        [across, across, (across + grid.axis) / np.sqrt(2), grid.axis],
        small_delta=0.008,
        big_delta=0.025,
    )
    return grid, axon, sheath, prot


def test_a_water_free_sheath_is_a_closed_empty_annulus():
    """Myelin of vanishing water (rho = 1e-9), permeable on both sides
    (1e-4 m/s), equals the same annulus holding no water and closed on both
    sides: the axon and the outside simulated as if impermeable, with the
    annulus out of the start and the read-out. Water flux through the
    sheath and its share of the signal both scale with rho: 1e-9 (measured
    differences ~1e-9; tolerance 1e-7). Per-compartment diffusivities
    (axon 1.5e-3, myelin 0.3e-3, outside 2.2e-3) keep the along-axis decay
    in the generator."""
    grid, axon, sheath, prot = _sheath_case()
    diffusivity = np.select([axon, sheath], [1.5e-3, 0.3e-3], 2.2e-3)
    permeable = _membranes(grid, 1e-4, axon, sheath)
    free = simulate(
        grid,
        permeable,
        prot,
        diffusivity=diffusivity,
        density=np.where(sheath, 1e-9, 1.0),
        substeps=8,
    ).numpy()
    closed = _membranes(grid, 0.0, axon, sheath)
    empty = simulate(
        grid, closed, prot, diffusivity=diffusivity, initial=~sheath, substeps=8
    ).numpy()
    assert_allclose(free, empty, rtol=0, atol=1e-7)
    # The sheath's exchange is seen at a density of one half.
    half = simulate(
        grid,
        permeable,
        prot,
        diffusivity=diffusivity,
        density=np.where(sheath, 0.5, 1.0),
        substeps=8,
    ).numpy()
    assert np.abs(half - empty).max() > 1e-2


def test_a_sheath_of_vanishing_t2_leaves_the_other_water():
    """T2 of myelin -> 0 (0.1 ms against a 33 ms echo: exp(-330)) with its
    membranes closed: the signal is the axon's and the outside's, weighted
    by their share of all water, sum_c W_c S_c / sum_c W_c over the two
    compartments that keep their signal (W = rho V, rho_myelin = 0.45):
    1e-10 (the Chebyshev truncation)."""
    grid, axon, sheath, prot = _sheath_case(n=18)
    density = np.where(sheath, 0.45, 1.0)
    closed = _membranes(grid, 0.0, axon, sheath)
    relaxed = simulate(
        grid,
        closed,
        prot,
        t2=np.where(sheath, 1e-4, np.inf),
        density=density,
        substeps=4,
    ).numpy()
    rest = simulate(grid, closed, prot, initial=~sheath, substeps=4).numpy()
    water = grid.cell_volumes * density
    assert_allclose(relaxed, rest * water[~sheath].sum() / water.sum(), atol=1e-10)


@pytest.mark.parametrize("grid", ["section", "tetrahedra"])
def test_a_uniform_density_changes_nothing(grid):
    """The same density everywhere rescales every cell's water and every
    flux alike: the normalised signal is unchanged (1e-12), on a periodic
    section and in a closed tetrahedral box."""
    if grid == "section":
        grid = SectionGrid.triangular(4.0, 8, axis=AXIS)
        region = _radius(grid) < 1.3
    else:
        grid = TetGrid.bcc(6.0, 3, boundary="reflecting")
        region = np.linalg.norm(grid.cell_circumcentres, axis=1) < 2.0
    prot = Protocol.pgse(
        [0, 2000, 2000],
        [[1, 0, 0], [1, 0, 0], [0.6, 0, 0.8]],
        small_delta=0.005,
        big_delta=0.02,
    )
    field = _membranes(grid, 3e-4, region)
    plain = simulate(grid, field, prot, substeps=2).numpy()
    scaled = simulate(grid, field, prot, density=0.37, substeps=2).numpy()
    assert_allclose(scaled, plain, rtol=0, atol=1e-12)


def test_dense_and_chebyshev_agree_with_a_density_per_cell():
    """The Chebyshev plan bounds the spectrum of the density-weighted
    operator: it equals the dense reference of the same Magnus steps to
    1e-9 (its truncation, 1e-11 a step)."""
    grid = SectionGrid.triangular(3.0, 6, axis=AXIS)
    axon, sheath = _sheathed(grid, 0.5, 0.9)
    prot = Protocol.pgse(
        [0, 2000, 4000, 4000],
        [AXIS, grid.plane[0], [0.6, 0.0, 0.8], [0.0, 0.6, 0.8]],
        small_delta=0.005,
        big_delta=0.02,
    )
    options = dict(
        diffusivity=np.select([axon, sheath], [1.5e-3, 0.4e-3], 2.0e-3),
        density=np.where(sheath, 0.4, 1.0),
        t2=np.select([axon, sheath], [0.07, 0.015], 0.06),
        phase_step=0.01,
    )
    field = _membranes(grid, 2e-4, axon, sheath)
    dense = simulate(grid, field, prot, method="dense", **options).numpy()
    cheb = simulate(grid, field, prot, method="chebyshev", **options).numpy()
    assert_allclose(cheb, dense, atol=1e-9)


def test_gradient_of_the_density_matches_finite_differences():
    """d S / d rho_i (mass, conductances and membranes) against central
    differences, float64, the Chebyshev truncation at 1e-13 a step (step
    1e-5 on rho ~ 0.5: difference error ~1e-10 relative, truncation noise
    ~1e-8 / 1e-5; rtol 1e-5)."""
    grid = SectionGrid.triangular(3.0, 5, axis=AXIS)
    axon, sheath = _sheathed(grid, 0.5, 0.9)
    prot = Protocol.pgse(
        [2000, 2000],
        [[0.6, 0.0, 0.8], grid.plane[1]],
        small_delta=0.005,
        big_delta=0.02,
    )
    field = torch.tensor(_membranes(grid, 1e-4, axon, sheath))
    base = torch.tensor(np.where(sheath, 0.5, 1.0))
    rho = base.clone().requires_grad_(True)
    simulate(grid, field, prot, density=rho, substeps=2, tol=1e-13).sum().backward()

    def total(r):
        with torch.no_grad():
            return (
                simulate(grid, field, prot, density=r, substeps=2, tol=1e-13)
                .sum()
                .item()
            )

    for cell in (
        int(np.flatnonzero(sheath)[0]),
        int(np.flatnonzero(axon)[0]),
        int(np.flatnonzero(~axon & ~sheath)[0]),
    ):
        step = 1e-5
        up, down = base.clone(), base.clone()
        up[cell] += step
        down[cell] -= step
        numeric = (total(up) - total(down)) / (2 * step)
        assert_allclose(rho.grad[cell].item(), numeric, rtol=1e-5)


@pytest.mark.parametrize("density", [0.0, -0.5, np.nan, np.inf])
def test_bad_density_is_named(density):
    grid = SectionGrid.triangular(3.0, 4)
    prot = Protocol.pgse([1000], [[1, 0, 0]], small_delta=0.005, big_delta=0.02)
    with pytest.raises(ValueError, match="density must be finite and > 0"):
        simulate(grid, np.full(grid.n_faces, np.inf), prot, density=density)
