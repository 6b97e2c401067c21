"""A voxel mixed from domains that exchange no water (posterior.mixture):
free water and dots against the simulator and closed forms, the mixture's
water weighting, and a tabulated bundle against its own simulations."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from dipy_spinverse import Protocol, simulate
from dipy_spinverse.compartments.blocks.zonal import axial_nodes
from dipy_spinverse.geometry.substrates.bundle import effective_diameter_of
from dipy_spinverse.posterior.mixture import (
    BundleResponse,
    bundle_water,
    dot_signal,
    free_water_signal,
    mixed_signal,
    nodes_for_decay,
    voxel_descriptors,
)
from dipy_spinverse.posterior.prior import section_grid
from dipy_spinverse.posterior.white_matter import WhiteMatterPrior
from dipy_spinverse.sim.waveforms import PGSE, SpinEcho

#: Magnus sub-step multiple wherever two simulations are compared exactly.
SUBSTEPS = 2
#: A coarse, small white-matter prior: cheap sections.
SMALL = WhiteMatterPrior(
    n_axons=(4, 6), mean_diameter=(2.0, 4.0), fibre_fraction=(0.5, 0.7)
)


def _echo_protocol():
    """Two echo times, b = 0 and two shells, directions off every axis."""
    rng = np.random.default_rng(3)
    dirs = rng.normal(size=(3, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    waveforms, bvals, bvecs = [], [], []
    for te in (0.04, 0.07):
        w = SpinEcho(PGSE(small_delta=0.008, big_delta=0.02), echo_time=te)
        for b, d in [(0.0, np.zeros(3))] + [(b, d) for b in (1000, 2500) for d in dirs]:
            waveforms.append(w)
            bvals.append(b)
            bvecs.append(d)
    return Protocol(waveforms=tuple(waveforms), bvals=bvals, bvecs=bvecs)


def test_free_water_is_the_simulators_membrane_free_section():
    """A section with no membrane, one diffusivity and T2, simulated by the
    Bloch-Torrey solver along a tilted axis: exp(-TE/T2) exp(-b D). The
    grid's phase across a cell of width h bends the decay exponent by about
    (q h)^2 / 12 (q = gamma G delta): on 0.125 um cells at b <= 2500 that is
    2e-4 of b D <= 5.3, so 2e-3 relative; b = 0 to the Chebyshev
    truncation (1e-9)."""
    protocol = _echo_protocol()
    grid = section_grid(2.0, 16)
    axis = np.array([0.3, 0.4, 0.866])
    axis /= np.linalg.norm(axis)
    simulated = simulate(
        grid,
        np.full(grid.n_faces, np.inf),
        protocol,
        axes=axis,
        diffusivity=2.1e-3,
        t2=0.05,
    ).numpy()
    want = free_water_signal(protocol, diffusivity=2.1e-3, t2=0.05)
    assert_allclose(simulated, want, rtol=2e-3)
    b0 = protocol.bvals == 0
    assert_allclose(simulated[b0], want[b0], rtol=1e-9)
    assert_allclose(dot_signal(protocol, t2=0.05), np.exp(-protocol.echo_times / 0.05))


def test_a_mixture_weighs_each_domain_by_its_water():
    """At b = 0 the mixture is sum_k W_k exp(-TE/T2_k) / sum_k W_k (1e-15);
    batched voxels mix alike; one domain alone is itself."""
    protocol = _echo_protocol()
    free = free_water_signal(protocol, diffusivity=2e-3, t2=0.08)
    dot = dot_signal(protocol, t2=0.03)
    mixed = mixed_signal(np.stack([free, dot]), [3.0, 1.0])
    b0 = protocol.bvals == 0
    want = (
        3 * np.exp(-protocol.echo_times / 0.08) + np.exp(-protocol.echo_times / 0.03)
    ) / 4
    assert_allclose(mixed[b0], want[b0], atol=1e-15)
    batch = mixed_signal(
        np.stack([np.stack([free, dot])] * 2), [[3.0, 1.0], [1.0, 0.0]]
    )
    assert_allclose(batch[0], mixed)
    assert_allclose(batch[1], free)


@pytest.mark.parametrize(
    "waters, match",
    [([1.0, -1.0], "waters must be >= 0"), ([0.0, 0.0], "positive sum")],
)
def test_bad_waters_are_named(waters, match):
    signals = np.ones((2, 4))
    with pytest.raises(ValueError, match=match):
        mixed_signal(signals, waters)


def test_bad_t2_is_named():
    with pytest.raises(ValueError, match="t2 must be > 0"):
        dot_signal(_echo_protocol(), t2=0.0)


def test_nodes_follow_the_decay_along_the_fibres():
    """More nodes for faster decay, each enough for the tolerance, and a
    decay beyond the largest table named."""
    counts = [nodes_for_decay(rate, tol=1e-4) for rate in (0.1, 3.0, 30.0)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    with pytest.raises(ValueError, match="needs more than"):
        nodes_for_decay(1e5, tol=1e-6)


@pytest.fixture(scope="module")
def tabulated():
    """One small bundle tabulated on a protocol of two shells and b = 0
    (4 azimuths a node)."""
    draw = SMALL.draw(np.random.default_rng(2))
    rng = np.random.default_rng(0)
    g = rng.normal(size=(4, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0, [1500.0] * 4, [4000.0] * 4]
    protocol = Protocol.pgse(
        bvals, np.r_[[[0, 0, 0]], g, g], small_delta=0.01, big_delta=0.03
    )
    response = BundleResponse.tabulate(
        SMALL, draw, protocol, n_azimuths=4, substeps=SUBSTEPS
    )
    return draw, protocol, response


def test_the_table_gives_back_the_bundle_at_its_nodes(tabulated):
    """Without dispersion, along z, at every node of both shells: the mean
    of the bundle's own simulations over the table's azimuths (1e-12: the
    same acquisitions simulated the same way, through the Legendre
    transform and back). The simulator's time steps follow the gradients
    simulated together, so the probe repeats the table's acquisitions."""
    draw, protocol, response = tabulated
    psi = np.pi * np.arange(4) / 4
    bvals, bvecs = [0.0], [np.zeros(3)]
    for b, terms in zip((1500.0, 4000.0), response.coefficients[1:], strict=True):
        for x in axial_nodes(np.count_nonzero(terms)):
            s = np.sqrt(1 - x * x)
            for angle in psi:
                bvals.append(b)
                bvecs.append([s * np.cos(angle), s * np.sin(angle), x])
    probe = Protocol.pgse(bvals, bvecs, small_delta=0.01, big_delta=0.03)
    along_z = draw._replace(axis=np.array([0.0, 0.0, 1.0]))
    direct = SMALL.simulate([along_z], probe, substeps=SUBSTEPS)[0]
    table = response.signals(probe, [0.0, 0.0, 1.0])
    per_node = direct[1:].reshape(-1, 4).mean(1)
    assert_allclose(
        table[1:].reshape(-1, 4), np.repeat(per_node[:, None], 4, 1), atol=1e-12
    )
    assert_allclose(table[0], direct[0], atol=1e-12)


def test_isotropic_dispersion_is_the_powder_average(tabulated):
    """kappa = 0: every direction of a shell reads the same value, e_0 (the
    powder average), whatever the mean axis."""
    _, protocol, response = tabulated
    a = response.signals(protocol, [0.0, 0.0, 1.0], 0.0)
    b = response.signals(protocol, [1.0, 0.0, 0.0], 0.0)
    assert_allclose(a, b, atol=1e-14)
    for shell in (1500.0, 4000.0):
        rows = protocol.bvals == shell
        assert np.ptp(a[rows]) < 1e-14


def test_a_shell_not_tabulated_is_named(tabulated):
    _, protocol, response = tabulated
    other = Protocol.pgse(
        [0, 2000.0], [[0, 0, 0], [1, 0, 0]], small_delta=0.01, big_delta=0.03
    )
    with pytest.raises(ValueError, match="not tabulated at b = 2000"):
        response.signals(other, [0.0, 0.0, 1.0])


def test_a_dispersed_bundle_is_the_average_of_rotated_simulations():
    """The table dispersed in zonal harmonics (Watson, kappa 4, mean axis
    off every axis) against the Watson average of explicitly rotated
    bundles: for each of 8 x 12 axes n of a product rule over the sphere
    (Gauss-Legendre in n . mu, uniform in azimuth), the bundle simulated
    with the gradient at its cosine to n and the section turned in-plane
    through the table's 4 azimuths. One shell (b = 4000), so that both
    simulations take the same time steps: what differs is the product
    rule's error, 5e-6 here (1e-7 with 10 x 16 axes); 2e-5 allowed."""
    kappa, n_t, n_phi, n_azimuths = 4.0, 8, 12, 4
    draw = SMALL.draw(np.random.default_rng(2))
    rng = np.random.default_rng(0)
    g = rng.normal(size=(2, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    protocol = Protocol.pgse(
        [0.0, 4000.0, 4000.0], np.r_[[[0, 0, 0]], g], small_delta=0.01, big_delta=0.03
    )
    response = BundleResponse.tabulate(
        SMALL, draw, protocol, n_azimuths=n_azimuths, substeps=SUBSTEPS
    )
    mu = np.array([0.2, 0.3, 0.93])
    mu /= np.linalg.norm(mu)
    t, w = np.polynomial.legendre.leggauss(n_t)
    t, w = (t + 1) / 2, w / 2
    phi = 2 * np.pi * np.arange(n_phi) / n_phi
    e1 = np.cross(mu, [1.0, 0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(mu, e1)
    axes = [
        tk * mu + np.sqrt(1 - tk**2) * (np.cos(p) * e1 + np.sin(p) * e2)
        for tk in t
        for p in phi
    ]
    weights = np.repeat(w * np.exp(kappa * (t**2 - 1)), n_phi)
    weights /= weights.sum()
    psi = np.pi * np.arange(n_azimuths) / n_azimuths
    bvecs = []
    for direction in g:
        for n in axes:
            x = abs(direction @ n)
            s = np.sqrt(1 - x * x)
            bvecs += [[s * np.cos(a), s * np.sin(a), x] for a in psi]
    rotated = Protocol.pgse(
        np.full(len(bvecs), 4000.0), bvecs, small_delta=0.01, big_delta=0.03
    )
    along_z = draw._replace(axis=np.array([0.0, 0.0, 1.0]))
    raw = SMALL.simulate([along_z], rotated, substeps=SUBSTEPS)[0]
    want = raw.reshape(len(g), len(axes), n_azimuths).mean(2) @ weights
    got = response.signals(protocol, mu, kappa)[1:]
    assert_allclose(got, want, atol=2e-5)


def test_a_voxel_of_one_bundle_is_described_as_the_bundle():
    """One bundle filling the voxel: the prior's own descriptors of it
    (1e-12), no free water, no dots."""
    draw = SMALL.draw(np.random.default_rng(4))
    got = voxel_descriptors([draw], [1.0])
    for name in ("effective_diameter", "mean_diameter", "intra_axonal_fraction"):
        assert_allclose(got[name], draw.descriptors[name], rtol=1e-12)
    for name in ("myelin_fraction", "g_ratio", "exchange_time"):
        assert_allclose(got[name], draw.descriptors[name], rtol=1e-12)
    assert got["free_water_fraction"] == 0 and got["dot_fraction"] == 0


def test_several_bundles_pool_their_axons():
    """Two bundles whose shares make the first count twice per unit area:
    d_eff and the mean diameter over the first's axons twice and the
    second's once (effective_diameter_of, 1e-12); a third of the voxel free
    water and dots, by their water (myelin's density below 1)."""
    a, b = (SMALL.draw(np.random.default_rng(s)) for s in (5, 6))
    area_a, area_b = a.bundle.grid.volume, b.bundle.grid.volume
    # v_a / A_a = 2 v_b / A_b, and v_a + v_b = 2 / 3.
    v_b = (2 / 3) / (1 + 2 * area_a / area_b)
    v_a = 2 / 3 - v_b
    got = voxel_descriptors([a, b], [v_a, v_b], free_water=0.2, dot=2 / 15)
    pooled = np.concatenate([a.bundle.diameters] * 2 + [b.bundle.diameters])
    assert_allclose(
        got["effective_diameter"], effective_diameter_of(pooled), rtol=1e-12
    )
    assert_allclose(got["mean_diameter"], pooled.mean(), rtol=1e-12)
    water = v_a * bundle_water(a) + v_b * bundle_water(b) + 0.2 + 2 / 15
    assert_allclose(got["free_water_fraction"], 0.2 / water, rtol=1e-12)
    assert bundle_water(a) < 1


def test_bad_shares_are_named():
    draw = SMALL.draw(np.random.default_rng(4))
    with pytest.raises(ValueError, match="sum to 1"):
        voxel_descriptors([draw], [0.5])
    with pytest.raises(ValueError, match="one share >= 0 per bundle"):
        voxel_descriptors([draw], [0.5, 0.5])
