"""Sub-grid pools (:class:`~dipy_spinverse.sim.pools.PooledSection`): water
a section's grid does not resolve, held as extra unknowns at a host cell.

References are independent of the pools' code: the closed form of a closed
stick (exp(-TE/T2) exp(-b D (g . a)^2)), the two-site Karger exchange
(:func:`~dipy_spinverse.sim.analytic.karger_signal`, its own sixth-order
Magnus integration of the 2x2 system), the plain section with the pools'
water in its cells (the open limit), the dense engine, and central finite
differences. Tolerances are stated per test.
"""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from dipy_spinverse import Protocol, simulate
from dipy_spinverse.sim import analytic as an
from dipy_spinverse.sim.pools import PooledSection
from dipy_spinverse.sim.sections import SectionGrid

AXIS = np.array([1.0, 2.0, 2.0]) / 3.0


def _protocol(directions, bvals=(1000, 3000), small_delta=0.008, big_delta=0.03):
    directions = np.asarray(directions, dtype=float)
    bvals = np.repeat(bvals, len(directions))
    bvecs = np.tile(directions, (len(bvals) // len(directions), 1))
    return Protocol.pgse(
        np.r_[0, bvals],
        np.r_[[directions[0]], bvecs],
        small_delta=small_delta,
        big_delta=big_delta,
    )


def _sticks(section, hosts, removed=None):
    """Each host with a myelin pool (0.3 of its area, a shell) and an axon
    pool (0.2 of it) in series; the host keeps half of its area."""
    n = section.n_cells
    hosts = np.asarray(hosts)
    m = len(hosts)
    area = section.cell_volumes[hosts]
    myelin, axon = n + np.arange(m), n + m + np.arange(m)
    volumes = section.cell_volumes.copy()
    volumes[hosts] *= 0.5
    r_i = np.sqrt(0.2 * area / np.pi)
    r_o = np.sqrt(0.5 * area / np.pi)
    return PooledSection.attach(
        section,
        pool_hosts=np.r_[hosts, hosts],
        pool_volumes=np.r_[0.3 * area, 0.2 * area],
        links=np.r_[np.c_[hosts, myelin], np.c_[myelin, axon]],
        link_areas=np.r_[2 * np.pi * r_o, 2 * np.pi * r_i],
        link_distances=np.r_[np.c_[0 * r_o, 0.1 * r_o], np.c_[0.1 * r_i, r_i / 4]],
        removed=removed,
        cell_volumes=volumes,
    )


def _one_pool_per_cell(section, share, distance):
    """Every cell keeps ``1 - share`` of its area, the rest is a pool linked
    to it over a unit perimeter: the section stays uniform."""
    n = section.n_cells
    cells = np.arange(n)
    return PooledSection.attach(
        section,
        pool_hosts=cells,
        pool_volumes=share * section.cell_volumes,
        links=np.c_[cells, n + cells],
        link_areas=1.0,
        link_distances=[0.0, distance],
        cell_volumes=(1 - share) * section.cell_volumes,
    )


def _without_pools(section, **cells):
    """``section`` as a pooled section of no pool (``cells``: its removed
    cells and kept volumes)."""
    return PooledSection.attach(
        section,
        pool_hosts=[],
        pool_volumes=[],
        links=np.zeros((0, 2)),
        link_areas=[],
        link_distances=np.zeros((0, 2)),
        **cells,
    )


def test_without_pools_the_section_is_unchanged():
    """A pooled section with no pool and no cell removed is the section:
    the same signals, bit for bit."""
    section = SectionGrid.triangular(4.0, 8, axis=AXIS)
    pooled = _without_pools(section)
    prot = _protocol([[1, 0, 0], [0, 0.6, 0.8]])
    diffusivity = np.linspace(1e-3, 2e-3, section.n_cells)
    field = np.full(section.n_faces, np.inf)
    field[::7] = 1e-4
    a = simulate(section, field, prot, diffusivity=diffusivity, t2=0.07)
    b = simulate(pooled, field, prot, diffusivity=diffusivity, t2=0.07)
    assert torch.equal(a, b)


def test_water_is_conserved():
    """b = 0 without relaxation: the signal is 1 (1e-12) with pools of
    their own density, cells removed and areas changed."""
    section = SectionGrid.triangular(4.0, 8, axis=AXIS)
    removed = np.zeros(section.n_cells, dtype=bool)
    removed[[40, 41, 42]] = True
    pooled = _sticks(section, [10, 60, 61], removed)
    density = np.r_[np.ones(pooled.n_grid_cells), np.full(3, 0.45), np.ones(3)]
    field = np.r_[np.full(pooled.n_grid_faces, np.inf), np.full(6, 1e-4)]
    prot = _protocol([[1, 0, 0]], bvals=(0,))
    got = simulate(pooled, field, prot, density=density, diffusivity=1.5e-3)
    assert_allclose(got.numpy(), 1.0, atol=1e-12)


def test_a_closed_pool_is_a_stick_added_to_the_rest():
    """kappa = 0 on every link: the signal is the rest's (the same grid
    without pools, simulated alone) plus each pool's closed form, W_p
    exp(-TE / T2_p) exp(-b D_p (g . a)^2), over the water. Exact up to the
    engine's truncation (1e-11 a step) and the sub-steps' time error, which
    the closed form does not have but the rest shares: 1e-9."""
    section = SectionGrid.triangular(4.0, 8, axis=AXIS)
    removed = np.zeros(section.n_cells, dtype=bool)
    removed[[40, 41]] = True
    pooled = _sticks(section, [10, 60, 100], removed)
    rest = _without_pools(
        section,
        removed=removed,
        cell_volumes=np.r_[pooled.cell_volumes, np.zeros(2)][
            np.argsort(np.r_[pooled.kept_cells, np.flatnonzero(removed)])
        ],
    )
    n, m = rest.n_cells, 3
    d_rest, d_my, d_ax = 1.7e-3, 0.3e-3, 2.2e-3
    t2_rest, t2_my, t2_ax = 0.06, 0.015, 0.08
    rho_my = 0.45
    prot = _protocol([[1, 0, 0], [0.6, 0, 0.8], AXIS])
    field = np.r_[np.full(rest.n_faces, np.inf), np.zeros(2 * m)]
    settings = dict(substeps=4)
    got = simulate(
        pooled,
        field,
        prot,
        diffusivity=np.r_[np.full(n, d_rest), np.full(m, d_my), np.full(m, d_ax)],
        t2=np.r_[np.full(n, t2_rest), np.full(m, t2_my), np.full(m, t2_ax)],
        density=np.r_[np.ones(n), np.full(m, rho_my), np.ones(m)],
        **settings,
    ).numpy()
    alone = simulate(
        rest,
        np.full(rest.n_faces, np.inf),
        prot,
        diffusivity=d_rest,
        t2=t2_rest,
        **settings,
    ).numpy()
    w_rest = rest.volume
    w_my = rho_my * pooled.cell_volumes[n : n + m].sum()
    w_ax = pooled.cell_volumes[n + m :].sum()
    te = prot.echo_times * 1e6
    b_axis = prot.bvals * (prot.bvecs @ AXIS) ** 2
    stick = lambda d, t2: np.exp(-te / (t2 * 1e6) - b_axis * d)  # noqa: E731
    expected = (
        w_rest * alone + w_my * stick(d_my, t2_my) + w_ax * stick(d_ax, t2_ax)
    ) / (w_rest + w_my + w_ax)
    assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_exchange_along_the_fibres_is_two_site_karger(rho):
    """Gradient along the fibres only, one pool on every cell (the section
    stays uniform, so each side is well mixed: Karger's model holds
    exactly), pools of density ``rho``: the two-site model with D_1, D_2
    (the pool's and the host's) and k_12 = G / W_pool, G = P / (d / (D_p
    rho) + 1 / (kappa max(rho, 1))). The reference integrates the 2x2
    system by sixth-order Magnus steps (error ~1e-13); the engine's error
    here is its Magnus sub-steps' (fourth order, along-axis term),
    measured 1.5e-9 at 4 sub-step multiples (9e-8 at 1): tolerance 1e-8.
    The dense engine agrees with Chebyshev to 1e-9 (same sub-steps;
    measured 2.5e-10, the Chebyshev truncation of 1e-11 a step)."""
    section = SectionGrid.triangular(2.0, 4, axis=[0.0, 0.0, 1.0])
    share, distance, kappa = 0.3, 0.05, 2e-4
    pooled = _one_pool_per_cell(section, share, distance)
    n = section.n_cells
    d_host, d_pool = 1.7e-3, 2.4e-3
    prot = _protocol([[0.0, 0.0, 1.0]], bvals=(500, 1500, 3000))
    field = np.r_[np.full(section.n_faces, np.inf), np.full(n, kappa)]
    options = dict(
        diffusivity=np.r_[np.full(n, d_host), np.full(n, d_pool)],
        density=np.r_[np.ones(n), np.full(n, rho)],
        substeps=4,
    )
    got = simulate(pooled, field, prot, **options).numpy()
    dense = simulate(pooled, field, prot, method="dense", **options).numpy()
    w_pool = rho * share
    conductance = 1.0 / (distance / (d_pool * rho) + 1 / (kappa * max(rho, 1.0)))
    k12 = conductance / (w_pool * section.cell_volumes[0])
    f1 = w_pool / (w_pool + 1 - share)
    durations, amplitudes = an.pgse_waveform(8000.0, 30000.0)
    rate = np.linalg.norm(prot.gradient_rate, axis=1)
    expected = an.karger_signal(
        durations, amplitudes, rate, D1=d_pool, D2=d_host, f1=f1, k12=k12
    )
    no_exchange = f1 * np.exp(-prot.bvals * d_pool) + (1 - f1) * np.exp(
        -prot.bvals * d_host
    )
    assert np.max(np.abs(expected - no_exchange)) > 1e-3  # the exchange is seen
    assert_allclose(got, expected, rtol=0, atol=1e-8)
    assert_allclose(dense, got, rtol=0, atol=1e-9)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")
def test_an_open_pool_is_water_of_its_host():
    """kappa = inf, the pool's diffusivity and density its host's: the pool
    exchanges at 8 D / r^2 (here 16 /us: the link's path r / 4) and carries
    its host's phase, so it is the host's water, and the section behaves
    as the plain one (each cell's water its whole area, the same
    conductances). In-plane and oblique gradients, b up to 3000: the
    residual is the finite exchange rate against the in-plane decay (~1e-4
    /us), measured 7e-7; tolerance 5e-6. (The engine's Gershgorin bound
    is far below zero for so fast a link to so small a pool, and its plan
    overflows harmlessly: Chebyshev agrees with the dense engine to 2e-11
    here.)"""
    section = SectionGrid.triangular(2.0, 4, axis=AXIS)
    pooled = _one_pool_per_cell(section, 0.25, 0.0125)
    prot = _protocol([[1, 0, 0], [0, 0.6, 0.8], [0.6, 0.0, 0.8]])
    field = np.r_[np.full(section.n_faces, np.inf), np.full(section.n_cells, np.inf)]
    got = simulate(pooled, field, prot, diffusivity=2e-3, substeps=4).numpy()
    plain = simulate(
        section, np.full(section.n_faces, np.inf), prot, diffusivity=2e-3, substeps=4
    ).numpy()
    assert_allclose(got, plain, rtol=0, atol=5e-6)


def test_gradient_of_the_link_permeability_matches_finite_differences():
    """d S / d kappa of the links (one kappa scaling all four), autograd
    through the Chebyshev engine against central differences of the dense
    engine (exact exponentials: no truncation noise in the difference),
    float64, step 1e-3 relative: the difference's own error is ~1.4e-6
    relative (measured against a step of 1e-4); rtol 1e-5."""
    section = SectionGrid.triangular(2.0, 4, axis=AXIS)
    pooled = _sticks(section, [3, 20])
    prot = _protocol([[1, 0, 0], [0, 0.6, 0.8]])
    links = torch.as_tensor(np.r_[np.zeros(pooled.n_grid_faces), np.ones(4)]) > 0
    options = dict(
        diffusivity=np.r_[np.full(pooled.n_grid_cells, 1.7e-3), [3e-4] * 2, [2e-3] * 2],
        density=np.r_[np.ones(pooled.n_grid_cells), [0.45] * 2, [1.0] * 2],
        t2=0.07,
        substeps=2,
    )

    def signal(kappa, method):
        field = torch.where(links, kappa, torch.full_like(kappa, float("inf")))
        return simulate(pooled, field, prot, method=method, **options).sum()

    kappa0 = 1e-4
    kappa = torch.full((pooled.n_faces,), kappa0, dtype=torch.float64)
    kappa.requires_grad_(True)
    signal(kappa, "chebyshev").backward()
    grad = float(kappa.grad[links].sum())
    h = 1e-3 * kappa0
    with torch.no_grad():
        plus, minus = (
            signal(torch.full_like(kappa, kappa0 + s * h), "dense") for s in (1, -1)
        )
    fd = float(plus - minus) / (2 * h)
    assert abs(fd) > 1.0  # the exchange is seen
    assert_allclose(grad, fd, rtol=1e-5)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(pool_hosts=[999]), "pool_hosts"),
        (dict(pool_volumes=[0.0]), "pool_volumes"),
        (dict(link_distances=[[0.0, 0.0]]), "diffusion path"),
        (dict(link_areas=[-1.0]), "link_areas"),
        (dict(links=[[3, 4]]), "grid cells share an edge"),
        (
            dict(links=[[5, 160]], removed=np.arange(160) == 5),
            "kept cells",
        ),
        (dict(removed=np.r_[True, np.zeros(159, dtype=bool)]), "pool_hosts"),
    ],
)
def test_bad_pools_are_named(changes, match):
    section = SectionGrid.triangular(4.0, 8)
    n = section.n_cells
    settings = dict(
        pool_hosts=[0],
        pool_volumes=[0.01],
        links=[[0, n]],
        link_areas=[0.3],
        link_distances=[[0.0, 0.01]],
    )
    with pytest.raises(ValueError, match=match):
        PooledSection.attach(section, **{**settings, **changes})
    with pytest.raises(TypeError, match="SectionGrid"):
        PooledSection.attach(PooledSection.attach(section, **settings), **settings)


def test_a_pooled_section_names_every_field_of_its_section(monkeypatch):
    """Built by its constructor (issue 83), not by copying the section's
    ``__dict__``: every field of SectionGrid is set, the lattice's shared
    with the section, the section's cached positions not carried over; a
    field the constructor neither builds nor shares is refused, named."""
    import dataclasses

    from dipy_spinverse.sim import pools

    section = SectionGrid.triangular(4.0, 8, axis=AXIS)
    assert "section_positions" not in vars(section)
    section.section_positions  # noqa: B018 -- cached on the section, not copied
    pooled = _sticks(section, [3, 17, 60])
    fields = [field.name for field in dataclasses.fields(SectionGrid)]
    assert set(fields) <= set(vars(pooled))
    assert "section_positions" not in vars(pooled)
    for name in pools._LATTICE:
        assert getattr(pooled, name) is getattr(section, name)
    assert len(pooled.section_positions) == pooled.n_cells
    monkeypatch.setattr(pools, "_LATTICE", pools._LATTICE[:-1])
    with pytest.raises(TypeError, match=r"unset: \['boundary'\]"):
        _sticks(section, [3])
